"""What a study has spent, from its trials alone (so every worker, and a resumed study, computes
the same numbers from the shared storage), and whether the search stage may start another trial.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from distil.search.config import BudgetSection

FINISHED = ("COMPLETE", "PRUNED", "FAIL")


@dataclass(frozen=True)
class TrialRecord:
    """The part of a trial the budget reads.

    Attributes:
        number: Optuna's trial number.
        state: ``RUNNING``, ``WAITING``, ``COMPLETE``, ``PRUNED`` or ``FAIL``.
        start: When it started running (``None`` while waiting).
        end: When it finished (``None`` while running).
        examples: Training examples its run processed (0 until it finishes).
        tokens: Training tokens its run processed.
        retry_of: The trial it re-runs (after a killed worker), if any.
    """

    number: int
    state: str
    start: dt.datetime | None
    end: dt.datetime | None
    examples: int = 0
    tokens: int = 0
    retry_of: int | None = None


@dataclass(frozen=True)
class Usage:
    """Spent so far: ``trials`` started (a retry counts with its original), ``wall_time_s`` of
    busy time, and the ``examples``/``tokens`` of finished trials."""

    trials: int
    wall_time_s: float
    examples: int
    tokens: int


def busy_seconds(intervals: Iterable[tuple[dt.datetime, dt.datetime]]) -> float:
    """Length of the union of time intervals, in seconds: overlapping trials of parallel workers
    count once, and gaps with no trial running (a study stopped overnight) count zero."""
    total = 0.0
    current: tuple[dt.datetime, dt.datetime] | None = None
    for start, end in sorted(intervals):
        if end < start:
            continue
        if current is None or start > current[1]:
            if current is not None:
                total += (current[1] - current[0]).total_seconds()
            current = (start, end)
        elif end > current[1]:
            current = (current[0], end)
    if current is not None:
        total += (current[1] - current[0]).total_seconds()
    return total


def usage(records: Sequence[TrialRecord], now: dt.datetime) -> Usage:
    """What ``records`` have spent at time ``now`` (running trials count up to ``now``).

    A failed trial that was retried is the same logical trial as its retry: it is counted once
    as a trial, but both runs' time is counted (the time was spent).
    """
    started = [r for r in records if r.state != "WAITING" or r.retry_of is not None]
    logical = {r.retry_of if r.retry_of is not None else r.number for r in started}
    intervals = [
        (r.start, r.end if r.end is not None else now)
        for r in records
        if r.start is not None and (r.end is not None or r.state == "RUNNING")
    ]
    done = [r for r in records if r.state in FINISHED]
    return Usage(
        trials=len(logical),
        wall_time_s=busy_seconds(intervals),
        examples=sum(r.examples for r in done),
        tokens=sum(r.tokens for r in done),
    )


def exhausted(budget: BudgetSection, spent: Usage) -> list[str]:
    """The limits ``spent`` has reached, as readable lines (empty: the search may go on)."""
    out: list[str] = []
    if budget.trials is not None and spent.trials >= budget.trials:
        out.append(f"trials: {spent.trials} of {budget.trials}")
    if budget.wall_time is not None and spent.wall_time_s >= budget.wall_time:
        out.append(f"wall time: {spent.wall_time_s:.0f} s of {budget.wall_time:.0f} s")
    if budget.examples is not None and spent.examples >= budget.examples:
        out.append(f"examples: {spent.examples:,} of {budget.examples:,}")
    if budget.tokens is not None and spent.tokens >= budget.tokens:
        out.append(f"tokens: {spent.tokens:,} of {budget.tokens:,}")
    return out
