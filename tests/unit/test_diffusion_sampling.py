"""Samplers: grids against diffusers, exact answers on a one-image data distribution, paper #1's
published schedule, guidance and NFE accounting."""

from __future__ import annotations

import pytest
import torch

from distil.diffusion.model import unet_denoiser
from distil.diffusion.sampling import (
    CountingDenoiser,
    EarlyStopOutput,
    SamplerKind,
    SamplerSpec,
    classifier_free_guidance,
    consistency_timesteps,
    ddim_sample,
    ddim_timesteps,
    generate_images,
    make_scheduler,
    record_guided_trajectories,
    scheduler_sample,
    truncated_karras_sample,
    truncated_karras_timesteps,
)
from distil.diffusion.schedule import make_noise_schedule
from distil.errors import DistilError
from tests.helpers import delta_oracle, tiny_diffusion_unet

SD = make_noise_schedule("scaled_linear")


@pytest.mark.parametrize("steps", [1, 2, 4, 7, 64])
def test_ddim_grid_is_diffusers_trailing_grid(steps: int) -> None:
    scheduler = make_scheduler("ddim", SD, "epsilon")
    scheduler.set_timesteps(steps)
    assert ddim_timesteps(steps) == [float(t) for t in scheduler.timesteps]


def test_ddim_grids_nest_for_progressive_distillation() -> None:
    for steps in (1, 2, 4, 8, 16, 32):
        assert ddim_timesteps(2 * steps)[::2] == ddim_timesteps(steps)


def test_own_ddim_equals_diffusers_ddim() -> None:
    unet = tiny_diffusion_unet()
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3])
    kwargs = {
        "noise": noise,
        "class_labels": labels,
        "schedule": SD,
        "prediction_type": "v_prediction",
    }
    ours = ddim_sample(unet_denoiser(unet), timesteps=ddim_timesteps(5), **kwargs)
    theirs = scheduler_sample(unet_denoiser(unet), kind="ddim", num_steps=5, **kwargs)
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("kind", ["ddim", "dpmpp_2m", "euler", "unipc", "lcm"])
def test_schedulers_recover_the_only_image(kind: str, prediction_type: str) -> None:
    target = torch.linspace(-0.9, 0.9, 64).reshape(1, 1, 8, 8)
    oracle = delta_oracle(target, SD, prediction_type)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    out = scheduler_sample(
        oracle,
        kind=kind,
        num_steps=4,
        noise=noise,
        class_labels=torch.zeros(3, dtype=torch.long),
        schedule=SD,
        prediction_type=prediction_type,
        generator=torch.Generator().manual_seed(2),
    )
    assert torch.allclose(out, target.expand_as(out), atol=2e-3)


def test_truncated_karras_reproduces_paper_schedule_for_sd15() -> None:
    """METHODS.md H.9: the schedules paper #1's code gives for SD 1.5 at 5 and 8 steps."""
    five = truncated_karras_timesteps(SD, 5)
    assert five.tolist() == pytest.approx([999, 772.5, 556.7, 354.2, 170.0, 18.3], abs=0.06)
    assert SD.ve_sigma(five).tolist() == pytest.approx(
        [14.61, 4.52, 1.96, 1.00, 0.50, 0.13], abs=0.006
    )
    eight = truncated_karras_timesteps(SD, 8)
    expected = [999, 857.3, 719.4, 585.9, 457.2, 334.3, 218.7, 112.7, 22.7]
    assert eight.tolist() == pytest.approx(expected, abs=0.06)
    assert SD.ve_sigma(eight)[-1].item() == pytest.approx(0.147, abs=5e-4)
    with pytest.raises(DistilError, match="pinned"):
        truncated_karras_timesteps(SD, 7)


@pytest.mark.parametrize("steps", [4, 8])
def test_truncated_karras_early_stop_state_is_exact(steps: int) -> None:
    """For a one-image distribution D(x, σ) = c, so DPM-Solver++ (1S and 2M) contracts
    x − c by σ_{i+1}/σ_i per step: the state at the stop is c + σ_n·ε − (σ_n/σ_0)·c."""
    c = torch.linspace(-0.5, 0.5, 64).reshape(1, 1, 8, 8)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    sigmas = SD.ve_sigma(truncated_karras_timesteps(SD, steps))
    kwargs = {
        "num_steps": steps,
        "noise": noise,
        "class_labels": torch.zeros(2, dtype=torch.long),
        "schedule": SD,
        "prediction_type": "v_prediction",
    }
    state = truncated_karras_sample(delta_oracle(c, SD, "v_prediction"), **kwargs)
    s0, sn = float(sigmas[0]), float(sigmas[-1])
    assert torch.allclose(state, c + sn * noise - (sn / s0) * c, atol=1e-4)
    denoised = truncated_karras_sample(
        delta_oracle(c, SD, "epsilon"),
        **{**kwargs, "prediction_type": "epsilon"},
        output="denoised",
    )
    assert torch.allclose(denoised, c.expand_as(denoised), atol=1e-4)


def test_consistency_grid_is_lcm_scheduler_grid() -> None:
    scheduler = make_scheduler("lcm", SD, "epsilon")
    for steps in (1, 2, 4):
        scheduler.set_timesteps(steps)
        assert consistency_timesteps(steps) == [float(t) for t in scheduler.timesteps]


def test_classifier_free_guidance_combines_two_rows() -> None:
    unet = tiny_diffusion_unet()
    denoiser = unet_denoiser(unet)
    assert classifier_free_guidance(denoiser, 1.0, null_class=3) is denoiser
    x, t, c = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 900.0]), torch.tensor([0, 2])
    with torch.no_grad():
        cond, uncond = denoiser(x, t, c), denoiser(x, t, torch.tensor([3, 3]))
        guided = classifier_free_guidance(denoiser, 2.5, null_class=3)(x, t, c)
        per_row = classifier_free_guidance(denoiser, torch.tensor([1.0, 0.0]), null_class=3)(
            x, t, c
        )
    assert torch.allclose(guided, uncond + 2.5 * (cond - uncond), atol=1e-5)
    assert torch.allclose(per_row[0], cond[0], atol=1e-5)
    assert torch.allclose(per_row[1], uncond[1], atol=1e-5)


@pytest.mark.parametrize(
    ("spec", "scale", "nfe"),
    [
        (SamplerSpec(kind="ddim", steps=3), 1.0, 3),
        (SamplerSpec(kind="ddim", steps=3), 2.0, 6),
        (SamplerSpec(kind="dpmpp_2m", steps=4), 1.0, 4),
        (SamplerSpec(kind="truncated_karras", steps=5), 1.0, 5),
        (SamplerSpec(kind="truncated_karras", steps=8, early_stop_output="denoised"), 3.0, 18),
    ],
)
def test_nfe_per_image(spec: SamplerSpec, scale: float, nfe: int) -> None:
    unet = tiny_diffusion_unet()
    network = CountingDenoiser(unet_denoiser(unet))
    denoiser = classifier_free_guidance(network, scale, null_class=3)
    generated = generate_images(
        denoiser,
        spec,
        labels=torch.tensor([0, 1, 2, 0, 1]),
        image_shape=(1, 8, 8),
        schedule=SD,
        prediction_type="v_prediction",
        seed=0,
        batch_size=2,
        counter=network,
    )
    assert generated.images.shape == (5, 1, 8, 8)
    assert generated.nfe_per_image == nfe
    assert generated.seconds_per_image > 0


def test_generation_is_seeded() -> None:
    unet = tiny_diffusion_unet()
    kwargs = {
        "labels": torch.tensor([0, 1, 2]),
        "image_shape": (1, 8, 8),
        "schedule": SD,
        "prediction_type": "epsilon",
    }
    spec = SamplerSpec(kind="lcm", steps=2)
    first = generate_images(unet_denoiser(unet), spec, seed=5, **kwargs)
    again = generate_images(unet_denoiser(unet), spec, seed=5, **kwargs)
    other = generate_images(unet_denoiser(unet), spec, seed=6, **kwargs)
    assert torch.equal(first.images, again.images)
    assert not torch.allclose(first.images, other.images)


def test_recorded_trajectories_hold_the_guided_outputs() -> None:
    unet = tiny_diffusion_unet()
    denoiser = unet_denoiser(unet)
    scales = torch.tensor([1.5, 4.0, 2.0])
    rows = record_guided_trajectories(
        denoiser,
        SamplerSpec(kind="ddim", steps=4),
        labels=torch.tensor([0, 1, 2]),
        guidance_scales=scales,
        image_shape=(1, 8, 8),
        schedule=SD,
        prediction_type="v_prediction",
        null_class=3,
        seed=0,
        batch_size=2,
    )
    assert len(rows) == 12 and rows.inputs.shape == (12, 1, 8, 8)
    assert sorted(rows.guidance_scales.tolist()) == sorted(scales.repeat_interleave(4).tolist())
    pick = torch.tensor([5])
    one = rows.rows(pick)
    with torch.no_grad():
        again = classifier_free_guidance(denoiser, one.guidance_scales, 3)(
            one.inputs, one.timesteps, one.labels
        )
    assert torch.allclose(again, one.outputs, atol=1e-5)


def test_specs_reject_nonsense() -> None:
    with pytest.raises(ValueError):
        SamplerSpec(kind="ddpm", steps=4)  # type: ignore[arg-type]
    assert (
        SamplerSpec(
            kind=SamplerKind.TRUNCATED_KARRAS, steps=8, early_stop_output=EarlyStopOutput.DENOISED
        ).label
        == "truncated_karras-8-denoised"
    )
    with pytest.raises(DistilError):
        make_scheduler("truncated_karras", SD, "epsilon")
    with pytest.raises(DistilError):
        ddim_timesteps(0)


def test_counting_denoiser_counts_rows() -> None:
    counter = CountingDenoiser(lambda x, t, c: x)
    counter(torch.zeros(4, 1, 2, 2), torch.zeros(4), torch.zeros(4, dtype=torch.long))
    assert counter.rows == 4 and counter.calls == 1 and counter.nfe_per_image(2) == 2
