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
from typing import Any

from distil.data.reasoning import answer_format_ok, check_answer, read_problems
from distil.errors import DistilError
from distil.storage import atomic_write_bytes

__all__ = [
    "TraceFilter",
    "TraceSummary",
    "pass_rates",
    "read_traces",
    "redi_pairs",
    "select_traces",
    "verify_traces",
    "write_traces",
]

Checker = Callable[[Mapping[str, Any], str], bool]
_PROBLEM_FIELDS = ("id", "prompt", "answer", "kind", "size")
_TEACHER_FIELDS = ("token_ids", "token_logprobs")


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
