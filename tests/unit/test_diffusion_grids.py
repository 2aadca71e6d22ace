"""Sample grids and the distance-vs-NFE plot."""

from __future__ import annotations

import io

import torch
from PIL import Image

from distil.diffusion.evaluate import balanced_labels, distance_vs_nfe_png
from distil.diffusion.grids import image_grid


def test_grid_tiles_row_by_row_with_white_borders() -> None:
    images = torch.stack([torch.full((1, 2, 2), v) for v in (0.0, 0.25, 0.5, 1.0, 0.75)])
    grid = image_grid(images, columns=2, padding=1, zoom=2)
    assert grid.shape == (3 * 5 + 1, 2 * 5 + 1) and grid.dtype.name == "uint8"
    assert grid[0].tolist() == [255] * 11  # top border
    assert grid[1, 1] == 0 and grid[1, 6] == 64 and grid[6, 1] == 128 and grid[11, 1] == 191
    assert (grid[11:15, 6:10] == 255).all()  # the missing sixth tile stays white
    rgb = image_grid(torch.rand(2, 3, 2, 2), columns=2)
    assert rgb.shape == (4, 7, 3)


def test_distance_plot_is_a_png() -> None:
    rows = [
        {"model": "teacher DDIM", "nfe_per_image": n, "frechet_distance": 10 / n}
        for n in (4, 8, 64)
    ] + [{"model": "PD", "nfe_per_image": 2, "frechet_distance": 3.0}]
    png = distance_vs_nfe_png(rows, floor=0.1)
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.size[0] > 300


def test_balanced_labels() -> None:
    assert balanced_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
