"""Recipe ``compress``: prune, distil, quantise, distil (quantisation-aware) and export in one
resumable pipeline, distilling with the loss steps of ``lm_kd`` (causal LMs) and
``classifier_kd`` (CNN classifiers) on the shared training loop.

The source model is the teacher of every ``distil`` stage:

- after ``prune``, the pruned model learns from the unpruned one (Minitron); with
  ``distillation.self_data`` it trains on the teacher's own generations, written by
  ``distil generate``'s library (#78);
- after ``quantise``, the stage is quantisation-aware (#84): the float weights the quantise
  stage started from train through torchao fake quantisation of the same scheme, against the
  full-precision teacher, and are converted to that scheme at the end;
- with ``lora``, only adapters on the stage's input model (the pretrained student) train.

Stages are computed by :func:`distil.compress.pipeline.run_pipeline` into ``store``: each one
content-addressed (its input, its settings, the data, the teacher), published atomically, and
reused by any later run, so changing one stage reruns that stage and what follows. A distil
stage checkpoints into its work folder in the store: a killed run, started again (with or
without ``--resume``), resumes the stage from its last checkpoint. The run folder holds the
report (``report.json``/``.md``/``.html``: every stage's size, quality and latency), the
stages' training curves (``metrics.jsonl``) and ``mode.txt``.

``eval.baseline`` trains the first distil stage's architecture from random initialisation on
the same data and steps without a teacher (content-addressed in the store too), so the report
says what pruning plus distillation bought over training that shape from scratch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import numpy as np
import torch
from pydantic import Field, ValidationError, model_validator
from torch import Tensor, nn

from distil.compress.artifacts import LoadedModel, load_model
from distil.compress.config import (
    Calibration,
    DistilStage,
    Measure,
    ModelKind,
    PipelineConfig,
    Stage,
    fill_prune_kinds,
    stage_names,
)
from distil.compress.pipeline import (
    PipelineHooks,
    PipelineReport,
    StageContext,
    StageRecord,
    fingerprint_folder,
    measure_model,
    save_quantised_stage,
)
from distil.config.base import StrictModel
from distil.config.classifier import ClassifierDataSection
from distil.config.lm import KDSection as LMKDSection
from distil.config.lm import LMDataFormat, LMDataSection, TeacherSection
from distil.config.loading import ConfigError, apply_overrides
from distil.config.sections import RunSection, SchedulerName, TrainSection
from distil.config.sources import FileData, HFModel, ModelSource, ZooModel, describe_model
from distil.config.sources import require_kind as require_source_kind
from distil.data.classification import ClassificationData, load_data
from distil.data.lm import LMData, load_lm_data
from distil.data.prompts import PromptsSection
from distil.errors import DistilError
from distil.evaluation import classification as cls_metrics
from distil.evaluation.lm import held_out_metrics
from distil.evaluation.report import (
    cost_part,
    make_table,
    print_report,
    quality_part,
    write_report,
)
from distil.generation import GenerateConfig, GenerationSettings, write_generations
from distil.losses.chunked import loss_chunk_rows, should_use_chunked_loss
from distil.losses.objective import ObjectiveOutput
from distil.models.classifier import build_classifier, load_weights
from distil.models.lm import LMForward, load_causal_lm, save_model_folder
from distil.models.vocab import load_tokenizer_folder, tokenizer_vocab_size
from distil.recipes.classifier_kd import KDSection as ClassifierKDSection
from distil.recipes.classifier_kd import KDStep, kd_loss_step
from distil.recipes.lm_kd import LMStep, lm_loss_step
from distil.storage import atomic_write_bytes, atomic_write_json
from distil.teachers import LiveLMTeacher, Teacher, TeacherSignal, hidden_path_matches
from distil.teachers.models import LiveClassifierTeacher
from distil.training.loop import Phase, Step, finished, open_phase
from distil.training.metrics import MetricsLog, read_metrics
from distil.training.session import Session

logger = logging.getLogger(__name__)

DISTILLERS = {ModelKind.causal_lm: "lm_kd", ModelKind.classifier: "classifier_kd"}
"""The recipe whose loss step distils each kind of source (``stages[i].recipe``)."""

SOURCE_MODEL_KINDS = {ModelKind.causal_lm: ("hf",), ModelKind.classifier: ("zoo",)}
FORMAT = 1  # of the store's sources, self-data and baseline keys
STUDENT_PHASE = "student"  # the phase name inside a stage's work folder
BASELINE_PHASE = "baseline"


# --------------------------------------------------------------------------------------------
# Config


class SourceSection(StrictModel):
    """The model to compress: the teacher of every distil stage."""

    kind: ModelKind = Field(description="causal_lm or classifier")
    model: ModelSource = Field(
        description="causal_lm: {hf: FOLDER}; classifier: {zoo: cnn, kwargs, weights: FILE}"
    )

    @model_validator(mode="after")
    def _loadable(self) -> SourceSection:
        if self.kind not in SOURCE_MODEL_KINDS:
            raise ValueError(
                "source.kind: the compress recipe compresses causal_lm and classifier models; "
                "encoders compress through distil.compress.pipeline.run_pipeline (library) and "
                "distil with encoder_kd (student.model={hf: PRUNED_FOLDER})"
            )
        require_source_kind(self.model, SOURCE_MODEL_KINDS[self.kind], "source.model")
        if isinstance(self.model, ZooModel) and self.model.weights is None:
            raise ValueError("source.model.weights: a classifier source needs its trained weights")
        return self


class SelfData(StrictModel):
    """#78: the distil stages train on the teacher's own continuations of a prompt set (written
    once into the store by ``distil generate``'s library, resumable) instead of ``data``'s
    training split; held-out quality is still measured on ``data``'s held-out split."""

    prompts: PromptsSection = PromptsSection(limit=256)
    generation: GenerationSettings = GenerationSettings()
    shard_size: int = Field(default=64, ge=1, description="prompts per shard")


class LMDistillation(StrictModel):
    """How causal-LM distil stages train (``lm_kd``'s loss step) and what quality is measured."""

    kind: Literal["causal_lm"] = "causal_lm"
    data: LMDataSection = LMDataSection()
    kd: LMKDSection = LMKDSection(kd_weight=1.0)
    self_data: SelfData | None = None
    eval_batch_size: int = Field(default=8, ge=1)

    @model_validator(mode="after")
    def _text(self) -> LMDistillation:
        if self.self_data is not None and self.data.format is not LMDataFormat.TEXT:
            raise ValueError(
                "distillation.self_data: the held-out split comes from data, read as text; "
                "set distillation.data.format=text"
            )
        return self


class ClassifierDistillation(StrictModel):
    """How classifier distil stages train (``classifier_kd``'s loss step)."""

    kind: Literal["classifier"] = "classifier"
    data: ClassifierDataSection = ClassifierDataSection()
    kd: ClassifierKDSection = ClassifierKDSection()

    @model_validator(mode="after")
    def _logits_only(self) -> ClassifierDistillation:
        if self.kd.features or self.kd.auto_features is not None:
            raise ValueError(
                "distillation.kd.features: the compress recipe distils logits; feature KD of a "
                "pruned student runs in classifier_kd (student.model: the pruned folder's zoo "
                "kwargs and weights)"
            )
        return self


Distillation = Annotated[LMDistillation | ClassifierDistillation, Field(discriminator="kind")]


class EvalSection(StrictModel):
    baseline: bool = Field(
        default=True,
        description="also train the first distil stage's architecture from random init on the "
        "same data and steps, without a teacher",
    )


class Config(StrictModel):
    recipe: Literal["compress"] = "compress"
    seed: int = 0
    run: RunSection = RunSection()
    source: SourceSection
    store: str = Field(
        default="runs/compress-store",
        description="where stage outputs live, content-addressed and shared by runs",
    )
    stages: list[Stage] = Field(min_length=1)
    distillation: Distillation | None = Field(
        default=None, description="filled from source.kind when absent"
    )
    train: TrainSection = TrainSection(
        epochs=1,
        max_steps=32,
        batch_size=8,
        lr=1e-3,
        scheduler=SchedulerName.linear,
        warmup_steps=4,
        max_grad_norm=1.0,
        checkpoint_every=8,
    )
    measure: Measure = Measure()
    eval: EvalSection = EvalSection()

    @model_validator(mode="before")
    @classmethod
    def _defaults_from_source(cls, data: Any) -> Any:
        """``distillation.kind`` and each distil stage's ``recipe`` follow ``source.kind``."""
        if not isinstance(data, dict) or not isinstance(data.get("source"), dict):
            return data
        kind = data["source"].get("kind")
        recipe = {k.value: v for k, v in DISTILLERS.items()}.get(str(kind))
        if recipe is None:
            return data
        out = fill_prune_kinds(dict(data))
        distillation = out.get("distillation")
        if distillation is None:
            out["distillation"] = {"kind": kind}
        elif isinstance(distillation, dict) and "kind" not in distillation:
            out["distillation"] = {**distillation, "kind": kind}
        if isinstance(out.get("stages"), list):
            out["stages"] = [
                {**s, "recipe": recipe}
                if isinstance(s, dict) and s.get("stage") == "distil" and "recipe" not in s
                else s
                for s in out["stages"]
            ]
        return out

    @model_validator(mode="after")
    def _coherent(self) -> Config:
        problems: list[str] = []
        try:  # the pipeline's own checks (order, methods per kind, QAT schemes, ONNX scope)
            pipeline_config(self, Path("<source folder>"))
        except ValidationError as exc:
            problems += [str(e["msg"]).removeprefix("Value error, ") for e in exc.errors()]
        assert self.distillation is not None  # filled for every supported source kind
        if self.distillation.kind != self.source.kind.value:
            problems.append(
                f"distillation.kind is {self.distillation.kind} but source.kind is "
                f"{self.source.kind.value}"
            )
        for index, stage in enumerate(self.stages):
            if not isinstance(stage, DistilStage):
                continue
            wanted = DISTILLERS[self.source.kind]
            if stage.recipe != wanted:
                problems.append(
                    f"stages.{index}.recipe: a {self.source.kind.value} distils with {wanted}, "
                    f"not {stage.recipe}"
                )
            try:
                stage_settings(self, stage)
            except (ConfigError, ValueError) as exc:
                problems.append(f"stages.{index}.overrides: {exc}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def stage_settings(cfg: Config, stage: DistilStage) -> tuple[TrainSection, Any]:
    """The ``train`` and ``distillation.kd`` settings of one distil stage: the recipe's, with
    the stage's ``overrides`` (``train.*``, ``kd.*``) applied and validated.

    Raises:
        ValueError: For an override outside ``train``/``kd`` or an invalid value.
    """
    assert cfg.distillation is not None
    outside = sorted(k for k in stage.overrides if k.split(".")[0] not in ("train", "kd"))
    if outside:
        raise ValueError(f"{outside}: a distil stage overrides train.* and kd.* only")
    base = {"train": cfg.train.model_dump(mode="json"), "kd": cfg.distillation.kd.model_dump()}
    merged = apply_overrides(
        base, [f"{k}={json.dumps(v)}" for k, v in sorted(stage.overrides.items())]
    )
    train = TrainSection.model_validate(merged["train"])
    kd = type(cfg.distillation.kd).model_validate(merged["kd"])
    return train, kd


def pipeline_config(cfg: Config, source_dir: Path) -> PipelineConfig:
    """The library pipeline of ``cfg``: the source folder resolved, and each distil stage's
    ``overrides`` replaced by its complete effective settings (train, kd, seed), so that they are
    part of the stage's key: a change to ``train`` reruns the distil stages, not the prune."""
    stages: list[Any] = []
    for stage in cfg.stages:
        if isinstance(stage, DistilStage) and cfg.distillation is not None:
            try:
                train, kd = stage_settings(cfg, stage)
            except (ConfigError, ValueError):  # reported by the validator that called us
                train, kd = cfg.train, cfg.distillation.kd
            effective = {
                "train": train.model_dump(mode="json"),
                "kd": kd.model_dump(mode="json"),
                "seed": cfg.seed,
            }
            stage = stage.model_copy(update={"overrides": effective})
        stages.append(stage.model_dump(mode="json"))
    return PipelineConfig.model_validate(
        {
            "source": {"kind": cfg.source.kind.value, "folder": str(source_dir)},
            "output_dir": cfg.store,
            "stages": stages,
            "measure": cfg.measure.model_dump(mode="json"),
        }
    )


# --------------------------------------------------------------------------------------------
# The loop: one short loop for every kind of student


LossStep = Callable[[Tensor, float], ObjectiveOutput]
"""``(example ids of one micro-batch, items in the accumulation window) -> loss``."""


def train_student(
    s: Session,
    name: str,
    model: nn.Module,
    *,
    train: TrainSection,
    num_examples: int,
    seed: int,
    log: MetricsLog,
    loss_step: Callable[[Phase], LossStep],
    export: Callable[[Path], object],
    window: Callable[[Step], float] | None = None,
    count: Callable[[Step], float] | None = None,
    forward: nn.Module | None = None,
    unit: str = "sample",
) -> Path:
    """Train ``model`` in phase ``name`` of ``s`` (resuming its checkpoint) and return the
    phase's ``final/`` folder, which ``export`` wrote; a phase that finished before is not
    trained again.

    Args:
        loss_step: Builds the micro-batch loss once the phase (and its wrapped forward) exists.
        window: Items the window's loss is averaged over (default: the step's examples).
        count: What a step processed, in ``unit`` (default: its examples).
    """
    if (final := finished(s, name)) is not None:
        logger.info("%s: reusing the finished phase %s", name, final)
        return final
    phase = open_phase(
        s,
        name,
        model=model,
        forward=forward,
        train=train,
        num_examples=num_examples,
        seed=seed,
        log=log,
        unit=unit,
    )
    step_loss = loss_step(phase)
    for step in phase.steps():
        items = step.window_items if window is None else window(step)
        for m, ids in enumerate(step.micro_batches):
            with phase.accumulate(m):
                out = step_loss(ids, items)
            phase.backward(out, micro=m)
        phase.optimizer_step(count=len(step.batch) if count is None else count(step))
    phase.finish(export=export)
    return s.run_dir / name / "final"


def lm_distil_step(ctx: LMStep, data: LMData, ids: Tensor, window_items: float) -> ObjectiveOutput:
    """One micro-batch of a causal-LM distil stage: the examples collated, then ``lm_kd``'s
    token-level KD (``(1 - w)·CE + w·T²·D(teacher_T ‖ student_T)``; CE alone without a
    teacher)."""
    cols = data.collate(data.train, ids.tolist())
    return lm_loss_step(ctx, cols, window_items, sampled=False)


# --------------------------------------------------------------------------------------------
# What differs between causal LMs and classifiers


class Task(Protocol):
    """The model-kind-specific parts of a compress run."""

    source_dir: Path
    data_fingerprint: str
    evaluation_fingerprint: str

    def describe(self) -> str: ...

    def calibration(self, kind: ModelKind, calibration: Calibration) -> Sequence[Any]: ...

    def evaluate(self, loaded: LoadedModel) -> dict[str, float]: ...

    def distil(self, ctx: StageContext) -> dict[str, Any]: ...

    def baseline(self, shape_dir: Path, train: TrainSection) -> BaselineRun: ...


@dataclass(frozen=True)
class BaselineRun:
    """Where the from-scratch model was trained (``work``) and saved (``folder``)."""

    folder: Path
    work: Path
    reused: bool


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _spread(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (calibration from the whole split)."""
    return sorted({int(i) for i in np.linspace(0, n - 1, num=min(k, n))})


def _stage_session(s: Session, ctx_dir: Path) -> Session:
    """A session whose run folder is a stage's work folder: always resumed, since that folder
    belongs to exactly this stage's inputs and settings."""
    ctx_dir.mkdir(parents=True, exist_ok=True)
    return Session(accelerator=s.accelerator, run_dir=ctx_dir, resume=True, console=s.console)


def _keep_logs(work_dir: Path, log_dir: Path, phase: str) -> None:
    """Copy what the phase logged into the stage's published ``logs/``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    for source in (work_dir / "metrics.jsonl", work_dir / phase / "summary.json"):
        if source.is_file():
            shutil.copy2(source, log_dir / source.name)


def _mode(ctx: StageContext) -> str:
    stage = ctx.stage
    assert isinstance(stage, DistilStage)
    if ctx.qat is not None:
        return "qat"
    return "lora" if stage.lora is not None else "full"


@dataclass
class LMTask:
    """Causal LMs: ``lm_kd``'s loss step, held-out perplexity, token calibration batches."""

    cfg: Config
    s: Session
    source_dir: Path
    section: LMDistillation
    tokenizer: Any
    vocab: int
    data: LMData  # training split (real or self-generated) and the real held-out split
    lengths: np.ndarray  # tokens of each training example (what a step processed)
    calibration_data: LMData  # the real corpus (pruning importance)
    teacher_model: Any
    data_fingerprint: str
    evaluation_fingerprint: str
    data_line: str
    _teachers: dict[TeacherSignal, LiveLMTeacher] = field(default_factory=dict)

    def describe(self) -> str:
        return self.data_line

    def teacher(self, signal: TeacherSignal) -> LiveLMTeacher:
        if signal not in self._teachers:
            self._teachers[signal] = LiveLMTeacher(
                self.teacher_model,
                vocab_size=self.vocab,
                device=self.s.accelerator.device,
                dtype=torch.float32,
                output_device=self.s.accelerator.device,
                signal=signal,
            )
        return self._teachers[signal]

    def calibration(self, kind: ModelKind, calibration: Calibration) -> Sequence[Any]:
        split = self.calibration_data
        ids = _spread(len(split.train), calibration.num_examples)
        step = calibration.batch_size
        return [split.collate(split.train, ids[i : i + step]) for i in range(0, len(ids), step)]

    def evaluate(self, loaded: LoadedModel) -> dict[str, float]:
        out = held_out_metrics(
            loaded.module,
            self.data.eval_batches(self.section.eval_batch_size),
            vocab_size=self.vocab,
            device=torch.device("cpu"),
            teacher=self.teacher(TeacherSignal.LOGITS),
        )
        out.pop("tokens", None)
        return out

    def distil(self, ctx: StageContext) -> dict[str, Any]:
        from distil.compress.lora import add_lora, load_lora, merge_lora
        from distil.compress.quantise import convert_qat, has_fake_quant, prepare_qat

        stage = self.cfg.stages[ctx.index]  # as written (ctx.stage holds the resolved settings)
        assert isinstance(stage, DistilStage)
        train, kd = stage_settings(self.cfg, stage)
        mode = _mode(ctx)
        acc = self.s.accelerator
        student_dir = ctx.float_input_dir if ctx.qat is not None else ctx.input_dir
        assert student_dir is not None  # the pipeline gives a QAT stage its float input
        student: Any = load_causal_lm(student_dir, dtype=torch.float32)
        if ctx.qat is not None:
            prepare_qat(student, ctx.qat.scheme, include_lm_head=ctx.qat.include_lm_head)
        if stage.lora is not None:
            lora = stage.lora
            student = add_lora(
                student, rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules
            )
        counts = _trainable(student)
        probe = self.data.collate(self.data.train, [0])
        # peft's wrapper returns logits from its base model: the hidden-state path needs a
        # plain model (hidden_path_matches also refuses a fake-quantised output layer)
        hidden = stage.lora is None and hidden_path_matches(
            student, probe["input_ids"], probe["attention_mask"]
        )
        tokens_per_micro = train.batch_size // train.grad_accum * self.section.data.max_length
        chunked = kd.chunked
        if chunked is None:
            chunked = hidden and should_use_chunked_loss(tokens_per_micro, self.vocab)
        if chunked and not hidden:
            raise DistilError(
                f"stage {ctx.name}: kd.chunked needs a plain linear output layer on the student "
                "(LoRA and a fake-quantised LM head have none); set kd.chunked=false"
            )
        teacher = self.teacher(TeacherSignal.HIDDEN if chunked else TeacherSignal.LOGITS)
        rows = loss_chunk_rows(kd.chunk_size, self.vocab, fused=chunked, device=acc.device)
        self.s.announce(
            f"compress stage {ctx.name}: {_mode_text(ctx, counts)}; teacher {teacher.describe()}; "
            f"loss = {1 - kd.kd_weight:g}·CE + {kd.kd_weight:g}·T²·{kd.divergence.value} at "
            f"kd_temperature={kd.kd_temperature:g} ({'chunked from hidden states' if chunked else 'full logits'}); "
            f"{train.max_steps or '-'} steps of {train.batch_size} examples"
        )
        sub = _stage_session(self.s, ctx.work_dir)
        log = MetricsLog(ctx.work_dir / "metrics.jsonl", acc, acc.is_main_process)
        data = self.data

        def loss_step(phase: Phase) -> LossStep:
            step_ctx = LMStep(
                phase.model,
                student,
                self.vocab,
                hidden,
                chunked,
                rows,
                acc.device,
                teacher if kd.kd_weight > 0 else None,
                kd,
            )
            return lambda ids, items: lm_distil_step(step_ctx, data, ids, items)

        def export(folder: Path) -> None:
            if mode == "lora":
                student.save_pretrained(str(folder), safe_serialization=True)  # adapters only
                return
            if has_fake_quant(student):
                convert_qat(student, None)  # the trained float weights; quantised below
            save_model_folder(student, folder, tokenizer=self.tokenizer, overwrite=True)

        final = train_student(
            sub,
            STUDENT_PHASE,
            student,
            train=train,
            num_examples=len(data.train),
            seed=self.cfg.seed,
            log=log,
            loss_step=loss_step,
            export=export,
            window=lambda step: float(data.targets_per_example[step.batch.numpy()].sum()),
            count=lambda step: float(self.lengths[step.batch.numpy()].sum()),
            forward=LMForward(student, hidden=hidden),
            unit="token",
        )
        trained: Any
        if mode == "lora":
            trained = merge_lora(load_lora(load_causal_lm(ctx.input_dir), final))
            assert stage.lora is not None
            if stage.lora.keep_adapters:
                shutil.copytree(final, ctx.extras_dir / "adapter")
        else:
            trained = load_causal_lm(final, dtype=torch.float32)
        if ctx.qat is not None:
            assert ctx.float_input_dir is not None
            float_model = LoadedModel(ModelKind.causal_lm, trained, ctx.float_input_dir)
            save_quantised_stage(
                ModelKind.causal_lm,
                float_model,
                trained,
                ctx.qat.scheme,
                ctx.output_dir,
                include_lm_head=ctx.qat.include_lm_head,
            )
        else:
            save_model_folder(trained, ctx.output_dir, tokenizer=self.tokenizer, overwrite=True)
        _keep_logs(ctx.work_dir, ctx.log_dir, STUDENT_PHASE)
        return _details(ctx, mode, counts, final.parent / "summary.json", teacher.describe())

    def baseline(self, shape_dir: Path, train: TrainSection) -> BaselineRun:
        """The same architecture as ``shape_dir`` from random init, trained with CE only."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(shape_dir), local_files_only=True)
        key = _digest(
            {
                "format": FORMAT,
                "config": config.to_dict(),
                "train": train.model_dump(mode="json"),
                "data": self.data_fingerprint,
                "seed": self.cfg.seed,
            }
        )
        work = Path(self.cfg.store) / "baselines" / key[:16]
        sub = _stage_session(self.s, work)
        reused = finished(sub, BASELINE_PHASE) is not None
        acc = self.s.accelerator
        log = MetricsLog(work / "metrics.jsonl", acc, acc.is_main_process)
        torch.manual_seed(self.cfg.seed + 17)  # the same init on every rerun
        model: Any = AutoModelForCausalLM.from_config(config)
        data = self.data

        def loss_step(phase: Phase) -> LossStep:
            step_ctx = LMStep(phase.model, model, self.vocab, False, False, 256, acc.device)
            return lambda ids, items: lm_distil_step(step_ctx, data, ids, items)

        final = train_student(
            sub,
            BASELINE_PHASE,
            model,
            train=train,
            num_examples=len(data.train),
            seed=self.cfg.seed,
            log=log,
            loss_step=loss_step,
            export=lambda folder: save_model_folder(
                model, folder, tokenizer=self.tokenizer, overwrite=True
            ),
            window=lambda step: float(data.targets_per_example[step.batch.numpy()].sum()),
            count=lambda step: float(self.lengths[step.batch.numpy()].sum()),
            forward=LMForward(model, hidden=False),
            unit="token",
        )
        return BaselineRun(final, work, reused)


def _trainable(model: nn.Module) -> dict[str, int]:
    from distil.compress.lora import count_trainable

    counts = count_trainable(model)
    return {"trainable_parameters": counts.trainable, "total_parameters": counts.total}


def _mode_text(ctx: StageContext, counts: dict[str, int]) -> str:
    stage = ctx.stage
    assert isinstance(stage, DistilStage)
    share = counts["trainable_parameters"] / max(counts["total_parameters"], 1)
    if ctx.qat is not None:
        return (
            f"quantisation-aware distillation: the float weights before {ctx.qat.name or 'quantise'} "
            f"({ctx.float_input_dir}) train through torchao fake quantisation with "
            f"{ctx.qat.scheme.value} (straight-through gradients) against the float teacher, then "
            f"convert to {ctx.qat.scheme.value}"
        )
    if stage.lora is not None:
        lora = stage.lora
        return (
            f"LoRA distillation: adapters r={lora.rank}, alpha={lora.alpha} on "
            f"{lora.target_modules or 'the default targets'} of the pretrained student "
            f"({counts['trainable_parameters']:,} of {counts['total_parameters']:,} parameters "
            f"train, {100 * share:.2f}%), merged into model/"
            + (", adapters also kept in extras/adapter" if lora.keep_adapters else "")
        )
    return f"distillation of all {counts['trainable_parameters']:,} student parameters"


def _details(
    ctx: StageContext, mode: str, counts: dict[str, int], summary_file: Path, teacher: str
) -> dict[str, Any]:
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    stage = ctx.stage
    assert isinstance(stage, DistilStage)
    return {
        "mode": mode,
        "teacher": teacher,
        "recipe": stage.recipe,
        **counts,
        "train_summary": summary,
        **({"scheme": ctx.qat.scheme.value} if ctx.qat is not None else {}),
    }


@torch.no_grad()
def _predict(module: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """Logits ``(N, C)`` of a loaded stage model (already in eval mode: a PT2E program refuses
    ``eval()``, so this never calls it), batched."""
    return torch.cat([module(part).float() for part in x.split(batch_size)])


@dataclass
class ClassifierTask:
    """Zoo classifiers: ``classifier_kd``'s loss step, test accuracy, image calibration."""

    cfg: Config
    s: Session
    source_dir: Path
    section: ClassifierDistillation
    data: ClassificationData
    train_inputs: dict[str, Tensor]
    train_labels: Tensor
    test_inputs: dict[str, Tensor]
    test_labels: Tensor
    teacher_module: nn.Module
    teacher_logits: Tensor  # on the test split, for agreement
    data_fingerprint: str
    evaluation_fingerprint: str

    def describe(self) -> str:
        return (
            f"data {self.data.name}: {len(self.data.train)} train / {len(self.data.test)} test "
            f"examples, {self.data.num_classes} classes"
        )

    def calibration(self, kind: ModelKind, calibration: Calibration) -> Sequence[Any]:
        ids = torch.tensor(_spread(len(self.train_labels), calibration.num_examples))
        x = self.train_inputs["x"]
        return [x[part] for part in ids.split(calibration.batch_size)]

    def evaluate(self, loaded: LoadedModel) -> dict[str, float]:
        logits = _predict(loaded.module, self.test_inputs["x"])
        return {
            "accuracy": cls_metrics.accuracy(logits, self.test_labels),
            "agreement": cls_metrics.agreement(logits, self.teacher_logits),
        }

    def _teacher(self) -> Teacher:
        return LiveClassifierTeacher(
            self.teacher_module,
            self.train_inputs,
            device=self.s.accelerator.device,
            source=describe_model(self.cfg.source.model),
        )

    def _train(
        self,
        sub: Session,
        name: str,
        module: nn.Module,
        train: TrainSection,
        kd: ClassifierKDSection,
        teacher: Teacher | None,
        log: MetricsLog,
        export: Callable[[Path], object],
    ) -> Path:
        acc = self.s.accelerator
        mixing = kd.mixup_alpha > 0 or kd.cutmix_alpha > 0
        inputs, labels = self.train_inputs, self.train_labels

        def loss_step(phase: Phase) -> LossStep:
            step_ctx = KDStep(
                phase.model, phase.unwrapped(), inputs, labels, kd, mixing, acc.device, teacher
            )
            return lambda ids, items: kd_loss_step(step_ctx, ids, items)

        return train_student(
            sub,
            name,
            module,
            train=train,
            num_examples=len(labels),
            seed=self.cfg.seed,
            log=log,
            loss_step=loss_step,
            export=export,
        )

    def distil(self, ctx: StageContext) -> dict[str, Any]:
        from safetensors.torch import save_file

        from distil.compress.artifacts import save_float_model
        from distil.compress.export import load_zoo_classifier, read_zoo_spec
        from distil.compress.lora import add_lora, load_lora, merge_lora
        from distil.compress.quantise import convert_qat, has_fake_quant, prepare_qat

        stage = self.cfg.stages[ctx.index]  # as written (ctx.stage holds the resolved settings)
        assert isinstance(stage, DistilStage)
        train, kd = stage_settings(self.cfg, stage)
        mode = _mode(ctx)
        student_dir = ctx.float_input_dir if ctx.qat is not None else ctx.input_dir
        assert student_dir is not None
        student: Any = load_zoo_classifier(student_dir)
        if ctx.qat is not None:
            prepare_qat(student, ctx.qat.scheme)
        if stage.lora is not None:
            lora = stage.lora
            student = add_lora(
                student, rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules
            )
        counts = _trainable(student)
        teacher = self._teacher() if kd.kd_weight > 0 else None
        self.s.announce(
            f"compress stage {ctx.name}: {_mode_text(ctx, counts)}; teacher "
            f"{teacher.describe() if teacher else 'none (kd_weight=0)'}; loss = "
            f"{1 - kd.kd_weight:g}·CE + {kd.kd_weight:g}·T²·{kd.divergence.value} at "
            f"kd_temperature={kd.kd_temperature:g}"
        )
        acc = self.s.accelerator
        sub = _stage_session(self.s, ctx.work_dir)
        log = MetricsLog(ctx.work_dir / "metrics.jsonl", acc, acc.is_main_process)

        def export(folder: Path) -> None:
            folder.mkdir(parents=True, exist_ok=True)
            if mode == "lora":
                student.save_pretrained(str(folder), safe_serialization=True)
                return
            if has_fake_quant(student):
                convert_qat(student, None)
            state = {k: v.detach().contiguous().cpu() for k, v in student.state_dict().items()}
            save_file(state, str(folder / "model.safetensors"))

        final = self._train(sub, STUDENT_PHASE, student, train, kd, teacher, log, export)
        float_loaded = load_model(ModelKind.classifier, student_dir)
        if mode == "lora":
            trained = merge_lora(load_lora(load_zoo_classifier(ctx.input_dir), final))
            assert stage.lora is not None
            if stage.lora.keep_adapters:
                shutil.copytree(final, ctx.extras_dir / "adapter")
        else:
            trained = float_loaded.module
            load_weights(trained, final / "model.safetensors")
        if ctx.qat is not None:
            save_quantised_stage(
                ModelKind.classifier, float_loaded, trained, ctx.qat.scheme, ctx.output_dir
            )
        else:
            spec = read_zoo_spec(student_dir)
            save_float_model(float_loaded, trained, ctx.output_dir, zoo_kwargs=spec["kwargs"])
        _keep_logs(ctx.work_dir, ctx.log_dir, STUDENT_PHASE)
        describe = teacher.describe() if teacher else "none"
        return _details(ctx, mode, counts, final.parent / "summary.json", describe)

    def baseline(self, shape_dir: Path, train: TrainSection) -> BaselineRun:
        """The architecture of ``shape_dir`` from random init, trained with CE only."""
        from distil.compress.artifacts import save_float_model
        from distil.compress.export import build_zoo_module, read_zoo_spec

        spec = read_zoo_spec(shape_dir)
        key = _digest(
            {
                "format": FORMAT,
                "spec": {k: spec[k] for k in ("zoo", "kwargs", "in_shape", "num_classes")},
                "train": train.model_dump(mode="json"),
                "data": self.data_fingerprint,
                "seed": self.cfg.seed,
            }
        )
        work = Path(self.cfg.store) / "baselines" / key[:16]
        sub = _stage_session(self.s, work)
        reused = finished(sub, BASELINE_PHASE) is not None
        acc = self.s.accelerator
        log = MetricsLog(work / "metrics.jsonl", acc, acc.is_main_process)
        torch.manual_seed(self.cfg.seed + 17)
        module = build_zoo_module(spec)
        kd = self.section.kd.model_copy(update={"kd_weight": 0.0})
        shape = load_model(ModelKind.classifier, shape_dir)

        def export(folder: Path) -> None:
            save_float_model(shape, module, folder / "model", zoo_kwargs=spec["kwargs"])

        final = self._train(sub, BASELINE_PHASE, module, train, kd, None, log, export)
        return BaselineRun(final / "model", work, reused)


# --------------------------------------------------------------------------------------------
# Setting the task up


def _atomic_folder(target: Path, write: Callable[[Path], object]) -> Path:
    """``target`` written by ``write`` into a temporary sibling, then renamed into place."""
    if target.is_dir():
        return target
    tmp = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    tmp.rename(target)
    return target


def lm_task(cfg: Config, s: Session) -> LMTask:
    """Load the tokenizer, teacher and data of a causal-LM compress run (and write the
    self-generated data first, when asked)."""
    assert isinstance(cfg.distillation, LMDistillation) and isinstance(cfg.source.model, HFModel)
    section = cfg.distillation
    acc = s.accelerator
    source_dir = Path(cfg.source.model.hf)
    tokenizer = load_tokenizer_folder(source_dir)
    vocab = tokenizer_vocab_size(tokenizer)
    teacher_model = load_causal_lm(source_dir, dtype=torch.float32)
    real = load_lm_data(section.data, tokenizer, s.run_dir, acc)
    data, line = real, f"{len(real.train)} training examples of {section.data.max_length} tokens"
    generated = None
    if section.self_data is not None:
        generated = self_generated_data(cfg, section, source_dir, s)
        gen_section = section.data.model_copy(
            update={
                "source": FileData(train=[str(generated)], eval=[str(generated)]),
                "format": LMDataFormat.PROMPT_COMPLETION,
                "eval_limit": 1,
                "train_limit": None,
            }
        )
        own = load_lm_data(gen_section, tokenizer, s.run_dir, acc)
        data = LMData(own.train, real.eval, own.targets_per_example, own.pad_token_id)
        line = (
            f"{len(own.train)} prompt/completion examples the teacher wrote ({generated}; "
            "#78 self-data: loss on the completions)"
        )
    from distil.cache.manifest import dataset_fingerprint

    data_fp = _digest(
        {
            "train": dataset_fingerprint(data.train),
            "calibration": dataset_fingerprint(real.train) if generated is not None else None,
        }
    )
    eval_fp = _digest(
        {"eval": dataset_fingerprint(data.eval), "batch": section.eval_batch_size, "v": FORMAT}
    )
    line = (
        f"{line}; {len(data.eval)} held-out examples ({describe_data(section.data)}); vocab {vocab}"
    )
    lengths = np.asarray([len(ids) for ids in data.train["input_ids"]], dtype=np.int64)
    return LMTask(
        cfg,
        s,
        source_dir,
        section,
        tokenizer,
        vocab,
        data,
        lengths,
        real,
        teacher_model,
        data_fp,
        eval_fp,
        line,
    )


def describe_data(section: LMDataSection) -> str:
    source = section.source
    return f"builtin {section.builtin}" if section.builtin else f"files {source}"


def self_generated_data(cfg: Config, section: LMDistillation, source_dir: Path, s: Session) -> Path:
    """The teacher's continuations of ``self_data.prompts`` (written or completed in the store)."""
    assert section.self_data is not None
    settings = section.self_data
    source_fp, _ = fingerprint_folder(source_dir)
    key = _digest({"source": source_fp, "settings": settings.model_dump(mode="json")})
    output = Path(cfg.store) / "self-data" / key[:16]
    gen = GenerateConfig(
        teacher=TeacherSection(model=HFModel(hf=str(source_dir))),
        prompts=settings.prompts,
        generation=settings.generation,
        shard_size=settings.shard_size,
        output=str(output),
    )
    result = write_generations(gen)
    counts = result.manifest["counts"]
    s.announce(
        f"compress: self-data (#78): the teacher continued {counts['prompts']} prompts "
        f"({counts['generated_tokens']} tokens; {result.shards_written} shard(s) written, "
        f"{result.shards_skipped} reused) into {output}"
    )
    return output


def classifier_task(cfg: Config, s: Session) -> ClassifierTask:
    """Load the data and the teacher of a classifier compress run; the teacher's zoo folder is
    written into the store (the pipeline's source)."""
    from distil.compress.export import save_zoo_classifier
    from distil.storage import sha256_file

    assert isinstance(cfg.distillation, ClassifierDistillation)
    source = cfg.source.model
    assert isinstance(source, ZooModel) and source.weights is not None
    data = load_data(cfg.distillation.data)
    built = build_classifier(source, data)
    module = built.module.eval()
    train_inputs, test_inputs = built.encoder(data.train), built.encoder(data.test)
    in_shape = list(train_inputs["x"].shape[1:])
    spec = {
        "zoo": source.zoo,
        "kwargs": source.kwargs,
        "weights": sha256_file(Path(source.weights)),
        "in_shape": in_shape,
        "num_classes": data.num_classes,
    }
    folder = Path(cfg.store) / "sources" / _digest({"format": FORMAT, **spec})[:16]
    _atomic_folder(
        folder,
        lambda tmp: save_zoo_classifier(
            module,
            tmp,
            zoo=source.zoo,
            kwargs=source.kwargs,
            in_shape=in_shape,
            num_classes=data.num_classes,
        ),
    )
    from distil.cache.manifest import tensors_fingerprint

    train_labels = torch.from_numpy(data.train.labels)
    test_labels = torch.from_numpy(data.test.labels)
    with torch.no_grad():
        teacher_logits = cls_metrics.predict_logits(module, test_inputs)
    return ClassifierTask(
        cfg,
        s,
        folder,
        cfg.distillation,
        data,
        train_inputs,
        train_labels,
        test_inputs,
        test_labels,
        module,
        teacher_logits,
        tensors_fingerprint({**train_inputs, "labels": train_labels}),
        tensors_fingerprint({**test_inputs, "labels": test_labels}),
    )


# --------------------------------------------------------------------------------------------
# Run and report


def main(cfg: Config, s: Session) -> dict[str, Any]:
    """Run (or reuse) every stage and the baseline; write and return the report."""
    acc = s.accelerator
    if acc.num_processes > 1:
        raise DistilError(
            "the compress recipe runs in one process (its stages publish folders one at a time); "
            "run it without torchrun/accelerate launch"
        )
    task: Task = (
        lm_task(cfg, s) if cfg.source.kind == ModelKind.causal_lm else classifier_task(cfg, s)
    )
    pipeline = pipeline_config(cfg, task.source_dir)
    names = stage_names(pipeline)
    s.announce(
        f"compress: {cfg.source.kind.value} {describe_model(cfg.source.model)} -> "
        + " -> ".join(f"{n} ({st.stage})" for n, st in zip(names, pipeline.stages, strict=True))
        + f"; the source is the teacher of every distil stage; stages in {cfg.store} "
        f"(content-addressed, reused by any run); {task.describe()}; "
        f"1 process on {acc.device}"
    )

    def after(record: StageRecord) -> None:
        s.announce(
            f"compress stage {record.name} ({record.kind}): {record.status.value}"
            + (f" ({record.seconds:.1f} s)" if record.status.value == "ran" else "")
            + f" -> {record.folder}"
        )

    hooks = PipelineHooks(
        distillers={DISTILLERS[cfg.source.kind]: task.distil},
        calibration=task.calibration,
        evaluate=task.evaluate,
        data_fingerprint=task.data_fingerprint,
        evaluation_fingerprint=task.evaluation_fingerprint,
        after_stage=after,
    )
    from distil.compress.pipeline import run_pipeline

    result = run_pipeline(pipeline, hooks)
    baseline = _baseline(cfg, task, pipeline, result)
    _gather_logs(s.run_dir, result, baseline)
    report = build_report(cfg, result, baseline)
    write_report(s.run_dir, report)
    print_report(report, s.console)
    return report


@dataclass(frozen=True)
class Baseline:
    """The same-shape model trained from scratch: its metrics and where it logged."""

    metrics: dict[str, Any]
    run: BaselineRun
    shape_of: str


def _baseline(
    cfg: Config, task: Task, pipeline: PipelineConfig, result: PipelineReport
) -> Baseline | None:
    """Train (or reuse) and measure the from-scratch model of the first distil stage's shape."""
    index = next((i for i, st in enumerate(cfg.stages) if isinstance(st, DistilStage)), None)
    if not cfg.eval.baseline or index is None:
        return None
    stage = cfg.stages[index]
    assert isinstance(stage, DistilStage)
    shape_dir = result.stages[index - 1].model_dir if index > 0 else task.source_dir
    train, _ = stage_settings(cfg, stage)
    run = task.baseline(shape_dir, train)
    cache = run.work / "metrics-measured.json"
    key = _digest({"model": fingerprint_folder(run.folder)[0], "eval": task.evaluation_fingerprint})
    if cache.is_file() and json.loads(cache.read_text()).get("key") == key:
        metrics = json.loads(cache.read_text())["metrics"]
    else:
        loaded = load_model(cfg.source.kind, run.folder)
        metrics = measure_model(loaded, Measure(latency=False), task.evaluate)
        atomic_write_json(cache, {"key": key, "metrics": metrics})
    return Baseline(metrics, run, stage_names(pipeline)[index])


def _gather_logs(run_dir: Path, result: PipelineReport, baseline: Baseline | None) -> None:
    """The run's ``metrics.jsonl``: every distil stage's training log (phase = stage name) and
    the baseline's, in pipeline order, so the report draws every curve."""
    rows: list[dict[str, Any]] = []
    sources = [(r.name, r.log_dir / "metrics.jsonl") for r in result.stages]
    if baseline is not None:
        sources.append((BASELINE_PHASE, baseline.run.work / "metrics.jsonl"))
    for phase, path in sources:
        rows += [{**row, "phase": phase} for row in read_metrics(path)] if path.is_file() else []
    text = "".join(json.dumps(row, default=str) + "\n" for row in rows)
    atomic_write_bytes(run_dir / "metrics.jsonl", text.encode())


SOURCE_ROW = "teacher (source)"
BASELINE_ROW = "baseline (scratch, same shape)"


def _row(name: str, status: str, metrics: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "model": name,
        "status": status,
        "params": metrics.get("parameters"),
        "size_bytes": metrics.get("weight_bytes"),
        **metrics.get("quality", {}),
    }
    if row["size_bytes"]:
        row["file_ratio"] = source["weight_bytes"] / row["size_bytes"]
    for cell in metrics.get("latency", []):
        mode = "compiled" if cell["compiled"] else "eager"
        row[f"latency_b{cell['batch_size']}_{mode}_ms"] = cell["median_ms"]
    return row


def build_report(cfg: Config, result: PipelineReport, baseline: Baseline | None) -> dict[str, Any]:
    """The house-style report: the source, every stage and the baseline side by side."""
    source_metrics = result.source["metrics"]
    rows = [_row(SOURCE_ROW, "-", source_metrics, source_metrics)]
    for record in result.stages:
        rows.append(
            _row(
                f"{record.name} ({record.kind})",
                record.status.value,
                record.metrics,
                source_metrics,
            )
        )
    if baseline is not None:
        status = "reused" if baseline.run.reused else "ran"
        rows.append(_row(BASELINE_ROW, status, baseline.metrics, source_metrics))
    final = rows[len(result.stages)] if result.stages else rows[0]
    roles = {"teacher": SOURCE_ROW, "student": final["model"]}
    if baseline is not None:
        roles["baseline"] = BASELINE_ROW
    lm = cfg.source.kind == ModelKind.causal_lm
    quality_metrics = (
        [
            ("perplexity", "held-out ppl"),
            ("ce", "CE nats/tok"),
            ("agreement", "top-1 agree"),
            ("kl_teacher_student", "KL(t‖s)"),
        ]
        if lm
        else [("accuracy", "test acc"), ("agreement", "agree w/ teacher")]
    )
    latency_columns = sorted(
        {k for row in rows for k in row if k.startswith("latency_")},
        key=lambda k: (int(k.split("_")[1][1:]), "compiled" in k),
    )
    latency_labels = [
        (k, f"ms @ b{k.split('_')[1][1:]} {k.split('_')[2]}") for k in latency_columns
    ]
    columns = [
        ("model", "model"),
        ("status", "status"),
        *quality_metrics[:2],
        ("params", "params"),
        ("size_bytes", "weights on disk"),
        ("file_ratio", "file smaller by"),
        *latency_labels[:1],
    ]
    highlights: dict[str, Any] = {
        "stages": ", ".join(f"{r.name} {r.status.value}" for r in result.stages),
        "final model": str(result.final_model_dir),
        "store": cfg.store,
    }
    primary = quality_metrics[0][0]
    if final.get(primary) is not None and rows[0].get(primary) is not None:
        ratio = final[primary] / rows[0][primary]
        highlights[f"final {primary} / teacher's"] = ratio
    if final.get("file_ratio") is not None:
        highlights["final file smaller by"] = f"{final['file_ratio']:.2f}x"
    if baseline is not None:
        highlights["baseline"] = (
            f"the input shape of stage {baseline.shape_of} from random init, same data and steps, "
            "no teacher"
        )
    stage_lines = [
        f"- **{r.name}** ({r.kind}, {r.status.value}, {r.seconds:.1f} s): "
        + json.dumps(_short_details(r.details), default=str)
        for r in result.stages
    ]
    measure = cfg.measure
    return {
        "title": f"compress: {cfg.source.kind.value} {describe_model(cfg.source.model)}",
        "recipe": "compress",
        "roles": roles,
        "table": make_table(columns, rows),
        "highlights": highlights,
        "quality": quality_part(
            rows,
            quality_metrics,
            roles=roles,
            primary="ce" if lm else "accuracy",
            higher_is_better=not lm,
        ),
        "cost": cost_part(
            rows,
            [
                ("params", "params"),
                ("size_bytes", "weights on disk"),
                ("file_ratio", "file smaller by"),
                *latency_labels,
            ],
        ),
        "sections": {
            "Stages": "\n".join(stage_lines),
            "Latency": (
                f"One forward pass ({'images' if not lm else f'{measure.sequence_length} tokens'} "
                f"per example), {measure.threads} thread(s), median of {measure.repeats} "
                "interleaved repeats after warm-up (compilation included in the warm-up). Eager "
                "int8 on CPU is slower than float32 (the dequantising matmuls are not fused); "
                "compare the compiled columns. Per-stage p10/p90 and load average are in "
                "report.json (details.stages[].metrics.latency)."
            ),
        },
        "details": {
            "source": result.source,
            "stages": [r.as_dict() for r in result.stages],
            "baseline": None if baseline is None else baseline.metrics,
            "seed": cfg.seed,
        },
    }


def _short_details(details: dict[str, Any]) -> dict[str, Any]:
    """A stage's details without the bulky parts (per-layer scores, the training summary)."""
    short = {k: v for k, v in details.items() if k not in ("layer_scores", "train_summary")}
    summary = details.get("train_summary") or {}
    for key in ("steps", "tokens", "samples", "train_wall_s"):
        if key in summary:
            short[key] = summary[key]
    return short
