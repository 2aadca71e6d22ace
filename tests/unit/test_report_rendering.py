"""What a person sees in a report or a comparison (issue 13 item 16): Markdown rendered, empty
generations one line high, no "-0 %", divergences clamped at zero, "28x slower", per-class axes
from 0, run names and chart labels that tell runs apart."""

from __future__ import annotations

import io
import re
from pathlib import Path

from rich.console import Console

from distil.evaluation.calibration import clamp_divergence
from distil.evaluation.compare import distinct_labels
from distil.evaluation.html import markdown_html, render_html
from distil.evaluation.plots import per_class_ylim
from distil.evaluation.report import (
    percent,
    print_table,
    relative_time_text,
    render_markdown,
)

SAMPLES = (
    "### Prompt 1\n\n```\ndef f(x):\n```\n\n"
    "**teacher**\n\n```\n    return x" + "\n" * 30 + "\n```\n\n"
    "**student (KD)**\n\n```\n" + "\n" * 40 + "\n```\n"  # as lm_kd writes a generation
)


def test_sample_generations_are_rendered_markdown_and_empty_ones_stay_short() -> None:
    out = markdown_html(SAMPLES)
    assert "<b>teacher</b>" in out and "<b>student (KD)</b>" in out
    assert "```" not in out and "**" not in out and "###" not in out
    assert "<h4>Prompt 1</h4>" in out and "<pre>    return x</pre>" in out
    assert "no visible text: 40 line break(s)" in out
    assert "(then 30 line breaks)" in out  # trailing blank lines counted, not drawn
    assert out.count("<pre>") == 2  # the newline-only generation is no screen-high <pre>
    assert "&lt;script&gt;" in markdown_html("**<script>**")  # everything escaped


def test_report_sections_render_as_markdown(tmp_path: Path) -> None:
    report = {"title": "t", "sections": {"Sample generations (greedy)": SAMPLES}}
    html = render_html(report, tmp_path, {})
    section = re.search(r'<section id="section-0"[^>]*>(.*?)</section>', html, re.S)
    assert section and "<b>teacher</b>" in section.group(1) and "```" not in section.group(1)


def test_no_minus_zero_percent() -> None:
    assert percent(-0.001) == "0 %" and percent(-0.0) == "0 %"
    assert percent(0.123) == "12 %" and percent(-0.25) == "-25 %" and percent(0.5, 1) == "50.0 %"


def test_gap_closed_card_never_shows_minus_zero(tmp_path: Path) -> None:
    report = {
        "title": "t",
        "roles": {"student": "student (KD)"},
        "quality": {
            "table": {"columns": [{"key": "model", "label": "model"}], "rows": []},
            "primary": "accuracy",
            "gap_closed": -0.002,
        },
    }
    html = render_html(report, tmp_path, {})
    assert "-0 %" not in html and '<div class="v">0 %</div>' in html


def test_divergences_clamp_rounding_noise_at_zero() -> None:
    assert clamp_divergence(-1.1e-07) == 0.0
    assert clamp_divergence(-0.3) == 0.0  # a divergence is never negative
    assert clamp_divergence(3e-3) == 3e-3


def test_long_slowdowns_read_as_times_not_thousands_of_percent() -> None:
    assert relative_time_text(27.33) == "28x slower"
    assert relative_time_text(1.5) == "2.5x slower"
    assert relative_time_text(0.54) == "54 % slower"
    assert relative_time_text(-0.12) == "12 % faster"
    md = render_markdown(
        {
            "title": "t",
            "cost": {
                "table": {"columns": [{"key": "model", "label": "model"}], "rows": []},
                "training": {
                    "wall_time_s": 10.0,
                    "phases": {"student": 9.0, "baseline": 1.0},
                    "teacher_overhead": 27.33,
                },
            },
        }
    )
    assert "28x slower" in md and "2733" not in md


def test_per_class_axes_start_at_zero() -> None:
    assert per_class_ylim({"a": [0.91, 0.97], "b": [0.95, None]}) == (0.0, 1.0)
    assert per_class_ylim({"a": [3.2, 7.0]}) is None  # not a share: Matplotlib's range


def test_run_names_and_chart_labels_tell_runs_apart() -> None:
    names = ["classifier_kd-20261128-110513", "classifier_kd-20261128-110514"]
    assert distinct_labels(names) == ["110513", "110514"]
    assert distinct_labels(["a-x-final", "a-y-final"]) == ["x", "y"]
    assert distinct_labels(["run1", "run2"]) == ["run1", "run2"]
    table = {
        "columns": [{"key": "run", "label": "run"}]
        + [{"key": f"m{i}", "label": f"a long metric name {i}"} for i in range(8)],
        "rows": [{"run": n, **{f"m{i}": 0.5 for i in range(8)}} for n in names],
    }
    buffer = io.StringIO()
    print_table(table, Console(file=buffer, width=80, force_terminal=True), title="compare")
    shown = buffer.getvalue()
    for name in names:  # never cut to "classifier_kd-2…" for both
        assert name in shown
