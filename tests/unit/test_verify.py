"""Verifiers for rejection sampling: each kind's pass and fail, the function contract, the
unit-test sandbox (time, memory, network), and which samples are kept."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from distil.errors import DistilError
from distil.verify import (
    KeepPolicy,
    Verdict,
    VerifierSpec,
    VerifySection,
    as_verdict,
    last_number,
    run_unit_tests,
    select_samples,
    strip_fences,
)

SPEC: TypeAdapter[object] = TypeAdapter(VerifierSpec)


def build(spec: dict[str, object]):  # type: ignore[no-untyped-def]
    return SPEC.validate_python(spec).build()  # type: ignore[attr-defined]


def test_exact_match_normalises_space_and_case_and_can_extract() -> None:
    check = build({"kind": "exact"})
    assert check({"answer": "Paris"}, "  paris \n").passed
    assert not check({"answer": "Paris"}, "London").passed
    strict = build({"kind": "exact", "case_sensitive": True})
    assert not strict({"answer": "Paris"}, "paris").passed
    extracted = build({"kind": "exact", "answer_pattern": r"Answer:\s*(\w+)"})
    assert extracted({"answer": "b"}, "Answer: a ... Answer: b").passed  # the last one counts
    assert extracted({"answer": "b"}, "no answer").reason == "no answer found"
    with pytest.raises(DistilError, match="no field 'answer'"):
        check({"id": 3}, "x")


def test_numeric_answer_takes_the_last_number() -> None:
    check = build({"kind": "numeric"})
    assert check({"answer": 42}, "6 * 7 = 42").passed
    assert check({"answer": "1,234.5"}, "so the total is 1,234.50.").passed
    assert not check({"answer": 41}, "6 * 7 = 42").passed
    assert check({"answer": 3}, "no digits here").reason == "no number in the answer"
    hashes = build({"kind": "numeric", "answer_pattern": r"####\s*(.+)"})
    assert hashes({"answer": 5}, "2 + 3 is 5, not 7\n#### 5").passed
    assert last_number("-3e2 and .5") == 0.5 and last_number("none") is None


def test_regex_search_and_fullmatch() -> None:
    assert build({"kind": "regex", "pattern": r"def \w+\("})({}, "x\ndef f(a):").passed
    full = build({"kind": "regex", "pattern": r"\d+", "fullmatch": True})
    assert full({}, "123").passed and not full({}, "123 apples").passed
    with pytest.raises(ValidationError, match="not a regular expression"):
        SPEC.validate_python({"kind": "regex", "pattern": "("})


def test_json_schema_strips_fences_and_names_the_failing_path() -> None:
    schema = {
        "type": "object",
        "properties": {"label": {"enum": ["fresh", "rotten"]}},
        "required": ["label"],
    }
    check = build({"kind": "json_schema", "json_schema": schema})
    assert check({}, '```json\n{"label": "fresh"}\n```').passed
    bad = check({}, '{"label": "meh"}')
    assert not bad.passed and bad.reason.startswith("label:")
    assert check({}, "{not json").reason.startswith("not JSON")
    with pytest.raises(ValidationError, match="not a valid JSON schema"):
        SPEC.validate_python({"kind": "json_schema", "json_schema": {"type": 3}})


def _write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_checks.py").write_text(
        "from distil.verify import Verdict\n"
        "def is_even(record, completion):\n    return int(completion) % 2 == 0\n"
        "def closeness(record, completion):\n    return 1.0 / (1 + abs(int(completion) - record['answer']))\n"
        "def verdict(record, completion):\n    return Verdict(False, 0.25, 'custom')\n"
        "def bad(record, completion):\n    return 'yes'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))


def test_python_function_by_import_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_module(tmp_path, monkeypatch)
    assert build({"kind": "python", "function": "my_checks:is_even"})({}, "4") == Verdict(True, 1.0)
    close = build({"kind": "python", "function": "my_checks:closeness"})
    assert close({"answer": 10}, "10").passed and not close({"answer": 10}, "12").passed
    assert close({"answer": 10}, "11").score == 0.5  # passes at the default threshold 0.5
    assert build({"kind": "python", "function": "my_checks:verdict"})({}, "x").reason == "custom"
    with pytest.raises(DistilError, match="return a bool"):
        build({"kind": "python", "function": "my_checks:bad"})({}, "x")
    with pytest.raises(ValidationError, match="cannot import"):
        VerifySection.model_validate({"check": {"kind": "python", "function": "my_checks:nope"}})


def test_as_verdict_contract() -> None:
    assert as_verdict(True) == Verdict(True, 1.0)
    assert as_verdict(0.7, threshold=0.8).passed is False
    with pytest.raises(DistilError):
        as_verdict(float("nan"))


def test_unit_tests_pass_fail_and_limits() -> None:
    code = "```python\ndef add(a, b):\n    return a + b\n```"
    assert run_unit_tests(
        strip_fences(code), "assert add(2, 3) == 5", timeout_s=20, memory_mb=512
    ).passed
    failed = run_unit_tests(
        "def add(a, b):\n    return a - b",
        "assert add(2, 3) == 5, 'add'",
        timeout_s=20,
        memory_mb=512,
    )
    assert not failed.passed and "AssertionError" in failed.reason
    slow = run_unit_tests("while True:\n    pass", "", timeout_s=1, memory_mb=512)
    assert not slow.passed and "timed out" in slow.reason
    hog = run_unit_tests("x = bytearray(1 << 31)", "", timeout_s=20, memory_mb=256)
    assert not hog.passed and "memory" in hog.reason
    net = run_unit_tests(
        "import socket\nsocket.create_connection(('127.0.0.1', 9))", "", timeout_s=20, memory_mb=512
    )
    assert not net.passed and "network access is disabled" in net.reason


def test_unit_tests_run_in_a_fresh_isolated_interpreter() -> None:
    env = run_unit_tests(
        "import os, sys\nassert sys.flags.isolated\nassert 'DISTIL_SECRET' not in os.environ",
        "",
        timeout_s=20,
        memory_mb=512,
    )
    assert env.passed, env.reason
    assert sys.executable  # the same interpreter runs the program


def test_select_samples_keeps_all_passing_or_best() -> None:
    verdicts = [Verdict(False, 0.0), Verdict(True, 0.5), Verdict(True, 0.9), Verdict(True, 0.9)]
    assert select_samples(verdicts, KeepPolicy.ALL) == [True] * 4
    assert select_samples(verdicts, KeepPolicy.PASSING) == [False, True, True, True]
    assert select_samples(verdicts, KeepPolicy.BEST) == [False, False, True, False]  # tie: lowest
    assert select_samples([Verdict(False, 0.0)] * 2, KeepPolicy.BEST) == [False, False]
