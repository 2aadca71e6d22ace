"""The report of a real (tiny) classifier_kd run: every part present, the HTML and Markdown show
the numbers of report.json, ``distil report`` and ``distil compare`` work on the run folder, and
the page renders in headless Chromium."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from distil.cli import app
from distil.evaluation.report import byte_formatters, fmt
from distil.evaluation.report import cell as render_cell

TINY = [
    "data.source={builtin: digits}",
    "teacher.training.epochs=2",
    "teacher.model.kwargs.channels=[8,16]",
    "train.epochs=2",
    "data.train_limit=512",
    "eval.throughput_batch=64",
    "run.log_with=[]",
]
CHROMIUM = shutil.which("chromium") or (
    Path("/usr/bin/chromium") if Path("/usr/bin/chromium").is_file() else None
)

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("report") / "run"
    result = runner.invoke(app, ["run", "classifier_kd", *TINY, "--run-dir", str(path)])
    assert result.exit_code == 0, result.output
    return path


def _section(html: str, anchor: str) -> str:
    match = re.search(rf'<section id="{anchor}">(.*?)</section>', html, re.S)
    assert match, f"no section {anchor}"
    return match.group(1)


def _cells(table: dict[str, Any]) -> list[str]:
    # the one formatting function (a speed-up shows its quartiles: "8.2 (7.9-8.6)")
    formatters = byte_formatters(table)
    out = []
    for row in table["rows"]:
        for col in table["columns"]:
            out.append(f"<td>{html.escape(render_cell(row, col['key'], formatters))}</td>")
    return out


def test_every_part_is_there_and_matches_report_json(run_dir: Path) -> None:
    report = json.loads((run_dir / "report.json").read_text())
    for part in ("quality", "fidelity", "cost", "curves", "summary", "roles"):
        assert report.get(part), part
    assert report["quality"]["per_class"]["labels"] == [str(i) for i in range(10)]
    assert set(report["fidelity"]["confusion"]["matrices"]) == {
        "teacher",
        "student (KD)",
        "baseline (no teacher)",
    }
    assert set(report["cost"]["training"]["phases"]) == {"teacher", "student", "baseline"}
    assert all(r["peak_memory_bytes"] > 0 for r in report["cost"]["table"]["rows"])
    assert {"hard_ce/raw", "kd/raw", "kd/weighted", "lr", "grad_norm", "test_accuracy"} <= set(
        report["curves"]["phases"]["student"]["series"]
    )
    html = (run_dir / "report.html").read_text()
    for anchor, part in (("quality", "quality"), ("fidelity", "fidelity"), ("cost", "cost")):
        section = _section(html, anchor)
        for cell in _cells(report[part]["table"]):
            assert cell in section, (anchor, cell)
    assert all(cell in _section(html, "summary") for cell in _cells(report["table"]))
    gap = report["quality"]["gap_closed"]
    assert f'<b id="gap-closed">{fmt(gap)}</b>' in html
    assert f"<td>{fmt(report['cost']['training']['wall_time_s'])}</td>" in _section(html, "cost")
    assert "kd.kd_temperature" in _section(html, "config") and "package torch" in _section(
        html, "environment"
    )
    assert (
        html.count("data:image/png;base64,") == 7
        and "http://" not in html
        and "https://" not in html
    )
    md = (run_dir / "report.md").read_text()
    for row in report["fidelity"]["table"]["rows"]:
        assert fmt(row["kl_to_teacher"]) in md
    assert fmt(gap) in md


def test_distil_report_rewrites_html(run_dir: Path) -> None:
    (run_dir / "report.html").unlink()
    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "report.html" in result.output and (run_dir / "report.html").is_file()


def test_distil_compare_two_runs(run_dir: Path, tmp_path: Path) -> None:
    # A second run folder that differs in one config key (a copy: training it again would only
    # cost time; compare reads report.json, config.resolved.yaml and metrics.jsonl).
    other = tmp_path / "other"
    other.mkdir()
    for name in ("report.json", "metrics.jsonl", "env.json"):
        shutil.copy(run_dir / name, other / name)
    config = yaml.safe_load((run_dir / "config.resolved.yaml").read_text())
    original = config["kd"]["kd_temperature"]
    config["kd"]["kd_temperature"] = original + 1.0
    (other / "config.resolved.yaml").write_text(yaml.safe_dump(config))
    result = runner.invoke(
        app, ["compare", str(run_dir), str(other), "--out", str(tmp_path / "cmp")]
    )
    assert result.exit_code == 0, result.output
    assert "kd.kd_temperature" in result.output and "student test accuracy" in result.output
    comparison = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert comparison["config_keys"] == ["kd.kd_temperature"]
    assert [r["kd.kd_temperature"] for r in comparison["table"]["rows"]] == [
        original,
        original + 1.0,
    ]
    assert (tmp_path / "cmp" / "compare.html").is_file() and (
        tmp_path / "cmp" / "compare.md"
    ).is_file()


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--hide-scrollbars",
        "--window-size=1280,2400",
        "--enable-logging=stderr",
        "--v=0",
        f"--screenshot={shot}",
        (run_dir / "report.html").as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CONSOLE" not in proc.stderr and "Uncaught" not in proc.stderr, proc.stderr[-2000:]
    from PIL import Image

    image = Image.open(shot).convert("L")
    assert image.size == (1280, 2400)
    low, high = image.getextrema()
    assert high - low > 100  # not a blank page: text, tables and plots were drawn
    histogram = image.histogram()
    assert sum(histogram[:128]) > 0.01 * image.size[0] * image.size[1]
