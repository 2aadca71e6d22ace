"""Run reports: ``report.json`` holds the numbers; ``report.md``, ``report.html`` and the terminal
table are rendered from it, so what a person reads always matches what a program reads.

A report is a dict. Every recipe fills the same parts, so the renderers, ``distil report`` and
``distil compare`` never branch on the recipe:

- ``title``, ``recipe``: what ran.
- ``roles``: the ``model`` name of the ``teacher``, ``student`` and ``baseline`` rows
  (e.g. ``{"student": "student (KD)"}``); ``baseline`` may be absent.
- ``table``: the headline table, ``{"columns": [{"key", "label"}], "rows": [{...}]}`` with one
  row per model; every other table below has this shape.
- ``highlights``: a few ``key: value`` lines.
- ``warnings``: sentences a reader must not miss (e.g. distillation made the student worse),
  shown first in every rendering.
- ``quality`` (optional): ``table`` of task metrics, ``primary`` (the metric key the gap closed is
  computed on), ``higher_is_better``, ``gap_closed`` ((student − baseline) / (teacher −
  baseline)), and ``per_class`` (``labels`` and per-model ``values``) where the task has classes
  or slices.
- ``fidelity`` (optional): built by :func:`distil.evaluation.calibration.fidelity_part`:
  ``table`` (agreement, KL, JSD, ECE), ``reliability`` bins, ``confusion`` matrices.
- ``cost`` (optional): ``table`` (params, bytes, peak memory, latency, throughput, speed-up)
  and ``training`` (wall time per phase), the latter filled from ``metrics.jsonl``.
- ``curves``: filled by :func:`complete_report` from ``metrics.jsonl`` (steps and final value of
  every logged series per phase); the plots are drawn from the same file.
- ``speculative`` (optional): a draft measured for speculative decoding with a target
  (:mod:`distil.evaluation.drafts`): the τ-by-γ ``table``, ``alpha``, ``by_position``,
  ``costs``, ``speed``, ``lossless`` checks and the ``lowest``-acceptance tokens.
- ``monitor`` (optional): the teacher-hacking verdict of
  :func:`distil.evaluation.hacking.hacking_verdict` (``flag``, ``text``, best/last values).
- ``summary``: a flat ``{label: value}`` of headline numbers, what ``distil compare`` lines up.
- ``sections`` (free Markdown text by heading) and ``details`` (free JSON), both optional.

The effective configuration and the environment are read from the run folder
(``config.resolved.yaml``, ``mode.txt``, ``env.json``) when rendering.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from distil.errors import DistilError

logger = logging.getLogger(__name__)

LOGITS_FILE = Path("eval") / "test_logits.safetensors"  # {role: (N, C) logits, "labels": (N,)}
PLOTS_DIR = "plots"  # PNGs the Markdown report links to (the HTML embeds its own copies)
NOT_A_SERIES = frozenset(
    {"phase", "step", "time_s", "epoch"}
)  # metrics.jsonl keys that are no curve


def fmt(value: Any) -> str:
    """Human formatting: 4 significant digits for floats, thousands separators for ints."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if abs(value) >= 1e4:
            return f"{value:,.0f}"
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def percent(fraction: float, digits: int = 0) -> str:
    """``0.123`` → ``"12 %"``; a value that rounds to zero is ``"0 %"``, never ``"-0 %"``."""
    shown = round(100 * fraction, digits)
    if shown == 0:
        shown = 0.0  # drops the sign of -0.0
    return f"{shown:.{digits}f} %"


def relative_time_text(overhead: float) -> str:
    """How much longer one phase took than another, ``overhead = a / b - 1``: ``"54 % slower"``,
    ``"28x slower"`` from twice as long on (a percentage past 100 reads badly), ``"12 % faster"``."""
    if overhead >= 1:
        ratio = 1 + overhead
        return f"{ratio:.1f}x slower" if ratio < 9.95 else f"{ratio:.0f}x slower"
    if overhead >= 0:
        return f"{percent(overhead)} slower"
    return f"{percent(-overhead)} faster"


def fmt_bytes(value: Any) -> str:
    """Bytes in binary units (``12.3 MiB``); other values as :func:`fmt`."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return fmt(value)
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return fmt(value)  # pragma: no cover - the loop always returns


def flatten_config(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict → ``{"dotted.key": leaf}``; lists stay leaves (they are one value)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_config(value, f"{name}."))
        else:
            out[name] = value
    return out


def make_table(columns: Sequence[tuple[str, str]], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A report table from ``(key, label)`` columns and row dicts."""
    return {"columns": [{"key": k, "label": label} for k, label in columns], "rows": rows}


# ---------------------------------------------------------------------------------------------
# Parts every recipe can build from its rows


def gap_closed(
    teacher: float | None, student: float | None, baseline: float | None
) -> float | None:
    """``(student − baseline) / (teacher − baseline)``: 1 = the student matches the teacher, 0 =
    no better than training without the teacher. Valid for metrics where higher or lower is
    better alike; ``None`` when a value is missing or teacher and baseline tie."""
    if teacher is None or student is None or baseline is None:
        return None
    if not all(math.isfinite(v) for v in (teacher, student, baseline)) or teacher == baseline:
        return None
    return (student - baseline) / (teacher - baseline)


def row_of(table: Mapping[str, Any], model: str | None) -> dict[str, Any] | None:
    """The row of ``table`` whose ``model`` is ``model``."""
    if model is None:
        return None
    for row in table.get("rows", []):
        if row.get("model") == model:
            return dict(row)
    return None


def quality_part(
    rows: list[dict[str, Any]],
    metrics: Sequence[tuple[str, str]],
    *,
    roles: Mapping[str, str],
    primary: str,
    higher_is_better: bool = True,
    per_class: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``quality`` part: task metrics per model and the gap closed on ``primary``.

    Args:
        rows: One dict per model with ``model`` and the metric keys.
        metrics: ``(key, label)`` of the metrics to show, ``primary`` among them.
        roles: ``{"teacher": name, "student": name, "baseline": name}`` (baseline optional).
        primary: The metric the gap closed is computed on.
        higher_is_better: Direction of ``primary`` (for the reader; the gap formula is symmetric).
        per_class: ``{"labels": [...], "values": {model: [...]}, "metric": key}`` when the task
            has classes or slices.
    """
    table = make_table(
        [("model", "model"), *metrics],
        [{k: r.get(k) for k in ["model", *(m for m, _ in metrics)]} for r in rows],
    )
    value = {name: (row_of(table, name) or {}).get(primary) for name in roles.values()}
    part: dict[str, Any] = {
        "table": table,
        "primary": primary,
        "higher_is_better": higher_is_better,
        "gap_closed": gap_closed(
            value.get(roles.get("teacher", "")),
            value.get(roles.get("student", "")),
            value.get(roles.get("baseline", "")),
        ),
    }
    if per_class is not None:
        part["per_class"] = dict(per_class)
    return part


SPREAD_SUFFIXES = ("q1", "q3", "rounds", "noisy", "verdict")


def cost_part(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """The ``cost`` part: what each model costs to keep and to run (``training`` is added by
    :func:`complete_report` from ``metrics.jsonl``). A column's spread (``KEY_q1``, ``KEY_q3``,
    ``KEY_rounds``, ``KEY_noisy``, ``KEY_verdict``) travels with it."""
    keys = ["model", *(c for c, _ in columns)]
    keys += [f"{c}_{s}" for c, _ in columns for s in SPREAD_SUFFIXES]
    return {
        "table": make_table(
            [("model", "model"), *columns],
            [{k: r[k] for k in keys if k in r} for r in rows],
        )
    }


def read_metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``run_dir/metrics.jsonl`` (empty when absent)."""
    from distil.training.metrics import read_metrics

    return read_metrics(Path(run_dir) / "metrics.jsonl")


def phase_order(metrics_rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Phases in the order they first appear."""
    seen: dict[str, None] = {}
    for row in metrics_rows:
        seen.setdefault(str(row.get("phase", "train")), None)
    return list(seen)


def training_times(metrics_rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Wall time of each phase from the ``time_s`` stamps of ``metrics.jsonl``.

    Each row's time since the previous row is charged to the row's phase. ``time_s`` restarts
    at 0 when a run is resumed, so a stamp lower than the previous one starts a new segment
    (and counts from 0): the total is the time actually spent, interruptions excluded.

    Returns:
        ``{"wall_time_s": total, "phases": {phase: seconds}}``.
    """
    phases: dict[str, float] = {}
    prev = 0.0
    for row in metrics_rows:
        t = row.get("time_s")
        if not isinstance(t, int | float):
            continue
        delta = t - prev if t >= prev else t
        phase = str(row.get("phase", "train"))
        phases[phase] = phases.get(phase, 0.0) + float(delta)
        prev = float(t)
    return {"wall_time_s": sum(phases.values()), "phases": phases}


def series_by_phase(
    metrics_rows: Sequence[Mapping[str, Any]],
) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{phase: {series: [(step, value), ...]}}`` for every numeric series in the rows."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for row in metrics_rows:
        phase = str(row.get("phase", "train"))
        step = row.get("step")
        if not isinstance(step, int):
            continue
        for key, value in row.items():
            if key in NOT_A_SERIES or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(float(value)):
                out.setdefault(phase, {}).setdefault(key, []).append((step, float(value)))
    return out


def curves_part(metrics_rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The ``curves`` part: per phase, the last step and each series' point count and last value."""
    phases: dict[str, Any] = {}
    for phase, series in series_by_phase(metrics_rows).items():
        phases[phase] = {
            "steps": max((p[0] for points in series.values() for p in points), default=0),
            "series": {
                key: {"points": len(points), "final": points[-1][1]}
                for key, points in series.items()
            },
        }
    return {"source": "metrics.jsonl", "phases": phases}


def summary_of(report: Mapping[str, Any]) -> dict[str, Any]:
    """Headline numbers as a flat ``{label: value}``: what ``distil compare`` lines up."""
    roles: Mapping[str, str] = report.get("roles", {})
    out: dict[str, Any] = {}
    quality = report.get("quality")
    if quality:
        for role in ("teacher", "student", "baseline"):
            row = row_of(quality["table"], roles.get(role))
            if row is None:
                continue
            for col in quality["table"]["columns"][1:]:
                out[f"{role} {col['label']}"] = row.get(col["key"])
        out["gap closed"] = quality.get("gap_closed")
    fidelity = report.get("fidelity")
    if fidelity and "table" in fidelity:
        row = row_of(fidelity["table"], roles.get("student"))
        for col in fidelity["table"]["columns"][1:]:
            out[f"student {col['label']}"] = None if row is None else row.get(col["key"])
    cost = report.get("cost")
    if cost and "table" in cost:
        row = row_of(cost["table"], roles.get("student")) or {}
        for key in ("speedup", "size_ratio", "params"):
            if key in row:
                label = next(c["label"] for c in cost["table"]["columns"] if c["key"] == key)
                out[f"student {label}"] = row[key]
        training = cost.get("training", {})
        if "wall_time_s" in training:
            out["train wall time s"] = training["wall_time_s"]
    if not quality and report.get("table"):  # no quality part: the headline table's numbers
        for row in report["table"]["rows"]:
            for col in report["table"]["columns"][1:]:
                out[f"{row.get('model')} {col['label']}"] = row.get(col["key"])
    return out


def _fidelity_from_saved_logits(run_dir: Path, report: Mapping[str, Any]) -> dict[str, Any] | None:
    path = run_dir / LOGITS_FILE
    roles: Mapping[str, str] = report.get("roles", {})
    if not path.is_file() or "teacher" not in roles:
        return None
    from safetensors.torch import load_file

    from distil.evaluation.calibration import fidelity_part

    saved = load_file(str(path))
    labels = saved.pop("labels", None)
    if labels is None or "teacher" not in saved:
        return None
    logits: dict[str, Any] = {r: saved[r] for r in ("teacher", "student", "baseline") if r in saved}
    class_names = report.get("details", {}).get("class_names")
    return fidelity_part(
        logits,
        labels,
        teacher="teacher",
        names=roles,
        split=f"test ({labels.shape[0]} examples)",
        class_names=class_names
        if isinstance(class_names, list) and len(class_names) == logits["teacher"].shape[-1]
        else None,
    )


def infer_roles(report: Mapping[str, Any]) -> dict[str, str]:
    """Roles from the headline table's model names (``"student (KD)"`` is the student)."""
    roles: dict[str, str] = {}
    for row in (report.get("table") or {}).get("rows", []):
        name = str(row.get("model", ""))
        head = name.split(" ")[0].lower()
        if head in ("teacher", "student", "baseline"):
            roles.setdefault(head, name)
    return roles


def complete_report(run_dir: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Fill what the run folder can tell: ``curves`` and ``cost.training`` from
    ``metrics.jsonl``, ``fidelity`` from the saved test logits when the recipe did not add it,
    and the ``summary``. Parts already present are kept; returns the same dict."""
    run_dir = Path(run_dir)
    if "roles" not in report:  # a report written before roles existed
        roles = infer_roles(report)
        if roles:
            report["roles"] = roles
    rows = read_metrics_rows(run_dir)
    if rows:
        report["curves"] = curves_part(rows)
        if "cost" in report:
            report["cost"]["training"] = _training_part(rows, report.get("roles", {}))
    if "fidelity" not in report:
        fidelity = _fidelity_from_saved_logits(run_dir, report)
        if fidelity is not None:
            report["fidelity"] = fidelity
    report["summary"] = summary_of(report)
    return report


def _training_part(rows: Sequence[Mapping[str, Any]], roles: Mapping[str, str]) -> dict[str, Any]:
    times = training_times(rows)
    phases = times["phases"]
    student, baseline = phases.get("student"), phases.get("baseline")
    sources = [r["kd_source"] for r in rows if r.get("phase") == "student" and "kd_source" in r]
    live = not sources or sources[-1] == "live teacher"  # runs from before kd_source: live
    if student and baseline and live:
        # The KD student and the baseline train the same model on the same batches: the
        # difference is what the live teacher costs (not said of a cache: it costs no teacher)
        times["teacher_overhead"] = (student - baseline) / baseline
    return times


# ---------------------------------------------------------------------------------------------
# Rendering


def cell(row: Mapping[str, Any], key: str, formatters: Mapping[str, Any] | None = None) -> str:
    """One table cell as text. A speed-up measured over interleaved rounds (a row with
    ``KEY_q1`` and ``KEY_q3``) shows its quartiles, and is marked when too noisy to call:
    ``8.2 (7.9-8.6)``, ``~1.1 (0.8-1.3) noisy``."""
    value = row.get(key)
    text = (formatters or {}).get(key, fmt)(value)
    q1, q3 = row.get(f"{key}_q1"), row.get(f"{key}_q3")
    if not key.endswith("speedup") or not isinstance(value, float) or q1 is None or q3 is None:
        return str(text)
    if row.get(f"{key}_verdict") is None:  # the reference itself: 1 by definition
        return str(text)
    noisy = bool(row.get(f"{key}_noisy"))
    return f"{'~' if noisy else ''}{text} ({q1:.2g}-{q3:.2g}){' noisy' if noisy else ''}"


def md_table(table: Mapping[str, Any], formatters: Mapping[str, Any] | None = None) -> list[str]:
    """A report table as Markdown lines (a blank line after)."""
    cols = table["columns"]
    formatters = formatters or {}
    lines = ["| " + " | ".join(c["label"] for c in cols) + " |"]
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|")
    for row in table["rows"]:
        lines.append("| " + " | ".join(cell(row, c["key"], formatters) for c in cols) + " |")
    return [*lines, ""]


BYTE_KEYS = frozenset({"size_bytes", "peak_memory_bytes"})


def byte_formatters(table: Mapping[str, Any]) -> dict[str, Any]:
    """Formatters that print byte columns in binary units."""
    return {c["key"]: fmt_bytes for c in table["columns"] if c["key"] in BYTE_KEYS}


def per_class_table(per_class: Mapping[str, Any]) -> dict[str, Any]:
    """The per-class values as a table with one row per class and one column per model."""
    models = list(per_class["values"])
    rows = []
    for i, label in enumerate(per_class["labels"]):
        rows.append({"model": str(label), **{m: per_class["values"][m][i] for m in models}})
    return make_table(
        [("model", per_class.get("label_header", "class")), *((m, m) for m in models)], rows
    )


def render_markdown(report: dict[str, Any], plots: Mapping[str, str] | None = None) -> str:
    """The Markdown report; ``plots`` maps a plot name to a path relative to the run folder."""
    plots = plots or {}
    lines = [f"# {report.get('title', 'distil run')}", ""]
    for warning in report.get("warnings", []):
        lines += [f"> **Warning:** {warning}", ""]
    table = report.get("table")
    if table:
        lines += md_table(table, byte_formatters(table))
    for key, value in report.get("highlights", {}).items():
        lines.append(f"- **{key}**: {fmt(value)}")
    if report.get("highlights"):
        lines.append("")
    quality = report.get("quality")
    if quality:
        lines += ["## Quality", "", *md_table(quality["table"])]
        lines += [
            f"Gap closed on {quality['primary']} ((student − baseline) / (teacher − baseline)): "
            f"**{fmt(quality.get('gap_closed'))}**",
            "",
        ]
        if "per_class" in quality:
            lines += [
                f"### Per class ({quality['per_class'].get('metric', quality['primary'])})",
                "",
            ]
            if "per_class" in plots:
                lines += [f"![per class]({plots['per_class']})", ""]
            lines += md_table(per_class_table(quality["per_class"]))
    fidelity = report.get("fidelity")
    if fidelity:
        lines += [
            "## Fidelity to the teacher",
            "",
            f"On {fidelity.get('split', 'held-out data')}.",
            "",
        ]
        lines += md_table(fidelity["table"])
        lines += [
            f"![{name}]({plots[name]})" for name in ("reliability", "confusion") if name in plots
        ]
        lines.append("")
    cost = report.get("cost")
    if cost:
        lines += ["## Cost", "", *md_table(cost["table"], byte_formatters(cost["table"]))]
        training = cost.get("training")
        if training:
            lines += [
                f"Training wall time: **{fmt(training['wall_time_s'])} s** ("
                + ", ".join(f"{p} {fmt(s)} s" for p, s in training["phases"].items())
                + ")."
            ]
            if "training_time" in plots:
                lines.append(f"![training time]({plots['training_time']})")
            if training.get("teacher_overhead") is not None:
                lines.append(
                    f"The live teacher made the KD phase {relative_time_text(training['teacher_overhead'])} than the baseline."
                )
            lines.append("")
    if report.get("speculative"):
        from distil.evaluation.speculative_render import speculative_markdown

        lines += speculative_markdown(report["speculative"], plots)
    curves = report.get("curves")
    if curves and curves.get("phases"):
        lines += ["## Training curves", ""]
        lines += [f"![{name}]({path})" for name, path in plots.items() if name.startswith("curves")]
        lines += ["", "| phase | steps | last values |", "|---|---:|---|"]
        for phase, info in curves["phases"].items():
            last = ", ".join(f"{k} {fmt(v['final'])}" for k, v in info["series"].items())
            lines.append(f"| {phase} | {info['steps']} | {last} |")
        lines.append("")
    monitor = report.get("monitor")
    if monitor:
        lines += ["## Teacher-hacking monitor", "", f"**{monitor['text']}**", ""]
        if "monitor" in plots:
            lines += [f"![teacher-hacking monitor]({plots['monitor']})", ""]
    figures = report.get("figures") or []
    if figures:  # PNGs the recipe wrote into the run folder (sample grids, its own plots)
        lines += ["## Figures", ""]
        for figure in figures:
            lines += [f"**{figure['title']}**", "", f"![{figure['title']}]({figure['file']})", ""]
    for section, body in report.get("sections", {}).items():
        lines += [f"## {section}", "", body, ""]
    details = report.get("details")
    if details:
        lines += [
            "## Details",
            "",
            "```json",
            json.dumps(details, indent=1, default=str),
            "```",
            "",
        ]
    return "\n".join(lines)


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    """Print the headline table and highlights to the terminal."""
    console = wide(console or Console())
    for warning in report.get("warnings", []):
        console.print(f"[bold yellow]warning:[/bold yellow] {escape(warning)}", soft_wrap=True)
    table_spec = report.get("table")
    if table_spec:
        print_table(table_spec, console, title=report.get("title"))
    for key, value in report.get("highlights", {}).items():
        console.print(f"  [bold]{escape(str(key))}[/bold]: {escape(fmt(value))}")


def wide(console: Console, width: int = 140) -> Console:
    """``console``, or for logs and pipes (not a terminal) one at least ``width`` wide, so tables
    are not wrapped into unreadable columns."""
    if not console.is_terminal and console.width < width:
        return Console(width=width, file=console.file)
    return console


def print_table(table_spec: Mapping[str, Any], console: Console, title: str | None = None) -> None:
    """Print a report table with rich (at least 140 columns wide outside a terminal)."""
    console = wide(
        console, max(140, sum(max(len(c["label"]), 8) + 3 for c in table_spec["columns"]))
    )
    table = Table(title=None if title is None else escape(title))
    names = [str(row.get(table_spec["columns"][0]["key"], "")) for row in table_spec["rows"]]
    for i, c in enumerate(table_spec["columns"]):
        if i == 0:  # the names: never cut (two runs named a…b and a…c must not both read "a…")
            width = max([len(c["label"]), *map(len, names)])
            table.add_column(escape(c["label"]), justify="left", no_wrap=True, min_width=width)
        else:
            table.add_column(escape(c["label"]), justify="right")
    formatters = byte_formatters(table_spec)
    for row in table_spec["rows"]:
        table.add_row(*(escape(cell(row, c["key"], formatters)) for c in table_spec["columns"]))
    console.print(table)


def write_report(run_dir: Path, report: dict[str, Any]) -> None:
    """Complete the report from the run folder, then write ``report.json``, ``report.md`` (with
    its PNGs in ``plots/``) and the self-contained ``report.html`` into ``run_dir``."""
    run_dir = Path(run_dir)
    complete_report(run_dir, report)
    (run_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    from distil.evaluation.html import render_html
    from distil.evaluation.plots import report_plots

    images = report_plots(report, read_metrics_rows(run_dir))
    plot_dir = run_dir / PLOTS_DIR
    plot_dir.mkdir(exist_ok=True)
    for stale in plot_dir.glob("*.png"):  # a plot an earlier rendering drew but this one does not
        if stale.stem not in images:
            stale.unlink()
    links: dict[str, str] = {}
    for name, png in images.items():
        (plot_dir / f"{name}.png").write_bytes(png)
        links[name] = f"{PLOTS_DIR}/{name}.png"
    (run_dir / "report.md").write_text(render_markdown(report, links))
    (run_dir / "report.html").write_text(render_html(report, run_dir, images), encoding="utf-8")


def load_report(run_dir: Path) -> dict[str, Any]:
    """Read ``run_dir/report.json``.

    Raises:
        DistilError: If the folder does not exist, has no report (the run did not finish) or
            its report is not valid JSON.
    """
    if not Path(run_dir).is_dir():
        raise DistilError(f"{run_dir}: no such run folder (check the path)")
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise DistilError(
            f"{run_dir} has no report.json: the run did not finish (resume it with `distil run CONFIG --resume`)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DistilError(
            f"{path} is not valid JSON ({exc}); it was damaged or edited by hand: "
            "rerun the run's evaluation, or restore the file"
        ) from exc
    if not isinstance(data, dict):
        raise DistilError(f"{path} does not hold a report (a JSON object); restore the file")
    return data
