"""classifier_kd with ``teacher.cache``: the teacher's logits are computed once and read back.

The cached run must train the same student as the live run (the logits are the same fp32 values,
up to the rounding of batching the teacher differently), reuse a finished cache, refuse a cache
of another teacher by naming the field, and refuse settings that need the live teacher.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from distil.cache.examples import ExampleCache
from distil.cli import app, load_config
from distil.config.loading import ConfigError
from distil.data.classification import load_digits

runner = CliRunner()
BASE = [
    "run",
    "classifier_kd",
    "data.source={builtin: digits}",
    "teacher.model.kwargs.channels=[8,16]",
    "train.epochs=2",
    "train.checkpoint_every=1000",
    "eval.baseline=false",
    "run.log_with=[]",
]


def _ok(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("teacher") / "run"
    _ok(
        [
            *BASE,
            "teacher.train=true",
            "teacher.training.epochs=2",
            "train.max_steps=1",
            "--run-dir",
            str(run),
        ]
    )
    return run / "teacher" / "final" / "model.safetensors"


def test_cached_run_trains_the_live_runs_student(tmp_path: Path, teacher: Path) -> None:
    live, cached, cache = tmp_path / "live", tmp_path / "cached", tmp_path / "cache"
    _ok([*BASE, "teacher.train=false", f"teacher.model.weights={teacher}", "--run-dir", str(live)])
    _ok(
        [
            *BASE,
            "teacher.train=false",
            f"teacher.model.weights={teacher}",
            f"teacher.cache.path={cache}",
            "--run-dir",
            str(cached),
        ]
    )
    a = load_file(str(live / "student" / "final" / "model.safetensors"))
    b = load_file(str(cached / "student" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4, msg=k)

    def rows(run: Path) -> list[dict]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines if '"student"' in x]

    kd_live = [r["kd/raw"] for r in rows(live) if "kd/raw" in r]
    kd_cached = [r["kd/raw"] for r in rows(cached) if "kd/raw" in r]
    assert len(kd_live) == len(kd_cached) > 10
    assert max(abs(x - y) for x, y in zip(kd_live, kd_cached, strict=True)) < 1e-4
    summary = json.loads((cached / "student" / "summary.json").read_text())
    assert summary["kd_source"] == "cache" and summary["samples"] == summary["steps"] * 64 > 0
    assert (
        json.loads((live / "student" / "summary.json").read_text())["kd_source"] == "live teacher"
    )
    # the cache holds the teacher's logits for every training example, keyed by index
    data = load_digits(0.25, 0)
    opened = ExampleCache(cache)
    assert len(opened) == len(data.train) and opened.get([0, 5])["logits"].shape == (2, 10)
    # a second run reuses the finished cache: no shard is rewritten
    shard_times = {p: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}
    _ok(
        [
            *BASE,
            "teacher.train=false",
            f"teacher.model.weights={teacher}",
            f"teacher.cache.path={cache}",
            "train.max_steps=2",
            "--run-dir",
            str(tmp_path / "again"),
        ]
    )
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")} == shard_times


def test_cache_of_another_teacher_is_refused_by_name(tmp_path: Path, teacher: Path) -> None:
    cache = tmp_path / "cache"
    _ok(
        [
            *BASE,
            "teacher.train=false",
            f"teacher.model.weights={teacher}",
            f"teacher.cache.path={cache}",
            "train.max_steps=1",
            "--run-dir",
            str(tmp_path / "a"),
        ]
    )
    other = tmp_path / "other.safetensors"
    weights = load_file(str(teacher))
    from safetensors.torch import save_file

    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}, str(other))
    result = runner.invoke(
        app,
        [
            *BASE,
            "teacher.train=false",
            f"teacher.model.weights={other}",
            f"teacher.cache.path={cache}",
            "train.max_steps=1",
            "--run-dir",
            str(tmp_path / "b"),
        ],
    )
    assert result.exit_code != 0
    assert "teacher_fingerprint" in result.output + str(result.exception)


def test_cache_with_settings_that_need_the_live_teacher_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="kd.mixup_alpha"):
        load_config("classifier_kd", ["teacher.cache.path=somewhere", "kd.mixup_alpha=0.2"])
    with pytest.raises(ConfigError, match="kd.cutmix_alpha"):
        load_config("classifier_kd", ["teacher.cache.path=somewhere", "kd.cutmix_alpha=1.0"])


def test_cached_feature_maps_train_the_live_runs_student(tmp_path: Path, teacher: Path) -> None:
    """Feature KD from cached teacher maps (fp32 here) trains the same student as the live teacher;
    a cache written without those maps is refused, naming the field."""
    cnn = [
        "student.model.zoo=cnn",
        "student.model.kwargs={channels: [4, 8]}",
        "train.epochs=1",
        "kd.features=[{student: stages.1, teacher: stages.1, loss: hint, weight: 1.0}]",
    ]
    live, cached, cache = tmp_path / "live", tmp_path / "cached", tmp_path / "cache"
    common = [*BASE, "teacher.train=false", f"teacher.model.weights={teacher}", *cnn]
    _ok([*common, "--run-dir", str(live)])
    _ok(
        [
            *common,
            f"teacher.cache.path={cache}",
            "teacher.cache.feature_dtype=float32",
            "--run-dir",
            str(cached),
        ]
    )
    a = load_file(str(live / "student" / "final" / "model.safetensors"))
    b = load_file(str(cached / "student" / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4, msg=k)
    metric = "feature/hint/stages.1->stages.1/raw"
    rows = [
        json.loads(x) for x in (cached / "metrics.jsonl").read_text().splitlines() if metric in x
    ]
    assert len(rows) > 5 and rows[-1][metric] < rows[0][metric]
    opened = ExampleCache(cache)
    assert opened.get([3])["feature:stages.1"].shape == (
        1,
        16,
        2,
        2,
    )  # (1, C, H, W) of the teacher's stage
    result = runner.invoke(
        app,
        [
            *BASE,
            "teacher.train=false",
            f"teacher.model.weights={teacher}",
            f"teacher.cache.path={cache}",
            "train.max_steps=1",
            "--run-dir",
            str(tmp_path / "no-features"),
        ],
    )
    assert result.exit_code != 0 and "features" in result.output + str(result.exception)
