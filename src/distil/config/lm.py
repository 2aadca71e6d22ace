"""Config sections of the causal-LM recipes (``lm_pretrain``, ``lm_kd``, ``distil cache``,
``distil generate``): data, teacher, student, KD, on-policy sampling, evaluation, the cache.

Each default lives here and nowhere else; a shipped YAML that restates one says so in a comment.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import Field, ValidationInfo, model_validator

from distil.alignment.groups import AlignmentKind
from distil.alignment.offsets import ByteOffsetMethod
from distil.alignment.vocab import VocabMatch
from distil.config.base import StrictModel
from distil.config.sources import (
    BuiltinData,
    DataSource,
    FromTeacher,
    HFModel,
    LayerSubset,
    ModelSource,
    TeacherCache,
    check_paths,
    missing_path,
    require_builtin,
    require_kind,
)
from distil.losses.cross_tokenizer import CrossTokenizerLoss, GroupMerge
from distil.losses.divergences import Divergence

BUILTIN_CORPORA = ["stdlib"]  # the CPython standard-library corpus (distil.data.corpus)


class LMDataFormat(str, Enum):
    """How source records become training examples."""

    TEXT = "text"
    PROMPT_COMPLETION = "prompt_completion"
    CHAT = "chat"


class OverlengthPolicy(str, Enum):
    """What to do with an example longer than ``max_length`` (prompt/completion and chat)."""

    ERROR = "error"
    TRUNCATE = "truncate"  # keep the first max_length tokens; logged with a count


class TorchDtype(str, Enum):
    AUTO = "auto"  # the checkpoint's dtype (float32 for a spec)
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class LMDataSection(StrictModel):
    """Local files (text, JSONL, Parquet) or the built-in corpus, and how they become examples."""

    source: DataSource = Field(
        default_factory=lambda: BuiltinData(builtin="stdlib"),
        description="{builtin: stdlib} (the CPython standard library) or {train: [FILES], eval: [FILES]}",
    )
    corpus_max_bytes: int | None = Field(
        default=None, ge=1, description="cap on the built-in corpus size"
    )
    eval_fraction: float = Field(default=0.05, gt=0, lt=1)
    format: LMDataFormat = LMDataFormat.TEXT
    max_length: int = Field(
        default=256, ge=2, description="tokens per example (the block size of packed text)"
    )
    overlength: OverlengthPolicy = OverlengthPolicy.ERROR
    drop_unsupervised: bool = False
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    train_limit: int | None = Field(
        default=None, ge=1, description="use only the first N training examples"
    )
    eval_limit: int | None = Field(
        default=64, ge=1, description="evaluate on the first N held-out examples"
    )
    shuffle: bool = Field(
        default=True, description="a seeded permutation per epoch; false keeps file order"
    )

    @model_validator(mode="after")
    def _builtin_is_text(self) -> LMDataSection:
        require_builtin(self.source, BUILTIN_CORPORA)
        if self.builtin is not None and self.format is not LMDataFormat.TEXT:
            raise ValueError("data.format: the built-in corpus is raw text: use data.format=text")
        return self

    @property
    def builtin(self) -> str | None:
        """The built-in corpus's name, or None for local files."""
        return getattr(self.source, "builtin", None)


class CrossTokenizerSection(StrictModel):
    """Distillation between a teacher and a student with different tokenizers (used when
    ``student.tokenizer`` differs from the teacher's). The hybrid and MinED losses apply
    ``kd.divergence`` (with ``kd.divergence_params``) where they compare entries directly."""

    loss: CrossTokenizerLoss = Field(
        default=CrossTokenizerLoss.HYBRID,
        description="uld (sorted L1), hybrid (kd.divergence on shared entries + uld on the rest, "
        "TRL GOLD), min_ed (kd.divergence after FuseLLM's edit-distance vocabulary map) or "
        "first_token (kd.divergence after mapping each teacher entry to the student token its "
        "text starts with)",
    )
    alignment: AlignmentKind = Field(
        default=AlignmentKind.BYTE_SPAN,
        description="byte_span (tokens covering the same bytes) or positional (no offsets needed)",
    )
    merge: GroupMerge = Field(
        default=GroupMerge.OBSERVED,
        description="how a run of several tokens becomes one distribution: observed or bayesian",
    )
    byte_offsets: ByteOffsetMethod = Field(
        default=ByteOffsetMethod.OFFSETS,
        description="offsets (fast tokenizers) or decode (explicit fallback without offsets)",
    )
    vocab_match: VocabMatch = Field(
        default=VocabMatch.SURFACE,
        description="hybrid: pair entries by the bytes they stand for (surface) or by identical "
        "vocabulary strings (raw, GOLD's rule)",
    )
    matched_weight: float | None = Field(
        default=None,
        ge=0,
        description="hybrid: weight of the shared part; adaptive M/V_t when null",
    )
    unmatched_weight: float | None = Field(
        default=None, ge=0, description="hybrid: weight of the uld part; 1 - adaptive when null"
    )

    @model_validator(mode="after")
    def _weights_together(self) -> CrossTokenizerSection:
        if (self.matched_weight is None) != (self.unmatched_weight is None):
            raise ValueError(
                "kd.cross_tokenizer: set both matched_weight and unmatched_weight, or neither "
                "(adaptive weights)"
            )
        return self


class KDSection(StrictModel):
    kd_weight: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="weight of the soft term; 1 - it weighs the hard LM loss",
    )
    kd_temperature: float = Field(default=1.0, gt=0)
    divergence: Divergence = Divergence.FORWARD_KL
    divergence_params: dict[str, float] = Field(
        default_factory=dict, description="e.g. {beta: 0.5} for generalized_jsd"
    )
    chunked: bool | None = Field(
        default=None, description="chunked loss from hidden states; auto: on for large vocabularies"
    )
    chunk_size: int | None = Field(default=None, ge=1)
    cross_tokenizer: CrossTokenizerSection = Field(
        default_factory=CrossTokenizerSection,
        description="the loss and alignment when student.tokenizer differs from the teacher's",
    )


class OnPolicySection(StrictModel):
    """GKD-style on-policy distillation: on a share ``fraction`` (λ) of the steps the student
    samples completions of the batch's prompts and the teacher scores them; the divergence is
    taken on the sampled tokens only (no hard CE: there is no reference text)."""

    fraction: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="λ: 0 = off-policy KD on the dataset, 1 = every step on student samples",
    )
    sampling_temperature: float = Field(
        default=1.0, ge=0, description="the student's sampling temperature; 0 = greedy"
    )
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_new_tokens: int = Field(default=64, ge=1)
    prompt_tokens: int = Field(
        default=64,
        ge=1,
        description="prompt cut from packed text; prompt/completion and chat data use their own prompt",
    )


class MonitorSection(StrictModel):
    """Teacher-hacking monitor (Tiapkin et al. 2025): every ``every`` steps, the student's KL to
    the teacher on a fixed held-out set (and to an ``oracle`` model when given) is measured next
    to the training divergence (the proxy); the report flags a proxy that improves while the
    held-out or oracle measure worsens."""

    every: int = Field(default=0, ge=0, description="steps between measurements; 0 = off")
    examples: int = Field(default=16, ge=1, description="held-out examples measured")
    oracle: str | None = Field(
        default=None,
        description="folder of a ground-truth LM with the same tokenizer (e.g. the teacher's own teacher)",
    )
    tolerance: float = Field(
        default=0.02,
        ge=0,
        description="relative rise above its best value that counts as worsening",
    )


class GenerationSection(StrictModel):
    prompts: int = Field(default=3, ge=0, description="sample generations shown side by side")
    prompt_tokens: int = Field(default=32, ge=1)
    max_new_tokens: int = Field(default=48, ge=1)
    sampling_temperature: float = Field(default=0.0, ge=0, description="0 = greedy")
    speed_batch: int = Field(default=4, ge=1)
    speed_new_tokens: int = Field(default=32, ge=1)


class EvalSection(StrictModel):
    baseline: bool = Field(default=True, description="also train the student without the teacher")
    batch_size: int = Field(default=8, ge=1)
    fidelity_tokens: int = Field(
        default=2048,
        ge=1,
        description="held-out token positions whose full logits feed agreement, KL/JSD and calibration",
    )
    generation: GenerationSection = GenerationSection()
    monitor: MonitorSection = MonitorSection()


LM_MODEL_KINDS = ("hf", "spec")
LM_TEACHER_KINDS = ("hf", "spec", "ensemble")
LM_STUDENT_KINDS = ("from_teacher", "hf", "spec")


class CacheTargets(str, Enum):
    """What an LM cache stores per supervised position."""

    TOPK = "topk"  # the k most likely ids, their log-probs and the tail mass
    SAMPLED = "sampled"  # ids drawn from a proposal: unbiased estimates of the full loss


class ValueDtype(str, Enum):
    """Precision of the stored log-probs (and tail): 2 bytes either way."""

    FLOAT16 = "float16"  # 10-bit mantissa: finer steps for log-probs in [-65504, 0]
    BFLOAT16 = "bfloat16"  # 7-bit mantissa, fp32 range


class LMTeacherCache(TeacherCache):
    """A causal-LM teacher cache: sparse next-token targets at every supervised position
    (``docs/cache.md`` compares the kinds)."""

    targets: CacheTargets = CacheTargets.TOPK
    k: int = Field(default=8, ge=1, description="teacher log-probs kept per position")
    value_dtype: ValueDtype = ValueDtype.FLOAT16
    kd_temperature: float | None = Field(
        default=None,
        gt=0,
        description="temperature of the stored log-probs; kd.kd_temperature (or 1) when null",
    )
    tail_samples: int = Field(
        default=0,
        ge=0,
        description="targets=topk: also draw this many ids per position from the teacher's tail, "
        "so training estimates the full forward KL without bias (exact head + sampled tail)",
    )
    num_samples: int = Field(
        default=16, ge=1, description="targets=sampled: ids drawn per position"
    )
    proposal_temperature: float | None = Field(
        default=None,
        gt=0,
        description="targets=sampled: proposal temperature; the teacher itself when null",
    )
    examples_per_shard: int = Field(default=256, ge=1)
    batch_size: int = Field(default=8, ge=1, description="teacher forward batch")
    device: str | None = Field(
        default=None, description="teacher.device, else cuda if available, else cpu"
    )
    merge_timeout_s: float = Field(
        default=3600.0, gt=0, description="rank 0 waits this long for other ranks"
    )

    @model_validator(mode="after")
    def _tail_samples_go_with_topk(self) -> LMTeacherCache:
        if self.tail_samples and self.targets is CacheTargets.SAMPLED:
            raise ValueError(
                "teacher.cache.tail_samples adds sampled tail ids to a top-k cache; with "
                "targets=sampled every id is already sampled: set tail_samples=0 or targets=topk"
            )
        return self


class TeacherSection(StrictModel):
    """The causal-LM teacher: a local folder, or a model built in code (tests)."""

    model: ModelSource = Field(
        default_factory=lambda: HFModel(hf="runs/lm-teacher"),
        description="{hf: FOLDER} or {spec: {...}, seed: N}",
    )
    dtype: TorchDtype = TorchDtype.AUTO
    device: str | None = Field(
        default=None, description="e.g. cpu or cuda:1; the student's device when null"
    )
    cache: LMTeacherCache | None = Field(
        default=None,
        description="train from the teacher's cached top-k (written in-run when missing, or made "
        "ahead with `distil cache`); the live teacher still scores the report",
    )

    @model_validator(mode="after")
    def _kinds(self) -> TeacherSection:
        require_kind(self.model, LM_TEACHER_KINDS, "teacher.model")
        return self


class StudentSection(StrictModel):
    """The causal-LM student: teacher blocks, a local folder, or a shape built in code."""

    model: ModelSource = Field(
        default_factory=lambda: FromTeacher(from_teacher=LayerSubset(num_layers=2)),
        description="{from_teacher: {layers|num_layers}}, {hf: FOLDER} or {spec: {...}}",
    )
    tokenizer: str | None = Field(
        default=None,
        description="the student's own tokenizer folder, to distil across tokenizers "
        "(kd.cross_tokenizer); the teacher's when null",
    )

    @model_validator(mode="after")
    def _kinds(self, info: ValidationInfo) -> StudentSection:
        require_kind(self.model, LM_STUDENT_KINDS, "student.model")
        if self.tokenizer is not None and check_paths(info):
            problem = missing_path(self.tokenizer, "student.tokenizer:")
            if problem:
                raise ValueError(problem)
        if self.tokenizer is not None and isinstance(self.model, FromTeacher):
            raise ValueError(
                "student.model.from_teacher copies the teacher's blocks and vocabulary: with "
                "student.tokenizer use student.model={spec: ...} or {hf: FOLDER}"
            )
        return self


TEACHER_SEED = 1  # the init seed of a teacher built from a spec
STUDENT_SEED = 17  # the init seed of a student built from a spec


class LMCacheJob(StrictModel):
    """What writing an LM teacher cache reads of an ``lm_kd`` config (``distil cache CONFIG``,
    or the run itself when ``teacher.cache.write`` is ``auto``)."""

    seed: int = 0
    tokenizer: str | None = None
    data: LMDataSection = LMDataSection()
    teacher: TeacherSection = TeacherSection()
    kd_temperature: float = Field(default=1.0, gt=0)
    teacher_seed: int = TEACHER_SEED

    def tokenizer_folder(self) -> str:
        """``tokenizer``, else the teacher's folder."""
        if self.tokenizer is not None:
            return self.tokenizer
        if isinstance(self.teacher.model, HFModel):
            return self.teacher.model.hf
        raise ValueError("tokenizer: a teacher built from a spec needs a tokenizer folder")


def cache_job(cfg: Any) -> LMCacheJob:
    """The cache job of an ``lm_kd`` config (any object with its ``seed``, ``tokenizer``,
    ``data``, ``teacher`` and ``kd`` sections)."""
    return LMCacheJob(
        seed=cfg.seed,
        tokenizer=cfg.tokenizer,
        data=cfg.data,
        teacher=cfg.teacher,
        kd_temperature=cfg.kd.kd_temperature,
    )
