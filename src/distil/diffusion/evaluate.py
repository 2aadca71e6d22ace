"""Score samplers of a diffusion model with the offline metric, and draw distance against NFE.

One function, :func:`score_sampler`, is what the recipes' reports and ``bench/diffusion.py``
use for every row: generate ``num_images`` class-balanced images from fixed noise, time them,
count network evaluations, and compute FD / KID / class fidelity / class entropy against the
same real reference features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distil.diffusion.data import to_unit_range
from distil.diffusion.grids import save_image_grid
from distil.diffusion.metrics import SampleQuality, evaluate_samples
from distil.diffusion.model import ModelKind
from distil.diffusion.sampling import SamplerSpec, generate_images, sampling_denoiser
from distil.diffusion.schedule import NoiseSchedule, PredictionType
from distil.models.classifier import SmallCNN

__all__ = ["SamplerScore", "balanced_labels", "distance_vs_nfe_png", "score_sampler"]


@dataclass(frozen=True)
class SamplerScore:
    """One row of a sample-quality table."""

    model: str
    sampler: str
    steps: int
    guidance_scale: float
    nfe_per_image: float
    seconds_per_image: float
    cpu_seconds_per_image: float
    quality: SampleQuality

    def row(self) -> dict[str, Any]:
        """A flat dict for report tables and JSON lines."""
        flat = {k: v for k, v in asdict(self).items() if k != "quality"}
        return {**flat, **asdict(self.quality)}


def balanced_labels(num_images: int, num_classes: int) -> Tensor:
    """``(num_images,)`` class ids cycling 0..C−1 (as even as the count allows)."""
    return torch.arange(num_images) % num_classes


def score_sampler(
    model_name: str,
    module: nn.Module,
    kind: ModelKind,
    spec: SamplerSpec,
    *,
    schedule: NoiseSchedule,
    prediction_type: PredictionType | str,
    null_class: int,
    num_classes: int,
    image_shape: tuple[int, int, int],
    classifier: SmallCNN,
    reference_features: Tensor,
    num_images: int,
    seed: int = 0,
    batch_size: int = 500,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    grid: Path | None = None,
    grid_per_class: int = 8,
) -> SamplerScore:
    """Generate and score ``num_images`` images of ``module`` with ``spec``.

    Args:
        model_name: the row's name (``teacher``, ``PD student (4 steps)``...).
        module: a UNet, guided UNet or adapter UNet (see :func:`sampling_denoiser`).
        kind: which of those.
        spec: sampler, steps, guidance scale.
        schedule, prediction_type, null_class: the model's.
        num_classes: classes to cycle through.
        image_shape: ``(C, H, W)``.
        classifier: the metric's feature classifier.
        reference_features: real images' features (the test set).
        num_images: images to generate (≥ 2000 for distances that mean something).
        seed: initial noise (the same for every row: paired comparisons).
        batch_size: images per sampling batch.
        kid_subsets, kid_subset_size: KID settings.
        grid: also write a PNG grid here (``grid_per_class`` images per class, row = class).
    """
    module.eval()
    denoiser, counter = sampling_denoiser(
        module, kind, guidance_scale=spec.guidance_scale, null_class=null_class
    )
    labels = balanced_labels(num_images, num_classes)
    generated = generate_images(
        denoiser,
        spec,
        labels=labels,
        image_shape=image_shape,
        schedule=schedule,
        prediction_type=prediction_type,
        seed=seed,
        batch_size=batch_size,
        counter=counter,
    )
    images01 = to_unit_range(generated.images)
    quality = evaluate_samples(
        classifier,
        images01,
        labels,
        reference_features,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
    )
    if grid is not None and grid_per_class > 0:
        picks = torch.cat(
            [torch.nonzero(labels == c).flatten()[:grid_per_class] for c in range(num_classes)]
        )
        save_image_grid(images01[picks], grid, grid_per_class, zoom=4)
    return SamplerScore(
        model=model_name,
        sampler=spec.kind.value,
        steps=spec.steps,
        guidance_scale=spec.guidance_scale,
        nfe_per_image=generated.nfe_per_image,
        seconds_per_image=generated.seconds_per_image,
        cpu_seconds_per_image=generated.cpu_seconds_per_image,
        quality=quality,
    )


def distance_vs_nfe_png(
    rows: Sequence[dict[str, Any]],
    *,
    floor: float | None = None,
    metric: str = "frechet_distance",
    title: str = "Fréchet distance vs network evaluations per image",
) -> bytes:
    """A log-x plot of ``metric`` against NFE, one line per ``model`` (points joined in NFE
    order), with the real-vs-real floor as a dashed line."""
    from distil.evaluation.plots import color_for, new_figure, to_png

    fig = new_figure(7.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    groups: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        groups.setdefault(str(row["model"]), []).append(
            (float(row["nfe_per_image"]), float(row[metric]))
        )
    used: dict[str, int] = {}  # lines sharing a colour (every "teacher ..." line) get their own
    for i, (name, points) in enumerate(groups.items()):  # marker and dash pattern
        points.sort()
        xs, ys = zip(*points, strict=True)
        color = color_for(name, i)
        k = used[color] = used.get(color, -1) + 1
        ax.plot(
            xs,
            ys,
            marker="osD^vP"[k % 6],
            linestyle=("-", "--", "-.", ":")[k % 4],
            linewidth=1.4,
            markersize=4,
            label=name,
            color=color,
        )
    if floor is not None:
        ax.axhline(floor, linestyle="--", color="#888888", linewidth=1, label="real vs real")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations per image (CFG counts two)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3, linewidth=0.6, which="both")
    ax.legend(fontsize=7, loc="best")
    return to_png(fig)
