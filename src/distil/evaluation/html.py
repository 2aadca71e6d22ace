"""``report.html``: one self-contained page (inline CSS, PNGs as base64, no script, no network)
rendered from the report dict, so every number on it is the one in ``report.json``.

Sections, each an element with a stable ``id`` (tests read them): ``summary``, ``quality``,
``fidelity``, ``cost``, ``speculative``, ``curves``, ``config``, ``environment``, then free ``sections`` and
``details``.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from distil.evaluation.report import (
    byte_formatters,
    cell,
    flatten_config,
    fmt,
    per_class_table,
    percent,
    relative_time_text,
)

CSS = """
:root { --fg: #1d232a; --muted: #5f6b76; --line: #dde3e8; --bg: #f6f8fa; --accent: #1f77b4; }
* { box-sizing: border-box; }
body { font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--fg); margin: 0; background: #fff; }
header { background: var(--bg); border-bottom: 1px solid var(--line); padding: 18px 32px 12px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header .meta { color: var(--muted); font-size: 12px; }
nav { margin-top: 10px; font-size: 13px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 14px; }
main { padding: 8px 32px 40px; max-width: 1280px; }
section { margin-top: 22px; }
h2 { font-size: 18px; border-bottom: 1px solid var(--line); padding-bottom: 4px; margin: 0 0 10px; }
h3 { font-size: 15px; margin: 16px 0 6px; }
p.note { color: var(--muted); margin: 4px 0 10px; }
p.warning { border-left: 4px solid #c0392b; background: #fdecea; padding: 8px 12px; margin: 8px 0; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 12px 0 4px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 8px 14px; min-width: 150px; background: #fff; }
.card .v { font-size: 20px; font-weight: 600; }
.card .k { color: var(--muted); font-size: 12px; }
table { border-collapse: collapse; margin: 6px 0 10px; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: right; white-space: nowrap; }
th { background: var(--bg); font-weight: 600; font-size: 12px; white-space: normal;
     min-width: 4.5em; max-width: 11em; vertical-align: bottom; }
.scroll { max-width: 100%; overflow-x: auto; }
.md pre { max-height: 18em; overflow: auto; }
.md h3, .md h4 { font-size: 14px; }
.md p.empty { color: var(--muted); font-style: italic; }
th:first-child, td:first-child { text-align: left; }
tr.student td { background: #eef5fb; }
td.neg { color: #b42318; }
img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; margin: 6px 0; }
.grid { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
pre { background: var(--bg); border: 1px solid var(--line); border-radius: 4px; padding: 8px 10px;
      font-size: 12px; overflow-x: auto; white-space: pre-wrap; }
.kv { columns: 3 300px; column-gap: 28px; font-size: 12px; }
.kv div { break-inside: avoid; display: flex; justify-content: space-between; gap: 10px;
          border-bottom: 1px dotted var(--line); padding: 1px 0; }
.kv .key { color: var(--muted); }
.kv .val { font-family: ui-monospace, Menlo, Consolas, monospace; text-align: right; overflow-wrap: anywhere; }
.kv .none { color: #b0b8bf; }
details summary { cursor: pointer; color: var(--accent); margin: 6px 0; }
"""

# Config keys that say how the distillation is done, shown first in the configuration section:
# whole sections, models, and any key whose last part names a loss, weight or teacher policy.
DISTILLATION_SECTIONS = ("kd", "loss", "losses", "objective", "cache", "teacher_cache", "vocab")
DISTILLATION_PREFIXES = (
    "teacher.model.",
    "student.model.",
    "teacher.checkpoint",
    "teacher.train",
    "teacher.placement",
    "teacher.dtype",
    "teacher.device",
)
DISTILLATION_LEAF = re.compile(
    r"temperature|divergence|vocab|placement|kd_|(^|_)weight$|^(alpha|beta|lam)$|policy"
)


def is_distillation_key(key: str) -> bool:
    """Whether a dotted config key is about how the distillation is done."""
    parts = key.split(".")
    return (
        parts[0] in DISTILLATION_SECTIONS
        or (key.startswith(DISTILLATION_PREFIXES) and not key.startswith("teacher.training"))
        or bool(DISTILLATION_LEAF.search(parts[-1]))
    )


_INLINE = (
    (re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
    (re.compile(r"\*\*(.+?)\*\*"), r"<b>\1</b>"),
)


def _inline(text: str) -> str:
    out = html.escape(text, quote=True)
    for pattern, repl in _INLINE:
        out = pattern.sub(repl, out)
    return out


def markdown_html(text: str) -> str:
    """The Markdown that reports write (``#`` headings, ``**bold**``, `` `code` ``, ``-`` lists,
    fenced code blocks, paragraphs) as HTML, everything escaped.

    A code block with no visible text (a generation of only newlines or spaces) becomes one line
    saying so instead of a screen-high empty block.
    """
    out: list[str] = []
    paragraph: list[str] = []
    items: list[str] = []

    def flush() -> None:
        if paragraph:
            out.append(f"<p>{_inline(' '.join(paragraph))}</p>")
            paragraph.clear()
        if items:
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
            items.clear()

    lines = text.splitlines()
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped.startswith("```"):
            flush()
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            code = "\n".join(lines[i + 1 : j])
            if code.strip():
                shown = code.rstrip()
                out.append(f"<pre>{_e(shown)}</pre>")
                trailing = code[len(shown) :].count("\n")
                if trailing > 2:  # trailing blank lines: counted, not drawn
                    out.append(f'<p class="empty">(then {trailing} line breaks)</p>')
            else:
                breaks = code.count("\n")
                spaces = len(code) - code.count("\n")
                out.append(
                    f'<p class="empty">(no visible text: {breaks} line break(s), {spaces} space(s))</p>'
                )
            i = j + 1
            continue
        heading = re.match(r"^(#{1,6})\s+(.*)$", stripped)
        if heading:
            flush()
            level = min(6, len(heading.group(1)) + 1)  # inside a section's <h2>
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif stripped.startswith(("- ", "* ")):
            if paragraph:
                flush()
            items.append(stripped[2:])
        elif not stripped:
            flush()
        else:
            if items:
                flush()
            paragraph.append(stripped)
        i += 1
    flush()
    return "".join(out)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def img(png: bytes, alt: str) -> str:
    """An ``<img>`` with the PNG embedded as a data URI."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def table_html(
    table: Mapping[str, Any],
    formatters: Mapping[str, Callable[[Any], str]] | None = None,
    highlight: str | None = None,
) -> str:
    """A report table as HTML; the row whose ``model`` is ``highlight`` is tinted."""
    formatters = formatters or {}
    cols = table["columns"]
    # dotted config keys as headers may break after each dot instead of running into the next
    head = "".join(f"<th>{_e(c['label']).replace('.', '.<wbr>')}</th>" for c in cols)
    body = []
    for row in table["rows"]:
        cls = (
            ' class="student"'
            if highlight is not None and row.get(cols[0]["key"]) == highlight
            else ""
        )
        cells = "".join(f"<td>{_e(cell(row, c['key'], formatters))}</td>" for c in cols)
        body.append(f"<tr{cls}>{cells}</tr>")
    return (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _cards(items: Sequence[tuple[str, Any]]) -> str:
    cards = "".join(
        f'<div class="card"><div class="v">{_e(fmt(v))}</div><div class="k">{_e(k)}</div></div>'
        for k, v in items
    )
    return f'<div class="cards">{cards}</div>'


def _kv(flat: Mapping[str, Any]) -> str:
    rows = []
    for key, value in flat.items():
        shown = (
            "null"
            if value is None
            else json.dumps(value)
            if isinstance(value, list | dict)
            else str(value)
        )
        cls = "val none" if value is None else "val"
        rows.append(
            f'<div><span class="key">{_e(key)}</span><span class="{cls}">{_e(shown)}</span></div>'
        )
    return f'<div class="kv">{"".join(rows)}</div>'


def _read(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


def _student_value(report: Mapping[str, Any], part: str, key: str, student: str | None) -> Any:
    table = (report.get(part) or {}).get("table") or {}
    row = next((r for r in table.get("rows", []) if r.get("model") == student), None)
    return None if row is None else row.get(key)


def _speed_cards(report: Mapping[str, Any], student: str | None) -> list[tuple[str, Any]]:
    """A card per measured speed-up of the student (batch-1 forward, generation): the median
    and quartiles, or "too noisy" when the interleaved rounds do not allow a call."""
    labels = {
        "speedup": "at batch 1",
        "forward_speedup": "forward pass",
        "gen_speedup": "generating",
    }
    cards: list[tuple[str, Any]] = []
    for key, where in labels.items():
        value = _student_value(report, "cost", key, student)
        if not isinstance(value, int | float):
            continue
        q1 = _student_value(report, "cost", f"{key}_q1", student)
        q3 = _student_value(report, "cost", f"{key}_q3", student)
        spread = f" (quartiles {q1:.2g}-{q3:.2g}×)" if q1 is not None and q3 is not None else ""
        if _student_value(report, "cost", f"{key}_noisy", student):
            cards.append(
                (f"speed vs the teacher, {where}: median {value:.2g}×{spread}", "too noisy")
            )
        elif value >= 1:
            cards.append((f"faster than the teacher, {where}{spread}", f"{times(value)}"))
        else:
            cards.append((f"slower than the teacher, {where}{spread}", f"{times(1 / value)}"))
    return cards


def times(ratio: float) -> str:
    """``8.2×``, ``28×``: two significant digits below 10, whole numbers above."""
    return f"{ratio:.1f}×" if ratio < 9.95 else f"{ratio:.0f}×"


def _summary(report: Mapping[str, Any], student: str | None) -> str:
    out = ['<section id="summary"><h2>Summary</h2>']
    cards: list[tuple[str, Any]] = []
    gap = (report.get("quality") or {}).get("gap_closed")
    if gap is not None:
        cards.append(("of the teacher-baseline gap closed", percent(gap)))
    agreement = _student_value(report, "fidelity", "agreement", student)
    if agreement is not None:
        cards.append(("top-1 agreement with the teacher", percent(agreement, 1)))
    cards += _speed_cards(report, student)
    ratio = _student_value(report, "cost", "size_ratio", student)
    if ratio is not None:
        cards.append(("fewer parameters than the teacher", f"{ratio:.1f}×"))
    if cards:
        out.append(_cards(cards))
    out.extend(
        f'<p class="warning"><b>Warning:</b> {_e(w)}</p>' for w in report.get("warnings", [])
    )
    if report.get("table"):
        out.append(table_html(report["table"], byte_formatters(report["table"]), student))
    highlights = report.get("highlights") or {}
    if highlights:
        out.append(
            "<ul>"
            + "".join(f"<li><b>{_e(k)}</b>: {_e(fmt(v))}</li>" for k, v in highlights.items())
            + "</ul>"
        )
    out.append("</section>")
    return "".join(out)


def _quality(quality: Mapping[str, Any], student: str | None, images: Mapping[str, bytes]) -> str:
    out = ['<section id="quality"><h2>Quality</h2>', table_html(quality["table"], None, student)]
    direction = "higher" if quality.get("higher_is_better", True) else "lower"
    out.append(
        f'<p class="note">Gap closed on <b>{_e(quality["primary"])}</b> ({direction} is better): '
        f'<b id="gap-closed">{_e(fmt(quality.get("gap_closed")))}</b> — 1 means the student matches the teacher, '
        "0 means it does no better than the same student trained without the teacher.</p>"
    )
    per_class = quality.get("per_class")
    if per_class:
        metric = per_class.get("metric", quality["primary"])
        out.append(f"<h3>Per {_e(per_class.get('label_header', 'class'))}: {_e(metric)}</h3>")
        if "per_class" in images:
            out.append(img(images["per_class"], f"{metric} per class"))
        out.append(
            f"<details><summary>per-class table ({len(per_class['labels'])} rows)</summary>{table_html(per_class_table(per_class))}</details>"
        )
    out.append("</section>")
    return "".join(out)


def _fidelity(fidelity: Mapping[str, Any], student: str | None, images: Mapping[str, bytes]) -> str:
    out = ['<section id="fidelity"><h2>Fidelity to the teacher</h2>']
    out.append(
        f'<p class="note">Measured on {_e(fidelity.get("split", "held-out data"))} at temperature 1. '
        "Agreement: same top-1 class as the teacher. KL and JSD: mean per example, in nats. "
        "ECE: expected calibration error (0 is perfectly calibrated).</p>"
    )
    out.append(table_html(fidelity["table"], None, student))
    if "reliability" in images:
        out.append("<h3>Reliability diagrams</h3>")
        out.append(
            '<p class="note">Bars: accuracy per confidence bin; black ticks: the bin&#39;s mean confidence. A tick above its bar is over-confidence, below it under-confidence; the lower panels count the examples per bin.</p>'
        )
        out.append(img(images["reliability"], "reliability diagrams"))
    if "confusion" in images:
        out.append("<h3>Confusion matrices</h3>")
        out.append(img(images["confusion"], "confusion matrices"))
    out.append("</section>")
    return "".join(out)


def _cost(cost: Mapping[str, Any], student: str | None, images: Mapping[str, bytes]) -> str:
    out = [
        '<section id="cost"><h2>Cost</h2>',
        table_html(cost["table"], byte_formatters(cost["table"]), student),
    ]
    out.append(
        '<p class="note">Latency and throughput are measured with one CPU thread (comparable between runs on a busy machine) on the machine that made this report; '
        "peak memory is the weights plus the largest set of tensors alive during one forward pass at the "
        "throughput batch.</p>"
    )
    training = cost.get("training")
    if training:
        out.append("<h3>Training time</h3>")
        rows = [
            {
                "model": p,
                "seconds": s,
                "share": s / training["wall_time_s"] if training["wall_time_s"] else None,
            }
            for p, s in training["phases"].items()
        ]
        rows.append({"model": "total", "seconds": training["wall_time_s"], "share": 1.0})
        tbl = {
            "columns": [
                {"key": "model", "label": "phase"},
                {"key": "seconds", "label": "wall time s"},
                {"key": "share", "label": "share"},
            ],
            "rows": rows,
        }
        out.append('<div class="grid">' + table_html(tbl))
        if "training_time" in images:
            out.append(img(images["training_time"], "training wall time per phase"))
        out.append("</div>")
        if training.get("teacher_overhead") is not None:
            out.append(
                f'<p class="note">Teacher vs student time: the live teacher made the KD phase '
                f"<b>{_e(relative_time_text(training['teacher_overhead']))}</b> than training the same student "
                "without it (the baseline phase).</p>"
            )
    out.append("</section>")
    return "".join(out)


def _curves(curves: Mapping[str, Any], images: Mapping[str, bytes]) -> str:
    out = ['<section id="curves"><h2>Training curves</h2>']
    out.append(
        '<p class="note">From metrics.jsonl. Loss components: raw solid, weighted (as they enter the loss) dashed; '
        "long series show a moving average over the faint per-step values.</p>"
    )
    for name in ("curves-loss", "curves-optim", "curves-eval"):
        if name in images:
            out.append(img(images[name], name))
    rows = []
    for phase, info in curves.get("phases", {}).items():
        for key, series in info["series"].items():
            rows.append(
                {
                    "model": phase,
                    "series": key,
                    "points": series["points"],
                    "final": series["final"],
                }
            )
    tbl = {
        "columns": [
            {"key": "model", "label": "phase"},
            {"key": "series", "label": "series"},
            {"key": "points", "label": "points"},
            {"key": "final", "label": "last value"},
        ],
        "rows": rows,
    }
    out.append(
        f"<details><summary>last values ({len(rows)} series)</summary>{table_html(tbl)}</details></section>"
    )
    return "".join(out)


def _config(run_dir: Path, report: Mapping[str, Any]) -> str:
    out = ['<section id="config"><h2>Effective configuration</h2>']
    mode = _read(run_dir / "mode.txt")
    if mode:
        out.append(f"<h3>Mode announced at the start of the run</h3><pre>{_e(mode.strip())}</pre>")
    text = _read(run_dir / "config.resolved.yaml")
    if text is not None:
        flat = flatten_config(yaml.safe_load(text) or {})
        key_items = {k: v for k, v in flat.items() if is_distillation_key(k)}
        if key_items:
            out.append("<h3>Distillation settings</h3>" + _kv(key_items))
        out.append("<h3>All settings (config.resolved.yaml)</h3>" + _kv(flat))
    else:
        out.append('<p class="note">config.resolved.yaml is missing from the run folder.</p>')
    out.append("</section>")
    return "".join(out)


def _environment(run_dir: Path) -> str:
    out = ['<section id="environment"><h2>Environment</h2>']
    text = _read(run_dir / "env.json")
    if text is None:
        out.append('<p class="note">env.json is missing from the run folder.</p>')
    else:
        env = json.loads(text)
        packages = env.pop("packages", {}) or {}
        argv = env.pop("argv", None)
        flat = {k: v for k, v in env.items()}
        flat.update({f"package {k}": v for k, v in packages.items()})
        out.append(_kv(flat))
        if argv:
            out.append(f"<h3>Command</h3><pre>{_e(' '.join(str(a) for a in argv))}</pre>")
    out.append("</section>")
    return "".join(out)


def _figures(figures: Sequence[Mapping[str, Any]], run_dir: Path) -> str:
    """PNGs a recipe wrote into the run folder (``{"title", "file"}``, file relative to it),
    embedded; a missing file is named instead of breaking the page."""
    body = '<section id="figures"><h2>Figures</h2>'
    for figure in figures:
        path = run_dir / str(figure["file"])
        body += f"<h3>{_e(figure['title'])}</h3>"
        body += (
            img(path.read_bytes(), str(figure["title"]))
            if path.is_file()
            else f'<p class="warning">missing: {_e(figure["file"])}</p>'
        )
    return body + "</section>"


def render_html(report: Mapping[str, Any], run_dir: Path, images: Mapping[str, bytes]) -> str:
    """The whole page.

    Args:
        report: The completed report (see :mod:`distil.evaluation.report`).
        run_dir: The run folder, for the configuration, mode and environment files.
        images: PNGs by plot name (:func:`distil.evaluation.plots.report_plots`).
    """
    run_dir = Path(run_dir)
    title = str(report.get("title", "distil run"))
    student = (report.get("roles") or {}).get("student")
    env = json.loads(_read(run_dir / "env.json") or "{}")
    meta = " · ".join(
        _e(x)
        for x in (
            f"recipe {report.get('recipe', '?')}",
            f"run folder {run_dir.name}",
            env.get("time_utc"),
            env.get("git_sha") and f"git {str(env['git_sha'])[:12]}",
        )
        if x
    )
    parts: list[tuple[str, str, str]] = [("summary", "Summary", _summary(report, student))]
    if report.get("quality"):
        parts.append(("quality", "Quality", _quality(report["quality"], student, images)))
    if report.get("fidelity"):
        parts.append(("fidelity", "Fidelity", _fidelity(report["fidelity"], student, images)))
    if report.get("cost"):
        parts.append(("cost", "Cost", _cost(report["cost"], student, images)))
    if report.get("speculative"):
        from distil.evaluation.speculative_render import speculative_html

        body = speculative_html(report["speculative"], images, table_html, img)
        parts.append(("speculative", "Speculative decoding", body))
    if report.get("curves"):
        parts.append(("curves", "Training curves", _curves(report["curves"], images)))
    if report.get("monitor"):
        mon = report["monitor"]
        body = (
            f'<section id="monitor"><h2>Teacher-hacking monitor</h2><p><b>{_e(mon["text"])}</b></p>'
        )
        if "monitor" in images:
            body += img(images["monitor"], "teacher-hacking monitor")
        parts.append(("monitor", "Teacher hacking", body + "</section>"))
    if report.get("figures"):
        parts.append(("figures", "Figures", _figures(report["figures"], run_dir)))
    parts.append(("config", "Configuration", _config(run_dir, report)))
    parts.append(("environment", "Environment", _environment(run_dir)))
    for i, (heading, body) in enumerate((report.get("sections") or {}).items()):
        parts.append(
            (
                f"section-{i}",
                str(heading),
                f'<section id="section-{i}" class="md"><h2>{_e(heading)}</h2>{markdown_html(body)}</section>',
            )
        )
    if report.get("details"):
        details = json.dumps(report["details"], indent=1, default=str)
        parts.append(
            (
                "details",
                "Details",
                f'<section id="details"><h2>Details</h2><details><summary>report details (JSON)</summary><pre>{_e(details)}</pre></details></section>',
            )
        )
    nav = "".join(f'<a href="#{anchor}">{_e(label)}</a>' for anchor, label, _ in parts)
    body = "".join(content for _, _, content in parts)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
        f'<header><h1>{_e(title)}</h1><div class="meta">{meta}</div><nav>{nav}</nav></header>'
        f"<main>{body}</main></body></html>\n"
    )
