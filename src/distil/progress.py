"""Progress bars (rich) with rate and ETA for every long loop; silent on non-main processes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_bar(enabled: bool = True) -> Progress:
    """A rich Progress showing count, percentage, rate, elapsed time and ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("[cyan]{task.fields[rate]}"),  # updated by the loop: steps/s or samples/s
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        disable=not enabled,
        transient=False,
    )


def rate_text(count: float, seconds: float, unit: str) -> str:
    """``"123.4 samples/s"`` for the progress bar's rate field."""
    return f"{count / seconds:,.1f} {unit}/s" if seconds > 0 else f"- {unit}/s"


def is_main_process() -> bool:
    """Rank 0 of a launch by torchrun/accelerate (``RANK``), or a single process."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


@contextmanager
def phase_progress(
    description: str,
    total: float | None,
    *,
    unit: str,
    enabled: bool | None = None,
    after_seconds: float = 2.0,
) -> Iterator[Callable[[float], None]]:
    """A progress bar for one phase of library work (tokenising a corpus, evaluating a model):
    count, rate, elapsed time and ETA. Yields ``advance(n)``.

    The bar appears only once the phase has run ``after_seconds`` (so quick phases print
    nothing) and only on the main process.

    Args:
        description: What is being done (shown as is: Rich markup is escaped).
        total: Units of work, or None when unknown.
        unit: Unit of the rate (``"docs"``, ``"examples"``, ``"tok"``...).
        enabled: Force the bar on or off; the main process only when None.
        after_seconds: Delay before the bar is shown.
    """
    on = is_main_process() if enabled is None else enabled
    start = time.perf_counter()
    done = 0.0
    bar: Progress | None = None
    task = None

    def advance(n: float = 1) -> None:
        nonlocal done, bar, task
        done += n
        elapsed = time.perf_counter() - start
        if bar is None:
            if not on or elapsed < after_seconds:
                return
            bar = progress_bar(True)
            bar.start()
            task = bar.add_task(escape(description), total=total, rate="", info="")
            bar.update(task, completed=done)
        assert task is not None
        bar.update(task, completed=done, rate=rate_text(done, elapsed, unit))

    try:
        yield advance
    finally:
        if bar is not None:
            bar.stop()
