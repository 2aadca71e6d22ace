"""The ``compress`` recipe's config: what it fills from the source kind, how a distil stage's
overrides become its effective settings (and its stage key), and what ``distil validate``
refuses before anything runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from distil.compress.config import DistilStage, PruneStage
from distil.compress.pipeline import stage_key
from distil.recipes.compress import (
    ClassifierDistillation,
    Config,
    LMDistillation,
    pipeline_config,
    stage_settings,
)

LM_SOURCE = {"kind": "causal_lm", "model": {"hf": "runs/lm-teacher"}}
CNN_SOURCE = {"kind": "classifier", "model": {"zoo": "cnn", "weights": "t.safetensors"}}


def _config(source: dict[str, Any], *stages: dict[str, Any], **extra: Any) -> Config:
    return Config.model_validate({"source": source, "stages": list(stages), **extra})


def test_kind_recipe_and_prune_method_follow_the_source() -> None:
    cfg = _config(LM_SOURCE, {"stage": "prune", "method": {"num_layers": 2}}, {"stage": "distil"})
    assert isinstance(cfg.distillation, LMDistillation)
    prune, distil = cfg.stages
    assert isinstance(prune, PruneStage) and prune.method.kind == "causal_lm"
    assert isinstance(distil, DistilStage) and distil.recipe == "lm_kd"
    cnn = _config(CNN_SOURCE, {"stage": "prune", "method": {"ratio": 0.5}}, {"stage": "distil"})
    assert isinstance(cnn.distillation, ClassifierDistillation)
    assert cnn.stages[1].recipe == "classifier_kd"  # type: ignore[union-attr]


def test_overrides_apply_to_train_and_kd_of_their_stage_only() -> None:
    cfg = _config(
        LM_SOURCE,
        {"stage": "distil"},
        {"stage": "quantise"},
        {"stage": "distil", "overrides": {"train.max_steps": 5, "kd.kd_temperature": 2.0}},
        train={"max_steps": 40, "lr": 1e-3},
    )
    first, qat = cfg.stages[0], cfg.stages[2]
    assert isinstance(first, DistilStage) and isinstance(qat, DistilStage)
    train, kd = stage_settings(cfg, first)
    assert (train.max_steps, kd.kd_temperature) == (40, 1.0)
    train, kd = stage_settings(cfg, qat)
    assert (train.max_steps, train.lr, kd.kd_temperature) == (5, 1e-3, 2.0)


def test_a_training_change_changes_the_distil_key_not_the_prune_key() -> None:
    stages = ({"stage": "prune", "method": {"num_layers": 2}}, {"stage": "distil"})
    keys = []
    for lr in (1e-3, 2e-3):
        pipeline = pipeline_config(_config(LM_SOURCE, *stages, train={"lr": lr}), Path("src"))
        keys.append(
            [
                stage_key(
                    input_fingerprint="x", stage=s, data_fingerprint="d", teacher_fingerprint=None
                )
                for s in pipeline.stages
            ]
        )
    assert keys[0][0] == keys[1][0] and keys[0][1] != keys[1][1]


@pytest.mark.parametrize(
    ("source", "stages", "extra", "message"),
    [
        (
            LM_SOURCE,
            [{"stage": "distil", "overrides": {"data.max_length": 8}}],
            {},
            "train.* and kd.*",
        ),
        (LM_SOURCE, [{"stage": "distil", "overrides": {"train.lr": -1}}], {}, "stages.0.overrides"),
        (LM_SOURCE, [{"stage": "distil", "recipe": "classifier_kd"}], {}, "distils with lm_kd"),
        (LM_SOURCE, [{"stage": "export", "onnx": True}], {}, "ONNX export covers"),
        (
            LM_SOURCE,
            [{"stage": "prune", "method": {"ratio": 0.5, "kind": "cnn_channels"}}],
            {},
            "for classifier models",
        ),
        (
            {"kind": "encoder", "model": {"hf": "enc"}},
            [{"stage": "export"}],
            {},
            "compresses causal_lm and classifier",
        ),
        ({"kind": "causal_lm", "model": {"zoo": "cnn"}}, [{"stage": "export"}], {}, "source.model"),
        ({"kind": "classifier", "model": {"zoo": "cnn"}}, [{"stage": "export"}], {}, "weights"),
        (
            CNN_SOURCE,
            [{"stage": "distil"}],
            {"distillation": {"kd": {"auto_features": {}}}},
            "distils logits",
        ),
        (
            LM_SOURCE,
            [{"stage": "distil"}],
            {"distillation": {"kind": "classifier"}},
            "source.kind is causal_lm",
        ),
        (
            LM_SOURCE,
            [{"stage": "quantise", "scheme": "int4_weight_only"}, {"stage": "distil"}],
            {},
            "quantisation-aware distillation supports",
        ),
    ],
)
def test_validate_refuses_by_name(
    source: dict[str, Any], stages: list[dict[str, Any]], extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        _config(source, *stages, **extra)


def test_the_shipped_config_validates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from distil.cli import load_config

    monkeypatch.chdir(tmp_path)  # validation checks the teacher folder the config names
    (tmp_path / "runs" / "lm-teacher").mkdir(parents=True)

    recipe, cfg, _ = load_config("compress", [])
    assert recipe == "compress" and isinstance(cfg, Config)
    kinds = [s.stage for s in cfg.stages]
    assert kinds == ["prune", "distil", "quantise", "distil", "export"]
