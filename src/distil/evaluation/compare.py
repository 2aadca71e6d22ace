"""``distil compare RUN_DIR...``: several runs side by side, the config keys that differ as
columns, the headline numbers of each report (its ``summary``) after them — the way to read a
sweep. Written as ``compare.json``, ``compare.md`` and a self-contained ``compare.html``.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from distil.errors import DistilError
from distil.evaluation.report import (
    complete_report,
    flatten_config,
    fmt,
    load_report,
    md_table,
    read_metrics_rows,
    series_by_phase,
    summary_of,
)

logger = logging.getLogger(__name__)

COMPARE_CSS = (
    "main { max-width: none; } #table td, #table th { font-size: 12px; padding: 3px 8px; }"
)
IGNORED_KEYS = frozenset({"run.output_dir"})  # differs between sweeps without changing the run
# The summary labels printed in the terminal (all of them go to the files), in this order.
TERMINAL_METRICS = re.compile(
    r"^(teacher|baseline) (test accuracy|perplexity)|^student (test accuracy|perplexity|top-1 agreement|KL|ECE|speed-up)|^gap closed|^train wall time"
)
LOWER_IS_BETTER = re.compile(
    r"KL|JSD|ECE|perplexity|loss|time|ms\b|memory|bytes|on disk|params$", re.IGNORECASE
)


def _config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.resolved.yaml"
    if not path.is_file():
        logger.warning("%s has no config.resolved.yaml; its config columns are empty", run_dir)
        return {}
    return flatten_config(yaml.safe_load(path.read_text()) or {})


def differing_keys(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Dotted keys whose value is not the same in every config (a missing key counts as a value)."""
    keys = list(dict.fromkeys(k for c in configs for k in c))
    return [
        k
        for k in keys
        if k not in IGNORED_KEYS
        and len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1
    ]


def _short(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, list | dict) else value


def compare_runs(run_dirs: Sequence[Path]) -> dict[str, Any]:
    """The comparison of several run folders.

    Returns:
        ``{"runs": [{"name", "path"}], "config_keys": [...], "metrics": [...], "table": {...}}``,
        ``table`` with one row per run: ``run``, then each differing config key, then each summary
        metric.

    Raises:
        DistilError: If fewer than two runs are given or a run has no report.
    """
    if len(run_dirs) < 2:
        raise DistilError("distil compare needs at least two run folders")
    reports: list[dict[str, Any]] = []
    configs: list[dict[str, Any]] = []
    for run_dir in run_dirs:
        report = load_report(run_dir)
        if "summary" not in report:  # written before summaries existed: derive it now
            report = complete_report(run_dir, report)
        reports.append(report)
        configs.append(_config(Path(run_dir)))
    keys = differing_keys(configs)
    metrics = list(dict.fromkeys(m for r in reports for m in (r.get("summary") or summary_of(r))))
    names = _unique_names(run_dirs)
    rows = []
    for name, config, report in zip(names, configs, reports, strict=True):
        summary = report.get("summary") or summary_of(report)
        rows.append(
            {
                "run": name,
                **{k: _short(config.get(k)) for k in keys},
                **{m: summary.get(m) for m in metrics},
            }
        )
    columns = [
        {"key": "run", "label": "run"},
        *({"key": k, "label": k} for k in keys),
        *({"key": m, "label": m} for m in metrics),
    ]
    return {
        "runs": [
            {"name": n, "path": str(Path(p).resolve())}
            for n, p in zip(names, run_dirs, strict=True)
        ],
        "recipes": sorted({str(r.get("recipe")) for r in reports}),
        "config_keys": keys,
        "metrics": metrics,
        "table": {"columns": columns, "rows": rows},
    }


def _common_start(texts: Sequence[str]) -> str:
    """The characters every text starts with."""
    first = min(texts, key=len)
    for i, char in enumerate(first):
        if any(t[i] != char for t in texts):
            return first[:i]
    return first


def distinct_labels(names: Sequence[str]) -> list[str]:
    """The part of each name that tells it from the others: the text all names start and end
    with is dropped, at a ``-``, ``_``, ``.`` or ``/`` boundary (``classifier_kd-20261128-110513``
    and ``...-110514`` become ``110513`` and ``110514``). Names are kept whole when that would
    leave one empty or two alike."""
    if len(names) < 2:
        return list(names)
    separators = "-_./"
    prefix = _common_start(names)
    cut = max((prefix.rfind(c) for c in separators), default=-1) + 1
    if len(prefix) == min(len(n) for n in names):  # one name is the prefix itself
        cut = 0
    suffix = _common_start([n[::-1] for n in names])[::-1]
    keep = len(suffix) - min(
        (suffix.find(c) for c in separators if c in suffix), default=len(suffix)
    )
    parts = [n[cut : len(n) - keep] for n in names]
    if any(not p for p in parts) or len(set(parts)) < len(parts):
        return list(names)
    return parts


def _unique_names(run_dirs: Sequence[Path]) -> list[str]:
    names = [Path(p).resolve().name for p in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [str(Path(p)) for p in run_dirs]


def terminal_table(comparison: Mapping[str, Any]) -> dict[str, Any]:
    """The comparison table cut to the run, the differing keys and the main metrics."""
    keep = [
        "run",
        *comparison["config_keys"],
        *(m for m in comparison["metrics"] if TERMINAL_METRICS.search(m)),
    ]
    table = comparison["table"]
    return {"columns": [c for c in table["columns"] if c["key"] in keep], "rows": table["rows"]}


def best_rows(comparison: Mapping[str, Any]) -> dict[str, int]:
    """For each metric column, the index of the best run (lower is better for KL, ECE, time...)."""
    out: dict[str, int] = {}
    rows = comparison["table"]["rows"]
    for metric in comparison["metrics"]:
        values = [(i, r.get(metric)) for i, r in enumerate(rows)]
        numeric = [
            (i, float(v))
            for i, v in values
            if isinstance(v, int | float) and not isinstance(v, bool)
        ]
        if len(numeric) < 2 or len({v for _, v in numeric}) == 1:
            continue
        pick = min if LOWER_IS_BETTER.search(metric) else max
        out[metric] = pick(numeric, key=lambda iv: iv[1])[0]
    return out


def render_compare_markdown(comparison: Mapping[str, Any]) -> str:
    """``compare.md``: the full table and where each run lives."""
    lines = [
        "# distil compare",
        "",
        f"{len(comparison['runs'])} runs; differing config keys: "
        + (", ".join(f"`{k}`" for k in comparison["config_keys"]) or "none"),
        "",
    ]
    lines += md_table(comparison["table"])
    lines += ["## Runs", ""] + [f"- `{r['name']}`: {r['path']}" for r in comparison["runs"]] + [""]
    return "\n".join(lines)


def compare_plots(comparison: Mapping[str, Any], run_dirs: Sequence[Path]) -> dict[str, bytes]:
    """Headline metrics across runs, and the student's eval curves of every run overlaid."""
    from distil.evaluation.plots import EXTRA_COLORS, ROLE_COLORS, line, new_figure, to_png

    out: dict[str, bytes] = {}
    rows = comparison["table"]["rows"]
    keys = comparison["config_keys"]
    # A sweep over one or two keys reads best as key=value; more keys would not fit under a bar,
    # and run folder names differ only in their last characters: label by what differs.
    labels = (
        [", ".join(f"{k.split('.')[-1]}={r.get(k)}" for k in keys) for r in rows]
        if 0 < len(keys) <= 2
        else distinct_labels([r["run"] for r in rows])
    )
    slanted = len(rows) > 3 or max(len(label) for label in labels) > 12
    metrics = [
        m
        for m in comparison["metrics"]
        if TERMINAL_METRICS.search(m) and any(isinstance(r.get(m), int | float) for r in rows)
    ]
    metrics = [m for m in metrics if not m.startswith(("teacher", "baseline"))][:6]
    if metrics:
        cols = min(3, len(metrics))
        nrows = -(-len(metrics) // cols)
        width = max(4.2, 0.45 * len(rows) + 1.5)  # room under each bar for its label
        fig = new_figure(width * cols, (3.4 if slanted else 2.9) * nrows)
        axes = fig.subplots(nrows, cols, squeeze=False).flatten()
        for ax, metric in zip(axes, metrics, strict=False):
            values = [
                r.get(metric) if isinstance(r.get(metric), int | float) else float("nan")
                for r in rows
            ]
            ax.bar(range(len(rows)), values, color=ROLE_COLORS["student"], alpha=0.85)
            ax.set_xticks(
                range(len(rows)),
                labels,
                fontsize=7,
                rotation=30 if slanted else 0,
                ha="right" if slanted else "center",
                rotation_mode="anchor",
            )
            ax.set_title(metric, fontsize=9)
            ax.grid(True, axis="y", alpha=0.3)
            ax.spines[["top", "right"]].set_visible(False)
            ax.tick_params(labelsize=7)
        for ax in axes[len(metrics) :]:
            ax.set_visible(False)
        out["metrics"] = to_png(fig)
    series: dict[str, list[tuple[str, list[tuple[int, float]]]]] = {}
    for label, run_dir in zip(labels, run_dirs, strict=True):
        phases = series_by_phase(read_metrics_rows(Path(run_dir)))
        student = phases.get("student") or {}
        for key, points in student.items():
            if key not in ("lr", "grad_norm"):
                series.setdefault(key, []).append((label, points))
    keys_to_plot = [k for k in series if not k.endswith("/weighted")][:6]
    if keys_to_plot:
        cols = min(3, len(keys_to_plot))
        nrows = -(-len(keys_to_plot) // cols)
        fig = new_figure(4.2 * cols, 2.9 * nrows)
        axes = fig.subplots(nrows, cols, squeeze=False).flatten()
        for ax, key in zip(axes, keys_to_plot, strict=False):
            for i, (label, points) in enumerate(series[key]):
                color = EXTRA_COLORS[i % len(EXTRA_COLORS)] if i else ROLE_COLORS["student"]
                line(ax, points, color, label, "o" if len(points) <= 30 else "-")
            ax.set_title(f"student: {key}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.legend(fontsize=6, frameon=False)
            ax.grid(True, alpha=0.3)
            ax.spines[["top", "right"]].set_visible(False)
            ax.tick_params(labelsize=7)
        for ax in axes[len(keys_to_plot) :]:
            ax.set_visible(False)
        out["student_curves"] = to_png(fig)
    return out


def render_compare_html(comparison: Mapping[str, Any], images: Mapping[str, bytes]) -> str:
    """``compare.html``: the table (best value of each metric in bold) and the plots."""
    from distil.evaluation.html import CSS, img, table_html

    best = best_rows(comparison)
    table = comparison["table"]
    rows = []
    for i, row in enumerate(table["rows"]):
        shown = dict(row)
        for metric, index in best.items():
            if index == i:
                shown[metric] = f"★ {fmt(row.get(metric))}"
        rows.append(shown)
    keys = comparison["config_keys"]
    body = [
        "<header><h1>distil compare</h1>",
        f'<div class="meta">{len(comparison["runs"])} runs · recipes {html.escape(", ".join(comparison["recipes"]))} · differing config keys: '
        + html.escape(", ".join(keys) or "none")
        + "</div></header><main>",
        '<section id="table"><h2>Runs side by side</h2><p class="note">★ marks the best run for each metric '
        "(lower is better for KL, JSD, ECE, time, memory and size).</p>",
        f'<div style="overflow-x:auto">{table_html({"columns": table["columns"], "rows": rows})}</div></section>',
    ]
    if images:
        body.append('<section id="plots"><h2>Plots</h2>')
        body += [img(png, name) for name, png in images.items()]
        body.append("</section>")
    body.append('<section id="runs"><h2>Run folders</h2><ul>')
    body += [
        f"<li><b>{html.escape(r['name'])}</b>: {html.escape(r['path'])}</li>"
        for r in comparison["runs"]
    ]
    body.append("</ul></section></main>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>distil compare</title>'
        f"<style>{CSS}{COMPARE_CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )


def default_out_dir(run_dirs: Sequence[Path]) -> Path:
    """The runs' common parent folder (where a sweep's runs live), else the current folder."""
    parents = {str(Path(p).resolve().parent) for p in run_dirs}
    if len(parents) == 1:
        return Path(parents.pop())
    return Path(os.path.commonpath([str(Path(p).resolve()) for p in run_dirs]) or ".")


def write_comparison(
    comparison: Mapping[str, Any], run_dirs: Sequence[Path], out_dir: Path
) -> list[Path]:
    """Write ``compare.json``, ``compare.md`` and ``compare.html`` into ``out_dir``; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "compare.json", out_dir / "compare.md", out_dir / "compare.html"]
    paths[0].write_text(json.dumps(comparison, indent=1, default=str))
    paths[1].write_text(render_compare_markdown(comparison))
    paths[2].write_text(
        render_compare_html(comparison, compare_plots(comparison, run_dirs)), encoding="utf-8"
    )
    return paths
