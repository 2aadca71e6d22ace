"""The compression pipeline's config: a source model and stages
``prune -> distil -> quantise -> distil (quantisation-aware) -> export``, each optional.

Every check that reads only the config is a validator here, so ``distil validate`` reports it
before anything runs: stage order, which prune method fits which model, QAT-capable schemes,
ONNX only for classifiers and encoders, unique stage names.

A ``distil`` stage that follows the ``quantise`` stage is quantisation-aware: it trains the
float weights the quantise stage started from through fake quantisation with the same scheme,
against the full-precision source model as teacher (#84), then converts. Its output replaces
the post-training quantised model; the report keeps both.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from distil.compress.cnn_prune import ChannelImportance
from distil.compress.lm_prune import DepthImportance
from distil.compress.quantise import QAT_SCHEMES, QuantScheme
from distil.config.base import StrictModel


class ModelKind(str, Enum):
    """What the pipeline compresses."""

    causal_lm = "causal_lm"  # a Hugging Face causal-LM folder (Llama family for pruning)
    classifier = "classifier"  # a distil zoo classifier folder (distil_model.json)
    encoder = "encoder"  # a Hugging Face / sentence-transformers encoder folder


class SourceModel(StrictModel):
    """The model to compress; it is also the distillation teacher of every ``distil`` stage."""

    kind: ModelKind
    folder: str = Field(description="local model folder (never downloaded)")
    max_length: int | None = Field(
        default=None, ge=2, description="encoders: token truncation (None: the folder's)"
    )


class Calibration(StrictModel):
    """Examples whose activations rank what pruning removes (and static int8 observes)."""

    num_examples: int = Field(default=256, ge=1)
    batch_size: int = Field(default=16, ge=1)


class LMPrune(StrictModel):
    """Depth and/or width pruning of a Llama-style causal LM (Minitron-style importance)."""

    kind: Literal["causal_lm"] = "causal_lm"
    num_layers: int | None = Field(default=None, ge=1, description="decoder layers to keep")
    depth_importance: DepthImportance = DepthImportance.block_influence
    hidden_size: int | None = Field(default=None, ge=1)
    intermediate_size: int | None = Field(default=None, ge=1)
    num_heads: int | None = Field(default=None, ge=1, description="a multiple of the GQA ratio")

    @model_validator(mode="after")
    def _something(self) -> LMPrune:
        if all(
            v is None
            for v in (self.num_layers, self.hidden_size, self.intermediate_size, self.num_heads)
        ):
            raise ValueError(
                "set at least one of num_layers, hidden_size, intermediate_size, num_heads"
            )
        return self


class PruneEngine(str, Enum):
    """Who slices the CNN."""

    distil = "distil"  # own slicing of the zoo CNN
    torch_pruning = "torch_pruning"  # Torch-Pruning's dependency graph (zoo ResNet, any CNN)


class CNNPrune(StrictModel):
    """Output-channel pruning of a zoo CNN classifier."""

    kind: Literal["cnn_channels"] = "cnn_channels"
    ratio: float | None = Field(default=None, ge=0, lt=1, description="share of channels removed")
    channels: list[int] | None = Field(default=None, description="new width of every stage")
    importance: ChannelImportance = ChannelImportance.bn_scale
    engine: PruneEngine = PruneEngine.distil

    @model_validator(mode="after")
    def _one_target(self) -> CNNPrune:
        if (self.ratio is None) == (self.channels is None):
            raise ValueError("give exactly one of ratio or channels")
        if self.engine == PruneEngine.torch_pruning:
            if self.channels is not None:
                raise ValueError("engine torch_pruning takes a ratio, not channels")
            if self.importance == ChannelImportance.activation:
                raise ValueError("engine torch_pruning ranks by weight_l2 or bn_scale")
        return self


class EncoderPrune(StrictModel):
    """Layer subset and/or width pruning of a BERT-style encoder (``narrow_encoder``)."""

    kind: Literal["encoder_width"] = "encoder_width"
    layers: list[int] | None = Field(default=None, description="blocks to keep, e.g. [0, 2, 4]")
    hidden_size: int | None = Field(default=None, ge=1)
    intermediate_size: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _something(self) -> EncoderPrune:
        if self.layers is None and self.hidden_size is None:
            raise ValueError("set layers and/or hidden_size")
        if self.intermediate_size is not None and self.hidden_size is None:
            raise ValueError("intermediate_size needs hidden_size (width pruning)")
        return self


PruneMethod = Annotated[LMPrune | CNNPrune | EncoderPrune, Field(discriminator="kind")]

_PRUNE_FOR_KIND = {
    "causal_lm": ModelKind.causal_lm,
    "cnn_channels": ModelKind.classifier,
    "encoder_width": ModelKind.encoder,
}


class PruneStage(StrictModel):
    stage: Literal["prune"]
    name: str | None = None
    method: PruneMethod
    calibration: Calibration = Calibration()


class LoraOptions(StrictModel):
    """Distil into LoRA adapters on the stage's input model (the pretrained student) instead of
    all its weights. The stage's ``model/`` always holds the merged weights (what later stages and
    ``from_pretrained`` read); ``keep_adapters`` also saves the adapters apart."""

    rank: int = Field(default=8, ge=1)
    alpha: int = Field(default=16, ge=1)
    target_modules: list[str] | None = Field(
        default=None, description="None: q/v/up/down projections of a Llama, else every Linear"
    )
    keep_adapters: bool = Field(
        default=False,
        description="also save the adapters apart in extras/adapter (a peft folder for the "
        "stage's input model)",
    )


class DistilStage(StrictModel):
    """Distillation from the source model (the teacher) into this stage's input model."""

    stage: Literal["distil"]
    name: str | None = None
    recipe: str = Field(
        description="whose loss step distils (the caller's distillers by name): lm_kd for causal "
        "LMs, classifier_kd for classifiers in the compress recipe"
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="dotted overrides of the distillation settings for this stage, e.g. "
        "{train.max_steps: 40, kd.kd_weight: 1.0}",
    )
    lora: LoraOptions | None = None


class QuantMethod(str, Enum):
    """How the quantise stage quantises."""

    linear = "linear"  # torchao, nn.Linear layers (any model kind), QAT-capable
    static_pt2e = "static_pt2e"  # torchao PT2E x86 static int8 of a whole CNN (classifiers)
    # int8 storage of every conv/linear weight, dequantised to float at load (classifiers): the
    # smallest file (a PT2E program carries its serialised graph), float compute
    int8_weights = "int8_weights"


class QuantiseStage(StrictModel):
    stage: Literal["quantise"]
    name: str | None = None
    method: QuantMethod = QuantMethod.linear
    scheme: QuantScheme = QuantScheme.int8_weight_only
    include_lm_head: bool = Field(default=False, description="quantise the LM head too")
    calibration: Calibration = Calibration(num_examples=128)


class ExportStage(StrictModel):
    """The deliverable: the model folder as other tools load it (safetensors weights, always
    written) and, for classifiers and encoders, an ONNX file checked with onnxruntime."""

    stage: Literal["export"]
    name: str | None = None
    onnx: bool = Field(default=False, description="also write model.onnx and check it")
    onnx_atol: float = Field(default=1e-4, gt=0)
    onnx_rtol: float = Field(default=1e-4, ge=0)


Stage = Annotated[
    PruneStage | DistilStage | QuantiseStage | ExportStage, Field(discriminator="stage")
]


class Measure(StrictModel):
    """What is measured on every stage's output (size on disk always)."""

    latency: bool = Field(default=True, description="time forward passes of every stage's model")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 64])
    compiled: list[bool] = Field(
        default_factory=lambda: [False, True], description="eager and/or torch.compile"
    )
    sequence_length: int = Field(default=64, ge=1, description="tokens per LM/encoder example")
    repeats: int = Field(default=10, ge=1)
    warmup: int = Field(default=2, ge=1)
    threads: int = Field(default=1, ge=1)

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, sizes: list[int]) -> list[int]:
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError("batch_sizes must be a non-empty list of positive sizes")
        return sizes


class PipelineConfig(StrictModel):
    """``source`` → stages, each stage's output fingerprinted under ``output_dir``."""

    source: SourceModel
    output_dir: str = "runs/compress"
    stages: list[Stage] = Field(min_length=1)
    measure: Measure = Measure()

    @model_validator(mode="before")
    @classmethod
    def _method_kind_from_source(cls, data: Any) -> Any:
        """A prune method without ``kind`` gets the one that fits the source model."""
        return fill_prune_kinds(data)

    @model_validator(mode="after")
    def _coherent(self) -> PipelineConfig:
        problems: list[str] = []
        kinds = [s.stage for s in self.stages]
        names = stage_names(self)
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            problems.append(f"stage names must be unique: {duplicates}")
        if "export" in kinds and (kinds.count("export") > 1 or kinds[-1] != "export"):
            problems.append("export must be the last stage, once")
        if kinds.count("quantise") > 1:
            problems.append("quantise at most once")
        if "quantise" in kinds:
            q_index = kinds.index("quantise")
            quantise = self.stages[q_index]
            assert isinstance(quantise, QuantiseStage)
            after = [k for k in kinds[q_index + 1 :] if k != "export"]
            if any(k != "distil" for k in after) or len(after) > 1:
                problems.append(
                    "after quantise come at most one distil (quantisation-aware) and export"
                )
            if after and quantise.method != QuantMethod.linear:
                problems.append(
                    "quantisation-aware distillation needs method linear (torchao QAT); "
                    f"{quantise.method.value} is post-training only"
                )
            if after and quantise.scheme not in QAT_SCHEMES:
                problems.append(
                    f"quantisation-aware distillation supports schemes "
                    f"{[s.value for s in QAT_SCHEMES]}, not {quantise.scheme.value}"
                )
            if quantise.method != QuantMethod.linear and self.source.kind != ModelKind.classifier:
                problems.append(
                    f"{quantise.method.value} quantises zoo classifiers; use method linear"
                )
        for index, stage in enumerate(self.stages):
            if isinstance(stage, PruneStage):
                wanted = _PRUNE_FOR_KIND[stage.method.kind]
                if wanted != self.source.kind:
                    problems.append(
                        f"stages.{index}: prune method {stage.method.kind} is for "
                        f"{wanted.value} models, the source is {self.source.kind.value}"
                    )
            if (
                isinstance(stage, DistilStage)
                and stage.lora is not None
                and is_quantisation_aware(self, index)
            ):
                problems.append(
                    f"stages.{index}: LoRA and quantisation-aware distillation do not combine"
                )
            if isinstance(stage, ExportStage) and stage.onnx:
                if self.source.kind == ModelKind.causal_lm:
                    problems.append(
                        f"stages.{index}: ONNX export covers classifiers and encoders; causal "
                        "LMs export as safetensors folders"
                    )
                if "quantise" in kinds:
                    problems.append(
                        f"stages.{index}: ONNX export takes float models; export ONNX from a "
                        "pipeline without the quantise stage (its earlier stages are reused)"
                    )
        if problems:
            raise ValueError("; ".join(problems))
        return self


def fill_prune_kinds(data: Any) -> Any:
    """Raw config data (``source.kind`` and ``stages``) with each prune method's missing
    ``kind`` set to the one that fits the source model."""
    if not isinstance(data, dict):
        return data
    source, stages = data.get("source"), data.get("stages")
    source_kind = source.get("kind") if isinstance(source, dict) else None
    default = {v.value: k for k, v in _PRUNE_FOR_KIND.items()}.get(str(source_kind))
    if default is None or not isinstance(stages, list):
        return data
    filled = []
    for stage in stages:
        method = stage.get("method") if isinstance(stage, dict) else None
        if isinstance(method, dict) and stage.get("stage") == "prune" and "kind" not in method:
            stage = {**stage, "method": {**method, "kind": default}}
        filled.append(stage)
    return {**data, "stages": filled}


def stage_names(config: PipelineConfig) -> list[str]:
    """Each stage's name: its ``name``, else its kind, numbered from the second of a kind
    (``distil``, ``distil_2``)."""
    names: list[str] = []
    seen: dict[str, int] = {}
    for stage in config.stages:
        if stage.name is not None:
            names.append(stage.name)
            continue
        seen[stage.stage] = seen.get(stage.stage, 0) + 1
        count = seen[stage.stage]
        names.append(stage.stage if count == 1 else f"{stage.stage}_{count}")
    return names


def is_quantisation_aware(config: PipelineConfig, index: int) -> bool:
    """Whether stage ``index`` is a distil stage after the quantise stage."""
    kinds = [s.stage for s in config.stages]
    return kinds[index] == "distil" and "quantise" in kinds[:index]
