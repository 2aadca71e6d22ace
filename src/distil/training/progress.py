"""Progress bars (rich) with rate and ETA for every long loop; silent on non-main processes."""

from __future__ import annotations

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
