"""Run reports: ``report.json`` holds the numbers; ``report.md`` and the terminal table are
rendered from it, so what a person reads always matches what a program reads.

A report is a dict with ``title``, ``table`` (``columns`` and ``rows``: one row per model),
``highlights`` (a few key: value lines) and free-form ``details``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from distil.errors import DistilError


def fmt(value: Any) -> str:
    """Human formatting: 4 significant digits for floats, thousands separators for ints."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 1e4:
            return f"{value:,.0f}"
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# {report.get('title', 'distil run')}", ""]
    table = report.get("table")
    if table:
        cols = table["columns"]
        lines.append("| " + " | ".join(c["label"] for c in cols) + " |")
        lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|")
        for row in table["rows"]:
            lines.append("| " + " | ".join(fmt(row.get(c["key"])) for c in cols) + " |")
        lines.append("")
    for key, value in report.get("highlights", {}).items():
        lines.append(f"- **{key}**: {fmt(value)}")
    if report.get("highlights"):
        lines.append("")
    for section, body in report.get("sections", {}).items():
        lines += [f"## {section}", "", body, ""]
    details = report.get("details")
    if details:
        lines += ["## Details", "", "```json", json.dumps(details, indent=1, default=str), "```", ""]
    return "\n".join(lines)


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    if not console.is_terminal and console.width < 140:  # logs and pipes: do not wrap the table
        console = Console(width=140, file=console.file)
    table_spec = report.get("table")
    if table_spec:
        table = Table(title=report.get("title"))
        for i, c in enumerate(table_spec["columns"]):
            table.add_column(c["label"], justify="left" if i == 0 else "right")
        for row in table_spec["rows"]:
            table.add_row(*(fmt(row.get(c["key"])) for c in table_spec["columns"]))
        console.print(table)
    for key, value in report.get("highlights", {}).items():
        console.print(f"  [bold]{key}[/bold]: {fmt(value)}")


def write_report(run_dir: Path, report: dict[str, Any]) -> None:
    """Write ``report.json`` and ``report.md`` into ``run_dir``."""
    (run_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (run_dir / "report.md").write_text(render_markdown(report))


def load_report(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise DistilError(
            f"{run_dir} has no report.json: the run did not finish (resume it with `distil run CONFIG --resume`)"
        )
    data: dict[str, Any] = json.loads(path.read_text())
    return data
