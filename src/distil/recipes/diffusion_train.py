"""Recipe ``diffusion_train``: train a class-conditional pixel-space diffusion model, the teacher
of ``diffusion_distill``, and the small classifier whose features the sample metric uses.

Two phases on the shared loop: ``classifier`` (cross-entropy on the same images, skipped when
``classifier.path`` names a trained one) and ``model`` (the DDPM loss in the model's
parameterisation, labels dropped to the null class for classifier-free guidance, an EMA of the
weights exported as the model). The report scores the EMA model with each sampler of
``eval.samplers`` (Fréchet and kernel distances in the classifier's features, class fidelity, NFE
and time per image) next to the real-vs-real floor, with a PNG grid per sampler.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from distil.config.base import StrictModel
from distil.config.sections import RunSection, SchedulerName, TrainSection, require_unsharded
from distil.diffusion.config import DiffusionDataSection, ProcessSection, SampleEvalSection
from distil.diffusion.data import DiffusionImages, load_diffusion_images, to_unit_range
from distil.diffusion.evaluate import distance_vs_nfe_png, score_sampler
from distil.diffusion.losses import DiffusionLoss, denoising_loss
from distil.diffusion.metrics import (
    FeatureClassifierInfo,
    build_feature_classifier,
    class_fidelity,
    classifier_features,
    load_feature_classifier,
    real_floor,
    save_feature_classifier,
)
from distil.diffusion.model import (
    ModelKind,
    SamplingDefaults,
    UNetSpec,
    build_unet,
    card_for,
    ema_update,
    load_diffusion_model,
    parameter_count,
    save_diffusion_model,
    unet_denoiser,
)
from distil.diffusion.sampling import SamplerKind, SamplerSpec
from distil.diffusion.schedule import NoiseSchedule, make_noise_schedule
from distil.errors import DistilError
from distil.evaluation.report import print_report, write_report
from distil.losses.objective import ObjectiveOutput, classifier_objective
from distil.models.classifier import SmallCNN
from distil.training.loop import finished, open_phase
from distil.training.metrics import MetricsLog
from distil.training.session import Session

logger = logging.getLogger(__name__)

CLASSIFIER_STREAM = 5  # the classifier phase's random stream (the model phase uses "model")


class EMASection(StrictModel):
    """Exponential moving average of the weights, exported as the model. The decay at step t is
    ``min(decay, (1 + t)/(10 + t))`` (diffusers' EMA warm-up), so early averages forget the
    random initialisation quickly."""

    decay: float = Field(default=0.999, ge=0.0, lt=1.0, description="0 exports the raw weights")


class ClassifierSection(StrictModel):
    """The metric's feature classifier (``docs/diffusion.md``, Metric)."""

    path: str | None = Field(
        default=None, description="a trained classifier folder (classifier.json); else trained here"
    )
    channels: tuple[int, ...] = (32, 64, 128)
    training: TrainSection = TrainSection(
        epochs=4,
        batch_size=128,
        lr=2e-3,
        scheduler=SchedulerName.cosine,
        checkpoint_every=500,
    )


class Config(StrictModel):
    recipe: Literal["diffusion_train"] = "diffusion_train"
    seed: int = 0
    run: RunSection = RunSection(name="diffusion-teacher", cpu_threads=1)
    data: DiffusionDataSection = DiffusionDataSection()
    model: UNetSpec = UNetSpec()
    diffusion: ProcessSection = ProcessSection()
    ema: EMASection = EMASection()
    train: TrainSection = TrainSection(
        epochs=100,
        max_steps=4000,
        batch_size=128,
        lr=5e-4,
        scheduler=SchedulerName.constant,
        warmup_steps=200,
        max_grad_norm=1.0,
        checkpoint_every=500,
    )
    classifier: ClassifierSection = ClassifierSection()
    eval: SampleEvalSection = SampleEvalSection(
        samplers=[
            SamplerSpec(kind=SamplerKind.DDIM, steps=64),
            SamplerSpec(kind=SamplerKind.DDIM, steps=8),
            SamplerSpec(kind=SamplerKind.DPMPP_2M, steps=8),
            SamplerSpec(kind=SamplerKind.TRUNCATED_KARRAS, steps=8),
        ]
    )
    sampling: SamplingDefaults = SamplingDefaults(sampler="ddim", steps=64, guidance_scale=1.0)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        require_unsharded(self.train, "train", "diffusion_train")
        if self.model.image_size != self.data.image_size:
            raise ValueError(
                f"model.image_size={self.model.image_size} differs from data.image_size="
                f"{self.data.image_size}; set both to the same size"
            )
        return self


@dataclass(frozen=True)
class DenoiseStep:
    """What one micro-batch of the model phase needs besides its example ids."""

    model: nn.Module  # the UNet's forward (DDP-wrapped when several processes)
    images: Tensor  # (N, C, S, S) in [-1, 1]
    labels: Tensor  # (N,)
    schedule: NoiseSchedule
    process: ProcessSection
    null_class: int
    device: torch.device


def step_generator(device: torch.device) -> torch.Generator:
    """A generator seeded from the global RNG, which the loop seeds per step (so a resumed run
    draws the same timesteps and noise)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    return generator


def denoise_loss_step(ctx: DenoiseStep, ids: Tensor, window_items: float) -> DiffusionLoss:
    """One micro-batch of the DDPM loss (:func:`~distil.diffusion.losses.denoising_loss`), scaled
    so the micro-batches of a window sum to the window's mean."""
    images, labels = ctx.images[ids].to(ctx.device), ctx.labels[ids].to(ctx.device)
    out = denoising_loss(
        unet_denoiser(ctx.model),
        images,
        labels,
        schedule=ctx.schedule,
        prediction_type=ctx.process.prediction_type,
        null_class=ctx.null_class,
        label_dropout=ctx.process.label_dropout,
        generator=step_generator(ctx.device),
    )
    return out.scaled(len(ids) / window_items)


def ema_decay_at(step: int, decay: float) -> float:
    """The EMA decay after ``step`` optimiser steps (see :class:`EMASection`)."""
    return min(decay, (1.0 + step) / (10.0 + step))


def train_model(
    s: Session, cfg: Config, data: DiffusionImages, schedule: NoiseSchedule, log: MetricsLog
) -> nn.Module:
    """Train the UNet (phase ``model``); return the EMA weights (or the finished model)."""
    if (final := finished(s, "model")) is not None:
        module, _ = load_diffusion_model(final)
        return module
    acc = s.accelerator
    unet = build_unet(cfg.model, data.num_classes, seed=cfg.seed)
    ema = build_unet(cfg.model, data.num_classes, seed=cfg.seed).requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    # The EMA rides along as the phase's `extra` so checkpoints hold it and a resume restores it;
    # without gradients the optimiser never moves it and clipping skips it.
    phase = open_phase(
        s,
        "model",
        model=unet,
        extra=ema,
        train=cfg.train,
        num_examples=len(data.train_labels),
        seed=cfg.seed,
        log=log,
    )
    ctx = DenoiseStep(
        phase.model,
        data.train_images,
        data.train_labels,
        schedule,
        cfg.diffusion,
        data.num_classes,
        acc.device,
    )
    for step in phase.steps():
        if step.index > 0:  # the EMA takes the previous step's weights: see below
            ema_update(ema, phase.unwrapped(), ema_decay_at(step.index, cfg.ema.decay))
        for m, ids in enumerate(step.micro_batches):
            with phase.accumulate(m):
                out = denoise_loss_step(ctx, ids, step.window_items)
            phase.backward(out, micro=m)
        phase.optimizer_step(count=len(step.batch))
    # optimizer_step saves checkpoints, so an EMA update right after it would be missing from the
    # checkpoint it just wrote; taken at the top of the next step instead (and once here for the
    # last), a resumed run repeats the uninterrupted one bit for bit (tested)
    ema_update(ema, phase.unwrapped(), ema_decay_at(phase.step, cfg.ema.decay))
    exported = ema if cfg.ema.decay > 0 else phase.unwrapped()
    card = card_for(
        exported,
        class_names=data.class_names,
        beta_schedule=cfg.diffusion.beta_schedule,
        prediction_type=cfg.diffusion.prediction_type,
        num_train_timesteps=cfg.diffusion.num_train_timesteps,
        sampling=cfg.sampling,
        notes={"trained_by": "diffusion_train", "steps": phase.total, "ema_decay": cfg.ema.decay},
    )
    phase.finish(export=lambda folder: save_diffusion_model(folder, exported, card))
    return exported.eval()


@dataclass(frozen=True)
class ClassifyStep:
    model: nn.Module
    images01: Tensor
    labels: Tensor
    device: torch.device


def classifier_loss_step(ctx: ClassifyStep, ids: Tensor, window_items: float) -> ObjectiveOutput:
    """One micro-batch of cross-entropy for the metric's classifier."""
    logits = ctx.model(ctx.images01[ids].to(ctx.device)).float()
    labels = ctx.labels[ids].to(ctx.device)
    return classifier_objective(
        logits, None, labels, kd_weight=0.0, kd_temperature=1.0, num_items=window_items
    )


def metric_classifier(
    s: Session, cfg: Config, data: DiffusionImages, log: MetricsLog
) -> tuple[SmallCNN, FeatureClassifierInfo]:
    """The metric's classifier: loaded from ``classifier.path``, else trained (phase
    ``classifier``) and exported to ``classifier/final``."""
    if cfg.classifier.path is not None:
        model, info = load_feature_classifier(Path(cfg.classifier.path))
        if info.image_size != data.image_shape[-1] or info.num_classes != data.num_classes:
            raise DistilError(
                f"classifier.path={cfg.classifier.path} reads {info.image_size}px images of "
                f"{info.num_classes} classes; the data has {data.image_shape[-1]}px and "
                f"{data.num_classes}"
            )
        return model, info
    if (final := finished(s, "classifier")) is not None:
        return load_feature_classifier(final)
    info = FeatureClassifierInfo(
        channels=tuple(cfg.classifier.channels),
        in_channels=data.image_shape[0],
        num_classes=data.num_classes,
        image_size=data.image_shape[-1],
        dataset=data.name,
        test_accuracy=float("nan"),
        epochs=cfg.classifier.training.epochs,
        seed=cfg.seed,
    )
    model = build_feature_classifier(info, seed=cfg.seed)
    phase = open_phase(
        s,
        "classifier",
        model=model,
        train=cfg.classifier.training,
        num_examples=len(data.train_labels),
        seed=cfg.seed,
        log=log,
        stream=CLASSIFIER_STREAM,
        config_key="classifier.training",
    )
    ctx = ClassifyStep(
        phase.model, to_unit_range(data.train_images), data.train_labels, s.accelerator.device
    )
    for step in phase.steps():
        for m, ids in enumerate(step.micro_batches):
            with phase.accumulate(m):
                out = classifier_loss_step(ctx, ids, step.window_items)
            phase.backward(out, micro=m)
        phase.optimizer_step(count=len(step.batch))
    trained: Any = phase.unwrapped()
    accuracy = class_fidelity(trained, to_unit_range(data.test_images), data.test_labels)
    info = FeatureClassifierInfo(**{**info.__dict__, "test_accuracy": accuracy})
    phase.finish(
        export=lambda folder: save_feature_classifier(folder, trained, info),
        summary={"test_accuracy": accuracy},
    )
    return trained.eval(), info


def sample_report(
    s: Session,
    cfg_eval: SampleEvalSection,
    rows_in: list[tuple[str, nn.Module, ModelKind, SamplerSpec]],
    *,
    data: DiffusionImages,
    schedule: NoiseSchedule,
    prediction_type: Any,
    classifier: SmallCNN,
) -> tuple[list[dict[str, Any]], list[dict[str, str]], dict[str, Any]]:
    """Score each (name, module, kind, spec) row and the real floor; write grids and the
    distance-vs-NFE plot into ``samples/``. Returns table rows, figures and the floor row."""
    reference = classifier_features(classifier, to_unit_range(data.test_images))
    floor = real_floor(
        classifier,
        to_unit_range(data.train_images),
        data.train_labels,
        min(cfg_eval.num_images, len(data.train_labels)),
        reference_features=reference,
        kid_subsets=cfg_eval.kid_subsets,
        kid_subset_size=cfg_eval.kid_subset_size,
    )
    floor_row = {"model": "real images (floor)", "sampler": "-", **floor.__dict__}
    rows, figures = [], []
    for name, module, kind, spec in rows_in:
        grid = (
            s.run_dir
            / "samples"
            / f"{name.split(' ')[0]}-{spec.label}-g{spec.guidance_scale:g}.png"
        )
        score = score_sampler(
            name,
            module,
            kind,
            spec,
            schedule=schedule,
            prediction_type=prediction_type,
            null_class=data.num_classes,
            num_classes=data.num_classes,
            image_shape=data.image_shape,
            classifier=classifier,
            reference_features=reference,
            num_images=cfg_eval.num_images,
            seed=cfg_eval.seed,
            batch_size=cfg_eval.batch_size,
            kid_subsets=cfg_eval.kid_subsets,
            kid_subset_size=cfg_eval.kid_subset_size,
            grid=grid,
            grid_per_class=cfg_eval.grid_per_class,
        )
        rows.append({**score.row(), "label": spec.label})
        if cfg_eval.grid_per_class > 0:
            figures.append(
                {
                    "title": f"{name}, {spec.label}, guidance {spec.guidance_scale:g}",
                    "file": str(grid.relative_to(s.run_dir)),
                }
            )
    if rows:
        plot = s.run_dir / "samples" / "distance_vs_nfe.png"
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot.write_bytes(distance_vs_nfe_png(rows, floor=floor.frechet_distance))
        figures.insert(
            0, {"title": "Fréchet distance vs NFE", "file": "samples/distance_vs_nfe.png"}
        )
    return rows, figures, floor_row


SAMPLE_COLUMNS = [
    ("model", "model"),
    ("label", "sampler"),
    ("guidance_scale", "guidance"),
    ("nfe_per_image", "NFE/image"),
    ("frechet_distance", "FD"),
    ("kernel_distance", "KID"),
    ("class_fidelity", "class fidelity"),
    ("marginal_entropy", "class entropy"),
    ("seconds_per_image", "s/image"),
]


def main(cfg: Config, s: Session) -> dict[str, Any]:
    """Train the classifier and the model, score the samplers, write the report."""
    acc = s.accelerator
    torch.manual_seed(cfg.seed)
    d = cfg.data
    data = load_diffusion_images(
        d.dataset,
        image_size=d.image_size,
        seed=cfg.seed,
        train_limit=d.train_limit,
        test_limit=d.test_limit,
    )
    schedule = make_noise_schedule(cfg.diffusion.beta_schedule, cfg.diffusion.num_train_timesteps)
    params = parameter_count(build_unet(cfg.model, data.num_classes, seed=cfg.seed))
    s.announce(
        f"diffusion_train on {data.name} ({len(data.train_labels)} train / {len(data.test_labels)} "
        f"test images at {d.image_size}x{d.image_size}, {data.num_classes} classes + null class): "
        f"UNet {list(cfg.model.block_out_channels)} ({params:,} parameters), "
        f"{cfg.diffusion.prediction_type.value} on the {cfg.diffusion.beta_schedule.value} schedule, "
        f"label dropout {cfg.diffusion.label_dropout:g}, EMA {cfg.ema.decay:g}; metric classifier "
        f"{cfg.classifier.path or 'trained here'}; {acc.num_processes} process(es) on {acc.device}"
    )
    log = MetricsLog(s.run_dir / "metrics.jsonl", acc, acc.is_main_process)
    classifier, info = metric_classifier(s, cfg, data, log)
    model = train_model(s, cfg, data, schedule, log)
    if not acc.is_main_process:
        return {}
    rows_in = [("teacher", model, ModelKind.UNET, spec) for spec in cfg.eval.samplers]
    rows, figures, floor = sample_report(
        s,
        cfg.eval,
        rows_in,
        data=data,
        schedule=schedule,
        prediction_type=cfg.diffusion.prediction_type,
        classifier=classifier,
    )
    report: dict[str, Any] = {
        "title": f"diffusion_train: {data.name} at {d.image_size}x{d.image_size}",
        "recipe": "diffusion_train",
        "table": {
            "columns": [{"key": k, "label": lbl} for k, lbl in SAMPLE_COLUMNS],
            "rows": [*rows, floor],
        },
        "highlights": {
            "model": f"{params:,} parameters, exported to model/final (EMA {cfg.ema.decay:g})",
            "metric classifier": f"{info.test_accuracy:.4f} test accuracy ({cfg.classifier.path or 'classifier/final'})",
            "images per row": cfg.eval.num_images,
        },
        "figures": figures,
        "details": {
            "seed": cfg.seed,
            "class_names": data.class_names,
            "classifier": info.__dict__,
            "processes": acc.num_processes,
        },
    }
    write_report(s.run_dir, report)
    print_report(report, s.console)
    return report
