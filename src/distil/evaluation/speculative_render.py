"""Markdown and HTML for the ``speculative`` report part (:mod:`distil.evaluation.drafts`)."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

from distil.evaluation.report import fmt, make_table, md_table

DEFINITIONS = (
    "α: per-token acceptance on the target's own text (greedy: top-1 agreement; T > 0: "
    "Σ min(p, q), exact from both models' logits). τ: tokens a verification round emits, the "
    "target's own token included, over rounds that proposed all γ draft tokens; τ from α = "
    "(1 − α^(γ+1)) / (1 − α). Tokens per target call: every round, short last rounds included. "
    "c: draft / target time of one decoding step; v(γ): target time on γ + 1 tokens / on 1 "
    "(both measured here, batch 1). Speed-up (model, v=1) = τ / (γ·c + 1), for hardware where "
    "verifying γ + 1 tokens costs one step: a model, not a measurement. Speed-up (model, this "
    "CPU) = τ / (γ·c + v(γ)). Speed-up measured: tokens/s of speculative over target-alone "
    "decoding, batch 1, wall clock. See docs/speculative.md."
)

LOWEST_COLUMNS = [
    ("token", "target token"),
    ("count", "times"),
    ("acceptance", "mean acceptance"),
    ("draft_instead", "draft's usual argmax there"),
]


def _costs_line(part: Mapping[str, Any]) -> str:
    out = []
    for key, label in (("costs", "batch 1"), ("costs_batch", f"batch {part.get('batch_size')}")):
        costs = part.get(key)
        if not costs:
            continue
        verify = ", ".join(f"v({g}) {fmt(v)}" for g, v in costs["verify_cost"].items())
        out.append(
            f"{label}, {costs['context_tokens']} cached tokens: target step {fmt(costs['target_step_ms'])} ms, "
            f"draft step {fmt(costs['draft_step_ms'])} ms, c = {fmt(costs['cost_ratio'])}; {verify}"
        )
    return "; ".join(out) + "."


def _speed_line(part: Mapping[str, Any]) -> str:
    return " ".join(
        f"{mode}, γ={s['gamma']}, {s['prompts']} prompts at batch 1: target alone "
        f"{fmt(s['target_alone_tokens_per_s'])} tokens/s, speculative {fmt(s['speculative_tokens_per_s'])} "
        f"tokens/s, measured speed-up {fmt(s['measured_speedup'])}x (in process CPU time "
        f"{fmt(s['cpu_time_speedup'])}x)."
        for mode, s in part.get("speed", {}).items()
    )


def _lossless_lines(part: Mapping[str, Any]) -> list[str]:
    lines = []
    for key, check in part.get("lossless", {}).items():
        if "identical_rows" in check:
            lines.append(
                f"{key}: {check['identical_rows']}/{check['rows']} rows token-identical to the target "
                f"alone; target calls derived from α's agreement sequence {check['calls_from_alpha']} vs "
                f"counted {check['calls_counted']} ({check['rows_compared']} rows without EOS)"
            )
        else:
            lines.append(
                f"{key}: first token of {check['samples']} speculative samples vs the target's exact "
                f"distribution: χ² = {fmt(check['chi2'])}, {check['dof']} dof, p = {fmt(check['p_value'])}; "
                f"first-position acceptance {fmt(check['acceptance'])} (exact {fmt(check['alpha'])})"
            )
    return lines


def _lowest_table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return make_table(LOWEST_COLUMNS, rows)


def speculative_markdown(part: Mapping[str, Any], plots: Mapping[str, str]) -> list[str]:
    """The ``## Speculative decoding`` section (the τ table is the report's headline table)."""
    lines = ["## Speculative decoding", "", DEFINITIONS, "", "Costs: " + _costs_line(part), ""]
    if part.get("speed"):
        lines += [_speed_line(part), ""]
    lines += [
        f"![{name}]({plots[name]})"
        for name in ("speculative_position", "speculative_tau")
        if name in plots
    ]
    lines += (
        ["", "### Lossless checks", ""] + [f"- {line}" for line in _lossless_lines(part)] + [""]
    )
    for mode, rows in part.get("lowest", {}).items():
        lines += [
            f"### Where the draft is accepted least ({mode})",
            "",
            *md_table(_lowest_table(rows)),
        ]
    return lines


def speculative_html(
    part: Mapping[str, Any], images: Mapping[str, bytes], table_html: Any, img: Any
) -> str:
    """The ``speculative`` section of ``report.html``."""
    e = html.escape
    out = [
        '<section id="speculative"><h2>Speculative decoding</h2>',
        f'<p class="note">{e(DEFINITIONS)}</p>',
    ]
    out.append(f"<p>Costs: {e(_costs_line(part))}</p>")
    if part.get("speed"):
        out.append(f"<p>{e(_speed_line(part))}</p>")
    out.append('<div class="grid">')
    for name, alt in (
        ("speculative_position", "acceptance by position"),
        ("speculative_tau", "τ by γ"),
    ):
        if name in images:
            out.append(img(images[name], alt))
    out.append("</div><h3>Lossless checks</h3><ul>")
    out += [f"<li>{e(line)}</li>" for line in _lossless_lines(part)]
    out.append("</ul>")
    for mode, rows in part.get("lowest", {}).items():
        out.append(f"<h3>Where the draft is accepted least ({e(mode)})</h3>")
        out.append(table_html(_lowest_table(rows)))
    out.append("</section>")
    return "".join(out)
