"""The ``speculative`` report part renders to Markdown, HTML and plots (hand-made numbers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distil.evaluation.drafts import TABLE_COLUMNS
from distil.evaluation.report import make_table, write_report


def _part() -> dict[str, Any]:
    rows = [
        {
            "model": f"{mode} γ={g}",
            "mode": mode,
            "gamma": g,
            "alpha": a,
            "tau": t,
            "tau_predicted": p,
        }
        for mode, a in (("greedy", 0.6), ("T=1", 0.5))
        for g, t, p in ((1, 1.6, 1.6), (4, 2.4, 2.31))
    ]
    costs = {
        "batch_size": 1,
        "context_tokens": 96,
        "target_step_ms": 4.0,
        "draft_step_ms": 1.0,
        "cost_ratio": 0.25,
        "verify_ms": {"1": 4.2, "4": 5.0},
        "verify_cost": {"1": 1.05, "4": 1.25},
    }
    return {
        "table": make_table(TABLE_COLUMNS, rows),
        "alpha": {"greedy": 0.6, "T=1": 0.5},
        "by_position": {
            "greedy": {"1": [0.6], "4": [0.55, 0.62, 0.7, None]},
            "T=1": {"1": [0.5], "4": [0.5, 0.52, 0.55, 0.6]},
        },
        "costs": costs,
        "costs_batch": costs | {"batch_size": 16},
        "batch_size": 16,
        "speed": {
            "greedy": {
                "gamma": 4,
                "prompts": 8,
                "target_alone_tokens_per_s": 200.0,
                "speculative_tokens_per_s": 250.0,
                "measured_speedup": 1.25,
                "cpu_time_speedup": 1.3,
            }
        },
        "lossless": {
            "greedy γ=4": {
                "identical_rows": 64,
                "rows": 64,
                "calls_from_alpha": 900,
                "calls_counted": 900,
                "rows_compared": 60,
            },
            "T=1": {
                "chi2": 12.0,
                "dof": 10,
                "p_value": 0.28,
                "samples": 512,
                "acceptance": 0.51,
                "alpha": 0.5,
            },
        },
        "lowest": {
            "greedy": [{"token": "'\\n'", "count": 9, "acceptance": 0.1, "draft_instead": "' '"}]
        },
    }


def test_speculative_part_renders_everywhere(tmp_path: Path) -> None:
    report = {
        "title": "speculative decoding: draft d for target t",
        "recipe": "speculate",
        "table": _part()["table"],
        "speculative": _part(),
    }
    write_report(tmp_path, report)
    markdown = (tmp_path / "report.md").read_text()
    assert "## Speculative decoding" in markdown
    assert "64/64 rows token-identical" in markdown and "900 vs counted 900" in markdown
    assert "χ² = 12" in markdown and "measured speed-up 1.25x" in markdown
    assert "### Where the draft is accepted least (greedy)" in markdown
    page = (tmp_path / "report.html").read_text()
    assert 'id="speculative"' in page and page.count("data:image/png;base64") >= 2
    assert {p.name for p in (tmp_path / "plots").glob("*.png")} == {
        "speculative_position.png",
        "speculative_tau.png",
    }
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["summary"]["greedy γ=4 τ measured"] == 2.4
