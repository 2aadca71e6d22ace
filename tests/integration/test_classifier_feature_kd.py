"""classifier_kd with feature terms (CWD, attention transfer, hint) and mixup/cutmix-aware KD."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from distil.cli import app

runner = CliRunner()
BASE = [
    "run",
    "classifier_kd",
    "data.source={builtin: digits}",
    "teacher.model.kwargs.channels=[8,16]",
    "teacher.training.epochs=2",
    "student.model.zoo=cnn",
    "student.model.kwargs={channels: [4, 4]}",
    "train.epochs=2",
    "train.checkpoint_every=10",
    "eval.baseline=false",
    "run.log_with=[]",
]
FEATURES = "kd.features=[{student: stages.0, teacher: stages.0, loss: cwd, weight: 0.5, kd_temperature: 2.0}, {student: stages.1, teacher: stages.1, loss: attention, weight: 10.0}, {student: stages.1, teacher: stages.1, loss: hint, weight: 1.0}]"


def _logged(run_dir: Path) -> set[str]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {k for r in rows if r.get("phase") == "student" for k in r}


def test_feature_terms_and_mixing_are_logged_and_train(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = runner.invoke(
        app,
        [*BASE, FEATURES, "kd.mixup_alpha=0.4", "kd.cutmix_alpha=1.0", "--run-dir", str(run_dir)],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    logged = _logged(run_dir)
    for name in (
        "feature/cwd/stages.0->stages.0",
        "feature/attention/stages.1->stages.1",
        "feature/hint/stages.1->stages.1",
        "kd",
        "hard_ce",
    ):
        assert f"{name}/raw" in logged and f"{name}/weighted" in logged, name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("phase") == "student" and "kd/raw" in r]
    for name in (
        "feature/attention/stages.1->stages.1/raw",
        "feature/hint/stages.1->stages.1/raw",
    ):  # the student learns the maps
        assert sum(r[name] for r in steps[-5:]) < 0.8 * sum(r[name] for r in steps[:5]), name
    # the exported student has no projector weights
    exported = load_file(str(run_dir / "student" / "final" / "model.safetensors"))
    assert not any(k.startswith("features.") or "projectors" in k for k in exported)


def test_resume_with_projectors_ends_with_the_same_weights(tmp_path: Path) -> None:
    full = tmp_path / "full"
    result = runner.invoke(app, [*BASE, FEATURES, "kd.mixup_alpha=0.4", "--run-dir", str(full)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    ckpts = sorted(
        (full / "student" / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1])
    )
    assert len(ckpts) == 2
    assert any(
        k.startswith("extra.projectors") for k in load_file(str(ckpts[0] / "model.safetensors"))
    )
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "student" / "final")  # as if killed after the first kept checkpoint
    shutil.rmtree(resumed / "student" / "checkpoints" / ckpts[-1].name)
    result = runner.invoke(
        app, [*BASE, FEATURES, "kd.mixup_alpha=0.4", "--run-dir", str(resumed), "--resume"]
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    a = load_file(str(full / "student" / "final" / "model.safetensors"))
    b = load_file(str(resumed / "student" / "final" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_automatic_feature_map_pairs_blocks_by_shape(tmp_path: Path) -> None:
    """kd.auto_features pairs the student's stages with the teacher's of the same geometry."""
    run_dir = tmp_path / "auto"
    args = [
        *BASE,
        "teacher.model.kwargs.channels=[8,16,16]",
        "student.model.kwargs={channels: [4, 8]}",
        "kd.auto_features={layer_map: shape, loss: hint, weight: 0.5}",
        "--run-dir",
        str(run_dir),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    mode = " ".join((run_dir / "mode.txt").read_text().split())
    # digits 8x8: teacher stages 4x4, 2x2, 1x1; student 4x4, 2x2 -> stage 0 -> 0, stage 1 -> 1
    assert "stages.0 -> stages.0, stages.1 -> stages.1" in mode
    logged = _logged(run_dir)
    assert {"feature/hint/stages.0->stages.0/raw", "feature/hint/stages.1->stages.1/raw"} <= logged
    uniform = runner.invoke(
        app, [*args[:-2], "kd.auto_features={layer_map: uniform}", "--run-dir", str(tmp_path / "u")]
    )
    assert uniform.exit_code == 0, uniform.output
    assert "stages.0 -> stages.1, stages.1 -> stages.2" in " ".join(
        (tmp_path / "u" / "mode.txt").read_text().split()
    )
