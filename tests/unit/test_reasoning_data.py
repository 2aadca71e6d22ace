"""The built-in reasoning problems: worked solutions that are right, a verifier that is strict
about the answer line, deterministic and disjoint splits, a digit-level tokenizer."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from distil.data.reasoning import (
    MAX_SIZE,
    SPLIT_ID_OFFSET,
    SPLITS,
    ReasoningSplits,
    SizeRange,
    TaskKind,
    answer_format_ok,
    check_answer,
    extract_answer,
    generate_problem,
    generate_problems,
    read_problems,
    write_reasoning_splits,
    write_reasoning_tokenizer,
)
from distil.errors import DistilError

ALL_SIZES = {kind: SizeRange(min_size=2, max_size=6) for kind in TaskKind}


def _truth(question: str) -> str:
    """The answer computed independently of the worked solution."""
    if question.startswith("sort "):
        return " ".join(map(str, sorted(int(v) for v in question[5:].split())))
    assert re.fullmatch(r"[0-9+\-*()]+", question)
    return str(eval(question))  # digits and operators only (checked above)


@pytest.mark.parametrize("kind", list(TaskKind))
def test_gold_solutions_are_right_and_pass_the_checker(kind: TaskKind) -> None:
    rng = random.Random(3)
    for size in range(2, 7):
        for _ in range(40):
            p = generate_problem(kind, size, rng)
            question = p.prompt.removeprefix("Q: ").removesuffix("\n")
            assert p.answer == _truth(question)
            assert p.solution.endswith("#### " + p.answer)
            assert check_answer(p.record(0), p.solution)
            steps = p.solution.split("\n")[:-1]
            if kind in (TaskKind.EXPRESSION, TaskKind.SORTING):
                assert len(steps) == size  # one operation / one element per step
            else:  # one line per column of the longer operand, the last holds the result
                operands = re.split(r"[+\-*]", question)
                columns = (
                    len(operands[0]) if kind is TaskKind.MULTIPLICATION else max(map(len, operands))
                )
                assert len(steps) == columns
                assert int(steps[-1].split("|")[1]) == int(p.answer)


def test_addition_steps_carry_digit_by_digit() -> None:
    p = generate_problem(TaskKind.ADDITION, 4, random.Random(0))
    a, b = map(int, p.prompt[3:-1].split("+"))
    carry, result = 0, ""
    for i, line in enumerate(p.solution.split("\n")[:-1]):
        da, db = (a // 10**i) % 10, (b // 10**i) % 10
        assert line.startswith(f"{da}+{db}+{carry}={da + db + carry}|")
        carry = (da + db + carry) // 10
        result = line.split("|")[1]
    assert int(result) == a + b


def test_expression_steps_reduce_one_operation_each() -> None:
    rng = random.Random(5)
    for _ in range(50):
        p = generate_problem(TaskKind.EXPRESSION, 4, rng)
        values = [eval(line[1:]) for line in p.solution.split("\n")[:-1]]
        question = p.prompt[3:-1]
        assert all(v == eval(question) for v in values)  # every rewrite keeps the value
        assert all(0 <= v <= 99 for v in values)


def test_answer_line_parsing_and_format_errors() -> None:
    rec = {"answer": "5663", "kind": "addition"}
    assert extract_answer("steps\n#### 5663") == "5663"
    assert extract_answer("steps\nx #### 5663") is None  # the marker must start a line
    assert extract_answer("#### 12\n#### 13") == "12"  # the first answer line counts
    assert check_answer(rec, "a\n#### 05663") and check_answer(rec, "#### 5663  ")
    assert not check_answer(rec, "#### 5664")
    assert not answer_format_ok(rec, "8+5+0=13|3") and not check_answer(rec, "8+5+0=13|3")
    assert not answer_format_ok(rec, "#### 56 63") and not answer_format_ok(rec, "#### ")
    assert answer_format_ok(rec, "#### -7")
    sort = {"answer": "3 12 40", "kind": "sorting"}
    assert check_answer(sort, "#### 3 12 40") and not check_answer(sort, "#### 3 40 12")
    assert not answer_format_ok(sort, "#### 3,12,40") and not answer_format_ok(sort, "#### 3  12")
    free = {"answer": "yes  no"}  # an unknown kind: any non-empty answer, whitespace collapsed
    assert check_answer(free, "#### yes no") and answer_format_ok(free, "#### maybe")
    with pytest.raises(DistilError, match="answer"):
        check_answer({"id": 4}, "#### 1")


def test_sizes_are_checked() -> None:
    with pytest.raises(DistilError, match="size"):
        generate_problem(TaskKind.SORTING, 1, random.Random(0))
    with pytest.raises(DistilError, match="size"):
        generate_problem(TaskKind.ADDITION, MAX_SIZE[TaskKind.ADDITION] + 1, random.Random(0))
    with pytest.raises(ValidationError, match="exceeds"):
        SizeRange(min_size=3, max_size=2)
    with pytest.raises(ValidationError, match="sizes must lie"):
        ReasoningSplits(
            kinds=[TaskKind.SORTING],
            train_sizes={TaskKind.SORTING: SizeRange(min_size=1, max_size=3)},
        )
    with pytest.raises(ValidationError, match="no range"):
        ReasoningSplits(kinds=[TaskKind.ADDITION], harder_sizes={})


def test_generate_problems_balances_kinds_and_excludes_prompts() -> None:
    problems = generate_problems(list(TaskKind), ALL_SIZES, 25, random.Random(1))
    assert [p.kind for p in problems[:5]] == list(TaskKind)
    assert all(sum(p.kind is k for p in problems) == 5 for k in TaskKind)
    tiny = {TaskKind.ADDITION: SizeRange(min_size=1, max_size=1)}  # 100 distinct problems
    first = generate_problems([TaskKind.ADDITION], tiny, 50, random.Random(2))
    seen = {p.prompt for p in first}
    second = generate_problems([TaskKind.ADDITION], tiny, 30, random.Random(3), exclude=seen)
    assert not seen & {p.prompt for p in second}
    everything = {f"Q: {a}+{b}\n" for a in range(10) for b in range(10)}
    with pytest.raises(DistilError, match="excluded"):
        generate_problems([TaskKind.ADDITION], tiny, 1, random.Random(0), exclude=everything)


def test_splits_are_deterministic_disjoint_and_readable(tmp_path: Path) -> None:
    spec = ReasoningSplits(
        kinds=list(TaskKind),
        train_examples=300,
        pool_examples=60,
        held_out_examples=40,
        harder_examples=30,
    )
    paths = write_reasoning_splits(spec, tmp_path / "a")
    again = write_reasoning_splits(spec, tmp_path / "b")
    other = write_reasoning_splits(spec.model_copy(update={"seed": 1}), tmp_path / "c")
    assert list(paths) == list(SPLITS)
    for split in SPLITS:
        assert paths[split].read_bytes() == again[split].read_bytes()
        assert paths[split].read_bytes() != other[split].read_bytes()
    records = {split: read_problems(paths[split]) for split in SPLITS}
    assert [len(records[s]) for s in SPLITS] == [300, 60, 40, 30]
    prompts = {s: {r["prompt"] for r in records[s]} for s in SPLITS}
    for i, s in enumerate(SPLITS):
        for t in SPLITS[i + 1 :]:
            assert not prompts[s] & prompts[t], (s, t)
    ids = [r["id"] for s in SPLITS for r in records[s]]
    assert len(set(ids)) == len(ids) and records["harder"][0]["id"] == SPLIT_ID_OFFSET["harder"]
    for r in records["harder"]:
        assert r["size"] == spec.harder_sizes[TaskKind(r["kind"])].min_size

    def rare(rows: list[dict[str, object]]) -> int:
        return sum(r["size"] == spec.harder_sizes[TaskKind(r["kind"])].min_size for r in rows)

    assert rare(records["train"]) == 30 and rare(records["pool"]) == 6  # harder_in_train = 0.1
    pure = write_reasoning_splits(spec.model_copy(update={"harder_in_train": 0.0}), tmp_path / "d")
    assert rare(read_problems(pure["train"])) == 0
    r = records["train"][0]
    assert r["text"] == r["prompt"] + r["completion"] and check_answer(r, r["completion"])
    summary = json.loads((tmp_path / "a" / "splits.json").read_text())
    assert summary["counts"]["pool"] == 60 and summary["spec"]["seed"] == 0


def test_read_problems_refuses_records_without_answer(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_text('{"prompt": "Q: 1+1\\n"}\n')
    with pytest.raises(DistilError, match="answer"):
        read_problems(tmp_path / "x.jsonl")
    with pytest.raises(DistilError, match="does not exist"):
        read_problems(tmp_path / "missing.jsonl")


def test_tokenizer_spells_every_character(tmp_path: Path) -> None:
    from distil.models.vocab import load_tokenizer_folder

    tok = load_tokenizer_folder(write_reasoning_tokenizer(tmp_path / "tok"))
    text = "Q: 4738+925\n8+5+0=13|3\n#### 5663"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and len(tok) == 261
    assert tok.decode(ids) == text
    assert tok.eos_token_id is not None and tok.pad_token_id not in (None, tok.eos_token_id)


def test_problems_command_writes_splits_and_tokenizer(tmp_path: Path) -> None:
    from tests.helpers import run_cli

    args = ["kinds=[sorting]", "train_examples=20", "pool_examples=4", "held_out_examples=3"]
    code, text = run_cli(["problems", str(tmp_path / "p"), *args, "harder_examples=2"])
    assert code == 0, text
    assert [len(read_problems(tmp_path / "p" / f"{s}.jsonl")) for s in SPLITS] == [20, 4, 3, 2]
    assert (tmp_path / "p" / "tokenizer" / "tokenizer.json").is_file()
    assert "lm_pretrain-reasoning" in text
    code, text = run_cli(["problems", str(tmp_path / "q"), "kinds=[sortin]", "train_exampls=3"])
    assert code == 2 and "train_exampls: unknown key" in text and "kinds.0" in text, text
