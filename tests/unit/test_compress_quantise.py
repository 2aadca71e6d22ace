"""Quantisation: int8 PTQ, QAT prepare/convert, HF and plain-module saving, int4 refusal, PT2E
static int8, and the latency/size helpers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from distil.compress.latency import (
    folder_bytes,
    interleaved_latency,
    latency_grid,
    summarise,
)
from distil.compress.quantise import (
    QuantScheme,
    convert_qat,
    has_fake_quant,
    int4_kernel_report,
    load_quantised_module,
    prepare_qat,
    quantise_linears,
    quantised_dtypes,
    save_quantised_module,
)
from distil.errors import DistilError
from distil.models.lm import CausalLMSpec

SPEC = CausalLMSpec(
    num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128, vocab_size=64, max_context=32
)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16)).eval()


def _x() -> torch.Tensor:
    return torch.randn(8, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "scheme",
    [QuantScheme.int8_weight_only, QuantScheme.int8_dynamic, QuantScheme.int8_dynamic_int4_weight],
)
def test_ptq_quantises_linears_and_stays_close(scheme: QuantScheme) -> None:
    model = _mlp()
    quantised = quantise_linears(model, scheme)
    assert "IntxUnpackedToInt8Tensor" in quantised_dtypes(quantised)
    assert quantised_dtypes(model) == {"float32": sum(p.numel() for p in model.parameters())}
    with torch.no_grad():
        reference, out = model(_x()), quantised(_x())
    relative = float((out - reference).norm() / reference.norm())
    assert relative < (0.15 if scheme == QuantScheme.int8_dynamic_int4_weight else 0.01)


def test_qat_fake_quant_forward_equals_the_converted_model() -> None:
    model = _mlp()
    prepare_qat(model, QuantScheme.int8_dynamic)
    assert has_fake_quant(model)
    model(_x()).pow(2).mean().backward()
    first = model[0]
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
    with torch.no_grad():
        first.weight -= 0.1 * first.weight.grad  # one training step through the rounding
        fake = model(_x())
    trained = first.weight.detach().clone()
    convert_qat(model, QuantScheme.int8_dynamic)
    assert not has_fake_quant(model)
    with torch.no_grad():
        torch.testing.assert_close(model(_x()), fake, rtol=1e-5, atol=1e-5)
    ptq = _mlp()
    with torch.no_grad():
        ptq[0].weight.copy_(trained)
    with torch.no_grad():  # converting QAT == post-training quantisation of the trained weights
        torch.testing.assert_close(
            quantise_linears(ptq, QuantScheme.int8_dynamic)(_x()), fake, rtol=1e-5, atol=1e-5
        )


def test_qat_convert_without_scheme_leaves_float_layers() -> None:
    model = prepare_qat(_mlp(), QuantScheme.int8_weight_only)
    convert_qat(model, None)
    assert type(model[0]) is nn.Linear and model[0].weight.dtype == torch.float32
    with pytest.raises(DistilError, match="no fake-quantised"):
        convert_qat(model, None)
    with pytest.raises(DistilError, match="quantisation-aware training supports"):
        prepare_qat(_mlp(), QuantScheme.int4_weight_only)


def test_plain_module_round_trips_through_safetensors(tmp_path: Path) -> None:
    quantised = quantise_linears(_mlp(), QuantScheme.int8_weight_only)
    size = save_quantised_module(quantised, tmp_path / "q.safetensors")
    fresh = quantise_linears(_mlp(), QuantScheme.int8_weight_only)
    with torch.no_grad():
        for p in fresh.parameters():  # make sure the load, not the seed, sets the values
            if type(p.data) is torch.Tensor:
                p.zero_()
    load_quantised_module(fresh, tmp_path / "q.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh(_x()), quantised(_x()))
    save_file(
        {k: v.contiguous() for k, v in _mlp().state_dict().items()}, str(tmp_path / "f.safetensors")
    )
    assert size < 0.4 * (tmp_path / "f.safetensors").stat().st_size


def test_int4_weight_only_is_refused_where_its_kernels_are_missing() -> None:
    report = int4_kernel_report()
    assert report["8da4w(unpacked_to_int8)"] == "ok"
    kernels_here = importlib.util.find_spec("mslk") is not None or torch.cuda.is_available()
    if kernels_here:
        quantise_linears(_mlp(), QuantScheme.int4_weight_only)
    else:
        assert report["Int4WeightOnlyConfig(plain)"] != "ok"
        with pytest.raises(DistilError, match="mslk"):
            quantise_linears(_mlp(), QuantScheme.int4_weight_only)


def test_timing_summary_and_interleaving() -> None:
    timing = summarise([0.001 * i for i in range(1, 11)], warmup_s=0.5)
    assert (timing.median_ms, timing.min_ms, timing.repeats) == (5.5, 1.0, 10)
    assert (timing.p10_ms, timing.p90_ms) == pytest.approx((2.0, 9.0))  # nearest rank of 10
    assert timing.spread == pytest.approx(7.0 / 5.5)
    order: list[str] = []
    timings = interleaved_latency(
        {"a": lambda: order.append("a"), "b": lambda: order.append("b")}, warmup=1, repeats=3
    )
    assert order == ["a", "b"] + ["a", "b"] * 3  # warm-ups, then interleaved rounds
    assert timings["a"].repeats == 3
    with pytest.raises(DistilError):
        summarise([])


def test_latency_grid_rows_and_folder_bytes(tmp_path: Path) -> None:
    rows = latency_grid(
        {"fp32": _mlp(), "int8": quantise_linears(_mlp(), QuantScheme.int8_weight_only)},
        lambda batch: {"input": torch.randn(batch, 64)},
        batch_sizes=(1, 4),
        compiled=(False,),
        warmup=1,
        repeats=2,
    )
    assert {(r["variant"], r["batch_size"], r["compiled"]) for r in rows} == {
        ("fp32", 1, False),
        ("fp32", 4, False),
        ("int8", 1, False),
        ("int8", 4, False),
    }
    assert all(r["median_ms"] > 0 and len(r["load_average"]) == 3 for r in rows)
    (tmp_path / "a.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "b.json").write_bytes(b"y" * 3)
    assert folder_bytes(tmp_path) == 13
    assert folder_bytes(tmp_path, suffixes=[".safetensors"]) == 10
    with pytest.raises(DistilError, match="does not exist"):
        folder_bytes(tmp_path / "missing")


def test_int8_weight_storage_is_within_half_a_step_and_a_quarter_of_the_bytes(
    tmp_path: Path,
) -> None:
    from distil.compress.export import load_zoo_classifier, save_zoo_int8_weights
    from distil.compress.quantise import SCALE_SUFFIX, dequantise_int8_state, int8_weight_state
    from distil.models.classifier import SmallCNN

    torch.manual_seed(0)
    cnn = SmallCNN(1, 10, channels=(16, 32)).eval()
    state = int8_weight_state(cnn)
    restored = dequantise_int8_state(state)
    assert restored.keys() == cnn.state_dict().keys()
    for name, value in cnn.state_dict().items():
        if name + SCALE_SUFFIX in state:
            assert state[name].dtype == torch.int8
            scale = state[name + SCALE_SUFFIX].reshape((-1,) + (1,) * (value.dim() - 1))
            assert bool(((restored[name] - value).abs() <= scale / 2 + 1e-7).all()), name
            # the largest weight of each output channel is exact: it sets the scale
            flat = value.reshape(value.shape[0], -1).abs().amax(1)
            back = restored[name].reshape(value.shape[0], -1).abs().amax(1)
            torch.testing.assert_close(back, flat)
        else:
            assert torch.equal(restored[name], value), name  # biases, BatchNorm: untouched
    spec = {
        "zoo": "cnn",
        "kwargs": {"channels": [16, 32]},
        "in_shape": [1, 8, 8],
        "num_classes": 10,
    }
    folder = save_zoo_int8_weights(cnn, tmp_path / "int8", spec=spec)
    save_file({k: v.contiguous() for k, v in cnn.state_dict().items()}, str(tmp_path / "f.st"))
    assert (folder / "model.safetensors").stat().st_size < 0.4 * (tmp_path / "f.st").stat().st_size
    loaded = load_zoo_classifier(folder)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), cnn(x), rtol=0.05, atol=0.05)
