"""The compression pipeline on a tiny zoo CNN: schema checks, fingerprinted reuse, partial reruns
after a config change, recovery from a stage that died, and the quantisation-aware context."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from distil.compress.artifacts import LoadedModel, load_model
from distil.compress.config import (
    Calibration,
    ModelKind,
    PipelineConfig,
    is_quantisation_aware,
    stage_names,
)
from distil.compress.export import save_zoo_classifier
from distil.compress.pipeline import (
    PipelineHooks,
    StageContext,
    StageStatus,
    run_pipeline,
    save_quantised_stage,
)
from distil.compress.quantise import QuantScheme, has_fake_quant
from distil.errors import DistilError
from distil.models.classifier import SmallCNN

IMAGES = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _source(root: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = SmallCNN(1, 4, channels=(8, 16))
    folder = root / f"teacher-{seed}"
    save_zoo_classifier(
        model, folder, zoo="cnn", kwargs={"channels": [8, 16]}, in_shape=(1, 8, 8), num_classes=4
    )
    return folder


def _config(root: Path, source: Path, *stages: dict[str, Any]) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "source": {"kind": "classifier", "folder": str(source)},
            "output_dir": str(root / "out"),
            "stages": list(stages),
            "measure": {"latency": False},
        }
    )


PRUNE = {"stage": "prune", "method": {"kind": "cnn_channels", "ratio": 0.5}}
QUANTISE = {"stage": "quantise", "scheme": "int8_dynamic"}
EXPORT = {"stage": "export"}


def _evaluate(loaded: LoadedModel) -> dict[str, float]:
    with torch.no_grad():
        return {"mean_logit": float(loaded.module(IMAGES).mean())}


def _calibration(kind: ModelKind, calibration: Calibration) -> list[torch.Tensor]:
    assert kind == ModelKind.classifier
    return [IMAGES[:3], IMAGES[3:]]


HOOKS = PipelineHooks(evaluate=_evaluate, calibration=_calibration, data_fingerprint="images-v1")


def test_rerun_reuses_every_stage_and_reports_the_same(tmp_path: Path) -> None:
    config = _config(tmp_path, _source(tmp_path), PRUNE, QUANTISE, EXPORT)
    first = run_pipeline(config, HOOKS)
    assert [r.status for r in first.stages] == [StageStatus.ran] * 3
    assert first.stages[0].metrics["parameters"] < first.source["metrics"]["parameters"]
    # only the CNN's small head is a Linear layer: its int8 output stays close to the float one
    pruned_logit = first.stages[0].metrics["quality"]["mean_logit"]
    assert first.stages[1].metrics["quality"]["mean_logit"] == pytest.approx(pruned_logit, abs=0.02)
    assert first.stages[1].details["scheme"] == "int8_dynamic"
    second = run_pipeline(config, HOOKS)
    assert [r.status for r in second.stages] == [StageStatus.reused] * 3
    assert [r.as_dict()["metrics"] for r in second.stages] == [
        r.as_dict()["metrics"] for r in first.stages
    ]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["prune", "quantise", "export"]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| source |" in markdown and "mean_logit" in markdown

    def max_logit(loaded: LoadedModel) -> dict[str, float]:
        with torch.no_grad():
            return {"max_logit": float(loaded.module(IMAGES).max())}

    other_evaluation = PipelineHooks(
        evaluate=max_logit,
        calibration=_calibration,
        data_fingerprint="images-v1",
        evaluation_fingerprint="max-logit",
    )
    remeasured = run_pipeline(config, other_evaluation)  # re-measures, retrains nothing
    assert [r.status for r in remeasured.stages] == [StageStatus.reused] * 3
    assert all(set(r.metrics["quality"]) == {"max_logit"} for r in remeasured.stages)
    assert set(remeasured.source["metrics"]["quality"]) == {"max_logit"}
    exported = load_model(ModelKind.classifier, second.final_model_dir)
    assert exported.zoo_spec is not None and exported.zoo_spec["kwargs"]["channels"] == [4, 8]


def test_a_changed_stage_reruns_itself_and_what_follows_only(tmp_path: Path) -> None:
    source = _source(tmp_path)
    run_pipeline(_config(tmp_path, source, PRUNE, QUANTISE, EXPORT), HOOKS)
    changed = {**QUANTISE, "scheme": "int8_weight_only"}
    report = run_pipeline(_config(tmp_path, source, PRUNE, changed, EXPORT), HOOKS)
    assert [r.status for r in report.stages] == [
        StageStatus.reused,
        StageStatus.ran,
        StageStatus.ran,
    ]
    other_data = PipelineHooks(evaluate=_evaluate, data_fingerprint="images-v2")
    report = run_pipeline(_config(tmp_path, source, PRUNE, changed, EXPORT), other_data)
    assert all(r.status == StageStatus.ran for r in report.stages)
    other_source = _source(tmp_path, seed=1)
    report = run_pipeline(_config(tmp_path, other_source, PRUNE, changed, EXPORT), HOOKS)
    assert all(r.status == StageStatus.ran for r in report.stages)


def test_a_stage_that_died_leaves_nothing_published_and_reruns(tmp_path: Path) -> None:
    config = _config(
        tmp_path, _source(tmp_path), PRUNE, {"stage": "distil", "recipe": "fake"}, EXPORT
    )
    calls: list[str] = []

    def dies_once(ctx: StageContext) -> dict[str, Any]:
        calls.append("call")
        (ctx.work_dir / "checkpoint").write_text(str(len(calls)))  # survives the failure
        (ctx.output_dir / "partial.bin").write_bytes(b"half")
        if len(calls) == 1:
            raise RuntimeError("killed mid-stage")
        loaded = load_model(ModelKind.classifier, ctx.input_dir)
        from distil.compress.artifacts import save_float_model

        (ctx.output_dir / "partial.bin").unlink()
        save_float_model(loaded, loaded.module, ctx.output_dir)
        return {"resumed_from": (ctx.work_dir / "checkpoint").read_text()}

    hooks = PipelineHooks(distillers={"fake": dies_once}, data_fingerprint="d")
    with pytest.raises(RuntimeError, match="killed"):
        run_pipeline(config, hooks)
    stages = tmp_path / "out" / "stages"
    assert [p.name.startswith(".tmp-01-distil") for p in stages.iterdir() if "distil" in p.name]
    assert not any(p.name.startswith("01-") for p in stages.iterdir())  # nothing published
    report = run_pipeline(config, hooks)
    assert [r.status for r in report.stages] == [
        StageStatus.reused,
        StageStatus.ran,
        StageStatus.ran,
    ]
    assert report.stage("distil").details == {"resumed_from": "2"}
    assert not any(p.name.startswith(".tmp-") for p in stages.iterdir())
    assert not any((tmp_path / "out" / "work").glob("*"))  # checkpoints go once published


def test_changed_output_files_are_detected_and_rerun(tmp_path: Path) -> None:
    config = _config(tmp_path, _source(tmp_path), PRUNE)
    first = run_pipeline(config, HOOKS)
    weights = first.stages[0].model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    again = run_pipeline(config, HOOKS)
    assert again.stages[0].status == StageStatus.ran
    assert again.stages[0].output_fingerprint == first.stages[0].output_fingerprint


def test_quantisation_aware_stage_gets_the_float_input_and_scheme(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def qat_without_training(ctx: StageContext) -> dict[str, Any]:
        from distil.compress.quantise import convert_qat, prepare_qat

        assert ctx.qat is not None and ctx.float_input_dir is not None
        seen["scheme"], seen["float"] = ctx.qat.scheme, ctx.float_input_dir
        loaded = load_model(ModelKind.classifier, ctx.float_input_dir)
        model = prepare_qat(loaded.module, ctx.qat.scheme)
        assert has_fake_quant(model)  # a recipe would train here, teacher = ctx.source_dir
        convert_qat(model, None)
        save_quantised_stage(ModelKind.classifier, loaded, model, ctx.qat.scheme, ctx.output_dir)
        return {"teacher": str(ctx.source_dir)}

    source = _source(tmp_path)
    config = _config(tmp_path, source, PRUNE, QUANTISE, {"stage": "distil", "recipe": "kd"}, EXPORT)
    assert is_quantisation_aware(config, 2) and not is_quantisation_aware(config, 1)
    hooks = PipelineHooks(distillers={"kd": qat_without_training}, evaluate=_evaluate)
    report = run_pipeline(config, hooks)
    assert seen["scheme"] == QuantScheme.int8_dynamic
    assert seen["float"] == report.stage("prune").model_dir
    # QAT with no training step converts to exactly the post-training quantised model
    assert report.stage("distil").metrics["quality"] == report.stage("quantise").metrics["quality"]
    assert report.stage("distil").details["teacher"] == str(source)


def test_missing_distiller_and_calibration_are_named(tmp_path: Path) -> None:
    source = _source(tmp_path)
    config = _config(tmp_path, source, {"stage": "distil", "recipe": "lm_kd"})
    with pytest.raises(DistilError, match="no distiller for recipe 'lm_kd'"):
        run_pipeline(config, PipelineHooks())
    activation = {
        "stage": "prune",
        "method": {"kind": "cnn_channels", "ratio": 0.5, "importance": "activation"},
    }
    with pytest.raises(DistilError, match="calibration"):
        run_pipeline(_config(tmp_path, source, activation), PipelineHooks())


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([EXPORT, PRUNE], "export must be the last stage"),
        ([QUANTISE, PRUNE], "after quantise"),
        ([QUANTISE, QUANTISE], "quantise at most once"),
        (
            [
                {"stage": "quantise", "scheme": "int4_weight_only"},
                {"stage": "distil", "recipe": "x"},
            ],
            "supports schemes",
        ),
        ([{"stage": "prune", "method": {"kind": "causal_lm", "num_layers": 2}}], "for causal_lm"),
        ([QUANTISE, {"stage": "export", "onnx": True}], "ONNX export takes float models"),
        ([{"stage": "prune", "method": {"kind": "cnn_channels"}}], "exactly one of ratio"),
        ([PRUNE, {**PRUNE, "name": "prune"}], "names must be unique"),
    ],
)
def test_schema_rejects_incoherent_pipelines(
    tmp_path: Path, stages: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        _config(tmp_path, tmp_path, *stages)


def test_stage_names_number_repeated_kinds(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        tmp_path,
        PRUNE,
        {"stage": "distil", "recipe": "a"},
        QUANTISE,
        {"stage": "distil", "recipe": "a"},
        EXPORT,
    )
    assert stage_names(config) == ["prune", "distil", "quantise", "distil_2", "export"]


def test_safetensors_content_hash_ignores_metadata_order(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from distil.compress.pipeline import content_sha256

    tensors = {"b": torch.ones(3), "a": torch.zeros(2, 2)}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"k1": "1", "k2": "2"})
    save_file(tensors, str(tmp_path / "y.safetensors"), metadata={"k2": "2", "k1": "1"})
    assert content_sha256(tmp_path / "x.safetensors") == content_sha256(tmp_path / "y.safetensors")
    save_file(
        {**tensors, "b": torch.full((3,), 2.0)},
        str(tmp_path / "z.safetensors"),
        metadata={"k1": "1", "k2": "2"},
    )
    assert content_sha256(tmp_path / "z.safetensors") != content_sha256(tmp_path / "x.safetensors")
