"""Diffusion networks: students that start as their teacher, frozen bases, folders, EMA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distil.diffusion.model import (
    AdapterGuidedUNet,
    GuidanceConditionedUNet,
    ModelKind,
    SamplingDefaults,
    UNetSpec,
    build_unet,
    card_for,
    ema_update,
    guided_denoiser,
    load_card,
    load_diffusion_model,
    parameter_count,
    save_diffusion_model,
    with_guidance,
)
from distil.diffusion.schedule import BetaSchedule, PredictionType
from distil.errors import DistilError
from tests.helpers import tiny_diffusion_unet

X = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
T = torch.tensor([0.0, 400.5, 999.0])
C = torch.tensor([0, 2, 3])  # 3 is the null class of a 3-class model


def test_unet_has_a_null_class_and_checks_groups() -> None:
    unet = tiny_diffusion_unet(num_classes=3)
    assert unet.class_embedding.num_embeddings == 4
    with pytest.raises(DistilError, match="norm_num_groups"):
        build_unet(UNetSpec(block_out_channels=(12, 16), norm_num_groups=8), 3)


@pytest.mark.parametrize(
    "wrapper", [GuidanceConditionedUNet.from_teacher, lambda u: AdapterGuidedUNet(u, hidden_dim=8)]
)
def test_students_start_as_the_conditional_teacher(wrapper) -> None:  # type: ignore[no-untyped-def]
    teacher = tiny_diffusion_unet()
    with torch.no_grad():
        reference = teacher(X, T, class_labels=C).sample
        student = wrapper(teacher)
        for scale in (0.0, 1.0, 7.5):
            out = student(X, T, C, torch.full((3,), scale))
            assert torch.allclose(out, reference, atol=1e-6)


def test_guidance_reaches_the_output_once_trained() -> None:
    student = GuidanceConditionedUNet.from_teacher(tiny_diffusion_unet())
    torch.nn.init.normal_(student.guidance_embedding.net[-1].weight)
    with torch.no_grad():
        low = with_guidance(guided_denoiser(student), 1.0)(X, T, C)
        high = with_guidance(guided_denoiser(student), 5.0)(X, T, C)
    assert not torch.allclose(low, high)
    assert not student.unet.class_embedding._forward_hooks  # the hook lives for one call only


def test_adapters_are_small_frozen_base_and_hooks_removed() -> None:
    base = build_unet(UNetSpec(), 10)
    student = AdapterGuidedUNet(base)
    adapter = sum(p.numel() for p in student.adapter_parameters())
    assert parameter_count(student, trainable_only=True) == adapter
    assert 0.015 < adapter / parameter_count(base) < 0.025  # AGD's "about 2 %"
    assert all(not p.requires_grad for p in base.parameters())
    assert all(not k.startswith("base.") for k in student.adapter_state_dict())
    with torch.no_grad():
        student(
            torch.randn(1, 1, 16, 16), torch.tensor([5.0]), torch.tensor([1]), torch.tensor([3.0])
        )
    assert all(not block._forward_hooks for block in student.blocks)


def test_ema_update() -> None:
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = (a.weight.detach() + b.weight.detach()) / 2
    ema_update(a, b, 0.5)
    assert torch.allclose(a.weight, expected)
    ema_update(a, b, 0.0)
    assert torch.equal(a.weight, b.weight)
    with pytest.raises(ValueError):
        ema_update(a, b, 1.5)


@pytest.mark.parametrize("kind", list(ModelKind))
def test_folder_round_trip(kind: ModelKind, tmp_path: Path) -> None:
    unet = tiny_diffusion_unet()
    module = {
        ModelKind.UNET: unet,
        ModelKind.GUIDED_UNET: GuidanceConditionedUNet.from_teacher(unet),
        ModelKind.ADAPTER_UNET: AdapterGuidedUNet(unet, hidden_dim=8),
    }[kind]
    for p in module.parameters():  # make every weight matter, zero-initialised heads included
        p.data.add_(0.01 * torch.randn_like(p))
    card = card_for(
        module,
        class_names=["a", "b", "c"],
        beta_schedule=BetaSchedule.SCALED_LINEAR,
        prediction_type=PredictionType.V_PREDICTION,
        sampling=SamplingDefaults(sampler="ddim", steps=4, guidance_scale=2.0),
    )
    run = tmp_path / "run"
    save_diffusion_model(run / "final", module, card)
    loaded, loaded_card = load_diffusion_model(run)  # a run folder: the model is in final/
    assert loaded_card == card and loaded_card.kind is kind and loaded_card.null_class == 3
    assert load_card(run / "final") == card
    with torch.no_grad():
        if kind is ModelKind.UNET:
            assert torch.equal(
                loaded(X, T, class_labels=C).sample, module(X, T, class_labels=C).sample
            )
        else:
            s = torch.full((3,), 3.0)
            assert torch.equal(loaded(X, T, C, s), module(X, T, C, s))
    with pytest.raises(DistilError, match="diffusion.json"):
        load_diffusion_model(tmp_path)
