"""Verified teacher traces: a ``distil generate`` folder joined with its problems and a verifier.

Trace collection is ``distil generate`` (a local teacher today, an endpoint through the same
record format later) on a problem file used as the prompt file, with
``generation.num_return_sequences`` samples per problem at a sampling temperature and, to keep
the teacher's per-token log-probabilities, ``generation.logprobs: true``. :func:`verify_traces`
then reads the finished folder (each shard checked against its manifest sha256), looks every
record's problem up by ``id``, runs the verifier and writes one JSONL line per trace::

    {"id", "sample", "prompt", "completion", "answer", "kind", "size",
     "correct": bool, "format_ok": bool, "token_ids"?, "token_logprobs"?}

Correct and incorrect traces are both kept (REDI trains on both). The file is itself
prompt/completion data, so ``lm_kd``/``lm_pretrain`` train on it as is (SFT on all traces);
:func:`write_traces` writes subsets (rejection-sampling SFT keeps ``correct`` ones).
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from distil.config.lm import LMDataFormat
from distil.data.lm import (
    IGNORE_INDEX,
    LMData,
    LMDataOptions,
    build_lm_dataset,
    collate_lm_batch,
    pad_token_id_for,
)
from distil.data.reasoning import answer_format_ok, check_answer, read_problems
from distil.errors import DistilError
from distil.storage import atomic_write_bytes

__all__ = [
    "Completions",
    "TraceExamples",
    "TraceFilter",
    "TraceSummary",
    "pass_rates",
    "read_traces",
    "redi_pairs",
    "select_traces",
    "trace_examples",
    "training_records",
    "verify_traces",
    "write_traces",
]

if TYPE_CHECKING:
    import datasets

Checker = Callable[[Mapping[str, Any], str], bool]
_PROBLEM_FIELDS = ("id", "prompt", "answer", "kind", "size")
_TEACHER_FIELDS = ("token_ids", "token_logprobs")


class Completions(str, Enum):
    """What a student trains on for each problem."""

    GOLD = "gold"  # the problem's own worked solution: no teacher involved
    ALL_TRACES = "all_traces"  # every teacher trace (SFT on all traces)
    CORRECT_TRACES = "correct_traces"  # verified-correct traces (rejection sampling)


def training_records(
    problems: Sequence[Mapping[str, Any]],
    traces: Sequence[Mapping[str, Any]] | None,
    keep: Iterable[Any],
    completions: Completions | str,
) -> list[Mapping[str, Any]]:
    """The sequences of the kept problems: their gold solutions, or their (correct) traces.

    Raises:
        DistilError: If traces are asked for but none were given.
    """
    completions, chosen = Completions(completions), set(keep)
    if completions is Completions.GOLD:
        return [p for p in problems if p["id"] in chosen]
    if traces is None:
        raise DistilError(f"completions={completions.value} needs the verified trace file")
    every = completions is Completions.ALL_TRACES
    return [t for t in traces if t["id"] in chosen and (every or t["correct"])]


class TraceFilter(str, Enum):
    """Which traces to keep: all of them (SFT on every trace), the verified-correct ones
    (rejection sampling) or the incorrect ones (REDI's negatives)."""

    ALL = "all"
    CORRECT = "correct"
    INCORRECT = "incorrect"


@dataclass(frozen=True)
class TraceSummary:
    """What :func:`verify_traces` wrote: counts, and each problem's pass rate (correct/samples)."""

    path: Path
    traces: int
    correct: int
    format_errors: int
    problems: int
    pass_rates: dict[int | str, float]


def verify_traces(
    generated: Path | str,
    problems: Path | str | Sequence[Mapping[str, Any]],
    output: Path | str,
    *,
    checker: Checker = check_answer,
    format_checker: Checker = answer_format_ok,
) -> TraceSummary:
    """Verify every completion of a finished ``distil generate`` folder and write the traces.

    Args:
        generated: The ``distil generate`` output folder.
        problems: The problem file (or records) the prompts came from; matched by ``id``.
        output: The JSONL file to write (atomically).
        checker: The verifier ``fn(record, completion) -> bool``.
        format_checker: Whether the answer line is well formed (counted separately).

    Raises:
        DistilError: If ``generated`` is not a finished ``distil generate`` folder, a record's
            id is not among the problems, or its prompt differs from the problem's.
    """
    from distil.data.generated import generated_shard_files

    files = generated_shard_files(Path(generated))
    if files is None:
        raise DistilError(
            f"{generated} is not a `distil generate` output folder (no generate manifest.json)"
        )
    records = read_problems(problems) if isinstance(problems, Path | str) else list(problems)
    by_id = {r["id"]: r for r in records}
    lines: list[str] = []
    correct = format_errors = 0
    verdicts: dict[int | str, list[bool]] = defaultdict(list)
    for file in files:
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
            generation = json.loads(line)
            problem = by_id.get(generation["id"])
            if problem is None:
                raise DistilError(
                    f"{file}:{number}: id {generation['id']!r} is not in the problem set; pass the problem "
                    "file the prompts came from"
                )
            if problem["prompt"] != generation["prompt"]:
                raise DistilError(
                    f"{file}:{number}: the prompt of id {generation['id']!r} differs from the problem's; "
                    "the folder was generated from another problem file"
                )
            ok = bool(checker(problem, generation["completion"]))
            well_formed = bool(format_checker(problem, generation["completion"]))
            trace = {k: problem[k] for k in _PROBLEM_FIELDS if k in problem}
            trace |= {
                "sample": generation.get("sample", 0),
                "completion": generation["completion"],
                "correct": ok,
                "format_ok": well_formed,
            }
            trace |= {k: generation[k] for k in _TEACHER_FIELDS if k in generation}
            lines.append(json.dumps(trace, ensure_ascii=False) + "\n")
            correct += ok
            format_errors += not well_formed
            verdicts[generation["id"]].append(ok)
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, "".join(lines).encode("utf-8"))
    rates = {i: sum(v) / len(v) for i, v in verdicts.items()}
    return TraceSummary(path, len(lines), correct, format_errors, len(rates), rates)


def read_traces(path: Path | str) -> list[dict[str, Any]]:
    """The traces of a file written by :func:`verify_traces` or :func:`write_traces`.

    Raises:
        DistilError: If the file is missing or a line lacks its verdict.
    """
    path = Path(path)
    if not path.is_file():
        raise DistilError(f"trace file {path} does not exist; write it with verify_traces")
    traces = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            trace = json.loads(line)
            if not isinstance(trace, dict) or not isinstance(trace.get("correct"), bool):
                raise DistilError(f"{path}:{number}: a trace needs a bool 'correct' verdict")
            traces.append(trace)
    return traces


def select_traces(
    traces: Iterable[Mapping[str, Any]], keep: TraceFilter | str = TraceFilter.ALL
) -> list[Mapping[str, Any]]:
    """The traces ``keep`` names, in order."""
    keep = TraceFilter(keep)
    if keep is TraceFilter.ALL:
        return list(traces)
    wanted = keep is TraceFilter.CORRECT
    return [t for t in traces if t["correct"] is wanted]


def write_traces(traces: Iterable[Mapping[str, Any]], path: Path | str) -> Path:
    """Write traces as JSONL (prompt/completion data plus their fields), atomically.

    Raises:
        DistilError: If there is no trace to write (training on it would fail later).
    """
    lines = [json.dumps(dict(t), ensure_ascii=False) + "\n" for t in traces]
    if not lines:
        raise DistilError(f"no traces to write to {path}; the filter or the selection kept none")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, "".join(lines).encode("utf-8"))
    return path


def pass_rates(traces: Iterable[Mapping[str, Any]]) -> dict[int | str, float]:
    """Each problem's share of correct traces (the teacher's pass@1 estimate on it)."""
    verdicts: dict[int | str, list[bool]] = defaultdict(list)
    for t in traces:
        verdicts[t["id"]].append(bool(t["correct"]))
    return {i: sum(v) / len(v) for i, v in verdicts.items()}


def redi_pairs(
    traces: Iterable[Mapping[str, Any]], *, seed: int = 0, max_pairs_per_problem: int | None = None
) -> list[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    """(correct, incorrect) trace pairs of the same problem, for REDI's second stage.

    A problem with ``p`` correct and ``q`` incorrect traces gives ``min(p, q)`` pairs (at most
    ``max_pairs_per_problem``), each trace used once, matched after a seeded shuffle; problems
    the teacher always or never solves give none. The paper trains on such pairs (one correct
    and one incorrect trace of a problem per example); how several traces of one problem are
    matched is not specified there, so this pairing is our choice.

    Returns:
        The pairs, in problem order of first appearance.
    """
    rng = random.Random(seed)
    grouped: dict[int | str, tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]] = {}
    for t in traces:
        grouped.setdefault(t["id"], ([], []))[0 if t["correct"] else 1].append(t)
    pairs: list[tuple[Mapping[str, Any], Mapping[str, Any]]] = []
    for positives, negatives in grouped.values():
        positives, negatives = positives[:], negatives[:]
        rng.shuffle(positives)
        rng.shuffle(negatives)
        count = min(len(positives), len(negatives))
        if max_pairs_per_problem is not None:
            count = min(count, max_pairs_per_problem)
        pairs.extend(zip(positives[:count], negatives[:count], strict=True))
    return pairs


@dataclass
class TraceExamples:
    """Tokenized traces (or gold solutions) ready for a training loop.

    Attributes:
        dataset: ``example_id`` (the row), ``input_ids`` and ``labels`` (prompt masked,
            completion + EOS supervised), as ``distil.data.lm`` builds them.
        targets_per_example: ``(N,)`` supervised next-token targets of each example (the
            normaliser of token-level losses over an accumulation window).
        is_positive: ``(N,)`` the verifier's verdict (True for gold solutions).
        problem_ids: The problem each example belongs to.
        pad_token_id: What collation pads with.
    """

    dataset: datasets.Dataset
    targets_per_example: np.ndarray
    is_positive: np.ndarray
    problem_ids: list[int | str]
    pad_token_id: int

    def __len__(self) -> int:
        return len(self.dataset)

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The examples at ``indices``, right-padded (``input_ids``, ``attention_mask``,
        ``labels``, ``example_id``; int64)."""
        cols = self.dataset[list(indices)]
        rows = [
            {"example_id": e, "input_ids": i, "labels": lab}
            for e, i, lab in zip(cols["example_id"], cols["input_ids"], cols["labels"], strict=True)
        ]
        return collate_lm_batch(rows, pad_token_id=self.pad_token_id)

    def as_lm_data(self) -> LMData:
        """The same examples as ``LMData`` (its held-out split: the first 8 examples, unused by
        pass@k evaluation) for loops written against ``distil.data.lm``."""
        held = self.dataset.select(range(min(8, len(self.dataset))))
        return LMData(self.dataset, held, self.targets_per_example, self.pad_token_id)


def trace_examples(
    records: Sequence[Mapping[str, Any]], tokenizer: Any, *, max_length: int
) -> TraceExamples:
    """Tokenize traces or problems (``prompt`` + ``completion``) as prompt/completion examples.

    A record's ``correct`` field is its verdict; a record without one (a gold solution) counts
    as correct.

    Raises:
        DistilError: If there is no record, or one is longer than ``max_length`` tokens.
    """
    import datasets

    if not records:
        raise DistilError("no traces to train on: the filter or the selection kept none")
    rows = [
        {"example_id": i, "prompt": r["prompt"], "completion": r["completion"]}
        for i, r in enumerate(records)
    ]
    options = LMDataOptions(data_format=LMDataFormat.PROMPT_COMPLETION, max_length=max_length)
    dataset = build_lm_dataset(datasets.Dataset.from_list(rows), tokenizer, options)
    targets = np.asarray(
        [sum(1 for t in labels[1:] if t != IGNORE_INDEX) for labels in dataset["labels"]],
        dtype=np.int64,
    )
    return TraceExamples(
        dataset=dataset,
        targets_per_example=targets,
        is_positive=np.asarray([bool(r.get("correct", True)) for r in records], dtype=bool),
        problem_ids=[r["id"] for r in records],
        pad_token_id=pad_token_id_for(tokenizer),
    )
