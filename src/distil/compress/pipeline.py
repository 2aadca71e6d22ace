"""The stage runner of ``prune -> distil -> quantise -> distil (QAT) -> export``.

Each stage reads the previous stage's model folder and writes its own under
``output_dir/stages/NN-name-KEY/`` (``model/`` + ``stage.json``). ``KEY`` is a sha256 over:

- the fingerprint of the stage's input (the previous stage's output fingerprint, or the
  source folder's file hashes for the first stage),
- the stage's own config, the data fingerprint the caller gives (calibration and training
  data) and the format version,
- for distillation stages, the source model's fingerprint (it is the teacher).

So a rerun with the same config reuses every stage (after checking the recorded sha256 of
every output file); changing one stage reruns it and everything after it, nothing before.

Measurements (size, quality through the caller's ``evaluate``, latency) live next to the stage
in ``metrics.json``, keyed by the measurement settings, the caller's evaluation fingerprint
and the content of the stage's ``model/`` folder: changing what is measured re-measures the
published models and retrains nothing, and an export stage that copies its input's model is
not measured twice. What a stage logged while it ran (training metrics) is published in its
``logs/`` folder, outside the fingerprint.

Crash safety: a stage writes into ``stages/.tmp-NN-name-KEY/`` and is published by one atomic
``rename`` after ``stage.json`` (the completion record) is written and synced. A kill at any
point leaves either a complete stage folder or a temporary one that the next run deletes
before running the stage again. Training stages get a ``work_dir`` that survives kills (it is
deleted when the stage is published), where a recipe keeps its checkpoints to resume.

Distillation stages are callables supplied by the caller (``PipelineHooks.distillers``, by
recipe name); prune, quantise and export are built in.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from distil.compress.artifacts import (
    LoadedModel,
    copy_side_files,
    example_inputs,
    load_model,
    parameter_count,
    save_float_model,
    usable_length,
    weight_bytes_on_disk,
)
from distil.compress.config import (
    Calibration,
    CNNPrune,
    DistilStage,
    EncoderPrune,
    ExportStage,
    LMPrune,
    Measure,
    ModelKind,
    PipelineConfig,
    PruneEngine,
    PruneStage,
    QuantiseStage,
    QuantMethod,
    Stage,
    is_quantisation_aware,
    stage_names,
)
from distil.compress.quantise import QuantScheme
from distil.errors import DistilError
from distil.storage import atomic_write_bytes, sha256_file

logger = logging.getLogger(__name__)

STAGE_FORMAT = 1
RECORD_FILE = "stage.json"
METRICS_FILE = "metrics.json"
MODEL_DIR = "model"
EXTRAS_DIR = "extras"
LOGS_DIR = "logs"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
SOURCE_METRICS = "source-metrics.json"


class StageStatus(str, Enum):
    ran = "ran"
    reused = "reused"


@dataclass(frozen=True)
class StageRecord:
    """A finished stage.

    Attributes:
        index: Position in the pipeline.
        name: Stage name.
        kind: ``prune``, ``distil``, ``quantise`` or ``export``.
        key: The stage key (what it was computed from).
        status: Whether this run computed it or reused it.
        folder: The published stage folder (``model/`` inside).
        output_fingerprint: sha256 over the output files and their hashes.
        seconds: Time the stage took when it ran (the original run's, when reused).
        details: What the stage reports about itself (kept layers, scheme, ...).
        metrics: Size, parameters, quality and latency of its output model.
    """

    index: int
    name: str
    kind: str
    key: str
    status: StageStatus
    folder: Path
    output_fingerprint: str
    seconds: float
    details: dict[str, Any]
    metrics: dict[str, Any]

    @property
    def model_dir(self) -> Path:
        return self.folder / MODEL_DIR

    @property
    def log_dir(self) -> Path:
        """What the stage logged while it ran (absent when it logged nothing)."""
        return self.folder / LOGS_DIR

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "kind": self.kind,
            "key": self.key,
            "status": self.status.value,
            "folder": str(self.folder),
            "output_fingerprint": self.output_fingerprint,
            "seconds": self.seconds,
            "details": self.details,
            "metrics": self.metrics,
        }


@dataclass(frozen=True)
class StageContext:
    """What a stage callable gets.

    Attributes:
        config: The whole pipeline config.
        stage: This stage's config.
        name: This stage's name.
        index: Its position.
        source_dir: The source model folder: the teacher of every distillation stage.
        input_dir: The model folder this stage transforms.
        output_dir: Where the stage writes its model folder (a loadable folder of the source's
            kind); it starts empty.
        extras_dir: Where a stage may write files besides the model (e.g. LoRA adapters kept
            apart); part of the stage's fingerprint.
        work_dir: Scratch that survives a kill until the stage is published (checkpoints).
        log_dir: Where a stage keeps what it logged (training metrics, summaries); published
            with the stage but outside its fingerprint (timings differ between equal runs).
        qat: For a quantisation-aware distil stage: the quantise stage it follows, whose
            ``scheme`` (and ``include_lm_head``) it fake-quantises with and converts to at the
            end (:func:`save_quantised_stage`); ``None`` otherwise.
        float_input_dir: For that stage: the float model the quantise stage started from,
            whose weights QAT trains.
        hooks: The caller's hooks (calibration data, evaluation).
    """

    config: PipelineConfig
    stage: Stage
    name: str
    index: int
    source_dir: Path
    input_dir: Path
    output_dir: Path
    extras_dir: Path
    work_dir: Path
    log_dir: Path
    qat: QuantiseStage | None
    float_input_dir: Path | None
    hooks: PipelineHooks


class StageFn(Protocol):
    """Runs one stage: writes ``ctx.output_dir`` and returns details for the report."""

    def __call__(self, ctx: StageContext) -> dict[str, Any]: ...


CalibrationFn = Callable[[ModelKind, Calibration], Sequence[Any]]
"""Calibration examples for a model kind: LM batches (dicts with ``input_ids`` and
``attention_mask``), image batches ``(B, C, H, W)`` for classifiers, sentences for encoders."""

EvaluateFn = Callable[[LoadedModel], Mapping[str, float]]
"""Quality of a model (e.g. held-out perplexity or accuracy), computed on every stage output."""


@dataclass(frozen=True)
class PipelineHooks:
    """The caller's parts of a pipeline run.

    Attributes:
        distillers: Recipe name → the callable that runs a distil stage with that recipe.
        calibration: Calibration data (pruning importance, static int8 observers).
        evaluate: Quality metrics of each stage's model.
        data_fingerprint: Identity of the calibration and training data; part of every stage
            key, so other data recomputes the stages.
        evaluation_fingerprint: Identity of what ``evaluate`` measures (its data, its code);
            part of the measurement key only, so another evaluation re-measures, not retrains.
        after_stage: Called with each record right after the stage is published or reused.
    """

    distillers: Mapping[str, StageFn] = field(default_factory=dict)
    calibration: CalibrationFn | None = None
    evaluate: EvaluateFn | None = None
    data_fingerprint: str = ""
    evaluation_fingerprint: str = ""
    after_stage: Callable[[StageRecord], None] | None = None


@dataclass(frozen=True)
class PipelineReport:
    """Every stage's record and the source's metrics, as written to ``report.json``."""

    output_dir: Path
    source: dict[str, Any]
    stages: list[StageRecord]

    def stage(self, name: str) -> StageRecord:
        for record in self.stages:
            if record.name == name:
                return record
        raise KeyError(name)

    @property
    def final_model_dir(self) -> Path:
        return self.stages[-1].model_dir if self.stages else Path(self.source["folder"])


def content_sha256(path: Path) -> str:
    """sha256 of a file's content; for safetensors, of its header with keys sorted plus its data.

    safetensors writes its ``__metadata__`` map in no fixed order (torchao puts one entry per
    tensor there), so the same tensors can give other bytes from one save to the next; the
    sorted header makes equal content hash equal, and downstream stages stay reusable.
    """
    if path.suffix != ".safetensors":
        return sha256_file(path)
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
        digest.update(json.dumps(header, sort_keys=True).encode())
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_folder(folder: Path, *, skip: Sequence[str] = ()) -> tuple[str, dict[str, str]]:
    """Content sha256 of every file under ``folder`` (:func:`content_sha256`) and one digest
    over their names and hashes.

    Args:
        folder: The folder.
        skip: Relative paths to leave out (a folder's path leaves out everything under it).

    Returns:
        (digest, relative path → file sha256).
    """

    def skipped(relative: str) -> bool:
        return any(relative == s or relative.startswith(f"{s}/") for s in skip)

    files = {
        path.relative_to(folder).as_posix(): content_sha256(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not skipped(path.relative_to(folder).as_posix())
    }
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return digest, files


def stage_key(
    *,
    input_fingerprint: str,
    stage: Stage,
    data_fingerprint: str,
    teacher_fingerprint: str | None,
) -> str:
    """The sha256 that names what a stage output was computed from."""
    payload = {
        "format": STAGE_FORMAT,
        "input": input_fingerprint,
        "stage": stage.model_dump(mode="json", exclude={"name"}),
        "data": data_fingerprint,
        "teacher": teacher_fingerprint,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def measurement_key(model_fingerprint: str, measure: Measure, evaluation_fingerprint: str) -> str:
    """The sha256 that names what a model's metrics were measured with."""
    payload = {
        "format": STAGE_FORMAT,
        "model": model_fingerprint,
        "measure": measure.model_dump(mode="json"),
        "evaluation": evaluation_fingerprint,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _metrics(
    path: Path,
    model_dir: Path,
    config: PipelineConfig,
    hooks: PipelineHooks,
    measured: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The metrics of a model folder: from ``path`` (a ``metrics.json``) when it was measured the
    same way, else from ``measured`` (this run's measurements by key: an export stage holds the
    same model as the stage before it), else measured now; written to ``path`` either way."""
    model_fingerprint, _ = fingerprint_folder(model_dir)
    key = measurement_key(model_fingerprint, config.measure, hooks.evaluation_fingerprint)
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            measured[key] = dict(cached["metrics"])
            return dict(cached["metrics"])
    if key not in measured:
        source = config.source
        loaded = load_model(source.kind, model_dir, max_length=source.max_length)
        measured[key] = measure_model(loaded, config.measure, hooks.evaluate)
    _write_json(path, {"key": key, "metrics": measured[key]})
    return dict(measured[key])


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=1, sort_keys=True, default=str).encode())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _Positional(nn.Module):
    """Calls a classifier with its image batch as the positional argument (a ``torch.export``
    program accepts only the calling convention it was exported with)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Any) -> Any:
        return self.module(x)


def measure_model(
    loaded: LoadedModel, measure: Measure, evaluate: EvaluateFn | None
) -> dict[str, Any]:
    """Parameters, weight bytes on disk, quality (``evaluate``) and latency of a model folder."""
    from distil.compress.latency import latency_grid, load_average

    metrics: dict[str, Any] = {
        "parameters": parameter_count(loaded.module),
        "weight_bytes": weight_bytes_on_disk(loaded.folder),
    }
    if evaluate is not None:
        metrics["quality"] = dict(evaluate(loaded))
    if measure.latency:
        runner = (
            loaded.module if loaded.kind != ModelKind.classifier else _Positional(loaded.module)
        )
        rows = latency_grid(
            {"model": runner},
            lambda batch: example_inputs(loaded, batch, measure.sequence_length),
            batch_sizes=measure.batch_sizes,
            compiled=measure.compiled,
            warmup=measure.warmup,
            repeats=measure.repeats,
            threads=measure.threads,
        )
        metrics["latency"] = [
            {k: r[k] for k in ("batch_size", "compiled", "median_ms", "p10_ms", "p90_ms")}
            | {"warmup_s": r["warmup_s"]}
            for r in rows
        ]
        metrics["load_average"] = list(load_average())
        if loaded.kind != ModelKind.classifier:
            metrics["latency_tokens"] = usable_length(loaded, measure.sequence_length)
    return metrics


def _calibration(ctx: StageContext, calibration: Calibration, why: str) -> Sequence[Any]:
    if ctx.hooks.calibration is None:
        raise DistilError(
            f"stage {ctx.name}: {why} needs calibration data, and no calibration hook was given"
        )
    examples = ctx.hooks.calibration(ctx.config.source.kind, calibration)
    if not examples:
        raise DistilError(f"stage {ctx.name}: the calibration hook returned no examples")
    return examples


def run_prune(ctx: StageContext) -> dict[str, Any]:
    """The built-in prune stage."""
    stage = ctx.stage
    assert isinstance(stage, PruneStage)
    source = ctx.config.source
    loaded = load_model(source.kind, ctx.input_dir, max_length=source.max_length)
    method = stage.method
    before = parameter_count(loaded.module)
    details: dict[str, Any]
    if isinstance(method, LMPrune):
        from distil.compress.lm_prune import DepthImportance, WidthTarget, prune_causal_lm

        width = (
            None
            if method.hidden_size is None
            and method.intermediate_size is None
            and method.num_heads is None
            else WidthTarget(method.hidden_size, method.intermediate_size, method.num_heads)
        )
        needs_data = width is not None or (
            method.num_layers is not None and method.depth_importance != DepthImportance.uniform
        )
        batches = _calibration(ctx, stage.calibration, "LM importance") if needs_data else []
        result = prune_causal_lm(
            loaded.module,  # type: ignore[arg-type]
            list(batches),
            width=width,
            num_layers=method.num_layers,
            depth_importance=method.depth_importance,
        )
        save_float_model(loaded, result.model, ctx.output_dir)
        config = result.model.config
        details = {
            "kept_layers": list(result.kept_layers),
            "layer_scores": None if result.layer_scores is None else result.layer_scores.tolist(),
            "shape": {
                "num_layers": config.num_hidden_layers,
                "hidden_size": config.hidden_size,
                "intermediate_size": config.intermediate_size,
                "num_heads": config.num_attention_heads,
                "num_kv_heads": config.num_key_value_heads,
            },
        }
        pruned_module: nn.Module = result.model
    elif isinstance(method, CNNPrune):
        pruned_module, details = _prune_cnn(ctx, loaded, method, stage.calibration)
    else:
        assert isinstance(method, EncoderPrune)
        from distil.compress.encoder import narrow_encoder
        from distil.models.encoder import subset_layers

        encoder = loaded.encoder
        if method.layers is not None:
            encoder = subset_layers(encoder, method.layers)
        if method.hidden_size is not None:
            sentences = _calibration(ctx, stage.calibration, "encoder width importance")
            encoder = narrow_encoder(
                encoder,
                method.hidden_size,
                intermediate_size=method.intermediate_size,
                calibration=[str(s) for s in sentences],
                batch_size=stage.calibration.batch_size,
            )
        save_float_model(loaded, encoder.model, ctx.output_dir, encoder=encoder)
        pruned_module = encoder.model
        details = {"layers": method.layers, "hidden_size": int(encoder.model.config.hidden_size)}
    after = parameter_count(pruned_module)
    details |= {"parameters_before": before, "parameters_after": after}
    logger.info("stage %s: pruned %d -> %d parameters", ctx.name, before, after)
    return details


def _prune_cnn(
    ctx: StageContext, loaded: LoadedModel, method: CNNPrune, calibration: Calibration
) -> tuple[nn.Module, dict[str, Any]]:
    import torch

    from distil.compress.cnn_prune import (
        ChannelImportance,
        prune_small_cnn_channels,
        prune_with_depgraph,
        zoo_kwargs_of,
    )
    from distil.models.classifier import SmallCNN

    spec = loaded.zoo_spec or {}
    module = loaded.module
    if method.engine == PruneEngine.distil:
        if not isinstance(module, SmallCNN):
            raise DistilError(
                f"stage {ctx.name}: distil's own channel slicing handles the zoo cnn; this is a "
                f"{type(module).__name__}: set method.engine: torch_pruning"
            )
        images = (
            _calibration(ctx, calibration, "activation importance")
            if method.importance == ChannelImportance.activation
            else None
        )
        result = prune_small_cnn_channels(
            module,
            channels=method.channels,
            ratio=method.ratio,
            importance=method.importance,
            calibration=images,
        )
        pruned = result.model
    else:
        example = torch.zeros(1, *spec["in_shape"])
        pruned = prune_with_depgraph(
            module, example, ratio=method.ratio or 0.0, importance=method.importance
        )
    kwargs = zoo_kwargs_of(str(spec["zoo"]), pruned, spec["kwargs"])
    save_float_model(loaded, pruned, ctx.output_dir, zoo_kwargs=kwargs)
    return pruned, {"zoo_kwargs": kwargs, "engine": method.engine.value}


def save_quantised_stage(
    kind: ModelKind,
    float_model: LoadedModel,
    module: nn.Module,
    scheme: QuantScheme,
    output_dir: Path,
    *,
    include_lm_head: bool = False,
) -> None:
    """Quantise a float ``module`` (of ``float_model``'s kind) with torchao and write it as a
    stage folder; what the quantise stage and a quantisation-aware distiller both end with."""
    from distil.compress.quantise import quantise_linears, save_quantised_hf

    if kind == ModelKind.classifier:
        from distil.compress.export import save_zoo_classifier

        spec = float_model.zoo_spec or {}
        save_zoo_classifier(
            quantise_linears(module, scheme),
            output_dir,
            zoo=spec["zoo"],
            kwargs=spec["kwargs"],
            in_shape=spec["in_shape"],
            num_classes=int(spec["num_classes"]),
            linear_scheme=scheme,
        )
        return
    save_quantised_hf(
        module,  # type: ignore[arg-type]
        scheme,
        output_dir,
        include_lm_head=include_lm_head,
    )
    copy_side_files(float_model.folder, output_dir, sentence_transformers=kind == ModelKind.encoder)


def run_quantise(ctx: StageContext) -> dict[str, Any]:
    """The built-in quantise stage."""
    from distil.compress.quantise import describe

    stage = ctx.stage
    assert isinstance(stage, QuantiseStage)
    source = ctx.config.source
    loaded = load_model(source.kind, ctx.input_dir, max_length=source.max_length)
    if stage.method == QuantMethod.int8_weights:
        from distil.compress.export import save_zoo_int8_weights

        save_zoo_int8_weights(loaded.module, ctx.output_dir, spec=loaded.zoo_spec or {})
        return {
            "method": stage.method.value,
            "description": "int8 weights per output channel (every conv and linear), "
            "dequantised to float when loaded",
        }
    if stage.method == QuantMethod.static_pt2e:
        from distil.compress.export import save_zoo_pt2e
        from distil.compress.quantise import quantise_static_pt2e

        images = _calibration(ctx, stage.calibration, "static int8 (activation observers)")
        example = (example_inputs(loaded, 2, 1)["x"],)
        graph = quantise_static_pt2e(loaded.module, example, list(images))
        save_zoo_pt2e(graph, ctx.output_dir, example_inputs=example, spec=loaded.zoo_spec or {})
        return {"method": stage.method.value, "description": "x86 static int8, whole CNN (PT2E)"}
    save_quantised_stage(
        source.kind,
        loaded,
        loaded.module,
        stage.scheme,
        ctx.output_dir,
        include_lm_head=stage.include_lm_head,
    )
    return {
        "method": stage.method.value,
        "scheme": stage.scheme.value,
        "description": describe(stage.scheme),
    }


def run_export(ctx: StageContext) -> dict[str, Any]:
    """The built-in export stage: the model folder as it is, plus a checked ONNX file."""
    stage = ctx.stage
    assert isinstance(stage, ExportStage)
    shutil.copytree(ctx.input_dir, ctx.output_dir)
    details: dict[str, Any] = {"folder": MODEL_DIR}
    if stage.onnx:
        from distil.compress.export import SentenceEmbedding, check_onnx, export_onnx

        source = ctx.config.source
        loaded = load_model(source.kind, ctx.output_dir, max_length=source.max_length)
        measure = ctx.config.measure
        small = example_inputs(loaded, 2, min(8, measure.sequence_length))
        check_inputs = example_inputs(loaded, 5, measure.sequence_length)
        module: nn.Module
        if source.kind == ModelKind.encoder:
            module = SentenceEmbedding(loaded.module, bool(loaded.encoder.normalize))
            dims = {name: {0: "batch", 1: "tokens"} for name in small}
            outputs = ["sentence_embedding"]
        else:
            module, dims, outputs = loaded.module, {"x": {0: "batch"}}, ["logits"]
        path = export_onnx(
            module, small, ctx.extras_dir / "model.onnx", output_names=outputs, dynamic_dims=dims
        )
        check = check_onnx(path, module, check_inputs, atol=stage.onnx_atol, rtol=stage.onnx_rtol)
        details |= {
            "onnx": f"{EXTRAS_DIR}/model.onnx",
            "onnx_bytes": path.stat().st_size,
            "onnx_max_abs_diff": check.max_abs_diff,
            "onnx_check_batch": check.batch_size,
        }
    return details


def run_distil(ctx: StageContext) -> dict[str, Any]:
    """A distil stage: the caller's callable for the stage's recipe."""
    stage = ctx.stage
    assert isinstance(stage, DistilStage)
    fn = ctx.hooks.distillers.get(stage.recipe)
    if fn is None:
        raise DistilError(
            f"stage {ctx.name}: no distiller for recipe {stage.recipe!r} "
            f"(available: {sorted(ctx.hooks.distillers)})"
        )
    return fn(ctx)


BUILT_IN: dict[str, StageFn] = {
    "prune": run_prune,
    "quantise": run_quantise,
    "export": run_export,
    "distil": run_distil,
}


def _reuse(
    folder: Path,
    key: str,
    index: int,
    name: str,
    config: PipelineConfig,
    hooks: PipelineHooks,
    measured: dict[str, dict[str, Any]],
) -> StageRecord | None:
    """The record of a published stage folder whose files still match it, else ``None``."""
    path = folder / RECORD_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("format") != STAGE_FORMAT or data.get("key") != key:
        return None
    for relative, expected in data["files"].items():
        file = folder / relative
        if not file.is_file() or content_sha256(file) != expected:
            logger.warning(
                "stage %s: %s changed on disk since it was written; running the stage again",
                name,
                relative,
            )
            return None
    return StageRecord(
        index=index,
        name=name,
        kind=data["kind"],
        key=key,
        status=StageStatus.reused,
        folder=folder,
        output_fingerprint=data["output_fingerprint"],
        seconds=float(data["seconds"]),
        details=data["details"],
        metrics=_metrics(folder / METRICS_FILE, folder / MODEL_DIR, config, hooks, measured),
    )


def _run(
    ctx_args: dict[str, Any], folder: Path, key: str, measured: dict[str, dict[str, Any]]
) -> StageRecord:
    """Run one stage into a temporary folder and publish it atomically."""
    stages_dir = folder.parent
    tmp = stages_dir / f".tmp-{folder.name}"
    if tmp.exists():
        logger.info("removing the unfinished attempt %s", tmp)
        shutil.rmtree(tmp)
    if folder.exists():  # a published folder whose files no longer match its record
        shutil.rmtree(folder)
    work = Path(ctx_args["config"].output_dir) / "work" / folder.name
    work.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(
        **ctx_args,
        output_dir=tmp / MODEL_DIR,
        extras_dir=tmp / EXTRAS_DIR,
        work_dir=work,
        log_dir=tmp / LOGS_DIR,
    )
    (tmp / EXTRAS_DIR).mkdir(parents=True)
    (tmp / LOGS_DIR).mkdir()
    if ctx.stage.stage != "export":  # export copies a whole folder into place
        ctx.output_dir.mkdir(parents=True)
    start = time.perf_counter()
    details = BUILT_IN[ctx.stage.stage](ctx)
    seconds = time.perf_counter() - start
    if not ctx.output_dir.is_dir() or not any(ctx.output_dir.iterdir()):
        raise DistilError(f"stage {ctx.name} wrote no model into {ctx.output_dir}")
    for empty in (tmp / EXTRAS_DIR, tmp / LOGS_DIR):
        if empty.is_dir() and not any(empty.iterdir()):
            empty.rmdir()
    output_fingerprint, files = fingerprint_folder(tmp, skip=(RECORD_FILE, METRICS_FILE, LOGS_DIR))
    metrics = _metrics(tmp / METRICS_FILE, ctx.output_dir, ctx.config, ctx.hooks, measured)
    record = {
        "format": STAGE_FORMAT,
        "key": key,
        "name": ctx.name,
        "kind": ctx.stage.stage,
        "stage": ctx.stage.model_dump(mode="json"),
        "output_fingerprint": output_fingerprint,
        "files": files,
        "seconds": seconds,
        "details": details,
        "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    _write_json(tmp / RECORD_FILE, record)
    _fsync_dir(tmp)
    os.replace(tmp, folder)  # the stage exists from here on, complete
    _fsync_dir(stages_dir)
    shutil.rmtree(work, ignore_errors=True)
    logger.info("stage %s done in %.1f s -> %s", ctx.name, seconds, folder)
    return StageRecord(
        index=ctx.index,
        name=ctx.name,
        kind=ctx.stage.stage,
        key=key,
        status=StageStatus.ran,
        folder=folder,
        output_fingerprint=output_fingerprint,
        seconds=seconds,
        details=details,
        metrics=metrics,
    )


def run_pipeline(config: PipelineConfig, hooks: PipelineHooks | None = None) -> PipelineReport:
    """Run (or reuse) every stage of ``config`` and write ``report.json`` / ``report.md``.

    Args:
        config: The validated pipeline.
        hooks: Distillers, calibration data, evaluation; none needed for prune by weights,
            linear quantise and export.

    Returns:
        The report.

    Raises:
        DistilError: When a stage cannot run (missing distiller or calibration, bad model).
    """
    hooks = hooks or PipelineHooks()
    root = Path(config.output_dir)
    stages_dir = root / "stages"
    stages_dir.mkdir(parents=True, exist_ok=True)
    source_dir = Path(config.source.folder)
    if not source_dir.is_dir():
        raise DistilError(f"source.folder {source_dir} does not exist")
    source_fingerprint, _ = fingerprint_folder(source_dir)
    measured: dict[str, dict[str, Any]] = {}
    source = {
        "folder": str(source_dir),
        "kind": config.source.kind.value,
        "fingerprint": source_fingerprint,
        "metrics": _metrics(root / SOURCE_METRICS, source_dir, config, hooks, measured),
    }
    names = stage_names(config)
    records: list[StageRecord] = []
    input_dir, input_fingerprint = source_dir, source_fingerprint
    float_before_quantise: Path | None = None
    for index, (stage, name) in enumerate(zip(config.stages, names, strict=True)):
        qat = is_quantisation_aware(config, index)
        key = stage_key(
            input_fingerprint=input_fingerprint,
            stage=stage,
            data_fingerprint=hooks.data_fingerprint,
            teacher_fingerprint=source_fingerprint if stage.stage == "distil" else None,
        )
        folder = stages_dir / f"{index:02d}-{name}-{key[:12]}"
        record = _reuse(folder, key, index, name, config, hooks, measured)
        if record is None:
            quantise = next((s for s in config.stages if isinstance(s, QuantiseStage)), None)
            ctx_args = {
                "config": config,
                "stage": stage,
                "name": name,
                "index": index,
                "source_dir": source_dir,
                "input_dir": input_dir,
                "qat": quantise if qat else None,
                "float_input_dir": float_before_quantise if qat else None,
                "hooks": hooks,
            }
            logger.info("stage %s (%s): running", name, stage.stage)
            record = _run(ctx_args, folder, key, measured)
        else:
            logger.info("stage %s (%s): reusing %s", name, stage.stage, folder)
        records.append(record)
        write_report(root, config, source, records)
        if hooks.after_stage is not None:
            hooks.after_stage(record)
        if isinstance(stage, QuantiseStage):
            float_before_quantise = input_dir
        input_dir, input_fingerprint = record.model_dir, record.output_fingerprint
    return PipelineReport(root, source, records)


def write_report(
    root: Path, config: PipelineConfig, source: Mapping[str, Any], records: Sequence[StageRecord]
) -> None:
    """``report.json`` (everything) and ``report.md`` (one table) in ``root``, atomically."""
    data = {
        "format": "distil-compress-report",
        "config": config.model_dump(mode="json"),
        "source": dict(source),
        "stages": [r.as_dict() for r in records],
    }
    _write_json(root / REPORT_JSON, data)
    atomic_write_bytes(root / REPORT_MD, render_markdown(source, records).encode())


def _latency_cell(metrics: Mapping[str, Any], batch: int, compiled: bool) -> str:
    for row in metrics.get("latency", []):
        if row["batch_size"] == batch and row["compiled"] == compiled:
            return f"{row['median_ms']:.2f} ({row['p10_ms']:.2f}-{row['p90_ms']:.2f})"
    return "-"


def render_markdown(source: Mapping[str, Any], records: Sequence[StageRecord]) -> str:
    """One row per model (source first): parameters, weight bytes, quality, latency."""
    rows: list[tuple[str, str, Mapping[str, Any]]] = [("source", "-", source["metrics"])]
    rows += [(f"{r.name} ({r.kind})", r.status.value, r.metrics) for r in records]
    quality_keys = sorted({k for _, _, m in rows for k in m.get("quality", {})})
    latency_keys = sorted(
        {(row["batch_size"], row["compiled"]) for _, _, m in rows for row in m.get("latency", [])}
    )
    header = ["model", "status", "parameters", "weight bytes", *quality_keys]
    header += [f"b{b} {'compiled' if c else 'eager'} ms" for b, c in latency_keys]
    lines = [
        "# Compression pipeline",
        "",
        "Latency: median (p10-p90) over interleaved repeats of one forward pass.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for label, status, metrics in rows:
        quality = metrics.get("quality", {})
        cells = [label, status, f"{metrics['parameters']:,}", f"{metrics['weight_bytes']:,}"]
        cells += [f"{quality[k]:.4g}" if k in quality else "-" for k in quality_keys]
        cells += [_latency_cell(metrics, b, c) for b, c in latency_keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
