"""LoRA students: trainable counts, merged == unmerged, adapters and merged folders round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from distil.compress.lora import (
    add_lora,
    count_trainable,
    default_targets,
    load_lora,
    merge_lora,
    save_lora,
)
from distil.errors import DistilError
from distil.models.lm import CausalLMSpec, build_causal_lm

SPEC = CausalLMSpec(
    num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64, vocab_size=64, max_context=32
)
IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))


def _student() -> nn.Module:
    return build_causal_lm(SPEC, seed=0).eval()


def _perturb_adapters(wrapped: nn.Module) -> None:
    """LoRA's B starts at zero (a no-op); give the adapters values as training would."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_only_adapters_train_and_their_count_is_r_times_in_plus_out() -> None:
    student = _student()
    total = sum(p.numel() for p in student.parameters())
    assert default_targets(student) == ["q_proj", "v_proj", "up_proj", "down_proj"]
    wrapped = add_lora(student, rank=4, alpha=8)
    counts = count_trainable(wrapped)
    per_layer = 4 * ((32 + 32) + (32 + 32) + (32 + 64) + (64 + 32))  # q, v, up, down
    assert counts.trainable == SPEC.num_layers * per_layer
    assert counts.total == total + counts.trainable
    assert counts.fraction < 0.1
    assert all("lora_" in n for n, p in wrapped.named_parameters() if p.requires_grad)


def test_merged_equals_unmerged_and_both_folders_round_trip(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    student = _student()
    student.save_pretrained(tmp_path / "base")
    wrapped = add_lora(student, rank=4, alpha=8).eval()
    _perturb_adapters(wrapped)
    unmerged = _logits(wrapped)
    assert not torch.allclose(unmerged, _logits(_student()))  # the adapters do something
    save_lora(wrapped, tmp_path / "adapters", merged=False)
    assert (tmp_path / "adapters" / "adapter_model.safetensors").is_file()
    reloaded = load_lora(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapters"
    )
    torch.testing.assert_close(_logits(reloaded.eval()), unmerged)
    save_lora(wrapped, tmp_path / "merged", merged=True)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()  # no peft needed
    assert not any("lora_" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(_logits(plain), unmerged, rtol=1e-5, atol=1e-5)


def test_merge_folds_alpha_over_rank_times_b_a() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    weight = base[0].weight.detach().clone()
    wrapped = add_lora(base, rank=2, alpha=6, target_modules=["0"])
    _perturb_adapters(wrapped)
    layer = wrapped.base_model.model[0]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = weight + (6 / 2) * b @ a
    x = torch.randn(4, 8)
    with torch.no_grad():
        before = wrapped(x)
    merged = merge_lora(wrapped)
    torch.testing.assert_close(merged[0].weight, expected.detach())
    with torch.no_grad():
        torch.testing.assert_close(merged(x), before, rtol=1e-5, atol=1e-6)


def test_bad_lora_requests_are_named(tmp_path: Path) -> None:
    with pytest.raises(DistilError, match="match no module"):
        add_lora(_student(), target_modules=["w_pack"])
    with pytest.raises(DistilError, match="rank must be"):
        add_lora(_student(), rank=0)
    with pytest.raises(DistilError, match="adapter_config.json"):
        load_lora(_student(), tmp_path)
