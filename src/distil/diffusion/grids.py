"""Image grids of samples: one PNG per sampler and step count, one row per class (what
``distil sample`` writes and the diffusion report embeds)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distil.diffusion.data import to_unit_range
from distil.diffusion.model import load_diffusion_model
from distil.diffusion.sampling import SamplerSpec, generate_images, sampling_denoiser
from distil.diffusion.schedule import make_noise_schedule

__all__ = ["GridRecord", "image_grid", "save_image_grid", "write_sample_grids"]

logger = logging.getLogger(__name__)


def image_grid(images01: Tensor, columns: int, *, padding: int = 1, zoom: int = 1) -> np.ndarray:
    """Tile images into one uint8 array.

    Args:
        images01: ``(N, C, H, W)`` in [0, 1], C = 1 or 3; filled row by row.
        columns: images per row.
        padding: pixels of white between tiles.
        zoom: integer nearest-neighbour upscaling (16x16 images are hard to see at 1x).

    Returns:
        ``(rows·(H·zoom + padding) + padding, columns·(W·zoom + padding) + padding[, 3])`` uint8.
    """
    n, channels, height, width = images01.shape
    if zoom > 1:
        images01 = images01.repeat_interleave(zoom, dim=2).repeat_interleave(zoom, dim=3)
        height, width = height * zoom, width * zoom
    rows = -(-n // columns)
    canvas = torch.ones(
        channels, rows * (height + padding) + padding, columns * (width + padding) + padding
    )
    for i in range(n):
        top = padding + (i // columns) * (height + padding)
        left = padding + (i % columns) * (width + padding)
        canvas[:, top : top + height, left : left + width] = images01[i].clamp(0.0, 1.0)
    array = (canvas * 255.0).round().to(torch.uint8).numpy()
    return array[0] if channels == 1 else np.transpose(array, (1, 2, 0))


def save_image_grid(images01: Tensor, path: Path, columns: int, *, zoom: int = 1) -> Path:
    """Write :func:`image_grid` as a PNG."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(images01, columns, zoom=zoom)).save(path)
    return path


@dataclass(frozen=True)
class GridRecord:
    """One written grid and what its samples cost."""

    path: str
    sampler: str
    steps: int
    guidance_scale: float
    nfe_per_image: float
    seconds_per_image: float


def write_sample_grids(
    model_path: Path,
    out_dir: Path,
    specs: list[SamplerSpec],
    *,
    per_class: int = 8,
    seed: int = 0,
    zoom: int = 4,
) -> list[GridRecord]:
    """Sample a model folder (or run folder) with each spec and write one grid per spec:
    ``{sampler}-{steps}-g{scale}.png``, row c = class c, ``per_class`` columns, the same
    initial noise for every spec; plus ``grids.json`` listing them.
    """
    module, card = load_diffusion_model(model_path)
    schedule = make_noise_schedule(card.beta_schedule, card.num_train_timesteps)
    labels = torch.arange(card.num_classes).repeat_interleave(per_class)
    channels = int(card.unet_config["in_channels"])
    size = int(card.unet_config["sample_size"])
    records = []
    for spec in specs:
        denoiser, counter = sampling_denoiser(
            module, card.kind, guidance_scale=spec.guidance_scale, null_class=card.null_class
        )
        generated = generate_images(
            denoiser,
            spec,
            labels=labels,
            image_shape=(channels, size, size),
            schedule=schedule,
            prediction_type=card.prediction_type,
            seed=seed,
            counter=counter,
        )
        path = out_dir / f"{spec.label}-g{spec.guidance_scale:g}.png"
        save_image_grid(to_unit_range(generated.images), path, per_class, zoom=zoom)
        records.append(
            GridRecord(
                path=path.name,
                sampler=spec.kind.value,
                steps=spec.steps,
                guidance_scale=spec.guidance_scale,
                nfe_per_image=generated.nfe_per_image,
                seconds_per_image=generated.seconds_per_image,
            )
        )
        logger.info("wrote %s (%.1f NFE/image)", path, generated.nfe_per_image)
    index: dict[str, Any] = {
        "model": str(model_path),
        "class_names": card.class_names,
        "per_class": per_class,
        "seed": seed,
        "grids": [r.__dict__ for r in records],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "grids.json").write_text(json.dumps(index, indent=1))
    return records
