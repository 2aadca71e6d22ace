"""Recipe ``diffusion_distill``: distil a ``diffusion_train`` teacher into a faster sampler.

``method.kind`` picks one of four distillations (sources and constants in ``docs/diffusion.md``):

* ``progressive`` (Salimans & Ho 2022): phases ``stage-N``, each a student taking one DDIM step
  where the previous model took two, halving from ``teacher_steps`` to ``final_steps``;
* ``guidance`` (Meng et al. 2023, stage 1): a student that reads the guidance scale and gives in
  one pass what classifier-free guidance gives in two;
* ``consistency`` (LCM-style consistency distillation): a guidance-conditioned consistency model
  with an EMA target network, sampled in 1-4 steps;
* ``adapter_guidance`` (AGD, paper #53): offset adapters (~2 % of the parameters) on the frozen
  teacher, trained on recorded classifier-free-guided trajectories.

Each phase is a short loop on the shared engine around the method's named loss step. The report
scores the student(s) and the teacher at the same NFE and the teacher's reference sampler with the
offline metric, next to the real-vs-real floor, with grids, a distance-vs-NFE plot and the
training curves (FD along training too when ``eval.track_every`` is set).
"""

from __future__ import annotations

import copy
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from distil.config.base import StrictModel
from distil.config.sections import RunSection, SchedulerName, TrainSection, require_unsharded
from distil.diffusion.config import DiffusionDataSection, SampleEvalSection
from distil.diffusion.data import load_diffusion_images, to_unit_range
from distil.diffusion.evaluate import balanced_labels, score_sampler
from distil.diffusion.losses import (
    ConsistencyMetric,
    DiffusionLoss,
    XWeighting,
    adapter_guidance_loss,
    consistency_distillation_loss,
    guidance_distillation_loss,
    progressive_distillation_loss,
)
from distil.diffusion.metrics import classifier_features, load_feature_classifier
from distil.diffusion.model import (
    CARD_FILE,
    AdapterGuidedUNet,
    DiffusionModelCard,
    GuidanceConditionedUNet,
    ModelKind,
    SamplingDefaults,
    card_for,
    ema_update,
    find_model_folder,
    guided_denoiser,
    load_diffusion_model,
    parameter_count,
    save_diffusion_model,
    unet_denoiser,
)
from distil.diffusion.sampling import (
    SamplerKind,
    SamplerSpec,
    Trajectories,
    classifier_free_guidance,
    record_guided_trajectories,
)
from distil.diffusion.schedule import NoiseSchedule, make_noise_schedule
from distil.errors import DistilError
from distil.evaluation.report import print_report, write_report
from distil.recipes.diffusion_train import SAMPLE_COLUMNS, sample_report, step_generator
from distil.training.loop import Phase, finished, open_phase
from distil.training.metrics import MetricsLog
from distil.training.session import Session

logger = logging.getLogger(__name__)

STAGE_STREAM = 10  # random stream of progressive stage i: STAGE_STREAM + i
TRAJECTORIES_FILE = "trajectories.safetensors"


class ProgressiveMethod(StrictModel):
    kind: Literal["progressive"] = "progressive"
    teacher_steps: int = Field(default=64, ge=2, description="DDIM steps of the first teacher")
    final_steps: int = Field(default=2, ge=1, description="halve until the student takes this many")
    weighting: XWeighting = XWeighting.SNR_PLUS_ONE
    guidance_scale: float = Field(
        default=1.0, ge=0.0, description="CFG scale of the first teacher (1: none); baked in"
    )
    label_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _halvings(self) -> ProgressiveMethod:
        ratio = self.teacher_steps // self.final_steps
        if self.teacher_steps % self.final_steps or ratio < 2 or ratio & (ratio - 1):
            raise ValueError(
                f"teacher_steps / final_steps must be a power of two ≥ 2 (got {self.teacher_steps} / "
                f"{self.final_steps}): each stage halves the steps"
            )
        return self

    def stages(self) -> list[int]:
        """Student steps of each stage, e.g. [32, 16, 8, 4, 2]."""
        out, n = [], self.teacher_steps
        while n > self.final_steps:
            n //= 2
            out.append(n)
        return out


class GuidanceMethod(StrictModel):
    kind: Literal["guidance"] = "guidance"
    guidance_range: tuple[float, float] = (1.0, 5.0)
    weighting: XWeighting = XWeighting.SNR_PLUS_ONE


class ConsistencyMethod(StrictModel):
    kind: Literal["consistency"] = "consistency"
    guidance_range: tuple[float, float] = (1.0, 3.0)
    num_ddim_timesteps: int = Field(default=50, ge=2)
    ema_decay: float = Field(default=0.95, ge=0.0, lt=1.0, description="LCM's target EMA")
    metric: ConsistencyMetric = ConsistencyMetric.L2
    huber_c: float = Field(default=0.001, gt=0.0)


class AdapterGuidanceMethod(StrictModel):
    kind: Literal["adapter_guidance"] = "adapter_guidance"
    guidance_range: tuple[float, float] = (1.0, 6.0)
    trajectories: int = Field(default=1024, ge=1, description="guided sampling runs recorded")
    trajectory_sampler: SamplerSpec = SamplerSpec(kind=SamplerKind.DDIM, steps=32)
    hidden_dim: int = Field(default=24, ge=1, description="adapter width (24: ~2 % at 1.05M)")


Method = Annotated[
    ProgressiveMethod | GuidanceMethod | ConsistencyMethod | AdapterGuidanceMethod,
    Field(discriminator="kind"),
]


class TeacherRef(StrictModel):
    path: str = Field(
        default="runs/diffusion-teacher",
        description="a diffusion model folder or a diffusion_train run folder",
    )


class DistillEvalSection(SampleEvalSection):
    guidance_scale: float = Field(default=1.0, ge=0.0, description="scale the rows are sampled at")
    student_steps: list[int] = Field(
        default_factory=list, description="student rows' steps (default: the method's own)"
    )
    reference: SamplerSpec = SamplerSpec(kind=SamplerKind.DDIM, steps=64)
    compare_teacher: bool = Field(
        default=True, description="also score the teacher, untrained, at the students' steps"
    )
    track_every: int | None = Field(
        default=None, ge=1, description="consistency: FD every N steps during training"
    )
    track_images: int = Field(default=500, ge=2)


class Config(StrictModel):
    recipe: Literal["diffusion_distill"] = "diffusion_distill"
    seed: int = 0
    run: RunSection = RunSection(name="diffusion-distill", cpu_threads=1)
    teacher: TeacherRef = TeacherRef()
    data: DiffusionDataSection = DiffusionDataSection()
    method: Method = ProgressiveMethod()
    train: TrainSection = TrainSection(
        epochs=100,
        max_steps=500,
        batch_size=128,
        lr=1e-4,
        scheduler=SchedulerName.constant,
        warmup_steps=0,
        max_grad_norm=1.0,
        checkpoint_every=250,
    )
    classifier: str | None = Field(
        default=None, description="the metric's classifier folder (default: the teacher run's)"
    )
    eval: DistillEvalSection = DistillEvalSection()

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        require_unsharded(self.train, "train", "diffusion_distill")
        if self.eval.track_every is not None and not isinstance(self.method, ConsistencyMethod):
            raise ValueError(
                "eval.track_every samples the consistency student along training; "
                f"method.kind={self.method.kind} has no such tracking: remove it"
            )
        return self


# --- loss steps: what one micro-batch of each method costs --------------------------------------


@dataclass(frozen=True)
class DistillStep:
    """Everything a micro-batch needs besides its example ids."""

    student: Callable[..., Tensor]  # the phase's (DDP-wrapped) forward
    teacher: nn.Module
    card: DiffusionModelCard
    schedule: NoiseSchedule
    images: Tensor
    labels: Tensor
    device: torch.device
    target: nn.Module | None = None  # consistency: the EMA target network
    trajectories: Trajectories | None = None  # adapter guidance: the recorded rows


def _batch(ctx: DistillStep, ids: Tensor) -> tuple[Tensor, Tensor]:
    return ctx.images[ids].to(ctx.device), ctx.labels[ids].to(ctx.device)


def progressive_loss_step(
    ctx: DistillStep,
    ids: Tensor,
    window_items: float,
    *,
    method: ProgressiveMethod,
    steps: int,
    teacher_scale: float,
) -> DiffusionLoss:
    images, labels = _batch(ctx, ids)
    teacher = classifier_free_guidance(
        unet_denoiser(ctx.teacher), teacher_scale, ctx.card.null_class
    )
    out = progressive_distillation_loss(
        unet_denoiser(ctx.student),  # type: ignore[arg-type]
        teacher,
        images,
        labels,
        student_steps=steps,
        schedule=ctx.schedule,
        student_prediction_type=ctx.card.prediction_type,
        teacher_prediction_type=ctx.card.prediction_type,
        generator=step_generator(ctx.device),
        weighting=method.weighting,
        null_class=ctx.card.null_class,
        label_dropout=method.label_dropout,
    )
    return out.scaled(len(ids) / window_items)


def guidance_loss_step(
    ctx: DistillStep, ids: Tensor, window_items: float, *, method: GuidanceMethod
) -> DiffusionLoss:
    images, labels = _batch(ctx, ids)
    out = guidance_distillation_loss(
        ctx.student,
        unet_denoiser(ctx.teacher),
        images,
        labels,
        schedule=ctx.schedule,
        student_prediction_type=ctx.card.prediction_type,
        teacher_prediction_type=ctx.card.prediction_type,
        null_class=ctx.card.null_class,
        guidance_range=method.guidance_range,
        generator=step_generator(ctx.device),
        weighting=method.weighting,
    )
    return out.scaled(len(ids) / window_items)


def consistency_loss_step(
    ctx: DistillStep, ids: Tensor, window_items: float, *, method: ConsistencyMethod
) -> DiffusionLoss:
    images, labels = _batch(ctx, ids)
    assert ctx.target is not None
    out = consistency_distillation_loss(
        ctx.student,
        guided_denoiser(ctx.target),
        unet_denoiser(ctx.teacher),
        images,
        labels,
        schedule=ctx.schedule,
        student_prediction_type=ctx.card.prediction_type,
        teacher_prediction_type=ctx.card.prediction_type,
        null_class=ctx.card.null_class,
        guidance_range=method.guidance_range,
        generator=step_generator(ctx.device),
        num_ddim_timesteps=method.num_ddim_timesteps,
        metric=method.metric,
        huber_c=method.huber_c,
    )
    return out.scaled(len(ids) / window_items)


def adapter_loss_step(ctx: DistillStep, ids: Tensor, window_items: float) -> DiffusionLoss:
    assert ctx.trajectories is not None
    rows = ctx.trajectories.rows(ids)
    moved = Trajectories(
        *(
            t.to(ctx.device)
            for t in (rows.inputs, rows.timesteps, rows.labels, rows.guidance_scales, rows.outputs)
        )
    )
    return adapter_guidance_loss(ctx.student, moved).scaled(len(ids) / window_items)


# --- phases --------------------------------------------------------------------------------------


def _run_phase(
    phase: Phase,
    loss_step: Callable[[Tensor, float], DiffusionLoss],
    after_step: Callable[[Phase], None] | None = None,
) -> None:
    """The loop every method shares: micro-batches through the method's loss step.

    ``after_step`` runs after each optimiser step's update, but at the top of the next step (and
    once after the last): ``optimizer_step`` writes the checkpoints, and an EMA updated after it
    would be missing from the checkpoint, so a resumed run would diverge from an uninterrupted
    one. For the consistency target this order is the same math (the update lands before the
    next loss, as in LCM).
    """
    for step in phase.steps():
        if after_step is not None and step.index > 0:
            after_step(phase)
        for m, ids in enumerate(step.micro_batches):
            with phase.accumulate(m):
                out = loss_step(ids, step.window_items)
            phase.backward(out, micro=m)
        phase.optimizer_step(count=len(step.batch))
    if after_step is not None and phase.step > 0:
        after_step(phase)


def _card(
    module: nn.Module, card: DiffusionModelCard, sampling: SamplingDefaults, notes: dict[str, Any]
) -> DiffusionModelCard:
    return card_for(
        module,
        class_names=card.class_names,
        beta_schedule=card.beta_schedule,
        prediction_type=card.prediction_type,
        num_train_timesteps=card.num_train_timesteps,
        sampling=sampling,
        notes={**card.notes, **notes},
    )


def progressive(
    s: Session, cfg: Config, method: ProgressiveMethod, base: DistillStep, log: MetricsLog
) -> list[tuple[int, nn.Module]]:
    """Halve the sampling steps stage by stage; returns (steps, student) per stage."""
    students: list[tuple[int, nn.Module]] = []
    previous: nn.Module = base.teacher
    for i, steps in enumerate(method.stages()):
        name = f"stage-{steps}"
        if (final := finished(s, name)) is not None:
            previous, _ = load_diffusion_model(final)
            students.append((steps, previous))
            continue
        student = copy.deepcopy(previous).requires_grad_(True)
        previous.eval().requires_grad_(False)
        phase = open_phase(
            s,
            name,
            model=student,
            train=cfg.train,
            num_examples=len(base.labels),
            seed=cfg.seed,
            log=log,
            stream=STAGE_STREAM + i,
        )
        ctx = DistillStep(
            phase.model, previous, base.card, base.schedule, base.images, base.labels, base.device
        )
        scale = method.guidance_scale if i == 0 else 1.0  # later teachers have it baked in
        _run_phase(
            phase,
            partial(progressive_loss_step, ctx, method=method, steps=steps, teacher_scale=scale),
        )
        trained = phase.unwrapped().eval()
        card = _card(
            trained,
            base.card,
            SamplingDefaults(sampler="ddim", steps=steps, guidance_scale=1.0),
            {
                "distilled_by": "progressive",
                "student_steps": steps,
                "distilled_guidance_scale": method.guidance_scale,
            },
        )
        phase.finish(export=partial(save_diffusion_model, module=trained, card=card))
        students.append((steps, trained))
        previous = trained
    if s.accelerator.is_main_process:  # the last stage is the run's student
        last = s.run_dir / f"stage-{students[-1][0]}" / "final"
        shutil.copytree(last, s.run_dir / "student" / "final", dirs_exist_ok=True)
    return students


def guided_student(
    s: Session,
    cfg: Config,
    method: GuidanceMethod | ConsistencyMethod,
    base: DistillStep,
    log: MetricsLog,
    track: Callable[[nn.Module], dict[str, float]] | None,
) -> nn.Module:
    """Guidance or consistency distillation into a guidance-conditioned copy of the teacher."""
    if (final := finished(s, "student")) is not None:
        return load_diffusion_model(final)[0]
    student = GuidanceConditionedUNet.from_teacher(base.teacher).requires_grad_(True)
    target = None
    if isinstance(method, ConsistencyMethod):
        # the EMA target rides along as `extra` so checkpoints hold it (no gradients: never stepped)
        target = copy.deepcopy(student).requires_grad_(False)
    phase = open_phase(
        s,
        "student",
        model=student,
        extra=target,
        train=cfg.train,
        num_examples=len(base.labels),
        seed=cfg.seed,
        log=log,
    )
    ctx = DistillStep(
        phase.model,
        base.teacher,
        base.card,
        base.schedule,
        base.images,
        base.labels,
        base.device,
        target,
    )

    def after(p: Phase) -> None:
        if target is not None and isinstance(method, ConsistencyMethod):
            ema_update(target, p.unwrapped(), method.ema_decay)
        every = cfg.eval.track_every
        if track is not None and every is not None and (p.step % every == 0 or p.step == p.total):
            p.log_values(track(p.unwrapped()))

    if isinstance(method, GuidanceMethod):
        _run_phase(phase, lambda ids, w: guidance_loss_step(ctx, ids, w, method=method), after)
        sampling = SamplingDefaults(
            sampler="ddim", steps=16, guidance_scale=cfg.eval.guidance_scale
        )
    else:
        _run_phase(phase, lambda ids, w: consistency_loss_step(ctx, ids, w, method=method), after)
        sampling = SamplingDefaults(
            sampler="lcm", steps=2, guidance_scale=cfg.eval.guidance_scale, consistency=True
        )
    trained = phase.unwrapped().eval()
    card = _card(trained, base.card, sampling, {"distilled_by": method.kind})
    phase.finish(export=lambda folder: save_diffusion_model(folder, trained, card))
    return trained


def recorded_trajectories(
    s: Session, method: AdapterGuidanceMethod, base: DistillStep, seed: int
) -> Trajectories:
    """Record the teacher's guided trajectories once per run folder (the main process writes
    them; a resumed run and every process read the same file)."""
    from safetensors.torch import load_file, save_file

    path = s.run_dir / TRAJECTORIES_FILE
    acc = s.accelerator
    if acc.is_main_process and not path.is_file():
        generator = torch.Generator().manual_seed(seed)
        low, high = method.guidance_range
        scales = low + (high - low) * torch.rand(method.trajectories, generator=generator)
        rows = record_guided_trajectories(
            unet_denoiser(base.teacher),
            method.trajectory_sampler,
            labels=balanced_labels(method.trajectories, base.card.num_classes),
            guidance_scales=scales,
            image_shape=tuple(base.images.shape[1:]),  # type: ignore[arg-type]
            schedule=base.schedule,
            prediction_type=base.card.prediction_type,
            null_class=base.card.null_class,
            seed=seed,
        )
        tmp = path.with_suffix(".tmp")
        save_file(
            {
                k: getattr(rows, k).contiguous()
                for k in ("inputs", "timesteps", "labels", "guidance_scales", "outputs")
            },
            str(tmp),
        )
        tmp.replace(path)
    acc.wait_for_everyone()
    saved = load_file(str(path))
    return Trajectories(
        saved["inputs"],
        saved["timesteps"],
        saved["labels"],
        saved["guidance_scales"],
        saved["outputs"],
    )


def adapter_student(
    s: Session, cfg: Config, method: AdapterGuidanceMethod, base: DistillStep, log: MetricsLog
) -> nn.Module:
    """AGD: adapters on a frozen copy of the teacher, trained on recorded guided trajectories."""
    if (final := finished(s, "student")) is not None:
        return load_diffusion_model(final)[0]
    rows = recorded_trajectories(s, method, base, cfg.seed)
    student = AdapterGuidedUNet(copy.deepcopy(base.teacher), hidden_dim=method.hidden_dim)
    phase = open_phase(
        s,
        "student",
        model=student,
        train=cfg.train,
        num_examples=len(rows),
        seed=cfg.seed,
        log=log,
    )
    ctx = DistillStep(
        phase.model,
        base.teacher,
        base.card,
        base.schedule,
        base.images,
        base.labels,
        base.device,
        trajectories=rows,
    )
    _run_phase(phase, lambda ids, w: adapter_loss_step(ctx, ids, w))
    trained = phase.unwrapped().eval()
    card = _card(
        trained,
        base.card,
        SamplingDefaults(sampler="ddim", steps=16, guidance_scale=cfg.eval.guidance_scale),
        {"distilled_by": "adapter_guidance", "trajectory_rows": len(rows)},
    )
    phase.finish(export=lambda folder: save_diffusion_model(folder, trained, card))
    return trained


# --- the run -------------------------------------------------------------------------------------


def default_student_steps(method: Any) -> list[int]:
    if isinstance(method, ProgressiveMethod):
        return method.stages()
    if isinstance(method, ConsistencyMethod):
        return [1, 2, 4]
    return [8, 16]


def main(cfg: Config, s: Session) -> dict[str, Any]:
    """Distil the teacher with the configured method, then score students and teacher."""
    acc = s.accelerator
    torch.manual_seed(cfg.seed)
    teacher_path = Path(cfg.teacher.path)
    teacher, card = load_diffusion_model(teacher_path)
    if card.kind is not ModelKind.UNET:
        raise DistilError(
            f"teacher.path={cfg.teacher.path} holds a {card.kind.value}; the teacher must be a "
            "class-conditional UNet (a diffusion_train run)"
        )
    teacher.to(acc.device).requires_grad_(False)
    size = int(card.unet_config["sample_size"])
    if size != cfg.data.image_size:
        raise DistilError(f"the teacher makes {size}x{size} images; set data.image_size={size}")
    d = cfg.data
    data = load_diffusion_images(
        d.dataset,
        image_size=d.image_size,
        seed=cfg.seed,
        train_limit=d.train_limit,
        test_limit=d.test_limit,
    )
    if data.num_classes != card.num_classes:
        raise DistilError(
            f"the teacher has {card.num_classes} classes, data.dataset={d.dataset.value} {data.num_classes}"
        )
    schedule = make_noise_schedule(card.beta_schedule, card.num_train_timesteps)
    classifier_path = (
        Path(cfg.classifier)
        if cfg.classifier
        else find_model_folder(teacher_path).parent.parent / "classifier" / "final"
    )
    classifier, info = load_feature_classifier(classifier_path)  # checked before training starts
    method = cfg.method
    s.announce(
        f"diffusion_distill ({method.kind}) of {find_model_folder(teacher_path) / CARD_FILE} "
        f"({parameter_count(teacher):,} parameters, {card.prediction_type.value}, {card.beta_schedule.value}) "
        f"on {data.name} ({len(data.train_labels)} train images at {size}x{size}); {method.model_dump()}; "
        f"metric classifier {classifier_path} ({info.test_accuracy:.4f}); {acc.num_processes} process(es) on {acc.device}"
    )
    log = MetricsLog(s.run_dir / "metrics.jsonl", acc, acc.is_main_process)
    base = DistillStep(
        teacher, teacher, card, schedule, data.train_images, data.train_labels, acc.device
    )
    reference = (
        classifier_features(classifier, to_unit_range(data.test_images))
        if cfg.eval.track_every
        else None
    )

    def track(student: nn.Module) -> dict[str, float]:
        assert reference is not None
        score = score_sampler(
            "student",
            student,
            ModelKind.GUIDED_UNET,
            SamplerSpec(kind=SamplerKind.LCM, steps=2, guidance_scale=cfg.eval.guidance_scale),
            schedule=schedule,
            prediction_type=card.prediction_type,
            null_class=card.null_class,
            num_classes=card.num_classes,
            image_shape=data.image_shape,
            classifier=classifier,
            reference_features=reference,
            num_images=cfg.eval.track_images,
            seed=cfg.eval.seed,
            kid_subsets=10,
            kid_subset_size=min(cfg.eval.track_images, 500),
        )
        student.train()
        return {
            "track/fd_lcm2": score.quality.frechet_distance,
            "track/fidelity_lcm2": score.quality.class_fidelity,
        }

    scale = cfg.eval.guidance_scale
    steps = cfg.eval.student_steps or default_student_steps(method)
    rows_in: list[tuple[str, nn.Module, ModelKind, SamplerSpec]] = [
        (
            "teacher (reference)",
            teacher,
            ModelKind.UNET,
            cfg.eval.reference.model_copy(update={"guidance_scale": scale}),
        )
    ]
    if isinstance(method, ProgressiveMethod):
        for n, student in progressive(s, cfg, method, base, log):
            if n in steps:  # the guidance is baked into the students: sampled at scale 1
                rows_in.append(
                    (
                        f"PD student ({n} steps)",
                        student,
                        ModelKind.UNET,
                        SamplerSpec(kind=SamplerKind.DDIM, steps=n),
                    )
                )
    elif isinstance(method, AdapterGuidanceMethod):
        student = adapter_student(s, cfg, method, base, log)
        rows_in += [
            (
                "AGD student",
                student,
                ModelKind.ADAPTER_UNET,
                SamplerSpec(kind=SamplerKind.DDIM, steps=n, guidance_scale=scale),
            )
            for n in steps
        ]
    else:
        student = guided_student(s, cfg, method, base, log, track if cfg.eval.track_every else None)
        kind = SamplerKind.LCM if isinstance(method, ConsistencyMethod) else SamplerKind.DDIM
        label = "CD student" if isinstance(method, ConsistencyMethod) else "GD student"
        rows_in += [
            (
                label,
                student,
                ModelKind.GUIDED_UNET,
                SamplerSpec(kind=kind, steps=n, guidance_scale=scale),
            )
            for n in steps
        ]
    if cfg.eval.compare_teacher:
        teacher_scale = method.guidance_scale if isinstance(method, ProgressiveMethod) else scale
        rows_in += [
            (
                "teacher",
                teacher,
                ModelKind.UNET,
                SamplerSpec(kind=SamplerKind.DDIM, steps=n, guidance_scale=teacher_scale),
            )
            for n in steps
        ]
    if not acc.is_main_process:
        return {}
    rows, figures, floor = sample_report(
        s,
        cfg.eval,
        rows_in,
        data=data,
        schedule=schedule,
        prediction_type=card.prediction_type,
        classifier=classifier,
    )
    ref_fd = rows[0]["frechet_distance"]
    for row in rows:
        row["fd_vs_reference"] = row["frechet_distance"] / ref_fd if ref_fd > 0 else None
    report: dict[str, Any] = {
        "title": f"diffusion_distill ({method.kind}): {data.name} at {size}x{size}",
        "recipe": "diffusion_distill",
        "table": {
            "columns": [
                {"key": k, "label": lbl}
                for k, lbl in [*SAMPLE_COLUMNS, ("fd_vs_reference", "FD / reference")]
            ],
            "rows": [*rows, floor],
        },
        "highlights": {
            "reference": f"teacher, {rows[0]['label']} at guidance {scale:g}: FD {ref_fd:.4g}",
            "images per row": cfg.eval.num_images,
        },
        "figures": figures,
        "details": {
            "method": method.model_dump(),
            "seed": cfg.seed,
            "classifier": info.__dict__,
            "class_names": data.class_names,
        },
    }
    write_report(s.run_dir, report)
    print_report(report, s.console)
    return report
