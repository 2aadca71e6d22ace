"""Report parts, fidelity metrics, rendering and compare on hand-made run folders (no training)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file

from distil.config.sections import RunSection
from distil.evaluation import calibration as cal
from distil.evaluation.compare import compare_runs, differing_keys, write_comparison
from distil.evaluation.cost import peak_forward_memory_bytes, weight_bytes
from distil.evaluation.report import (
    complete_report,
    cost_part,
    fmt,
    gap_closed,
    load_report,
    quality_part,
    render_markdown,
    training_times,
    write_report,
)

# ---------------------------------------------------------------------------------------------
# fidelity metrics


def test_gap_closed_both_directions_and_degenerate() -> None:
    assert gap_closed(0.9, 0.8, 0.7) == pytest.approx(0.5)
    assert gap_closed(10.0, 12.0, 14.0) == pytest.approx(0.5)  # perplexity: lower is better
    assert gap_closed(0.9, 0.6, 0.7) == pytest.approx(-0.5)
    assert gap_closed(0.7, 0.8, 0.7) is None
    assert gap_closed(0.9, 0.8, None) is None


def test_agreement_kl_jsd() -> None:
    torch.manual_seed(0)
    t = torch.randn(50, 7)
    s = torch.randn(50, 7)
    assert cal.agreement(t, t) == 1.0
    assert cal.kl_to_teacher(t, t) == 0.0
    assert cal.jsd_to_teacher(t, t) == 0.0
    p, q = t.softmax(-1), s.softmax(-1)
    want_kl = float((p * (p.log() - q.log())).sum(-1).mean())
    assert cal.kl_to_teacher(s, t) == pytest.approx(want_kl, rel=1e-5)
    m = (p + q) / 2
    want_jsd = float((0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)).mean())
    assert cal.jsd_to_teacher(s, t) == pytest.approx(want_jsd, rel=1e-5)
    assert 0 < want_jsd <= math.log(2)


def test_chunking_does_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    t, s, y = torch.randn(37, 5), torch.randn(37, 5), torch.randint(0, 5, (37,))
    whole = (cal.kl_to_teacher(s, t), cal.agreement(s, t), cal.reliability(s, y)["ece"])
    monkeypatch.setattr(cal, "CHUNK_ROWS", 4)
    monkeypatch.setattr(cal._rows, "__defaults__", (4,))
    chunked = (cal.kl_to_teacher(s, t), cal.agreement(s, t), cal.reliability(s, y)["ece"])
    assert chunked == pytest.approx(whole, rel=1e-6)


def test_ece_matches_the_definition_and_bins_add_up() -> None:
    # Two confident rows, one right one wrong, and one unsure right row.
    logits = torch.tensor([[4.0, 0.0], [4.0, 0.0], [0.1, 0.0]])
    labels = torch.tensor([0, 1, 0])
    rel = cal.reliability(logits, labels, num_bins=10)
    conf = logits.softmax(-1).max(-1).values
    # bins: rows 0 and 1 share one bin (acc 0.5), row 2 is alone (acc 1)
    want = (2 / 3) * abs(0.5 - float(conf[0])) + (1 / 3) * abs(1.0 - float(conf[2]))
    assert rel["ece"] == pytest.approx(want, rel=1e-6)
    assert sum(rel["count"]) == 3 and len(rel["count"]) == 10
    assert rel["confidence"][9] is not None and rel["confidence"][0] is None


def test_confusion_matrix_counts() -> None:
    logits = torch.eye(3)[[0, 1, 1, 2]] * 5  # predictions 0, 1, 1, 2
    labels = torch.tensor([0, 1, 2, 2])
    assert cal.confusion_matrix(logits, labels, 3) == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_fidelity_part_shapes() -> None:
    torch.manual_seed(2)
    y = torch.randint(0, 4, (30,))
    logits = {"teacher": torch.randn(30, 4), "student": torch.randn(30, 4)}
    part = cal.fidelity_part(logits, y, names={"student": "student (KD)"}, class_names=list("abcd"))
    rows = {r["model"]: r for r in part["table"]["rows"]}
    assert set(rows) == {"teacher", "student (KD)"} and rows["teacher"]["agreement"] == 1.0
    assert set(part["reliability"]) == set(rows) and set(part["confusion"]["matrices"]) == set(rows)
    assert sum(map(sum, part["confusion"]["matrices"]["student (KD)"])) == 30


# ---------------------------------------------------------------------------------------------
# cost


def test_peak_forward_memory_counts_live_activations() -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 4),
    ).eval()
    x = torch.randn(64, 16)
    peak = peak_forward_memory_bytes(lambda: model(x), model) - weight_bytes(model)
    # during the middle Linear, its (64, 256) input and output are alive together
    assert peak == 2 * 64 * 256 * 4
    assert weight_bytes(model) == 4 * sum(p.numel() for p in model.parameters())


def test_training_times_survive_a_resume() -> None:
    rows = [
        {"phase": "teacher", "time_s": 1.0},
        {"phase": "teacher", "time_s": 3.0},
        {"phase": "student", "time_s": 4.0},
        {"phase": "student", "time_s": 0.5},  # resumed: the clock restarted
        {"phase": "student", "time_s": 2.5},
    ]
    times = training_times(rows)
    assert times["phases"] == {"teacher": 3.0, "student": 3.5}
    assert times["wall_time_s"] == 6.5


# ---------------------------------------------------------------------------------------------
# a hand-made run folder


def make_run(
    folder: Path, *, kd_temperature: float, student_acc: float, render: bool = True
) -> Path:
    """A run folder as classifier_kd leaves it: config, env, metrics, logits, report.json (and,
    with ``render``, report.md/html and the plots)."""
    folder.mkdir(parents=True)
    config = {
        "recipe": "classifier_kd",
        "seed": 0,
        "run": {"output_dir": str(folder.parent), "log_with": []},
        "kd": {"kd_weight": 0.9, "kd_temperature": kd_temperature},
        "train": {"epochs": 2},
    }
    (folder / "config.resolved.yaml").write_text(yaml.safe_dump(config))
    (folder / "env.json").write_text(
        json.dumps({"python": "3.x", "packages": {"torch": "2"}, "git_sha": "abc"})
    )
    (folder / "mode.txt").write_text("classifier_kd on toy: loss = 0.1·CE + 0.9·T²·forward_kl\n")
    lines = []
    t = 0.0
    for phase, comps in (
        ("teacher", ["hard_ce"]),
        ("student", ["hard_ce", "kd"]),
        ("baseline", ["hard_ce"]),
    ):
        for step in range(1, 6):
            t += 0.5
            row: dict[str, Any] = {
                "phase": phase,
                "step": step,
                "time_s": t,
                "lr": 1e-3 / step,
                "grad_norm": 1.0 / step,
                "epoch": 0,
            }
            for c in comps:
                row[f"{c}/raw"] = 2.0 / step
                row[f"{c}/weighted"] = 1.0 / step
            lines.append(json.dumps(row))
        for step, acc in ((3, 0.4), (5, 0.5)):  # eval rows carry the time of the last step
            lines.append(
                json.dumps(
                    {"phase": phase, "step": step, "time_s": t, "test_accuracy": acc, "epoch": 0}
                )
            )
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (40,))
    teacher = torch.nn.functional.one_hot(labels, 3).float() * 3 + torch.randn(40, 3) * 0.3
    saved = {
        "labels": labels,
        "teacher": teacher,
        "student": teacher + torch.randn(40, 3),
        "baseline": torch.randn(40, 3),
    }
    (folder / "eval").mkdir()
    save_file(saved, str(folder / "eval" / "test_logits.safetensors"))
    roles = {"teacher": "teacher", "student": "student (KD)", "baseline": "baseline (no teacher)"}
    rows = [
        {
            "model": "teacher",
            "accuracy": 0.9,
            "params": 1000,
            "size_bytes": 4000,
            "peak_memory_bytes": 9000,
            "latency_b1_ms": 1.0,
            "speedup": 1.0,
            "size_ratio": 1.0,
        },
        {
            "model": "student (KD)",
            "accuracy": student_acc,
            "params": 100,
            "size_bytes": 400,
            "peak_memory_bytes": 900,
            "latency_b1_ms": 0.25,
            "speedup": 4.0,
            "size_ratio": 10.0,
        },
        {
            "model": "baseline (no teacher)",
            "accuracy": 0.7,
            "params": 100,
            "size_bytes": 400,
            "peak_memory_bytes": 900,
            "latency_b1_ms": 0.25,
            "speedup": 4.0,
            "size_ratio": 10.0,
        },
    ]
    report = {
        "title": "toy",
        "recipe": "classifier_kd",
        "roles": roles,
        "table": {
            "columns": [
                {"key": "model", "label": "model"},
                {"key": "accuracy", "label": "test acc"},
            ],
            "rows": rows,
        },
        "highlights": {"dataset": "toy"},
        "quality": quality_part(
            rows,
            [("accuracy", "test accuracy")],
            roles=roles,
            primary="accuracy",
            per_class={
                "labels": ["a", "b", "c"],
                "values": {r["model"]: [0.5, 0.6, 0.7] for r in rows},
            },
        ),
        "cost": cost_part(
            rows,
            [
                ("params", "params"),
                ("size_bytes", "on disk"),
                ("peak_memory_bytes", "peak memory"),
                ("latency_b1_ms", "CPU ms @ b1"),
                ("speedup", "speed-up @ b1"),
                ("size_ratio", "teacher/model params"),
            ],
        ),
        "details": {"class_names": ["a", "b", "c"]},
    }
    if render:
        write_report(folder, report)
    else:
        (folder / "report.json").write_text(json.dumps(complete_report(folder, report)))
    return folder


def _section(html: str, anchor: str) -> str:
    match = re.search(rf'<section id="{anchor}">(.*?)</section>', html, re.S)
    assert match, f"no section {anchor}"
    return match.group(1)


def test_write_report_fills_every_part_and_renders_the_same_numbers(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", kd_temperature=2.0, student_acc=0.8)
    report = load_report(run)
    assert report["quality"]["gap_closed"] == pytest.approx(0.5)
    assert report["fidelity"]["confusion"]["labels"] == ["a", "b", "c"]  # from the saved logits
    assert report["cost"]["training"]["phases"] == {"teacher": 2.5, "student": 2.5, "baseline": 2.5}
    assert report["curves"]["phases"]["student"]["series"]["kd/raw"]["final"] == pytest.approx(0.4)
    assert report["summary"]["gap closed"] == pytest.approx(0.5)
    html = (run / "report.html").read_text()
    assert (
        "http://" not in html and "https://" not in html and "<script" not in html
    )  # self-contained
    for name in (
        "reliability",
        "confusion",
        "per_class",
        "training_time",
        "curves-loss",
        "curves-optim",
        "curves-eval",
    ):
        assert (run / "plots" / f"{name}.png").is_file(), name
    assert html.count("data:image/png;base64,") == 7
    fidelity = _section(html, "fidelity")
    for row in report["fidelity"]["table"]["rows"]:
        for key in ("agreement", "kl_to_teacher", "jsd_to_teacher", "ece"):
            assert f"<td>{fmt(row[key])}</td>" in fidelity, (row["model"], key)
    quality = _section(html, "quality")
    assert f">{fmt(report['quality']['gap_closed'])}<" in quality
    cost = _section(html, "cost")
    assert (
        "<td>8.8 KiB</td>" in cost
        and f"<td>{fmt(report['cost']['training']['wall_time_s'])}</td>" in cost
    )
    assert "kd.kd_temperature" in _section(html, "config") and "git_sha" in _section(
        html, "environment"
    )
    md = (run / "report.md").read_text()
    assert "## Fidelity to the teacher" in md and "![reliability](plots/reliability.png)" in md
    assert render_markdown(report).count("| teacher |") >= 3


def test_complete_report_keeps_recipe_parts_and_tolerates_a_bare_folder(tmp_path: Path) -> None:
    bare = {
        "title": "bare",
        "table": {
            "columns": [{"key": "model", "label": "model"}, {"key": "x", "label": "x"}],
            "rows": [{"model": "m", "x": 1.0}],
        },
    }
    tmp_path.mkdir(exist_ok=True)
    write_report(tmp_path, bare)
    report = load_report(tmp_path)
    assert report["summary"] == {"m x": 1.0} and "fidelity" not in report
    assert '<section id="summary">' in (tmp_path / "report.html").read_text()
    kept = complete_report(tmp_path, {"fidelity": {"sentinel": 1}, "roles": {"teacher": "t"}})
    assert kept["fidelity"] == {"sentinel": 1}
    # an older report (no roles): the roles come from the model names of the table
    old = {
        "table": {
            "columns": [{"key": "model", "label": "model"}],
            "rows": [{"model": "teacher"}, {"model": "student (KD)"}],
        }
    }
    assert complete_report(tmp_path, old)["roles"] == {
        "teacher": "teacher",
        "student": "student (KD)",
    }
    (tmp_path / "plots" / "gone.png").write_bytes(b"")  # drawn by an earlier rendering only
    write_report(tmp_path, bare)
    assert not (tmp_path / "plots" / "gone.png").exists()


def test_compare_lines_up_differing_keys(tmp_path: Path) -> None:
    runs = [
        make_run(tmp_path / f"T{t}", kd_temperature=float(t), student_acc=acc, render=False)
        for t, acc in ((1, 0.75), (4, 0.85))
    ]
    comparison = compare_runs(runs)
    assert comparison["config_keys"] == [
        "kd.kd_temperature"
    ]  # run.output_dir is the same, seeds equal
    rows = comparison["table"]["rows"]
    assert [r["kd.kd_temperature"] for r in rows] == [1.0, 4.0]
    assert [r["student test accuracy"] for r in rows] == [0.75, 0.85]
    assert rows[1]["gap closed"] == pytest.approx(0.75)
    paths = write_comparison(comparison, runs, tmp_path / "out")
    html = paths[2].read_text()
    assert "★ 0.85" in html and "kd.kd_temperature" in html and html.count("data:image/png") == 2
    assert "| T1 |" in paths[1].read_text()
    assert differing_keys([{"a": 1, "b": [1]}, {"a": 1, "b": [2]}, {"a": 1}]) == ["b"]


# ---------------------------------------------------------------------------------------------
# trackers


def test_log_with_rejects_unknown_and_missing_trackers() -> None:
    with pytest.raises(ValueError, match="unknown tracker 'tensorbord'"):
        RunSection(log_with=["tensorbord"])
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ValueError, match="pip install wandb"):
            RunSection(log_with=["wandb"])
    assert RunSection(log_with=["tensorboard"]).log_with == ["tensorboard"]


def test_teacher_overhead_is_only_claimed_for_a_live_teacher() -> None:
    """A run that trained from a cache never reads "the live teacher made the KD phase slower"."""
    from distil.evaluation.report import _training_part

    def rows(source: str) -> list[dict[str, object]]:
        return [
            {"phase": "student", "step": 1, "time_s": 1.0, "loss": 1.0},
            {
                "phase": "student",
                "step": 2,
                "time_s": 21.0,
                "kd_source": source,
                "train_wall_s": 20.0,
            },
            {"phase": "baseline", "step": 1, "time_s": 22.0, "loss": 1.0},
            {"phase": "baseline", "step": 2, "time_s": 32.0, "train_wall_s": 10.0},
        ]

    assert _training_part(rows("live teacher"), {}).get("teacher_overhead") is not None
    assert "teacher_overhead" not in _training_part(rows("cache"), {})


def test_a_student_made_worse_is_warned_about_first_in_every_rendering() -> None:
    from distil.evaluation.html import render_html
    from distil.evaluation.report import render_markdown
    from distil.recipes.encoder_kd import regressions

    before = {"spearman": 0.675, "recall_at_k": 0.36}
    assert regressions(before, {"spearman": 0.70, "recall_at_k": 0.40}, 10) == []
    warnings = regressions(before, {"spearman": 0.632, "recall_at_k": 0.30}, 10)
    assert len(warnings) == 2 and "0.6750 before, 0.6320 after" in warnings[0]
    report = {"title": "t", "warnings": warnings, "highlights": {"a": 1}}
    md = render_markdown(report)
    assert md.index("Warning") < md.index("**a**")
    assert "recall@10 0.3600 before" in render_html(report, Path("."), {})


def test_a_teacher_at_chance_level_is_named() -> None:
    from distil.evaluation.classification import chance_level_warning

    labels = torch.tensor([0] * 60 + [1] * 20 + [2] * 20)  # majority class: 60 %
    assert "at chance level" in (chance_level_warning(0.62, labels) or "")
    assert "60.0 %" in (chance_level_warning(0.33, labels) or "")
    assert chance_level_warning(0.95, labels) is None
