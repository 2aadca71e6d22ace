"""One schema per concept, shared by every recipe: where a model comes from, where the data comes
from, and the teacher cache.

Alternatives are pydantic discriminated unions keyed by the one field that names the kind, so a
config reads as it means (``model: {hf: runs/lm-teacher}``, ``source: {builtin: mnist5k}``) and
a config that names two kinds, or none, is refused with the list of kinds::

    teacher:
      model: {zoo: cnn, kwargs: {channels: [32, 64, 64]}, weights: teacher.safetensors}
    student:
      model: {from_teacher: {layers: [0, 2, 4]}}
    data:
      source: {train: [train.csv], eval: [test.csv]}

A recipe accepts the kinds it can build (:func:`require_kind`); the union itself is the same for
all of them.
"""

from __future__ import annotations

import importlib.util
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, ValidationInfo, model_validator

from distil.config.base import StrictModel

# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class LMSpec(StrictModel):
    """A Llama-style causal LM built in code (the built-in teacher and students, tests)."""

    num_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    num_heads: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    max_context: int = Field(default=256, ge=2)
    num_kv_heads: int | None = Field(default=None, ge=1)
    tie_word_embeddings: bool = False
    vocab_size: int | None = Field(
        default=None, ge=1, description="embedding rows; the tokenizer's size when null"
    )


# The built-in teacher that `distil run lm_pretrain` exports: a missing one gets that hint.
BUILTIN_LM_TEACHER = "runs/lm-teacher"


def check_paths(info: ValidationInfo) -> bool:
    """Whether this validation checks the file system (``distil run``/``validate`` ask for it
    with ``context={"check_paths": True}``; defaults built at import time do not)."""
    return bool(info.context and info.context.get("check_paths"))


def missing_path(path: str, what: str) -> str | None:
    """A message for a path that does not exist, else None."""
    if Path(path).exists():
        return None
    hint = (
        " (make the built-in teacher first: distil run lm_pretrain)"
        if path.rstrip("/") == BUILTIN_LM_TEACHER
        else ""
    )
    return f"{what} {path!r} does not exist{hint}"


class _Source(StrictModel):
    """A model source. Keys of the other kinds set to null are dropped, so an override can
    switch kinds by nulling the old one (``teacher.model.zoo=null teacher.model.hf=DIR``)."""

    @model_validator(mode="before")
    @classmethod
    def _drop_null_kinds(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: v for k, v in value.items() if not (k in MODEL_KINDS and v is None)}
        return value

    @model_validator(mode="after")
    def _files_exist(self, info: ValidationInfo) -> _Source:
        if not check_paths(info):
            return self
        problems = [
            missing_path(str(v), f"{name}:")
            for name, v in (
                ("hf", getattr(self, "hf", None)),
                ("weights", getattr(self, "weights", None)),
            )
            if v is not None
        ]
        package = getattr(self, "package", None)
        if package is not None and importlib.util.find_spec(package) is None:
            problems.append(
                f"package {package!r} is not installed (pip install {package.replace('_', '-')})"
            )
        factory = getattr(self, "factory", None)
        if factory is not None:
            module, _, function = factory.partition(":")
            if not function or not _importable(module):
                problems.append(f"factory {factory!r}: give an importable package.module:function")
        if any(problems):
            raise ValueError("; ".join(p for p in problems if p))
        return self


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


class ZooModel(_Source):
    """A built-in architecture of distil's model zoo (classifiers: mlp, cnn, resnet)."""

    zoo: str
    kwargs: dict[str, Any] = Field(default_factory=dict, description="architecture settings")
    weights: str | None = Field(default=None, description="safetensors weights to load")


class FactoryModel(_Source):
    """Any ``nn.Module``: ``package.module:function`` called with the data's shape and ``kwargs``."""

    factory: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = Field(default=None, description="safetensors weights to load")


class HFModel(_Source):
    """A local Hugging Face model folder (config, safetensors, tokenizer)."""

    hf: str
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="loader settings, e.g. max_length for text classifiers"
    )
    trust_remote_code: bool = False


class PackageModel(_Source):
    """A model folder shipped inside a pip package (its ``get_model_path()``)."""

    package: str


class SpecModel(_Source):
    """A causal LM built in code from a shape, randomly initialised from ``seed``."""

    spec: LMSpec
    seed: int | None = Field(default=None, description="init seed; the role's default when null")


class LayerSubset(StrictModel):
    """A student cut from the teacher: a subset of its blocks, optionally narrowed."""

    layers: list[int] | None = Field(default=None, description="teacher blocks to keep")
    num_layers: int | None = Field(default=None, ge=1, description="or: this many, evenly spread")
    hidden_size: int | None = Field(
        default=None, ge=1, description="narrow to this width (activation-importance pruning)"
    )
    intermediate_size: int | None = Field(default=None, ge=1, description="FFN width when narrowed")
    calibration_examples: int = Field(
        default=256, ge=1, description="examples whose activations rank channels when narrowing"
    )

    @model_validator(mode="after")
    def _one_pick(self) -> LayerSubset:
        if (self.layers is None) == (self.num_layers is None):
            raise ValueError(
                "from_teacher takes exactly one of layers: [i, j, ...] or num_layers: N"
            )
        if self.layers is not None and not self.layers:
            raise ValueError("from_teacher.layers is empty: keep at least one block")
        return self


class FromTeacher(_Source):
    """A student made from the teacher's own blocks (DistilBERT / Minitron style)."""

    from_teacher: LayerSubset


class CombineRule(str, Enum):
    """How an ensemble's members become one target distribution.

    ``mean_probs``: the weighted mean of the members' probabilities at the KD temperature.
    Summing forward KLs to each member equals, up to a constant, one forward KL to this mean,
    so it is the target of "one KL per teacher" methods. ``mean_logits``: the weighted mean of
    the logits, i.e. the normalised *geometric* mean of the probabilities (TextBrewer's
    multi-teacher rule): a sharper, different target.
    """

    MEAN_PROBS = "mean_probs"
    MEAN_LOGITS = "mean_logits"


class MemberWeighting(str, Enum):
    """Fixed member weights, or per-example weights from each member's confidence in the label
    (a softmax over members of minus their cross-entropy on the true class, CA-MKD style)."""

    STATIC = "static"
    CONFIDENCE = "confidence"


class EnsembleMember(StrictModel):
    model: ModelSource
    weight: float = Field(default=1.0, gt=0, description="static weight (normalised over members)")


class EnsembleModel(_Source):
    """Several teachers combined into one target (multi-teacher distillation)."""

    ensemble: list[EnsembleMember] = Field(min_length=2)
    combine: CombineRule = CombineRule.MEAN_PROBS
    weighting: MemberWeighting = MemberWeighting.STATIC


MODEL_KINDS = ("zoo", "factory", "hf", "package", "spec", "from_teacher", "ensemble")


def _model_kind(value: Any) -> str | None:
    """The kind a model mapping names: the one key of :data:`MODEL_KINDS` it sets."""
    if isinstance(value, dict):
        named = [k for k in MODEL_KINDS if value.get(k) is not None]
        return named[0] if len(named) == 1 else None
    for kind in MODEL_KINDS:
        if getattr(value, kind, None) is not None:
            return kind
    return None


ModelSource = Annotated[
    Annotated[ZooModel, Tag("zoo")]
    | Annotated[FactoryModel, Tag("factory")]
    | Annotated[HFModel, Tag("hf")]
    | Annotated[PackageModel, Tag("package")]
    | Annotated[SpecModel, Tag("spec")]
    | Annotated[FromTeacher, Tag("from_teacher")]
    | Annotated[EnsembleModel, Tag("ensemble")],
    Discriminator(
        _model_kind,
        custom_error_type="model_kind",
        custom_error_message="a model names exactly one of: " + ", ".join(MODEL_KINDS),
    ),
]
EnsembleMember.model_rebuild()


def model_kind(source: Any) -> str:
    """The kind of a validated model source (``zoo``, ``hf``, ...)."""
    kind = _model_kind(source)
    assert kind is not None, "validated model sources always name one kind"
    return kind


def require_kind(source: Any, allowed: tuple[str, ...], key: str) -> None:
    """Refuse a model kind this recipe cannot build, naming the key and the kinds it can.

    Raises:
        ValueError: From a pydantic validator, so ``distil validate`` reports it by key.
    """
    kind = model_kind(source)
    if kind not in allowed:
        raise ValueError(f"{key}: {kind} models are not supported here; use one of {list(allowed)}")
    if isinstance(source, EnsembleModel):
        for i, member in enumerate(source.ensemble):
            inner = tuple(k for k in allowed if k != "ensemble")
            require_kind(member.model, inner, f"{key}.ensemble.{i}.model")


def describe_model(source: Any) -> str:
    """A short human name for a model source (for mode lines and reports)."""
    kind = model_kind(source)
    if isinstance(source, EnsembleModel):
        names = ", ".join(describe_model(m.model) for m in source.ensemble)
        return f"ensemble of {len(source.ensemble)} ({names}; {source.combine.value})"
    if isinstance(source, FromTeacher):
        sub = source.from_teacher
        pick = sub.layers if sub.layers is not None else f"{sub.num_layers} evenly spread"
        width = f", width {sub.hidden_size}" if sub.hidden_size else ""
        return f"teacher layers {pick}{width}"
    if isinstance(source, SpecModel):
        return f"scratch ({source.spec.num_layers} layers × {source.spec.hidden_size})"
    return f"{kind}:{getattr(source, kind)}"


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class BuiltinData(StrictModel):
    """A data set that ships with distil (or with a package it depends on), by name."""

    builtin: str


class FileData(StrictModel):
    """Local files: training files and, optionally, held-out ones (else split off training)."""

    train: list[str] = Field(min_length=1)
    eval: list[str] | None = Field(default=None, description="held-out/test files")

    @model_validator(mode="after")
    def _files_exist(self, info: ValidationInfo) -> FileData:
        if check_paths(info):
            problems = [missing_path(f, "data file") for f in [*self.train, *(self.eval or [])]]
            if any(problems):
                raise ValueError("; ".join(p for p in problems if p))
        return self


def _data_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        named = [k for k in ("builtin", "train") if value.get(k) is not None]
        return named[0] if len(named) == 1 else None
    return "builtin" if isinstance(value, BuiltinData) else "train"


DataSource = Annotated[
    Annotated[BuiltinData, Tag("builtin")] | Annotated[FileData, Tag("train")],
    Discriminator(
        _data_kind,
        custom_error_type="data_kind",
        custom_error_message="data.source is {builtin: NAME} or {train: [FILES], eval: [FILES]}",
    ),
]


def require_builtin(source: Any, known: list[str], key: str = "data.source.builtin") -> None:
    """Refuse an unknown built-in data set name with a "did you mean"."""
    if not isinstance(source, BuiltinData) or source.builtin in known:
        return
    import difflib

    close = difflib.get_close_matches(source.builtin, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"{key}: unknown {source.builtin!r}; {hint}built-in: {sorted(known)}")


# --------------------------------------------------------------------------------------------
# Teacher cache
# --------------------------------------------------------------------------------------------


class CacheWrite(str, Enum):
    """``auto``: write the cache in this run where it is missing or incomplete (resumable), then
    train from it. ``never``: it must exist already (made by ``distil cache CONFIG``)."""

    AUTO = "auto"
    NEVER = "never"


StorageDtype = Literal["float32", "float16", "bfloat16"]


class TeacherCache(StrictModel):
    """The teacher's outputs on the training data, written once and read every step instead of
    running the teacher. Fingerprinted by the teacher, the data and these settings: a cache made
    for something else is refused by the field that differs.

    ``dtype`` and ``feature_dtype`` apply to dense outputs (class logits, embeddings, feature
    maps); causal LMs store sparse next-token targets, set by the ``lm`` fields."""

    path: str = Field(description="the cache folder")
    write: CacheWrite = CacheWrite.AUTO
    dtype: StorageDtype = Field(default="float32", description="dense outputs (logits, embeddings)")
    feature_dtype: StorageDtype = Field(default="float16", description="feature maps")
