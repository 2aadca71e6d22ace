"""Quantisation through torchao: post-training int8 of Linear layers, quantisation-aware training
(fake-quant prepare/convert a distillation loop trains through), int4 where kernels exist,
static int8 of whole CNNs through PT2E, and safe (safetensors) saving of all of them.

Schemes (:class:`QuantScheme`) map to torchao configs that both post-training quantisation and
QAT accept, so "int8" and "QAT-int8" models have the same format and kernels:

- ``int8_weight_only``: int8 weights, one scale per output row; activations stay float.
- ``int8_dynamic``: int8 weights per row and int8 activations with a per-token scale computed
  at run time.
- ``int8_dynamic_int4_weight``: int4 weights in groups of 32 and int8 dynamic activations.
  On this CPU build the int4 values are stored one per byte (torchao's ``unpacked_to_int8``
  format; the packed CPU kernels need the torchao C++ library or KleidiAI on ARM): it measures
  int4 *quality*, not int4 size or speed. :func:`int4_kernel_report` says which int4 paths run.
- ``int4_weight_only``: torchao ``Int4WeightOnlyConfig``; it needs the ``mslk`` package or a
  CUDA device, and is refused with that message otherwise.

Eager int8 on CPU is slower than float32 (the dequantising kernels are not fused); the speed-up
appears under ``torch.compile`` at larger batches. :mod:`distil.compress.latency` measures it.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Callable, Iterable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from distil.compress import require
from distil.errors import DistilError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

# torchao logs a warning for each CUDA extension it cannot load on a CPU-only torch: harmless.
logging.getLogger("torchao").setLevel(logging.ERROR)


class QuantScheme(str, Enum):
    """Quantisation of ``nn.Linear`` weights (and activations) through torchao."""

    int8_weight_only = "int8_weight_only"
    int8_dynamic = "int8_dynamic"
    int8_dynamic_int4_weight = "int8_dynamic_int4_weight"
    int4_weight_only = "int4_weight_only"


QAT_SCHEMES = (
    QuantScheme.int8_weight_only,
    QuantScheme.int8_dynamic,
    QuantScheme.int8_dynamic_int4_weight,
)
"""Schemes torchao's ``QATConfig`` derives fake quantisation for."""

INT4_GROUP_SIZE = 32
INT4: torch.dtype = torch.int4  # type: ignore[attr-defined]  # missing from torch's stubs


def torchao_config(scheme: QuantScheme) -> Any:
    """The torchao ``AOBaseConfig`` of a scheme."""
    require("torchao")
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationIntxWeightConfig,
        IntxWeightOnlyConfig,
        PerAxis,
        PerGroup,
    )

    if scheme == QuantScheme.int8_weight_only:
        return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
    if scheme == QuantScheme.int8_dynamic:
        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int8, weight_granularity=PerAxis(0)
        )
    if scheme == QuantScheme.int8_dynamic_int4_weight:
        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=INT4, weight_granularity=PerGroup(INT4_GROUP_SIZE)
        )
    return Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE)


def int4_kernel_report() -> dict[str, str]:
    """Try every int4 path of torchao on a small Linear on this machine.

    Returns:
        Path name → ``"ok"`` or the first line of the error it raised.
    """
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationIntxWeightConfig,
        PerGroup,
        quantize_,
    )

    candidates: dict[str, Any] = {
        "Int4WeightOnlyConfig(plain)": Int4WeightOnlyConfig(group_size=32),
        "Int4WeightOnlyConfig(plain_int32)": Int4WeightOnlyConfig(
            group_size=32, int4_packing_format="plain_int32"
        ),
        "Int4WeightOnlyConfig(tile_packed_to_4d, bf16)": Int4WeightOnlyConfig(
            group_size=32, int4_packing_format="tile_packed_to_4d"
        ),
        "8da4w(opaque_torchao_auto)": Int8DynamicActivationIntxWeightConfig(
            weight_dtype=INT4,
            weight_granularity=PerGroup(32),
            intx_packing_format="opaque_torchao_auto",
        ),
        "8da4w(opaque_aten_kleidiai)": Int8DynamicActivationIntxWeightConfig(
            weight_dtype=INT4,
            weight_granularity=PerGroup(32),
            intx_packing_format="opaque_aten_kleidiai",
        ),
        "8da4w(unpacked_to_int8)": torchao_config(QuantScheme.int8_dynamic_int4_weight),
    }
    report = {}
    for name, config in candidates.items():
        dtype = torch.bfloat16 if "bf16" in name else torch.float32
        layer = nn.Linear(64, 32).to(dtype)
        try:
            quantize_(layer, config)
            with torch.no_grad():
                layer(torch.randn(2, 64, dtype=dtype))
            report[name] = "ok"
        except Exception as exc:  # each path fails in its own way; the message is the report
            report[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"
    return report


def _check_runs_here(scheme: QuantScheme) -> None:
    if scheme != QuantScheme.int4_weight_only:
        return
    import importlib.util

    if importlib.util.find_spec("mslk") is None and not torch.cuda.is_available():
        raise DistilError(
            "int4_weight_only needs torchao's int4 kernels (the mslk package, or a CUDA device); "
            "neither is here. Use int8_dynamic_int4_weight (int4 values stored unpacked on CPU) "
            "or an int8 scheme"
        )


def linear_filter(model: nn.Module, *, include_lm_head: bool = False) -> Callable[..., bool]:
    """The ``filter_fn`` for torchao: every ``nn.Linear`` except the LM head (unless asked), as
    Hugging Face's ``TorchAoConfig`` does by default. Input embeddings stay float: transformers
    5.25 does not quantise ``nn.Embedding`` when it loads a torchao folder (checked here)."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) and not include_lm_head else None

    def wanted(module: nn.Module, _fqn: str) -> bool:
        return isinstance(module, nn.Linear) and module is not output

    return wanted


def quantise_linears(
    model: nn.Module, scheme: QuantScheme, *, include_lm_head: bool = False
) -> nn.Module:
    """A copy of ``model`` with its ``nn.Linear`` layers quantised (post-training).

    Args:
        model: Any module (left unchanged).
        scheme: The quantisation.
        include_lm_head: Quantise the LM head too.

    Returns:
        The quantised copy, in eval mode.
    """
    from torchao.quantization import quantize_

    _check_runs_here(scheme)
    quantised = copy.deepcopy(model).eval()
    quantize_(
        quantised,
        torchao_config(scheme),
        filter_fn=linear_filter(quantised, include_lm_head=include_lm_head),
    )
    return quantised


def _check_qat(scheme: QuantScheme) -> None:
    if scheme not in QAT_SCHEMES:
        raise DistilError(
            f"quantisation-aware training supports {[s.value for s in QAT_SCHEMES]}, "
            f"not {scheme.value!r}"
        )


def prepare_qat(
    model: nn.Module, scheme: QuantScheme, *, include_lm_head: bool = False
) -> nn.Module:
    """Swap ``model``'s Linear layers for fake-quantised ones, in place, for QAT.

    The forward pass then rounds weights (and activations, for dynamic schemes) exactly as the
    converted model will, with straight-through gradients to the float weights, so a
    distillation loop trains through the rounding (Polino et al., quantized distillation).

    Returns:
        ``model`` (the same object).
    """
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    _check_qat(scheme)
    quantize_(
        model,
        QATConfig(torchao_config(scheme), step="prepare"),
        filter_fn=linear_filter(model, include_lm_head=include_lm_head),
    )
    return model


def _is_fake_quantised(module: nn.Module) -> bool:
    from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear

    return isinstance(module, (FakeQuantizedLinear, FakeQuantizedEmbedding))


def has_fake_quant(model: nn.Module) -> bool:
    """Whether any module of ``model`` is fake-quantised (prepared for QAT)."""
    return any(_is_fake_quantised(m) for m in model.modules())


def convert_qat(model: nn.Module, scheme: QuantScheme | None) -> nn.Module:
    """End QAT in place: swap fake-quantised layers back, then quantise with ``scheme``.

    Args:
        model: A model prepared by :func:`prepare_qat` and trained.
        scheme: The scheme it was prepared with; ``None`` only swaps the layers back, leaving
            float weights (to save a float folder that is quantised at load time).

    Returns:
        ``model`` (the same object).
    """
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    if not has_fake_quant(model):
        raise DistilError("convert_qat: the model has no fake-quantised layers (prepare_qat first)")
    if scheme is not None:
        _check_qat(scheme)
    config = QATConfig(torchao_config(scheme) if scheme is not None else None, step="convert")
    quantize_(model, config, filter_fn=lambda m, _fqn: _is_fake_quantised(m))
    return model


def save_quantised_hf(
    model: PreTrainedModel,
    scheme: QuantScheme,
    folder: Path | str,
    *,
    tokenizer: Any = None,
    include_lm_head: bool = False,
) -> PreTrainedModel:
    """Quantise a float Hugging Face model and save a folder plain ``from_pretrained`` loads.

    The float weights go through transformers' ``TorchAoConfig`` at load time, which writes
    the quantised tensors to safetensors with torchao's metadata and the
    ``quantization_config`` into ``config.json``.

    Args:
        model: A float model (no fake-quantised layers; :func:`convert_qat` with ``None`` first).
        scheme: The quantisation.
        folder: Output folder.
        tokenizer: Saved alongside when given.
        include_lm_head: Quantise the LM head too.

    Returns:
        The quantised model, loaded back from ``folder``.
    """
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        TorchAoConfig,
    )

    _check_runs_here(scheme)
    if has_fake_quant(model):
        raise DistilError(
            "save_quantised_hf takes a float model; call convert_qat(model, None) on a QAT model"
        )
    folder = Path(folder)
    auto = (
        AutoModelForCausalLM
        if model.get_output_embeddings() is not None
        else AutoModelForSequenceClassification
        if hasattr(model, "classifier") or hasattr(model, "score")
        else AutoModel
    )
    # modules_to_not_convert=None skips the LM head (transformers' default); [] converts it too
    config = TorchAoConfig(
        torchao_config(scheme), modules_to_not_convert=[] if include_lm_head else None
    )
    with tempfile.TemporaryDirectory(prefix="distil-quantise-") as tmp:
        model.save_pretrained(tmp)
        quantised = auto.from_pretrained(tmp, quantization_config=config)
    folder.mkdir(parents=True, exist_ok=True)
    quantised.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    logger.info("saved %s quantised with %s to %s", type(model).__name__, scheme.value, folder)
    return quantised.eval()


def save_quantised_module(
    module: nn.Module, path: Path | str, *, metadata: dict[str, str] | None = None
) -> int:
    """Save any module's state (torchao-quantised tensors included) to one safetensors file.

    Quantised tensors are flattened into their plain tensors plus torchao's JSON metadata
    (never pickled), as transformers does for ``TorchAoConfig`` folders.

    Returns:
        Bytes written.
    """
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    path = Path(path)
    tensors, ao_metadata = flatten_tensor_state_dict(
        {k: v.detach() for k, v in module.state_dict().items()}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(path),
        metadata={**ao_metadata, **(metadata or {})},
    )
    return path.stat().st_size


def load_quantised_module(module: nn.Module, path: Path | str) -> nn.Module:
    """Load a file of :func:`save_quantised_module` into ``module`` (built and quantised with the
    same scheme, or float when the file is float), in place; returns ``module``."""
    from safetensors import safe_open
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - not a dict
    if "tensor_names" in metadata:
        state, leftover = unflatten_tensor_state_dict(tensors, metadata)
        state.update(leftover)
    else:
        state = tensors
    module.load_state_dict(state, strict=True, assign=True)
    return module


INT8_WEIGHTS = "int8_weights"
"""Storage format of :func:`int8_weight_state`: int8 weights, float compute after loading."""
SCALE_SUFFIX = ".int8_scale"


def int8_weight_state(module: nn.Module) -> dict[str, Tensor]:
    """``module``'s state with every convolution and linear weight stored as int8.

    Symmetric, one scale per output channel: ``scale = max|w| / 127`` over the channel's
    weights, ``q = round(w / scale)`` in ``[-127, 127]``; the scale is stored beside the weight
    as ``NAME.int8_scale``. Everything else (biases, BatchNorm) stays float. A weight is off by at
    most ``scale / 2`` per element after :func:`dequantise_int8_state`.

    Returns:
        Name → tensor: int8 weights ``(out, ...)``, their float32 scales ``(out,)``, the rest.
    """
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    for name, sub in module.named_modules():
        if not isinstance(sub, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear):
            continue
        key = f"{name}.weight" if name else "weight"
        weight = state[key].float()
        flat = weight.reshape(weight.shape[0], -1)  # (out, in * kernel)
        scale = flat.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # (out,)
        q = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8)
        state[key] = q.reshape(weight.shape).contiguous()
        state[key + SCALE_SUFFIX] = scale.float().contiguous()
    return state


def dequantise_int8_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The float state dict of an :func:`int8_weight_state` (``q * scale`` per channel)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        scale = state.get(key + SCALE_SUFFIX)
        if scale is None:
            out[key] = value
            continue
        shape = (-1,) + (1,) * (value.dim() - 1)
        out[key] = value.float() * scale.reshape(shape)
    return out


def quantise_static_pt2e(
    model: nn.Module, example_inputs: tuple[Tensor, ...], calibration: Iterable[Tensor]
) -> torch.fx.GraphModule:
    """Static int8 of a whole CNN (convolutions and Linear) through torchao's PT2E flow with the
    x86 Inductor quantizer: export, insert observers, calibrate, convert.

    The result runs eagerly as float arithmetic on dequantised values (slow); under
    ``torch.compile`` Inductor lowers it to int8 oneDNN kernels.

    Args:
        model: A float CNN in eval mode (left unchanged).
        example_inputs: Inputs to export with; the batch dimension is exported as dynamic.
        calibration: Input batches for the activation observers.

    Returns:
        The quantised graph module.
    """
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic = tuple({0: batch} for _ in example_inputs)
    exported = torch.export.export(
        copy.deepcopy(model).eval(), example_inputs, dynamic_shapes=dynamic
    ).module()
    quantizer = x86.X86InductorQuantizer()
    quantizer.set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    seen = 0
    with torch.no_grad():
        for inputs in calibration:
            prepared(inputs)
            seen += 1
    if seen == 0:
        raise DistilError("static int8 needs calibration batches")
    return convert_pt2e(prepared)


def graph_constants(graph_module: torch.fx.GraphModule) -> dict[str, Tensor]:
    """The tensors a graph module's code reads (its ``get_attr`` nodes), i.e. what a deployment
    stores; PT2E leaves the replaced float weights attached but unused."""
    out: dict[str, Tensor] = {}
    for node in graph_module.graph.nodes:
        if node.op == "get_attr":
            value = graph_module
            for part in str(node.target).split("."):
                value = getattr(value, part)
            if isinstance(value, Tensor):
                out[str(node.target)] = value.detach()
    return out


def save_graph_constants(graph_module: torch.fx.GraphModule, path: Path | str) -> int:
    """Save the tensors a PT2E-quantised graph reads to safetensors; returns bytes written
    (the honest size of its weights: int8 filters, float scales and biases)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in graph_constants(graph_module).items()}
    save_file(tensors, str(path), metadata={"format": "distil-pt2e-constants"})
    return path.stat().st_size


def strip_unused_constants(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Delete the parameters and buffers a graph module's code never reads, in place (PT2E
    keeps the float weights it replaced with int8 constants); returns the module."""
    used = set(graph_constants(graph_module))
    named = [*graph_module.named_parameters(), *graph_module.named_buffers()]
    for name, _ in named:
        if name not in used:
            owner_name, _, attribute = name.rpartition(".")
            owner = graph_module.get_submodule(owner_name) if owner_name else graph_module
            delattr(owner, attribute)
    return graph_module


def save_pt2(
    graph_module: torch.fx.GraphModule, example_inputs: tuple[Tensor, ...], path: Path | str
) -> int:
    """Save a (PT2E-quantised) graph module as a ``torch.export`` program (``.pt2``) with a
    dynamic batch dimension, after dropping the constants it never reads; returns bytes written.
    ``torch.export.load(path).module()`` runs it without distil (after ``import
    torchao.quantization.pt2e``, which defines the ``quantized_decomposed`` operators it calls)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    strip_unused_constants(graph_module)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(
        graph_module, example_inputs, dynamic_shapes=tuple({0: batch} for _ in example_inputs)
    )
    torch.export.save(program, str(path))
    return path.stat().st_size


def quantised_dtypes(module: nn.Module) -> dict[str, int]:
    """Count of parameters per storage class: ``{"float32": n, "Int8Tensor": m, ...}``."""
    counts: dict[str, int] = {}
    for parameter in module.parameters():
        data = parameter.data if isinstance(parameter, nn.Parameter) else parameter
        name = type(data).__name__ if type(data) is not Tensor else str(data.dtype).split(".")[-1]
        counts[name] = counts.get(name, 0) + parameter.numel()
    return counts


def describe(scheme: QuantScheme) -> str:
    """One line for the run's mode line."""
    notes = {
        QuantScheme.int8_weight_only: "int8 weights per output row, float activations",
        QuantScheme.int8_dynamic: "int8 weights per row, int8 activations per token (dynamic)",
        QuantScheme.int8_dynamic_int4_weight: (
            f"int4 weights in groups of {INT4_GROUP_SIZE} stored one per byte "
            "(no packed int4 CPU kernel here), int8 dynamic activations"
        ),
        QuantScheme.int4_weight_only: f"int4 weights in groups of {INT4_GROUP_SIZE} (mslk/CUDA)",
    }
    return f"{scheme.value}: {notes[scheme]}"
