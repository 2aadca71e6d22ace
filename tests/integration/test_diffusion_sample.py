"""``distil sample`` end to end on a tiny diffusion model folder made in code: one grid per
sampler and step count, NFE in grids.json, guided students, refused options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from distil.diffusion.model import (
    GuidanceConditionedUNet,
    SamplingDefaults,
    card_for,
    save_diffusion_model,
)
from distil.diffusion.schedule import BetaSchedule, PredictionType
from tests.helpers import run_cli, tiny_diffusion_unet


def _save(folder: Path, module: object, steps: int = 3) -> Path:
    card = card_for(
        module,  # type: ignore[arg-type]
        class_names=["a", "b", "c"],
        beta_schedule=BetaSchedule.SCALED_LINEAR,
        prediction_type=PredictionType.V_PREDICTION,
        sampling=SamplingDefaults(sampler="ddim", steps=steps, guidance_scale=2.0),
    )
    return save_diffusion_model(folder, module, card)  # type: ignore[arg-type]


def test_sample_writes_a_grid_per_sampler_and_step_count(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _save(run / "final", tiny_diffusion_unet())
    code, out = run_cli(
        [
            "sample",
            str(run),
            "--sampler",
            "ddim",
            "--sampler",
            "truncated_karras",
            "--steps",
            "4",
            "--steps",
            "8",
            "--per-class",
            "2",
            "--zoom",
            "2",
        ]
    )
    assert code == 0, out
    index = json.loads((run / "final" / "samples" / "grids.json").read_text())
    names = [g["path"] for g in index["grids"]]
    assert names == [
        "ddim-4-g2.png",
        "ddim-8-g2.png",
        "truncated_karras-4-g2.png",
        "truncated_karras-8-g2.png",
    ]
    assert [g["nfe_per_image"] for g in index["grids"]] == [8, 16, 8, 16]  # CFG: two rows a step
    with Image.open(run / "final" / "samples" / "ddim-4-g2.png") as png:
        # 3 classes x 2 columns of 8x8 images at zoom 2 with 1-pixel borders
        assert png.size == (2 * 17 + 1, 3 * 17 + 1)


def test_sample_defaults_and_guided_student(tmp_path: Path) -> None:
    folder = _save(
        tmp_path / "student", GuidanceConditionedUNet.from_teacher(tiny_diffusion_unet()), steps=2
    )
    code, out = run_cli(
        ["sample", str(folder), "--per-class", "1", "--out", str(tmp_path / "grids")]
    )
    assert code == 0, out
    grid = json.loads((tmp_path / "grids" / "grids.json").read_text())["grids"]
    assert [(g["path"], g["nfe_per_image"]) for g in grid] == [("ddim-2-g2.png", 2)]  # one pass


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sampler", "truncated_karras", "--steps", "7"], "pinned"),
        (["--sampler", "ddpm"], "bad sampling option"),
        (["--steps", "0"], "bad sampling option"),
    ],
)
def test_sample_refuses_bad_options(tmp_path: Path, args: list[str], message: str) -> None:
    folder = _save(tmp_path / "m", tiny_diffusion_unet())
    code, out = run_cli(["sample", str(folder), "--per-class", "1", *args])
    assert code == 2 and message in " ".join(out.split()), out


def test_sample_names_a_missing_model(tmp_path: Path) -> None:
    code, out = run_cli(["sample", str(tmp_path)])
    assert code == 2 and "diffusion.json" in out
