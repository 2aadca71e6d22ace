"""Quantised models that leave the process: an int8 Hugging Face folder plain ``from_pretrained``
loads, PT2E static int8 of a CNN, and the compiled latency path (seconds each: exports and
compiles)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from distil.compress.latency import folder_bytes, latency_grid
from distil.compress.quantise import (
    QuantScheme,
    quantise_linears,
    quantise_static_pt2e,
    save_graph_constants,
    save_quantised_hf,
)
from distil.errors import DistilError
from distil.models.classifier import SmallCNN
from distil.models.lm import CausalLMSpec, build_causal_lm

SPEC = CausalLMSpec(
    num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128, vocab_size=64, max_context=32
)


def test_int8_hf_folder_loads_with_plain_from_pretrained(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = build_causal_lm(SPEC, seed=0).eval()
    model.save_pretrained(tmp_path / "fp")
    quantised = save_quantised_hf(model, QuantScheme.int8_weight_only, tmp_path / "int8")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "int8").eval()
    assert type(loaded.lm_head.weight.data) is torch.Tensor  # the LM head stays float
    assert "Int" in type(loaded.model.layers[0].mlp.up_proj.weight.data).__name__
    ids = torch.randint(0, SPEC.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = quantised(input_ids=ids).logits, loaded(input_ids=ids).logits
        reference = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected)
    assert float((got - reference).abs().max()) < 0.05 * float(reference.abs().max())
    int8_bytes = folder_bytes(tmp_path / "int8", suffixes=[".safetensors"])
    assert int8_bytes < 0.6 * folder_bytes(tmp_path / "fp", suffixes=[".safetensors"])


def test_pt2e_static_int8_quantises_convolutions(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cnn = SmallCNN(1, 10, channels=(8, 16)).eval()
    images = torch.randn(16, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    quantised = quantise_static_pt2e(cnn, (images[:2],), [images[:8], images[8:]])
    with torch.no_grad():
        reference, out = cnn(images), quantised(images)
    assert float((out - reference).abs().max()) < 0.05 * float(reference.abs().max()) + 1e-3
    size = save_graph_constants(quantised, tmp_path / "int8.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "int8.safetensors"), framework="pt") as handle:
        filters = [handle.get_tensor(k) for k in handle.keys() if "frozen_param" in k]  # noqa: SIM118
    assert filters and all(f.dtype == torch.int8 for f in filters)
    fp = {k: v.contiguous() for k, v in cnn.state_dict().items()}
    save_file(fp, str(tmp_path / "fp.safetensors"))
    assert size < (tmp_path / "fp.safetensors").stat().st_size
    with pytest.raises(DistilError, match="calibration"):
        quantise_static_pt2e(cnn, (images[:2],), [])


def test_compiled_int8_is_timed_next_to_eager() -> None:
    torch.manual_seed(0)
    model = quantise_linears(
        nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)), QuantScheme.int8_dynamic
    )
    rows = latency_grid(
        {"int8": model},
        lambda batch: {"input": torch.randn(batch, 32)},
        batch_sizes=(1,),
        compiled=(False, True),
        warmup=1,
        repeats=2,
    )
    by_mode = {r["compiled"]: r for r in rows}
    assert set(by_mode) == {False, True}
    assert all(r["median_ms"] > 0 and r["repeats"] == 2 for r in rows)
    # the compiled variant's warm-up call compiled it, which takes far longer than a forward
    assert by_mode[True]["warmup_s"] > by_mode[False]["warmup_s"]


def test_int8_with_the_lm_head(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = build_causal_lm(SPEC, seed=0).eval()
    model.save_pretrained(tmp_path / "fp")
    save_quantised_hf(model, QuantScheme.int8_dynamic, tmp_path / "head", include_lm_head=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "head").eval()
    assert type(loaded.lm_head.weight.data) is not torch.Tensor  # quantised too
    assert type(loaded.model.embed_tokens.weight.data) is torch.Tensor  # the lookup stays float
    ids = torch.randint(0, SPEC.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference, got = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert float((got - reference).abs().max()) < 0.05 * float(reference.abs().max())
    head_bytes = folder_bytes(tmp_path / "head", suffixes=[".safetensors"])
    without = save_quantised_hf(model, QuantScheme.int8_dynamic, tmp_path / "linears")
    assert type(without.lm_head.weight.data) is torch.Tensor
    assert head_bytes < folder_bytes(tmp_path / "linears", suffixes=[".safetensors"])
