"""Diffusion training and distillation losses: known answers on a one-image data distribution,
the defining property of the progressive-distillation target, zero-at-init students, gradients
only where they belong."""

from __future__ import annotations

import copy

import pytest
import torch

from distil.diffusion.losses import (
    adapter_guidance_loss,
    consistency_boundary_scalings,
    consistency_distillation_loss,
    consistency_function,
    denoising_loss,
    drop_labels,
    guidance_distillation_loss,
    progressive_distillation_loss,
    progressive_distillation_target,
    weighted_x_error,
    x_space_weight,
)
from distil.diffusion.model import (
    AdapterGuidedUNet,
    GuidanceConditionedUNet,
    guided_denoiser,
    unet_denoiser,
)
from distil.diffusion.sampling import (
    SamplerSpec,
    classifier_free_guidance,
    ddim_timesteps,
    make_scheduler,
    record_guided_trajectories,
)
from distil.diffusion.schedule import CLEAN, make_noise_schedule
from tests.helpers import delta_oracle, tiny_diffusion_unet

SD = make_noise_schedule("scaled_linear")
TARGET = torch.linspace(-0.8, 0.8, 64).reshape(1, 1, 8, 8)
IMAGES = TARGET.expand(6, 1, 8, 8).clone()
LABELS = torch.tensor([0, 1, 2, 0, 1, 2])


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_denoising_loss_is_zero_for_the_exact_denoiser(prediction_type: str) -> None:
    oracle = delta_oracle(TARGET, SD, prediction_type)
    result = denoising_loss(
        oracle,
        IMAGES,
        LABELS,
        schedule=SD,
        prediction_type=prediction_type,
        null_class=3,
        label_dropout=0.5,
        generator=gen(),
    )
    assert result.loss.item() < 1e-8


def test_denoising_loss_is_seeded_and_trains_the_unet() -> None:
    unet = tiny_diffusion_unet()
    kwargs = {
        "schedule": SD,
        "prediction_type": "v_prediction",
        "null_class": 3,
        "label_dropout": 0.1,
    }
    first = denoising_loss(unet_denoiser(unet), IMAGES, LABELS, generator=gen(1), **kwargs)
    again = denoising_loss(unet_denoiser(unet), IMAGES, LABELS, generator=gen(1), **kwargs)
    assert first.loss.item() == again.loss.item() > 0
    first.loss.backward()
    assert all(p.grad is not None for p in unet.conv_out.parameters())


def test_drop_labels_rate() -> None:
    labels = torch.zeros(20_000, dtype=torch.long)
    dropped = drop_labels(labels, null_class=9, probability=0.1, generator=gen())
    assert set(dropped.unique().tolist()) == {0, 9}
    assert (dropped == 9).double().mean().item() == pytest.approx(0.1, abs=0.01)
    assert drop_labels(labels, null_class=9, probability=0.0, generator=gen()) is labels


def test_weights_are_snr_plus_one_and_truncated_snr() -> None:
    alpha, sigma = (
        torch.tensor([0.6, 0.995**0.5], dtype=torch.float64),
        torch.tensor([0.8, 0.005**0.5], dtype=torch.float64),
    )
    assert x_space_weight(alpha, sigma, "snr_plus_one").tolist() == pytest.approx(
        [0.36 / 0.64 + 1, 200.0]
    )
    assert x_space_weight(alpha, sigma, "truncated_snr").tolist() == pytest.approx([1.0, 199.0])


def test_snr_plus_one_x_error_is_v_error() -> None:
    """ω = 1 + SNR on x₀ errors equals the plain MSE on v (why v-students use it)."""
    from distil.diffusion.schedule import prediction_from_x0_eps

    t = torch.tensor([5.0, 300.0, 999.0])
    alpha, sigma = SD.alpha_sigma(t)
    x_t = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    x_a, x_b = (
        torch.randn(3, 1, 4, 4, dtype=torch.float64),
        torch.randn(3, 1, 4, 4, dtype=torch.float64),
    )

    def v_of(x0: torch.Tensor) -> torch.Tensor:
        eps = (x_t - alpha.reshape(-1, 1, 1, 1) * x0) / sigma.reshape(-1, 1, 1, 1)
        return prediction_from_x0_eps(x0, eps, alpha, sigma, "v_prediction")

    v_mse = (v_of(x_a) - v_of(x_b)).square().flatten(1).mean(1).mean()
    assert weighted_x_error(x_a, x_b, alpha, sigma, "snr_plus_one").item() == pytest.approx(
        v_mse.item(), rel=1e-9
    )


def test_progressive_target_makes_one_step_land_where_two_teacher_steps_land() -> None:
    """x̃ is defined so that one DDIM step from z_t that predicts x̃ reaches the z'' of the
    teacher's two DDIM steps (diffusers' DDIM on the 2N grid, written out in float64 here)."""
    teacher = unet_denoiser(tiny_diffusion_unet())
    grid, fine = ddim_timesteps(8), ddim_timesteps(16)
    assert fine[4:7] == [grid[2], fine[5], grid[3]]  # t, t_mid, t_next: two teacher steps
    t, t_mid, t_next = (torch.full((2,), v) for v in (grid[2], fine[5], grid[3]))
    z_t = torch.randn(2, 1, 8, 8, generator=gen(3))
    labels = torch.tensor([0, 1])
    target = progressive_distillation_target(
        teacher,
        z_t,
        labels,
        t=t,
        t_mid=t_mid,
        t_next=t_next,
        schedule=SD,
        teacher_prediction_type="v_prediction",
    )

    def col(v: torch.Tensor) -> torch.Tensor:
        return v.reshape(-1, 1, 1, 1)

    def ddim(z: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor) -> torch.Tensor:
        a, s = SD.alpha_sigma(t_from)
        a_to, s_to = SD.alpha_sigma(t_to)
        with torch.no_grad():
            v = teacher(z.float(), t_from, labels).double()
        x0 = col(a) * z - col(s) * v
        eps = col(s) * z + col(a) * v
        return col(a_to) * x0 + col(s_to) * eps

    z_two = ddim(ddim(z_t.double(), t, t_mid), t_mid, t_next)
    a, s = SD.alpha_sigma(t)
    a_next, s_next = SD.alpha_sigma(t_next)
    x = target.double()
    one_step = col(a_next) * x + col(s_next) * (z_t.double() - col(a) * x) / col(s)
    assert torch.allclose(one_step, z_two, atol=1e-4)


def test_progressive_target_is_the_image_for_the_exact_teacher() -> None:
    oracle = delta_oracle(TARGET, SD, "epsilon")
    z_t = torch.randn(2, 1, 8, 8, generator=gen(4))
    for t, mid, nxt in ((999.0, 749.0, 499.0), (249.0, 124.0, CLEAN)):
        target = progressive_distillation_target(
            oracle,
            z_t,
            torch.tensor([0, 1]),
            t=torch.full((2,), t),
            t_mid=torch.full((2,), mid),
            t_next=torch.full((2,), nxt),
            schedule=SD,
            teacher_prediction_type="epsilon",
        )
        assert torch.allclose(target, TARGET.expand_as(target), atol=1e-4)
    loss = progressive_distillation_loss(
        delta_oracle(TARGET, SD, "v_prediction"),
        oracle,
        IMAGES,
        LABELS,
        student_steps=2,
        schedule=SD,
        student_prediction_type="v_prediction",
        teacher_prediction_type="epsilon",
        generator=gen(),
    )
    assert loss.loss.item() < 1e-6


def test_progressive_loss_trains_only_the_student() -> None:
    teacher_unet = tiny_diffusion_unet()
    student_unet = copy.deepcopy(teacher_unet).train()
    result = progressive_distillation_loss(
        unet_denoiser(student_unet),
        unet_denoiser(teacher_unet),
        IMAGES,
        LABELS,
        student_steps=4,
        schedule=SD,
        student_prediction_type="v_prediction",
        teacher_prediction_type="v_prediction",
        generator=gen(),
        weighting="truncated_snr",
        null_class=3,
        label_dropout=0.2,
    )
    result.loss.backward()
    assert result.loss.item() > 0
    assert student_unet.conv_out.weight.grad is not None
    assert teacher_unet.conv_out.weight.grad is None


def test_guidance_distillation_is_zero_at_init_for_scale_one_and_for_the_exact_student() -> None:
    teacher = tiny_diffusion_unet()
    student = GuidanceConditionedUNet.from_teacher(teacher)
    kwargs = {
        "schedule": SD,
        "student_prediction_type": "v_prediction",
        "teacher_prediction_type": "v_prediction",
        "null_class": 3,
        "generator": gen(),
    }
    at_one = guidance_distillation_loss(
        guided_denoiser(student),
        unet_denoiser(teacher),
        IMAGES,
        LABELS,
        guidance_range=(1.0, 1.0),
        **kwargs,
    )
    assert at_one.loss.item() < 1e-8

    def exact(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return classifier_free_guidance(unet_denoiser(teacher), s, 3)(x, t, c)

    ranged = guidance_distillation_loss(
        exact, unet_denoiser(teacher), IMAGES, LABELS, guidance_range=(1.0, 6.0), **kwargs
    )
    assert ranged.loss.item() < 1e-8
    assert 1.0 <= float(ranged.components["guidance_scale"]) <= 6.0
    at_init = guidance_distillation_loss(
        guided_denoiser(student),
        unet_denoiser(teacher),
        IMAGES,
        LABELS,
        guidance_range=(2.0, 6.0),
        **kwargs,
    )
    at_init.loss.backward()
    assert at_init.loss.item() > 0
    assert student.guidance_embedding.net[-1].weight.grad is not None


def test_boundary_scalings_match_diffusers_lcm() -> None:
    scheduler = make_scheduler("lcm", SD, "epsilon")
    t = torch.tensor([0.0, 1.0, 19.0, 999.0])
    c_skip, c_out = consistency_boundary_scalings(t)
    for i, value in enumerate(t.tolist()):
        ref_skip, ref_out = scheduler.get_scalings_for_boundary_condition_discrete(value)
        assert c_skip[i].item() == pytest.approx(ref_skip) and c_out[i].item() == pytest.approx(
            ref_out
        )
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0
    x_t = torch.randn(1, 1, 8, 8)
    assert torch.equal(
        consistency_function(
            torch.randn(1, 1, 8, 8), x_t, torch.zeros(1), schedule=SD, prediction_type="epsilon"
        ),
        x_t,
    )


def test_consistency_loss_vanishes_for_exact_networks_and_trains_only_the_online_network() -> None:
    oracle = delta_oracle(TARGET, SD, "v_prediction")

    def exact(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return oracle(x, t, c)

    kwargs = {
        "schedule": SD,
        "student_prediction_type": "v_prediction",
        "teacher_prediction_type": "v_prediction",
        "null_class": 3,
        "guidance_range": (1.0, 5.0),
    }
    # f differs from x̂₀ only by c_skip·(x − x̂₀) terms, 1e-5 and below on the grid (t ≥ 19)
    assert (
        consistency_distillation_loss(
            exact, exact, oracle, IMAGES, LABELS, generator=gen(), **kwargs
        ).loss.item()
        < 1e-6
    )
    teacher = tiny_diffusion_unet()
    student = GuidanceConditionedUNet.from_teacher(teacher).train()
    target = copy.deepcopy(student).requires_grad_(False)
    result = consistency_distillation_loss(
        guided_denoiser(student),
        guided_denoiser(target),
        unet_denoiser(teacher),
        IMAGES,
        LABELS,
        generator=gen(),
        metric="pseudo_huber",
        **kwargs,
    )
    result.loss.backward()
    assert result.loss.item() > 0
    assert student.unet.conv_out.weight.grad is not None
    assert teacher.conv_out.weight.grad is None
    assert all(p.grad is None for p in target.parameters())


def test_adapter_loss_is_zero_on_own_outputs_and_trains_only_adapters() -> None:
    base = tiny_diffusion_unet()
    student = AdapterGuidedUNet(base, hidden_dim=8)
    rows = record_guided_trajectories(
        unet_denoiser(base),
        SamplerSpec(kind="ddim", steps=3),
        labels=torch.tensor([0, 1]),
        guidance_scales=torch.tensor([2.0, 4.0]),
        image_shape=(1, 8, 8),
        schedule=SD,
        prediction_type="v_prediction",
        null_class=3,
        seed=0,
    )
    with torch.no_grad():
        own = student(rows.inputs, rows.timesteps, rows.labels, rows.guidance_scales)
    from dataclasses import replace

    assert (
        adapter_guidance_loss(guided_denoiser(student), replace(rows, outputs=own)).loss.item()
        < 1e-12
    )
    result = adapter_guidance_loss(guided_denoiser(student), rows)
    result.loss.backward()
    assert result.loss.item() > 0  # CFG at s > 1 differs from the base's conditional output
    assert all(p.grad is None for p in base.parameters())
    assert all(p.grad is not None for p in student.heads.parameters())
