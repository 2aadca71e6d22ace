"""Numbers a search reads from its runs: objective and cost values from ``report.json``, the
intermediate series from ``metrics.jsonl`` while a trial trains, and what a run processed."""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from distil.errors import DistilError
from distil.evaluation.report import row_of, summary_of

HEADLINE = "table"  # PART of ``table.ROLE.KEY``: the report's headline table, every key of a row


def _table(report: Mapping[str, Any], part: str) -> Mapping[str, Any] | None:
    """The table of ``part`` (``quality``, ``fidelity``, ``cost``), or the headline table."""
    if part == HEADLINE:
        table = report.get(HEADLINE)
        return table if isinstance(table, Mapping) and "rows" in table else None
    section = report.get(part)
    return section.get("table") if isinstance(section, Mapping) else None


def available_metrics(report: Mapping[str, Any]) -> list[str]:
    """Every name :func:`metric_value` accepts for this report: summary labels, then table paths
    (the headline table's rows offer every numeric key they hold, shown as a column or not, such
    as classifier_kd's ``val_accuracy``)."""
    names = list(report.get("summary") or summary_of(report))
    roles: Mapping[str, str] = report.get("roles") or {}
    for part in ("quality", "fidelity", "cost", HEADLINE):
        table = _table(report, part)
        if not table:
            continue
        for role, model in roles.items():
            row = row_of(table, model)
            if row is None:
                continue
            if part == HEADLINE:
                keys = [
                    k
                    for k, v in row.items()
                    if isinstance(v, int | float) and not isinstance(v, bool)
                ]
            else:
                keys = [c["key"] for c in table["columns"][1:]]
            names += [f"{part}.{role}.{k}" for k in keys]
    return names


class MetricMissing(DistilError):
    """An objective or cost names a metric the run's report does not hold: a mistake in the
    search section that every later trial would repeat, so the search stops at the first."""


def metric_value(report: Mapping[str, Any], name: str) -> float:
    """One number from a run's report.

    Args:
        report: A completed ``report.json``.
        name: A ``summary`` label (``student test accuracy``) or ``PART.ROLE.KEY``
            (``cost.student.latency_b1_ms``; PART ``table`` is the headline table, whose rows
            may hold keys shown nowhere else, e.g. ``table.student.val_accuracy``).

    Returns:
        The value as a float (NaN when the report holds ``None`` there).

    Raises:
        MetricMissing: If the name is neither, naming the closest available metric.
    """
    summary = report.get("summary") or summary_of(report)
    if name in summary:
        return _number(summary[name], name)
    part, _, rest = name.partition(".")
    role, _, key = rest.partition(".")
    table = _table(report, part)
    model = (report.get("roles") or {}).get(role)
    if table and model and key:
        row = row_of(table, model)
        if row is not None and key in row:
            return _number(row[key], name)
    names = available_metrics(report)
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; available: {names}"
    raise MetricMissing(f"metric {name!r} is not in the run's report{hint}")


def _number(value: Any, name: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DistilError(f"metric {name!r} is {value!r}, not a number")
    return float(value)


def metric_values(report: Mapping[str, Any], names: Sequence[str]) -> list[float]:
    """:func:`metric_value` for each name, in order."""
    return [metric_value(report, n) for n in names]


def read_report(run_dir: Path) -> dict[str, Any]:
    """``run_dir/report.json``.

    Raises:
        DistilError: If the run wrote no report.
    """
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise DistilError(f"{run_dir} has no report.json: the run did not finish")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def intermediate_points(
    rows: Sequence[Mapping[str, Any]], series: str, *, phase: str | None, step_key: str
) -> list[tuple[int, float]]:
    """``(step, value)`` of ``series`` in ``metrics.jsonl`` rows, in order, one per step (the
    last row wins when a resumed run logged a step twice); non-finite values are skipped.

    Args:
        rows: Parsed ``metrics.jsonl`` rows.
        series: The column to read (e.g. ``val_accuracy``).
        phase: Only rows of this phase (``None``: every row).
        step_key: The row field that is the step (``step`` or ``epoch``).
    """
    points: dict[int, float] = {}
    for row in rows:
        if phase is not None and row.get("phase") != phase:
            continue
        value, step = row.get(series), row.get(step_key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if isinstance(step, bool) or not isinstance(step, int) or not math.isfinite(value):
            continue
        points[step] = float(value)
    return sorted(points.items())


def processed(run_dir: Path) -> dict[str, int]:
    """What a finished run trained on: ``examples`` and ``tokens`` summed over the phases'
    ``summary.json`` files (``samples``/``tokens`` keys; absent keys count 0)."""
    examples = tokens = 0
    for path in sorted(Path(run_dir).glob("*/summary.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        examples += int(data.get("samples") or data.get("examples") or 0)
        tokens += int(data.get("tokens") or 0)
    return {"examples": examples, "tokens": tokens}
