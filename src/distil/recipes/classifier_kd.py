"""Recipe ``classifier_kd``: distil a classifier teacher into a smaller classifier student.

Hinton et al. (2015): the student minimises ``(1 - kd_weight) * CE(labels) + kd_weight * T² *
KL(teacher_T || student_T)``; the mix lives in ``distil.losses.objective``. The run trains the
teacher first when asked (so the built-in job needs nothing downloaded), distils the student,
trains the same student without the teacher as a baseline, and reports what the student kept
and what it costs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from distil.cache.examples import ExampleCache, write_example_cache
from distil.cache.manifest import teacher_fingerprint, tensors_fingerprint
from distil.config.base import StrictModel
from distil.config.classifier import ZOO_MODELS, ClassifierDataSection, ClassifierDivergence
from distil.config.sections import RunSection, TrainSection, require_unsharded
from distil.config.sources import (
    CacheWrite,
    EnsembleModel,
    ModelSource,
    TeacherCache,
    ZooModel,
    describe_model,
    model_kind,
    require_kind,
)
from distil.data.classification import ClassificationData, Split, load_data, validation_split
from distil.data.mixing import apply_mix, sample_mix
from distil.errors import DistilError
from distil.evaluation import classification as metrics
from distil.evaluation.calibration import fidelity_part
from distil.evaluation.cost import interleaved_speeds, peak_forward_memory_bytes
from distil.evaluation.report import cost_part, print_report, quality_part, write_report
from distil.losses.classifier import mixed_targets
from distil.losses.objective import (
    IGNORE_INDEX,
    ObjectiveOutput,
    classifier_objective,
    feature_objective,
    mixup_classifier_objective,
)
from distil.models.classifier import (
    BuiltModel,
    Inputs,
    build_classifier,
    count_parameters,
    load_weights,
    logits_of,
    save_model,
)
from distil.models.features import (
    FeatureDistiller,
    FeatureLoss,
    FeatureTerm,
    LayerMapStrategy,
    auto_layer_map,
    capture_features,
    feature_distiller,
    feature_shapes,
    find_blocks,
)
from distil.teachers import Teacher
from distil.teachers.ensemble import EnsembleTeacher, combine_logits
from distil.teachers.models import (
    FEATURE_PREFIX,
    CachedExampleTeacher,
    LiveClassifierTeacher,
    teacher_outputs,
)
from distil.training.loop import finished, open_phase
from distil.training.metrics import MetricsLog
from distil.training.session import Session

logger = logging.getLogger(__name__)


CLASSIFIER_KINDS = ("zoo", "factory", "hf")


def check_zoo_name(source: ModelSource, key: str) -> None:
    """Refuse an unknown zoo architecture by name, with a "did you mean"."""
    if isinstance(source, ZooModel) and source.zoo not in ZOO_MODELS:
        import difflib

        close = difflib.get_close_matches(source.zoo, ZOO_MODELS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"{key}.zoo: unknown {source.zoo!r}; {hint}the zoo has {ZOO_MODELS}")


class TeacherSection(StrictModel):
    model: ModelSource = Field(
        default_factory=lambda: ZooModel(zoo="cnn", kwargs={"channels": [32, 64, 64]}),
        description="{zoo|factory: ..., weights: FILE}, {hf: FOLDER}, or {ensemble: [{model, weight}], combine}",
    )
    train: bool = Field(default=False, description="train the teacher first, in this run")
    training: TrainSection = TrainSection()
    cache: TeacherCache | None = Field(
        default=None,
        description="the teacher's logits (and the kd.features maps) written once, then read each "
        "step instead of running the teacher (not with mixup or cutmix)",
    )

    @model_validator(mode="after")
    def _buildable(self) -> TeacherSection:
        require_kind(self.model, (*CLASSIFIER_KINDS, "ensemble"), "teacher.model")
        if self.train and isinstance(self.model, EnsembleModel):
            raise ValueError(
                "teacher.train: an ensemble is made of trained teachers; train each apart"
            )
        members = self.model.ensemble if isinstance(self.model, EnsembleModel) else []
        for key, m in [("teacher.model", self.model)] + [
            (f"teacher.model.ensemble.{i}.model", e.model) for i, e in enumerate(members)
        ]:
            check_zoo_name(m, key)
        for key, m in [("teacher.model", self.model)] + [
            (f"teacher.model.ensemble.{i}.model", e.model) for i, e in enumerate(members)
        ]:
            if isinstance(m, ZooModel) and m.weights is None and not self.train:
                raise ValueError(
                    f"{key}: a {model_kind(m)} teacher has no weights: set {key}.weights: FILE.safetensors, "
                    "or teacher.train: true"
                )
        return self


class StudentSection(StrictModel):
    model: ModelSource = Field(default_factory=lambda: ZooModel(zoo="mlp", kwargs={"hidden": [32]}))

    @model_validator(mode="after")
    def _buildable(self) -> StudentSection:
        require_kind(self.model, CLASSIFIER_KINDS, "student.model")
        check_zoo_name(self.model, "student.model")
        return self


class AutoFeatures(StrictModel):
    """Feature terms chosen from the models' block lists instead of named by hand."""

    layer_map: LayerMapStrategy = Field(
        default=LayerMapStrategy.SHAPE,
        description="shape: each student block to the deepest teacher block of its geometry; uniform: spread over "
        "depth; last_k: the last k blocks",
    )
    k: int = Field(default=1, ge=1, description="layer_map=last_k: how many blocks")
    loss: FeatureLoss = FeatureLoss.HINT
    weight: float = Field(default=1.0, ge=0, description="weight of each paired term")
    kd_temperature: float = Field(default=1.0, gt=0, description="τ of cwd")


class KDSection(StrictModel):
    kd_weight: float = Field(
        default=0.9, ge=0, le=1, description="weight of the soft term; 1 - it weighs hard CE"
    )
    kd_temperature: float = Field(default=4.0, gt=0)
    divergence: ClassifierDivergence = ClassifierDivergence.FORWARD_KL
    divergence_params: dict[str, float] = Field(
        default_factory=dict,
        description="e.g. {beta: 0.5} for generalized_jsd, {alpha, beta} for dkd",
    )
    features: list[FeatureTerm] = Field(
        default_factory=list,
        description="feature KD: [{student: stages.1, teacher: stages.1, loss: cwd|hint|attention, weight: 1.0}]",
    )
    auto_features: AutoFeatures | None = Field(
        default=None,
        description="feature terms paired automatically over the models' blocks: {layer_map: shape|uniform|last_k, loss, weight}",
    )
    mixup_alpha: float = Field(
        default=0.0,
        ge=0,
        description="mixup Beta(α, α) in the student and baseline phases; the teacher sees the same mix",
    )
    cutmix_alpha: float = Field(
        default=0.0, ge=0, description="cutmix Beta(α, α); with mixup too, each batch picks one"
    )


class EvalSection(StrictModel):
    baseline: bool = Field(default=True, description="also train the student without the teacher")
    throughput_batch: int = Field(default=256, ge=1)


class Config(StrictModel):
    recipe: Literal["classifier_kd"] = "classifier_kd"
    seed: int = 0
    run: RunSection = RunSection()
    data: ClassifierDataSection = ClassifierDataSection()
    teacher: TeacherSection = TeacherSection(train=True)
    student: StudentSection = StudentSection()
    train: TrainSection = TrainSection()
    kd: KDSection = KDSection()
    eval: EvalSection = EvalSection()

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        require_unsharded(self.train, "train", "classifier_kd")
        require_unsharded(self.teacher.training, "teacher.training", "classifier_kd")
        mixing = [
            name
            for name, on in (
                ("kd.mixup_alpha", self.kd.mixup_alpha > 0),
                ("kd.cutmix_alpha", self.kd.cutmix_alpha > 0),
            )
            if on
        ]
        if self.data.student_labels is not None and self.kd.divergence is ClassifierDivergence.DKD:
            raise ValueError(
                "data.student_labels leaves some training examples without a label, but "
                "kd.divergence=dkd splits the teacher at every example's label; set "
                "data.student_labels=null or choose another divergence"
            )
        if self.teacher.cache is not None and mixing:
            raise ValueError(
                f"teacher.cache stores the teacher's logits on the unmixed training examples, but {', '.join(mixing)} "
                "needs the live teacher's outputs on what the student sees; remove teacher.cache or those settings"
            )
        if isinstance(self.teacher.model, EnsembleModel) and (
            self.kd.features or self.kd.auto_features
        ):
            raise ValueError(
                "kd.features: an ensemble's members have different blocks; feature KD takes one teacher"
            )
        return self


def _take(inputs: Inputs, index: torch.Tensor, device: torch.device) -> Inputs:
    return {k: v[index].to(device) for k, v in inputs.items()}


def _check_classes(built: BuiltModel, inputs: Inputs, num_classes: int, role: str) -> None:
    with torch.no_grad():
        out = logits_of(built.module.eval(), {k: v[:2] for k, v in inputs.items()})
    if out.shape[-1] != num_classes:
        raise DistilError(
            f"the {role} outputs {out.shape[-1]} classes but the dataset has {num_classes}; "
            f"give the {role} a head of {num_classes} classes"
        )


@dataclass(frozen=True)
class KDStep:
    """What one micro-batch needs besides its example ids: the student, the encoded data, the
    teacher (any :class:`~distil.teachers.base.Teacher`) and the loss settings of the phase."""

    model: nn.Module  # the student's forward (DDP-wrapped when several processes)
    student: nn.Module  # the same, unwrapped: feature capture hooks attach here
    inputs: Inputs
    labels: torch.Tensor
    kd: KDSection
    mix: bool  # mixup/cutmix: the student and baseline phases, never the teacher's
    device: torch.device
    teacher: Teacher | None = None
    features: FeatureDistiller | None = None


def _mixed_hard_targets(y: torch.Tensor, plan: Any, num_classes: int) -> torch.Tensor:
    """The label distribution of a mixed batch: ``λ·onehot(y) + (1 − λ)·onehot(y[perm])``. A mix
    with an unlabelled example (``data.student_labels``) has no hard target: its row is zero,
    which drops it from the CE while a KD term still reads the teacher on it."""
    y_b = y[plan.perm]
    soft = mixed_targets(y.clamp_min(0), y_b.clamp_min(0), plan.lam, num_classes)
    return soft * ((y != IGNORE_INDEX) & (y_b != IGNORE_INDEX)).unsqueeze(-1)


def kd_loss_step(ctx: KDStep, ids: torch.Tensor, window_items: float) -> ObjectiveOutput:
    """One micro-batch of Hinton KD: ``(1 - w)·CE + w·T²·D(teacher_T ‖ student_T)`` (CE alone
    without a teacher), on mixed images when mixup/cutmix is on, plus the feature terms."""
    kd, fkd = ctx.kd, ctx.features
    x_s, y = _take(ctx.inputs, ids, ctx.device), ctx.labels[ids].to(ctx.device)
    plan = None
    if ctx.mix:
        plan = sample_mix(len(ids), mixup_alpha=kd.mixup_alpha, cutmix_alpha=kd.cutmix_alpha)
    if plan is not None:  # the teacher mixes its own inputs with the same plan
        x_s = {k: apply_mix(v, plan) for k, v in x_s.items()}
    with capture_features(ctx.student, fkd.student_names if fkd else []) as s_feats:
        student_logits = logits_of(ctx.model, x_s).float()  # (b, C)
    if ctx.teacher is None:  # the baseline: CE alone, on the mixed labels of mixed images
        if plan is None:
            return classifier_objective(
                student_logits,
                None,
                y,
                kd_weight=kd.kd_weight,
                kd_temperature=kd.kd_temperature,
                num_items=window_items,
            )
        return mixup_classifier_objective(
            student_logits,
            None,
            _mixed_hard_targets(y, plan, student_logits.shape[-1]),
            kd_weight=kd.kd_weight,
            kd_temperature=kd.kd_temperature,
            num_items=window_items,
        )
    t_out = ctx.teacher({"example_id": ids, "mix": plan, "labels": y})
    assert t_out.logits is not None, "classifier teachers answer with logits"
    mix: dict[str, Any] = {"kd_weight": kd.kd_weight, "kd_temperature": kd.kd_temperature}
    mix |= {"divergence": kd.divergence.value, "num_items": window_items, **kd.divergence_params}
    t_logits = t_out.logits.to(ctx.device).float()
    if plan is None:
        out = classifier_objective(student_logits, t_logits, y, **mix)
    else:
        soft = _mixed_hard_targets(y, plan, student_logits.shape[-1])
        out = mixup_classifier_objective(student_logits, t_logits, soft, **mix)
    if fkd is not None:
        out = feature_objective(fkd.terms(s_feats, t_out.features, window_items), out)
    return out


def train_phase(
    phase_name: str,
    s: Session,
    built: BuiltModel,
    cfg: Config,
    tcfg: TrainSection,
    data: tuple[Inputs, torch.Tensor],
    log: MetricsLog,
    evaluate: tuple[Inputs, torch.Tensor] | None,
    teacher: Teacher | None = None,
    features: list[FeatureTerm] | None = None,
) -> None:
    """Train ``built.module`` in place: CE only, or CE + KD when a teacher is given.

    ``data`` is (train inputs, train labels); ``evaluate`` (inputs, labels) of the split whose
    accuracy is logged after each epoch (validation when there is one), or None.
    """
    inputs, labels = data
    if (final := finished(s, phase_name)) is not None:  # finished before a crash: reuse it
        load_weights(built.module, final / "model.safetensors")
        logger.info("%s: reusing finished weights from %s", phase_name, final)
        return
    acc = s.accelerator
    fkd = None  # feature KD: projectors train with the student and are checkpointed, not exported
    if teacher is not None and features:
        few = torch.arange(2)
        t_feats = teacher({"example_id": few, "mix": None, "labels": labels[few]}).features
        fkd = feature_distiller(
            features,
            built.module,
            lambda: logits_of(built.module, _take(inputs, few, _device_of(built.module))),
            {name: tuple(v.shape) for name, v in t_feats.items()},
        )
    phase = open_phase(
        s,
        phase_name,
        model=built.module,
        extra=fkd,
        train=tcfg,
        num_examples=len(labels),
        seed=cfg.seed,
        log=log,
        config_key="teacher.training" if phase_name == "teacher" else "train",
    )
    mixing = phase_name != "teacher" and (cfg.kd.mixup_alpha > 0 or cfg.kd.cutmix_alpha > 0)
    ctx = KDStep(
        phase.model, phase.unwrapped(), inputs, labels, cfg.kd, mixing, acc.device, teacher, fkd
    )
    metric = "val_accuracy" if cfg.data.validation_fraction > 0 else "test_accuracy"
    for step in phase.steps():
        for m, ids in enumerate(step.micro_batches):
            with phase.accumulate(m):
                out = kd_loss_step(ctx, ids, step.window_items)
            phase.backward(out, micro=m)
        phase.optimizer_step(count=len(step.batch))
        if step.ends_epoch and tcfg.eval_every_epoch and evaluate is not None:
            logits = metrics.predict_logits(phase.unwrapped(), evaluate[0])
            phase.log_values({metric: metrics.accuracy(logits, evaluate[1]), "epoch": step.epoch})
    where = "cache" if cfg.teacher.cache is not None else "live teacher"
    summary = (
        {"kd_source": where, "teacher": teacher.describe()} if teacher else {"kd_source": "none"}
    )
    phase.finish(export=lambda folder: save_model(built, folder), summary=summary)
    built.module = phase.unwrapped()


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def build_teachers(cfg: Config, data: ClassificationData) -> list[tuple[BuiltModel, float]]:
    """The teacher (or each member of an ensemble) with its static weight."""
    source = cfg.teacher.model
    if isinstance(source, EnsembleModel):
        return [(build_classifier(m.model, data), m.weight) for m in source.ensemble]
    return [(build_classifier(source, data), 1.0)]


def live_teacher(
    cfg: Config,
    s: Session,
    members: list[tuple[BuiltModel, float]],
    train: Split,
    feature_names: list[str],
) -> tuple[Teacher, list[LiveClassifierTeacher]]:
    """The live teacher (one model, or the ensemble of the members) and its live members."""
    lives = [
        LiveClassifierTeacher(
            built.module,
            built.encoder(train),
            device=s.accelerator.device,
            feature_names=feature_names,
            source=built.source,
        )
        for built, _ in members
    ]
    if len(lives) == 1:
        return lives[0], lives
    assert isinstance(cfg.teacher.model, EnsembleModel)
    ens = cfg.teacher.model
    ensemble = EnsembleTeacher(
        lives,
        [w for _, w in members],
        rule=ens.combine,
        weighting=ens.weighting,
        kd_temperature=cfg.kd.kd_temperature,
        names=[b.source for b, _ in members],
    )
    return ensemble, lives


def make_teacher(
    cfg: Config,
    s: Session,
    members: list[tuple[BuiltModel, float]],
    train: Split,
    labels: torch.Tensor,
    feature_names: list[str],
) -> Teacher:
    """The teacher the student learns from: the live model, the ensemble of the members, or the
    cache of either's answers (written or completed first, then read by example id)."""
    teacher, lives = live_teacher(cfg, s, members, train, feature_names)
    if cfg.teacher.cache is None:
        return teacher
    started = time.perf_counter()
    write = cfg.teacher.cache.write is CacheWrite.AUTO
    cache = teacher_cache(cfg, s, teacher, lives, labels, feature_names, write=write)
    if s.accelerator.is_main_process:
        s.write_json(
            s.run_dir / "teacher-cache.json",
            {
                "path": str(cache.path),
                "seconds": time.perf_counter() - started,
                "bytes_per_example": cache.manifest["bytes_per_example"],
            },
        )
    return CachedExampleTeacher(cache, device=s.accelerator.device, feature_names=feature_names)


def teacher_cache(
    cfg: Config,
    s: Session,
    teacher: Teacher,
    lives: list[LiveClassifierTeacher],
    labels: torch.Tensor,
    feature_names: list[str],
    *,
    write: bool,
) -> ExampleCache:
    """Write (or complete, or reuse) the teacher's logits over the training split, plus the
    feature maps the feature terms read; open it.

    The cache is keyed by example index and fingerprinted by the teacher's weights (every
    member's, and how they combine), the encoded inputs and the feature names, so a cache of
    another teacher, other data or other features is refused by name, and a killed write resumes
    with only the missing shards.
    """
    assert cfg.teacher.cache is not None
    settings = cfg.teacher.cache
    fingerprints = [teacher_fingerprint(t.module) for t in lives]
    inputs = {f"{i}:{k}": v for i, t in enumerate(lives) for k, v in t.inputs.items()}
    spec: dict[str, Any] = {
        "teacher_fingerprint": fingerprints[0],
        "dataset_fingerprint": tensors_fingerprint({**lives[0].inputs, "labels": labels}),
        "outputs": "classifier logits at temperature 1",
        "features": feature_names,
    }
    if len(lives) > 1:  # the combined target depends on every member and on the KD temperature
        assert isinstance(cfg.teacher.model, EnsembleModel)
        how = {
            "members": fingerprints,
            "weights": [m.weight for m in cfg.teacher.model.ensemble],
            "combine": cfg.teacher.model.combine.value,
            "weighting": cfg.teacher.model.weighting.value,
        }
        spec |= {
            "teacher_fingerprint": hashlib.sha256(json.dumps(how).encode()).hexdigest(),
            "dataset_fingerprint": tensors_fingerprint({**inputs, "labels": labels}),
            "outputs": teacher.describe(),
            "kd_temperature": cfg.kd.kd_temperature,
        }
    acc = s.accelerator
    if acc.is_main_process and write:

        def compute(idx: list[int]) -> dict[str, torch.Tensor]:
            ids = torch.tensor(idx)
            return teacher_outputs(teacher, {"example_id": ids, "mix": None, "labels": labels[ids]})

        feature_dtype = getattr(torch, settings.feature_dtype)
        write_example_cache(
            settings.path,
            example_ids=range(len(labels)),
            spec=spec,
            compute=compute,
            examples_per_shard=16384,
            dtypes={
                "logits": getattr(torch, settings.dtype),
                **{FEATURE_PREFIX + n: feature_dtype for n in feature_names},
            },
            batch_size=cfg.eval.throughput_batch,
        )
    acc.wait_for_everyone()
    return ExampleCache(settings.path, expect=spec)


def _sum_costs(costs: list[dict[str, Any]]) -> dict[str, Any]:
    """The cost of keeping every member of an ensemble (one cost when there is one member);
    running them all is timed by ``_speeds``."""
    if len(costs) == 1:
        return costs[0]
    total = {k: sum(c[k] for c in costs) for k in costs[0] if k != "throughput_batch"}
    total["peak_memory_bytes"] = max(c["peak_memory_bytes"] for c in costs)
    total["throughput_batch"] = costs[0]["throughput_batch"]
    return total


def _cost(built: BuiltModel, inputs: Inputs, folder: Path, throughput_batch: int) -> dict[str, Any]:
    module = built.module.cpu().eval()
    many = {k: v[:throughput_batch] for k, v in inputs.items()}
    return {  # latency and throughput: _speeds, all models interleaved
        "params": count_parameters(module),
        "size_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
        "peak_memory_bytes": peak_forward_memory_bytes(lambda: logits_of(module, many), module),
        "throughput_batch": next(iter(many.values())).shape[0],
    }


def _speeds(
    runs: dict[str, list[tuple[nn.Module, Inputs]]], reference: str, batch: int
) -> dict[str, dict[str, Any]]:
    """Batch-1 latency and batch-``batch`` throughput of every row's models (an ensemble runs all
    its members), timed interleaved on one CPU thread, with speed-ups over ``reference``."""

    def call(models: list[tuple[nn.Module, Inputs]], n: int) -> Any:
        parts = [(m.cpu().eval(), {k: v[:n] for k, v in inp.items()}) for m, inp in models]
        return lambda: [logits_of(m, part) for m, part in parts]

    return interleaved_speeds(
        {name: call(models, 1) for name, models in runs.items()},
        {name: call(models, batch) for name, models in runs.items()},
        reference=reference,
        batch_size=batch,
    )


def feature_terms(
    cfg: Config, student: BuiltModel, teacher: BuiltModel, train: Split
) -> list[FeatureTerm]:
    """The explicit ``kd.features`` plus, with ``kd.auto_features``, one term per block pair that
    the layer-map strategy picks over both models' blocks (shapes probed on two examples)."""
    terms = list(cfg.kd.features)
    auto = cfg.kd.auto_features
    if auto is None:
        return terms
    few = torch.arange(2)
    s_inputs, t_inputs = (
        student.encoder(train.subset(few.numpy())),
        teacher.encoder(train.subset(few.numpy())),
    )
    s_blocks, t_blocks = find_blocks(student.module), find_blocks(teacher.module)
    s_shapes = feature_shapes(
        student.module,
        s_blocks,
        lambda: logits_of(student.module, _take(s_inputs, few, torch.device("cpu"))),
    )
    t_shapes = feature_shapes(
        teacher.module,
        t_blocks,
        lambda: logits_of(teacher.module, _take(t_inputs, few, torch.device("cpu"))),
    )
    pairs = auto_layer_map(auto.layer_map, s_shapes, t_shapes, k=auto.k)
    return terms + [
        FeatureTerm(
            student=a,
            teacher=b,
            loss=auto.loss,
            weight=auto.weight,
            kd_temperature=auto.kd_temperature,
        )
        for a, b in pairs
    ]


def splits(cfg: Config) -> tuple[ClassificationData, Split | None]:
    """The data, and the validation split carved out of its training split when asked (model
    selection reads it, never the test split)."""
    data = load_data(cfg.data)
    if cfg.data.validation_fraction <= 0:
        return data, None
    train, validation = validation_split(data, cfg.data.validation_fraction, cfg.data.split_seed)
    return ClassificationData(
        data.name, train, data.test, data.class_names, data.modality
    ), validation


def labelled_subset(cfg: Config, labels: torch.Tensor) -> torch.Tensor | None:
    """The sorted indices of the training examples whose labels the student and the baseline
    see (``data.student_labels`` of them, drawn with ``split_seed`` so every seed shares them),
    or None when they see every label."""
    n = cfg.data.student_labels
    if n is None or n >= len(labels):
        return None
    g = torch.Generator().manual_seed(cfg.data.split_seed)
    return torch.randperm(len(labels), generator=g)[:n].sort().values


def hide_labels(labels: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The labels with every one outside ``keep`` set to the ignore index: the hard CE drops
    those examples, the KD term still reads the teacher on them."""
    if keep is None:
        return labels
    hidden = torch.full_like(labels, IGNORE_INDEX)
    hidden[keep] = labels[keep]
    return hidden


def fresh_student(cfg: Config, data: ClassificationData) -> BuiltModel:
    """The student's initial weights: the same for the KD student and the baseline."""
    torch.manual_seed(cfg.seed + 17)
    return build_classifier(cfg.student.model, data)


def write_teacher_cache(cfg: Config, session: Callable[[], Session]) -> tuple[Path, bool, str]:
    """``distil cache``: write (or complete) ``teacher.cache`` ahead of training; returns the
    folder, whether this is the main process, and what it did."""
    s = session()
    if cfg.teacher.train or cfg.teacher.cache is None:
        raise DistilError(
            "distil cache runs a trained teacher: set teacher.model.weights (and teacher.train: "
            "false) and teacher.cache.path; a run with teacher.train: true writes the cache itself"
        )
    data, _ = splits(cfg)
    torch.manual_seed(cfg.seed)
    members = build_teachers(cfg, data)
    features = feature_terms(cfg, fresh_student(cfg, data), members[0][0], data.train)
    names = sorted({t.teacher for t in features})
    teacher, lives = live_teacher(cfg, s, members, data.train, names)
    labels = torch.from_numpy(data.train.labels)
    teacher_cache(cfg, s, teacher, lives, labels, names, write=True)
    return Path(cfg.teacher.cache.path), s.accelerator.is_main_process, "written"


def main(cfg: Config, s: Session) -> dict[str, Any]:
    """Run the recipe in the session's run folder; return the report."""
    data, validation = splits(cfg)
    acc = s.accelerator
    torch.manual_seed(cfg.seed)
    members = build_teachers(cfg, data)
    for built, _ in members:
        _check_classes(built, built.encoder(data.train), data.num_classes, "teacher")
    train_labels, test_labels = (
        torch.from_numpy(data.train.labels),
        torch.from_numpy(data.test.labels),
    )
    log = MetricsLog(s.run_dir / "metrics.jsonl", acc, acc.is_main_process)
    kd = cfg.kd
    s.announce(
        f"classifier_kd on {data.name} ({len(data.train)} train / "
        f"{len(validation) if validation is not None else 0} validation / {len(data.test)} test, "
        f"{data.num_classes} classes): teacher {describe_model(cfg.teacher.model)} "
        f"({'trained here' if cfg.teacher.train else 'loaded'}), student {describe_model(cfg.student.model)}, "
        f"loss = {1 - kd.kd_weight:g}·CE + {kd.kd_weight:g}·T²·{kd.divergence.value}{kd.divergence_params or ''} "
        f"at kd_temperature={kd.kd_temperature:g}; {acc.num_processes} process(es) on {acc.device}"
        + (f"; teacher outputs cached in {cfg.teacher.cache.path}" if cfg.teacher.cache else "")
    )

    def split_of(built: BuiltModel, split: Split | None) -> tuple[Inputs, torch.Tensor] | None:
        return None if split is None else (built.encoder(split), torch.from_numpy(split.labels))

    check = validation if validation is not None else data.test  # per-epoch accuracy
    if cfg.teacher.train:
        t_built = members[0][0]
        t_data = (t_built.encoder(data.train), train_labels)
        train_phase(
            "teacher", s, t_built, cfg, cfg.teacher.training, t_data, log, split_of(t_built, check)
        )
    for built, _ in members:
        built.module.eval().requires_grad_(False)

    student = fresh_student(cfg, data)
    s_train = student.encoder(data.train)
    _check_classes(student, s_train, data.num_classes, "student")
    features = feature_terms(cfg, student, members[0][0], data.train)
    if cfg.kd.auto_features is not None:
        pairs = ", ".join(f"{t.student} -> {t.teacher}" for t in features[len(cfg.kd.features) :])
        auto = cfg.kd.auto_features
        s.announce(
            f"classifier_kd: automatic feature terms ({auto.layer_map.value}, {auto.loss.value}): {pairs}"
        )
    feature_names = sorted({t.teacher for t in features})
    teacher = make_teacher(cfg, s, members, data.train, train_labels, feature_names)
    s.announce(f"classifier_kd: the student learns from the {teacher.describe()}")
    keep = labelled_subset(cfg, train_labels)
    if keep is not None:
        s.announce(
            f"classifier_kd: the student and the baseline see {len(keep)} of the "
            f"{len(train_labels)} training labels; the KD student also learns the teacher's soft "
            "labels on the rest, the baseline trains on the labelled ones alone"
        )
    evaluate = split_of(student, check)
    train_phase(
        "student",
        s,
        student,
        cfg,
        cfg.train,
        (s_train, hide_labels(train_labels, keep)),
        log,
        evaluate,
        teacher,
        features,
    )
    baseline = None
    same_objective = kd.kd_weight == 0 and not features  # the teacher would teach nothing
    if cfg.eval.baseline and same_objective:
        s.announce(
            "classifier_kd: no baseline: with kd.kd_weight=0 the student's objective is the "
            "baseline's (CE on the same data), so a gain over it would be noise"
        )
    if cfg.eval.baseline and not same_objective:
        baseline = fresh_student(cfg, data)
        b_data = (
            (s_train, train_labels)
            if keep is None
            else (_take(s_train, keep, torch.device("cpu")), train_labels[keep])
        )
        train_phase("baseline", s, baseline, cfg, cfg.train, b_data, log, evaluate)
    if not acc.is_main_process:
        return {}
    report = build_report(cfg, s, data, members, student, baseline, test_labels, validation)
    write_report(s.run_dir, report)
    print_report(report, s.console)
    return report


def build_report(
    cfg: Config,
    s: Session,
    data: ClassificationData,
    members: list[tuple[BuiltModel, float]],
    student: BuiltModel,
    baseline: BuiltModel | None,
    test_labels: torch.Tensor,
    validation: Split | None,
) -> dict[str, Any]:
    """Teacher (or ensemble, then each member), KD student and baseline on the test split."""
    member_logits, member_costs = [], []
    for i, (built, _) in enumerate(members):
        folder = s.run_dir / "teacher" / ("final" if len(members) == 1 else f"member-{i}")
        if not folder.is_dir():
            save_model(built, folder)
        test = built.encoder(data.test)
        member_logits.append(metrics.predict_logits(built.module, test))
        member_costs.append(_cost(built, test, folder, cfg.eval.throughput_batch))
    t_logits = member_logits[0]
    if isinstance(cfg.teacher.model, EnsembleModel):  # static weights: test labels never weigh
        ens = cfg.teacher.model
        weights = torch.tensor([w for _, w in members]) / sum(w for _, w in members)
        t_logits = combine_logits(
            member_logits, weights, rule=ens.combine, kd_temperature=cfg.kd.kd_temperature
        )
    rows: list[dict[str, Any]] = []
    saved: dict[str, torch.Tensor] = {"labels": test_labels}
    teacher_name = "teacher" if len(members) == 1 else f"teacher (ensemble of {len(members)})"
    entries: list[tuple[str, str, torch.Tensor, dict[str, Any], str]] = [
        (
            "teacher",
            teacher_name,
            t_logits,
            _sum_costs(member_costs),
            describe_model(cfg.teacher.model),
        )
    ]
    for role, trained in (("student (KD)", student), ("baseline (no teacher)", baseline)):
        if trained is None:
            continue
        test = trained.encoder(data.test)
        folder = s.run_dir / role.split(" ")[0] / "final"
        cost = _cost(trained, test, folder, cfg.eval.throughput_batch)
        logits = metrics.predict_logits(trained.module, test)
        entries.append((role.split(" ")[0], role, logits, cost, trained.source))
    if len(members) > 1:
        for i, ((built, w), logits, cost) in enumerate(
            zip(members, member_logits, member_costs, strict=True)
        ):
            entries.append(
                (f"member-{i}", f"teacher {i + 1} (w={w:g})", logits, cost, built.source)
            )
    for key, role, logits, cost, source in entries:
        saved[key] = logits.contiguous()
        row = {
            "model": role,
            "source": source,
            "accuracy": metrics.accuracy(logits, test_labels),
            "agreement": metrics.agreement(logits, t_logits),
            **cost,
        }
        row["per_class_accuracy"] = metrics.per_class_accuracy(
            logits, test_labels, data.num_classes
        )
        rows.append(row)
    if validation is not None:
        v_labels = torch.from_numpy(validation.labels)
        built_of = {"student (KD)": student, "baseline (no teacher)": baseline}
        for row in rows:
            model = built_of.get(row["model"])
            if model is not None:
                v_logits = metrics.predict_logits(model.module, model.encoder(validation))
                row["val_accuracy"] = metrics.accuracy(v_logits, v_labels)
    from safetensors.torch import save_file

    (s.run_dir / "eval").mkdir(exist_ok=True)
    save_file(
        saved, str(s.run_dir / "eval" / "test_logits.safetensors")
    )  # for calibration/confusion in reports
    runs = {teacher_name: [(b.module, b.encoder(data.test)) for b, _ in members]}
    for role, trained in (("student (KD)", student), ("baseline (no teacher)", baseline)):
        if trained is not None:
            runs[role] = [(trained.module, trained.encoder(data.test))]
    if len(members) > 1:
        for i, (built, w) in enumerate(members):
            runs[f"teacher {i + 1} (w={w:g})"] = [(built.module, built.encoder(data.test))]
    speeds = _speeds(runs, teacher_name, rows[0]["throughput_batch"])
    for row in rows:
        row |= speeds[row["model"]]
        row["size_ratio"] = rows[0]["params"] / row["params"]
    highlights: dict[str, Any] = {"dataset": f"{data.name} ({len(data.test)} test examples)"}
    weak = metrics.chance_level_warning(rows[0]["accuracy"], test_labels)
    if weak is not None:
        logger.warning("%s", weak)
    if baseline is not None:
        gain = rows[1]["accuracy"] - rows[2]["accuracy"]
        gap = rows[0]["accuracy"] - rows[2]["accuracy"]
        highlights["KD gain over baseline (accuracy points)"] = 100 * gain
        highlights["gap closed (student - baseline) / (teacher - baseline)"] = (
            gain / gap if gap > 0 else None
        )
    highlights["student is smaller by"] = (
        f"{rows[1]['size_ratio']:.1f}x params, {rows[1]['speedup_verdict']}"
    )
    columns = [
        ("model", "model"),
        ("accuracy", "test acc"),
        ("agreement", "agree w/ teacher"),
        ("params", "params"),
        ("size_bytes", "bytes"),
        ("latency_b1_ms", "ms @ b1"),
        ("throughput_per_s", f"ex/s @ b{rows[0]['throughput_batch']}"),
        ("speedup", "speed-up"),
    ]
    role_names = {"teacher": rows[0]["model"], "student": rows[1]["model"]}
    if baseline is not None:
        role_names["baseline"] = rows[2]["model"]
    for row in rows:
        known = [a for a in row["per_class_accuracy"] if a is not None]
        row["mean_class_accuracy"] = sum(known) / len(known) if known else None
    batch = rows[0]["throughput_batch"]
    return {
        "warnings": [] if weak is None else [weak],
        "title": f"classifier_kd: {data.name}",
        "recipe": "classifier_kd",
        "roles": role_names,
        "table": {"columns": [{"key": k, "label": lbl} for k, lbl in columns], "rows": rows},
        "highlights": highlights,
        "quality": quality_part(
            rows,
            [("accuracy", "test accuracy"), ("mean_class_accuracy", "mean per-class accuracy")],
            roles=role_names,
            primary="accuracy",
            per_class={
                "labels": data.class_names,
                "metric": "accuracy",
                "values": {r["model"]: r["per_class_accuracy"] for r in rows},
            },
        ),
        "fidelity": fidelity_part(
            {k: saved[k] for k in ("teacher", "student", "baseline") if k in saved},
            test_labels,
            names=role_names,
            split=f"test split ({len(test_labels)} examples)",
            class_names=data.class_names,
        ),
        "cost": cost_part(
            rows,
            [
                ("params", "params"),
                ("size_ratio", "teacher/model params"),
                ("size_bytes", "on disk"),
                ("peak_memory_bytes", f"peak memory @ b{batch}"),
                ("latency_b1_ms", "CPU ms @ b1 (1 thread)"),
                (f"latency_b{batch}_ms", f"CPU ms @ b{batch} (1 thread)"),
                ("throughput_per_s", f"ex/s @ b{batch}"),
                ("speedup", "speed-up @ b1"),
            ],
        ),
        "details": {
            "kd": cfg.kd.model_dump(),
            "seed": cfg.seed,
            "class_names": data.class_names,
            "processes": s.accelerator.num_processes,
        },
    }
