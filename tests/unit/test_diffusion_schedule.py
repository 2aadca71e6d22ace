"""The noising process and parameterisation conversions against diffusers and float64 formulas."""

from __future__ import annotations

import pytest
import torch

from distil.diffusion.schedule import (
    CLEAN,
    BetaSchedule,
    PredictionType,
    add_noise,
    make_noise_schedule,
    prediction_from_x0_eps,
    x0_eps_from_prediction,
)

F64 = torch.float64


@pytest.mark.parametrize("kind", list(BetaSchedule))
def test_table_matches_diffusers_and_interpolates(kind: BetaSchedule) -> None:
    from diffusers import DDIMScheduler

    schedule = make_noise_schedule(kind)
    reference = DDIMScheduler(**schedule.diffusers_kwargs()).alphas_cumprod.to(F64)
    t = torch.tensor([0.0, 1.0, 500.0, 999.0])
    assert torch.equal(schedule.alpha_bar(t), reference[t.long()])
    assert schedule.alpha_bar(torch.tensor([CLEAN])).item() == 1.0
    mid = schedule.alpha_bar(torch.tensor([10.25])).item()
    assert mid == pytest.approx(
        0.75 * reference[10].item() + 0.25 * reference[11].item(), rel=1e-12
    )
    alpha, sigma = schedule.alpha_sigma(torch.linspace(-1, 999, 17))
    assert torch.allclose(alpha.square() + sigma.square(), torch.ones(17, dtype=F64))


def test_add_noise_matches_diffusers() -> None:
    from diffusers import DDPMScheduler

    schedule = make_noise_schedule("scaled_linear")
    x0, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 400, 999])
    ours = add_noise(x0, noise, *schedule.alpha_sigma(t))
    theirs = DDPMScheduler(**schedule.diffusers_kwargs()).add_noise(x0, noise, t)
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("kind", list(PredictionType))
def test_prediction_round_trip(kind: PredictionType) -> None:
    schedule = make_noise_schedule("linear")
    t = torch.tensor([3.0, 250.5, 998.0])
    alpha, sigma = schedule.alpha_sigma(t)
    x0 = torch.randn(3, 1, 4, 4, dtype=F64)
    eps = torch.randn(3, 1, 4, 4, dtype=F64)
    x_t = add_noise(x0, eps, alpha, sigma)
    prediction = prediction_from_x0_eps(x0, eps, alpha, sigma, kind)
    back_x0, back_eps = x0_eps_from_prediction(prediction, x_t, alpha, sigma, kind)
    assert torch.allclose(back_x0, x0, atol=1e-8) and torch.allclose(back_eps, eps, atol=1e-6)


def test_v_is_alpha_eps_minus_sigma_x0() -> None:
    alpha, sigma = torch.tensor([0.6], dtype=F64), torch.tensor([0.8], dtype=F64)
    x0, eps = torch.full((1, 1, 1, 1), 2.0, dtype=F64), torch.full((1, 1, 1, 1), -1.0, dtype=F64)
    v = prediction_from_x0_eps(x0, eps, alpha, sigma, "v_prediction")
    assert v.item() == pytest.approx(0.6 * -1.0 - 0.8 * 2.0)


def test_ve_sigma_inverse_is_log_sigma_interpolation() -> None:
    schedule = make_noise_schedule("scaled_linear")
    t = torch.tensor([0.0, 17.0, 500.0, 999.0], dtype=F64)
    assert torch.allclose(schedule.timestep_of_ve_sigma(schedule.ve_sigma(t)), t, atol=1e-9)
    table = schedule.ve_sigma_table()
    geometric_mid = (table[10] * table[11]).sqrt()  # halfway in log σ
    assert schedule.timestep_of_ve_sigma(geometric_mid.reshape(1)).item() == pytest.approx(10.5)
    # SD 1.5's σ range, the numbers paper #1's constants were tuned on
    assert table[0].item() == pytest.approx(0.0292, abs=1e-4)
    assert table[-1].item() == pytest.approx(14.61, abs=1e-2)
