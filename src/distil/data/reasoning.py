"""Procedurally generated reasoning problems with worked solutions and a checkable final answer.

A miniature of reasoning distillation that runs on a CPU: every problem needs several steps,
every step is written out in the worked solution, and the final answer sits on one line in a
fixed format (``#### 5663``) that :func:`check_answer` verifies. Five task kinds, each with one
difficulty knob, ``size``:

================  =========================================  ===================================
kind              size                                       one step of the worked solution
================  =========================================  ===================================
addition          digits of the longer operand               ``7+9+0=16|663`` (column, carry in,
                                                             sum, the result so far)
subtraction       digits of the larger operand               ``17-9-0=8|813`` (a borrow shows as 1x)
multiplication    digits of the multi-digit factor (× 2..9)  ``7*7+2=51|166``
expression        operations (+, -, * with parentheses)      ``=14-5`` (one operation reduced)
sorting           list length (values 0..99)                 ``12 45 | 78`` (sorted | remaining)
================  =========================================  ===================================

Each step copies the previous line and changes one small, local thing, which a small
transformer can learn in minutes; the number of steps grows with ``size``, so a held-out split
with larger sizes than training measures length generalisation.

Records (one JSON object a line) are what ``lm_pretrain``/``lm_kd`` read with
``data.format=prompt_completion`` and what ``distil generate`` reads as a prompt file:
``{"id", "prompt", "completion", "answer", "kind", "size", "text"}``; ``completion`` is the gold
worked solution, ``text`` is prompt + completion (what ``lm_pretrain`` trains its tokenizer on).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from distil.config.base import StrictModel
from distil.errors import DistilError
from distil.storage import atomic_write_bytes

__all__ = [
    "ANSWER_MARKER",
    "DEFAULT_HARDER_SIZES",
    "DEFAULT_TRAIN_SIZES",
    "MAX_SIZE",
    "SPLITS",
    "SPLIT_ID_OFFSET",
    "Problem",
    "ReasoningSplits",
    "SizeRange",
    "TaskKind",
    "answer_format_ok",
    "check_answer",
    "extract_answer",
    "generate_problem",
    "generate_problems",
    "read_problems",
    "write_reasoning_splits",
    "write_reasoning_tokenizer",
]

ANSWER_MARKER = "#### "
"""The final answer is the rest of the first line that starts with this marker (GSM8K style)."""

_INT = re.compile(r"-?\d+")
_INT_LIST = re.compile(r"\d+( \d+)*")


class TaskKind(str, Enum):
    """The built-in problem families (see the module docstring for each one's steps)."""

    ADDITION = "addition"
    SUBTRACTION = "subtraction"
    MULTIPLICATION = "multiplication"
    EXPRESSION = "expression"
    SORTING = "sorting"


MAX_SIZE: dict[TaskKind, int] = {
    TaskKind.ADDITION: 12,
    TaskKind.SUBTRACTION: 12,
    TaskKind.MULTIPLICATION: 12,
    TaskKind.EXPRESSION: 8,
    TaskKind.SORTING: 12,
}
"""Largest ``size`` per kind (the worked solution grows about quadratically with it)."""


class SizeRange(StrictModel):
    """Sizes drawn uniformly from ``[min_size, max_size]``."""

    min_size: int = Field(ge=1)
    max_size: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> SizeRange:
        if self.min_size > self.max_size:
            raise ValueError(f"min_size={self.min_size} exceeds max_size={self.max_size}")
        return self


DEFAULT_TRAIN_SIZES: dict[TaskKind, SizeRange] = {
    TaskKind.ADDITION: SizeRange(min_size=1, max_size=4),
    TaskKind.SUBTRACTION: SizeRange(min_size=1, max_size=4),
    TaskKind.MULTIPLICATION: SizeRange(min_size=1, max_size=3),
    TaskKind.EXPRESSION: SizeRange(min_size=1, max_size=3),
    TaskKind.SORTING: SizeRange(min_size=2, max_size=4),
}
"""Training difficulty: short enough that a ~1M-parameter model learns it in minutes."""

DEFAULT_HARDER_SIZES: dict[TaskKind, SizeRange] = {
    TaskKind.ADDITION: SizeRange(min_size=5, max_size=5),
    TaskKind.SUBTRACTION: SizeRange(min_size=5, max_size=5),
    TaskKind.MULTIPLICATION: SizeRange(min_size=4, max_size=4),
    TaskKind.EXPRESSION: SizeRange(min_size=4, max_size=4),
    TaskKind.SORTING: SizeRange(min_size=5, max_size=5),
}
"""The harder split: one step beyond the training range (length generalisation)."""


@dataclass(frozen=True)
class Problem:
    """One problem: ``prompt`` is what the model continues, ``solution`` the gold worked
    solution (steps, then the answer line), ``answer`` the final answer as written."""

    kind: TaskKind
    size: int
    prompt: str
    solution: str
    answer: str

    def record(self, problem_id: int) -> dict[str, Any]:
        """The JSONL record (prompt/completion format, plus what the checker reads)."""
        return {
            "id": problem_id,
            "prompt": self.prompt,
            "completion": self.solution,
            "answer": self.answer,
            "kind": self.kind.value,
            "size": self.size,
            "text": self.prompt + self.solution,
        }


def _prompt(question: str) -> str:
    return f"Q: {question}\n"


def _solution(steps: Sequence[str], answer: str) -> str:
    return "".join(f"{step}\n" for step in steps) + ANSWER_MARKER + answer


def _number(rng: random.Random, digits: int) -> int:
    """A number with exactly ``digits`` digits (0..9 for one digit)."""
    return rng.randint(0, 9) if digits == 1 else rng.randint(10 ** (digits - 1), 10**digits - 1)


def _digit(value: int, position: int) -> int:
    return (value // 10**position) % 10


def _addition(rng: random.Random, size: int) -> Problem:
    a = _number(rng, size)
    b = _number(rng, rng.randint(1, size))
    if rng.random() < 0.5:
        a, b = b, a
    steps, result, carry = [], "", 0
    columns = max(len(str(a)), len(str(b)))
    for i in range(columns):
        da, db = _digit(a, i), _digit(b, i)
        total = da + db + carry
        # the last column writes its whole sum, every other column its units digit
        result = (str(total) if i == columns - 1 else str(total % 10)) + result
        steps.append(f"{da}+{db}+{carry}={total}|{result}")
        carry = total // 10
    return Problem(
        TaskKind.ADDITION, size, _prompt(f"{a}+{b}"), _solution(steps, str(a + b)), str(a + b)
    )


def _subtraction(rng: random.Random, size: int) -> Problem:
    a = _number(rng, size)
    b = rng.randint(0, a)
    steps, result, borrow = [], "", 0
    for i in range(len(str(a))):
        da, db = _digit(a, i), _digit(b, i)
        owed = 1 if da - db - borrow < 0 else 0
        top = da + 10 * owed  # a borrow shows as a leading 1: 17-9-0=8
        result = str(top - db - borrow) + result
        steps.append(f"{top}-{db}-{borrow}={top - db - borrow}|{result}")
        borrow = owed
    return Problem(
        TaskKind.SUBTRACTION, size, _prompt(f"{a}-{b}"), _solution(steps, str(a - b)), str(a - b)
    )


def _multiplication(rng: random.Random, size: int) -> Problem:
    a, d = _number(rng, size), rng.randint(2, 9)
    steps, result, carry = [], "", 0
    digits = len(str(a))
    for i in range(digits):
        da = _digit(a, i)
        total = da * d + carry
        result = (str(total) if i == digits - 1 else str(total % 10)) + result
        steps.append(f"{da}*{d}+{carry}={total}|{result}")
        carry = total // 10
    return Problem(
        TaskKind.MULTIPLICATION, size, _prompt(f"{a}*{d}"), _solution(steps, str(a * d)), str(a * d)
    )


# An expression is a flat token list: ints, "+", "-", "*", "(", ")".
_Token = int | str


def _render(tokens: Sequence[_Token]) -> str:
    return "".join(str(t) for t in tokens)


def _reduce_once(tokens: list[_Token]) -> list[_Token] | None:
    """One evaluation step: inside the first innermost parentheses if there are any (dropping
    them once one value is left), else the first ``*``, else the first ``+``/``-``. None when
    the step leaves 0..99 or multiplies anything but two single digits: every step is then a
    fact a small model can learn."""
    if "(" in tokens:
        close = tokens.index(")")
        open_ = max(i for i in range(close) if tokens[i] == "(")
        reduced = _reduce_once(tokens[open_ + 1 : close])
        if reduced is None:
            return None
        inner = ["(", *reduced, ")"] if len(reduced) > 1 else reduced
        return [*tokens[:open_], *inner, *tokens[close + 1 :]]
    ops = [i for i, t in enumerate(tokens) if t == "*"] or [
        i for i, t in enumerate(tokens) if t in ("+", "-")
    ]
    i = ops[0]
    left, op, right = tokens[i - 1], tokens[i], tokens[i + 1]
    assert isinstance(left, int) and isinstance(right, int)
    if op == "*" and (left > 9 or right > 9):
        return None
    value = left * right if op == "*" else left + right if op == "+" else left - right
    if not 0 <= value <= 99:
        return None
    return [*tokens[: i - 1], value, *tokens[i + 2 :]]


def _draw_expression(rng: random.Random, size: int) -> list[_Token]:
    tokens: list[_Token] = [rng.randint(1, 9)]
    for _ in range(size):
        tokens += [rng.choice("+-*"), rng.randint(1, 9)]
    if size >= 2 and rng.random() < 0.5:  # parentheses around a run of two or more operands
        first = rng.randint(0, size - 1)
        last = rng.randint(first + 1, size)
        if (first, last) != (0, size):
            start, stop = 2 * first, 2 * last + 1
            tokens = [*tokens[:start], "(", *tokens[start:stop], ")", *tokens[stop:]]
    return tokens


def _expression(rng: random.Random, size: int) -> Problem:
    for _ in range(10_000):  # rejection sampling; a few tries on average
        tokens = _draw_expression(rng, size)
        steps: list[str] = []
        current: list[_Token] | None = tokens
        while current is not None and len(current) > 1:
            current = _reduce_once(current)
            if current is not None:
                steps.append("=" + _render(current))
        if current is not None:
            answer = str(current[0])
            return Problem(
                TaskKind.EXPRESSION,
                size,
                _prompt(_render(tokens)),
                _solution(steps, answer),
                answer,
            )
    raise DistilError(f"no expression with {size} operations stays in 0..99")  # pragma: no cover


def _sorting(rng: random.Random, size: int) -> Problem:
    values = [rng.randint(0, 99) for _ in range(size)]
    done: list[int] = []
    remaining = list(values)
    steps = []
    while remaining:
        smallest = min(remaining)
        remaining.remove(smallest)
        done.append(smallest)
        steps.append(f"{' '.join(map(str, done))} | {' '.join(map(str, remaining))}".rstrip())
    answer = " ".join(map(str, done))
    return Problem(
        TaskKind.SORTING,
        size,
        _prompt("sort " + " ".join(map(str, values))),
        _solution(steps, answer),
        answer,
    )


_GENERATORS: dict[TaskKind, Callable[[random.Random, int], Problem]] = {
    TaskKind.ADDITION: _addition,
    TaskKind.SUBTRACTION: _subtraction,
    TaskKind.MULTIPLICATION: _multiplication,
    TaskKind.EXPRESSION: _expression,
    TaskKind.SORTING: _sorting,
}


def generate_problem(kind: TaskKind | str, size: int, rng: random.Random) -> Problem:
    """One problem of ``kind`` at difficulty ``size``, drawn with ``rng``.

    Raises:
        DistilError: If ``size`` is outside ``1..MAX_SIZE[kind]`` (2.. for sorting).
    """
    kind = TaskKind(kind)
    low = 2 if kind is TaskKind.SORTING else 1
    if not low <= size <= MAX_SIZE[kind]:
        raise DistilError(f"{kind.value} problems take size {low}..{MAX_SIZE[kind]}, got {size}")
    return _GENERATORS[kind](rng, size)


def generate_problems(
    kinds: Sequence[TaskKind | str],
    sizes: dict[TaskKind, SizeRange],
    count: int,
    rng: random.Random,
    *,
    exclude: Iterable[str] = (),
) -> list[Problem]:
    """``count`` problems, kinds in turn (balanced), sizes uniform in each kind's range.

    Args:
        kinds: Task kinds, cycled through in order.
        sizes: The size range of every kind in ``kinds``.
        count: Problems to draw.
        rng: The only source of randomness (the result is a function of its state).
        exclude: Prompts never to return (another split's), so splits stay disjoint.

    Raises:
        DistilError: If a kind has no size range, or too few distinct problems exist to draw
            ``count`` outside ``exclude`` (e.g. one-digit additions).
    """
    order = [TaskKind(k) for k in kinds]
    missing = [k.value for k in order if k not in sizes]
    if missing:
        raise DistilError(f"no size range for task kind(s) {missing}")
    banned = set(exclude)
    problems: list[Problem] = []
    for i in range(count):
        kind = order[i % len(order)]
        for _ in range(1000):
            size = rng.randint(sizes[kind].min_size, sizes[kind].max_size)
            problem = generate_problem(kind, size, rng)
            if problem.prompt not in banned:
                break
        else:
            raise DistilError(
                f"could not draw a {kind.value} problem outside the excluded ones in 1000 tries; "
                "widen its size range or ask for fewer problems"
            )
        problems.append(problem)
    return problems


def extract_answer(completion: str) -> str | None:
    """The text after the first ``#### `` at the start of a line, up to the end of that line
    (stripped); None when no line starts with the marker."""
    for line in completion.split("\n"):
        if line.startswith(ANSWER_MARKER):
            return line[len(ANSWER_MARKER) :].strip()
    return None


def _kind_of(record: Mapping[str, Any]) -> TaskKind | None:
    kind = record.get("kind")
    return TaskKind(kind) if kind in TaskKind._value2member_map_ else None


def answer_format_ok(record: Mapping[str, Any], completion: str) -> bool:
    """Whether ``completion`` has an answer line in the kind's format: an integer, or for
    sorting integers separated by single spaces (any non-empty answer for unknown kinds).
    A completion cut before its answer line (``max_new_tokens``) is a format error."""
    answer = extract_answer(completion)
    if not answer:
        return False
    kind = _kind_of(record)
    if kind is None:
        return True
    pattern = _INT_LIST if kind is TaskKind.SORTING else _INT
    return pattern.fullmatch(answer) is not None


def check_answer(record: Mapping[str, Any], completion: str) -> bool:
    """The verifier: does ``completion``'s final answer equal ``record["answer"]``?

    The signature ``fn(record, completion) -> bool`` is the one a verifier given as a Python
    import path has (``distil.data.reasoning:check_answer``). Integers compare by value (``007``
    equals ``7``); other answers compare with runs of whitespace collapsed. A completion with a
    badly formatted answer is wrong (count those with :func:`answer_format_ok`).

    Raises:
        DistilError: If the record has no string ``answer``.
    """
    expected = record.get("answer")
    if not isinstance(expected, str):
        raise DistilError(f"record {record.get('id')!r} has no string 'answer' to check against")
    if not answer_format_ok(record, completion):
        return False
    answer = extract_answer(completion)
    assert answer is not None
    if _INT.fullmatch(answer) and _INT.fullmatch(expected.strip()):
        return int(answer) == int(expected)
    return " ".join(answer.split()) == " ".join(expected.split())


SPLITS = ("train", "pool", "held_out", "harder")
"""``train``: the teacher's gold worked solutions; ``pool``: distillation problems (the teacher
writes traces for them; their gold solutions are the no-teacher baseline); ``held_out``: same
difficulty as training; ``harder``: larger sizes. All four are disjoint by prompt."""

SPLIT_ID_OFFSET = {"train": 0, "pool": 1_000_000, "held_out": 2_000_000, "harder": 3_000_000}
"""Problem ids are unique across splits: a split's ids start at its offset."""


class ReasoningSplits(StrictModel):
    """What :func:`write_reasoning_splits` writes; the files are a function of these fields."""

    kinds: list[TaskKind] = Field(
        default_factory=lambda: [TaskKind.ADDITION, TaskKind.SUBTRACTION], min_length=1
    )
    train_examples: int = Field(default=20_000, ge=1, description="teacher training problems")
    pool_examples: int = Field(default=2_000, ge=0, description="distillation prompts")
    held_out_examples: int = Field(default=500, ge=0)
    harder_examples: int = Field(default=500, ge=0)
    train_sizes: dict[TaskKind, SizeRange] = Field(
        default_factory=lambda: dict(DEFAULT_TRAIN_SIZES)
    )
    harder_sizes: dict[TaskKind, SizeRange] = Field(
        default_factory=lambda: dict(DEFAULT_HARDER_SIZES)
    )
    harder_in_train: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="share of train and pool problems drawn at the harder sizes (0: the harder "
        "split is pure extrapolation)",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _sizes_known(self) -> ReasoningSplits:
        for name, sizes in (("train_sizes", self.train_sizes), ("harder_sizes", self.harder_sizes)):
            for kind in self.kinds:
                if kind not in sizes:
                    raise ValueError(f"{name} has no range for {kind.value}")
                low = 2 if kind is TaskKind.SORTING else 1
                if sizes[kind].min_size < low or sizes[kind].max_size > MAX_SIZE[kind]:
                    raise ValueError(
                        f"{name}.{kind.value}: sizes must lie in {low}..{MAX_SIZE[kind]}"
                    )
        return self


def _split_rng(seed: int, split: str) -> random.Random:
    digest = hashlib.sha256(f"distil-reasoning:{seed}:{split}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def write_reasoning_splits(spec: ReasoningSplits, out_dir: Path | str) -> dict[str, Path]:
    """Write ``train``, ``pool``, ``held_out`` and ``harder`` JSONL files and ``splits.json``.

    Deterministic: the same spec writes the same bytes. Held-out and harder problems are drawn
    first, then the pool and the training set avoid their prompts (so held-out accuracy is
    never measured on a memorised problem). A share ``harder_in_train`` of the pool and
    training problems is drawn at the harder sizes (other problems than the harder split's):
    small transformers do not extrapolate to more digits than they were trained on (measured
    here: about 1 % pass@1 one digit beyond, see ``docs/reasoning.md``), so by default the
    harder split is rare in training rather than absent. Pass the files, not the folder, as
    data: the folder also holds ``splits.json``.

    Returns:
        The path of each split's file, by split name.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {
        "held_out": spec.held_out_examples,
        "harder": spec.harder_examples,
        "pool": spec.pool_examples,
        "train": spec.train_examples,
    }
    sizes = {"held_out": spec.train_sizes, "harder": spec.harder_sizes}
    seen: set[str] = set()
    paths: dict[str, Path] = {}
    for split in ("held_out", "harder", "pool", "train"):
        rng = _split_rng(spec.seed, split)
        rare = round(counts[split] * spec.harder_in_train) if split in ("pool", "train") else 0
        problems = generate_problems(
            spec.kinds, sizes.get(split, spec.train_sizes), counts[split] - rare, rng, exclude=seen
        )
        if rare:
            problems += generate_problems(spec.kinds, spec.harder_sizes, rare, rng, exclude=seen)
            rng.shuffle(problems)
        if split != "train":  # the training set may repeat a problem; other splits never hold one
            seen.update(p.prompt for p in problems)
        lines = [
            json.dumps(p.record(SPLIT_ID_OFFSET[split] + i), ensure_ascii=False) + "\n"
            for i, p in enumerate(problems)
        ]
        paths[split] = out / f"{split}.jsonl"
        atomic_write_bytes(paths[split], "".join(lines).encode("utf-8"))
    summary = {"spec": spec.model_dump(mode="json"), "counts": counts}
    atomic_write_bytes(out / "splits.json", json.dumps(summary, indent=2).encode("utf-8"))
    return {split: paths[split] for split in SPLITS}


def read_problems(path: Path | str) -> list[dict[str, Any]]:
    """The records of a split file, in order.

    Raises:
        DistilError: If the file is missing or a line is not a JSON object with a string answer.
    """
    path = Path(path)
    if not path.is_file():
        raise DistilError(
            f"problem file {path} does not exist; write it with write_reasoning_splits"
        )
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get("answer"), str):
            raise DistilError(f"{path}:{number}: a problem record needs a string 'answer'")
        records.append(record)
    return records


def write_reasoning_tokenizer(out_dir: Path | str, *, model_max_length: int = 256) -> Path:
    """A byte-level tokenizer without merges: one token per character, every digit its own token.

    BPE merges digits into tokens like ``17`` depending on their neighbours, so the same column
    sum would be spelled differently from line to line and arithmetic becomes memorising token
    facts; a merge-free byte-level tokenizer keeps every step digit by digit. It has the house
    special tokens (EOS, a dedicated pad, the chat roles): 256 + 5 = 261 ids. Pass the folder to
    ``lm_pretrain`` as ``tokenizer.path``.
    """
    from distil.data.corpus import CHAT_ROLE_TOKENS, train_bpe_tokenizer_from_texts

    alphabet_and_specials = 256 + 2 + len(CHAT_ROLE_TOKENS)  # no room left for a merge
    # the texts only matter for merges, and there are none: one document suffices
    return train_bpe_tokenizer_from_texts(
        ["0123456789"], Path(out_dir), alphabet_and_specials, model_max_length=model_max_length
    )
