"""Export: folders other tools load as they are, and ONNX files checked with onnxruntime.

- Causal LMs and Hugging Face classifiers: ``save_pretrained`` folders (safetensors + config).
- Sentence encoders: ``models.encoder.save_sentence_encoder`` (transformers and
  sentence-transformers both load it).
- Zoo classifiers (MLP, CNN, ResNet built in code): ``model.safetensors`` plus
  ``distil_model.json`` naming the zoo model and its kwargs, rebuilt by
  :func:`load_zoo_classifier` without pickle.
- ONNX for classifiers and encoders (torch's dynamo exporter, batch and sequence dimensions
  dynamic), then :func:`check_onnx` runs the file with onnxruntime on fresh inputs and compares
  with PyTorch: an export is only reported as done when the outputs agree within tolerance.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from distil.compress import require
from distil.errors import DistilError

if TYPE_CHECKING:
    from distil.compress.quantise import QuantScheme

logger = logging.getLogger(__name__)

ZOO_SPEC = "distil_model.json"
ZOO_FORMAT = "distil-zoo-classifier"
PT2E_FILE = "model.pt2"
STATIC_PT2E = "static_pt2e"
INT8_WEIGHTS = "int8_weights"  # == quantise.INT8_WEIGHTS (not imported: torch-only module here)


def save_zoo_classifier(
    module: nn.Module,
    folder: Path | str,
    *,
    zoo: str,
    kwargs: Mapping[str, Any],
    in_shape: Sequence[int],
    num_classes: int,
    linear_scheme: QuantScheme | None = None,
) -> Path:
    """Save a zoo classifier as ``model.safetensors`` + ``distil_model.json``.

    Args:
        module: The model (e.g. a pruned ``SmallCNN``), float or with torchao-quantised Linear
            layers.
        folder: Output folder.
        zoo: Zoo name (``cnn``, ``mlp``, ``resnet``).
        kwargs: Zoo kwargs that build this exact shape (``cnn_prune.zoo_kwargs_of``).
        in_shape: One example's shape, e.g. ``(1, 28, 28)``.
        num_classes: Output classes.
        linear_scheme: The scheme its Linear layers were quantised with, if any.
    """
    from distil.compress.quantise import save_quantised_module

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_quantised_module(module, folder / "model.safetensors", metadata={"source": f"zoo:{zoo}"})
    spec = {
        "format": ZOO_FORMAT,
        "zoo": zoo,
        "kwargs": dict(kwargs),
        "in_shape": list(in_shape),
        "num_classes": num_classes,
        "quantisation": None if linear_scheme is None else linear_scheme.value,
    }
    (folder / ZOO_SPEC).write_text(json.dumps(spec, indent=1, sort_keys=True))
    return folder


def save_zoo_int8_weights(
    module: nn.Module, folder: Path | str, *, spec: Mapping[str, Any]
) -> Path:
    """Save a float zoo classifier with int8 weights (``quantise.int8_weight_state``):
    ``model.safetensors`` holds int8 convolution/linear weights and their per-channel scales,
    ``distil_model.json`` the float model's spec marked ``int8_weights``; loading dequantises
    (float compute, a quarter of the weight bytes)."""
    from safetensors.torch import save_file

    from distil.compress.quantise import int8_weight_state

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(int8_weight_state(module), str(folder / "model.safetensors"))
    out = {**dict(spec), "format": ZOO_FORMAT, "quantisation": INT8_WEIGHTS}
    (folder / ZOO_SPEC).write_text(json.dumps(out, indent=1, sort_keys=True))
    return folder


def save_zoo_pt2e(
    graph_module: torch.fx.GraphModule,
    folder: Path | str,
    *,
    example_inputs: tuple[Tensor, ...],
    spec: Mapping[str, Any],
) -> Path:
    """Save a PT2E static-int8 zoo classifier: ``model.pt2`` (a ``torch.export`` program that
    runs without distil, once ``torchao.quantization.pt2e`` is imported: :func:`load_pt2e_program`) and ``distil_model.json`` (the float model's spec, marked quantised)."""
    from distil.compress.quantise import save_pt2

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_pt2(graph_module, example_inputs, folder / PT2E_FILE)
    out = {**dict(spec), "format": ZOO_FORMAT, "quantisation": STATIC_PT2E}
    (folder / ZOO_SPEC).write_text(json.dumps(out, indent=1, sort_keys=True))
    return folder


def read_zoo_spec(folder: Path | str) -> dict[str, Any]:
    """The ``distil_model.json`` of a zoo classifier folder."""
    path = Path(folder) / ZOO_SPEC
    if not path.is_file():
        raise DistilError(f"{folder} has no {ZOO_SPEC}; is it a distil zoo classifier folder?")
    spec: dict[str, Any] = json.loads(path.read_text())
    if spec.get("format") != ZOO_FORMAT:
        raise DistilError(f"{path} is not a {ZOO_FORMAT} spec (format {spec.get('format')!r})")
    return spec


def build_zoo_module(spec: Mapping[str, Any]) -> nn.Module:
    """An untrained zoo model of a ``distil_model.json`` spec's shape."""
    from distil.models.classifier import MLP, SmallCNN, SmallResNet

    zoo, kwargs = spec["zoo"], dict(spec["kwargs"])
    in_shape, classes = list(spec["in_shape"]), int(spec["num_classes"])
    kwargs.pop("text_features", None)
    if zoo == "cnn":
        return SmallCNN(in_shape[0], classes, **kwargs)
    if zoo == "resnet":
        return SmallResNet(in_shape[0], classes, **kwargs)
    if zoo == "mlp":
        features = 1
        for size in in_shape:
            features *= size
        image_shape = tuple(in_shape) if len(in_shape) == 3 else None
        return MLP(features, classes, image_shape=image_shape, **kwargs)
    raise DistilError(f"unknown zoo model {zoo!r} in {ZOO_SPEC}")


def load_pt2e_program(path: Path | str) -> nn.Module:
    """Run a PT2E int8 ``model.pt2`` (``torch.export.load(path).module()``).

    Its graph calls the ``quantized_decomposed`` operators, which exist only once a module
    defining them is imported: torchao's PT2E package is (a fresh process that imports neither
    fails to deserialise the program with "failed to resolve
    torch.ops.quantized_decomposed...").
    """
    require("torchao")
    import torchao.quantization.pt2e  # noqa: F401  (registers the quantized_decomposed ops)

    program: nn.Module = torch.export.load(str(path)).module()
    return program


def load_zoo_classifier(folder: Path | str) -> nn.Module:
    """Rebuild a zoo classifier folder (no pickle), in eval mode: float, with its Linear layers
    quantised by the torchao scheme the spec names, or from int8 weight storage (dequantised to
    float: :func:`save_zoo_int8_weights`)."""
    from distil.compress.quantise import QuantScheme, load_quantised_module, quantise_linears
    from distil.models.classifier import load_weights

    spec = read_zoo_spec(folder)
    if spec.get("quantisation") == STATIC_PT2E:
        return load_pt2e_program(Path(folder) / PT2E_FILE)
    module = build_zoo_module(spec)
    weights = Path(folder) / "model.safetensors"
    if spec.get("quantisation") == INT8_WEIGHTS:
        from safetensors.torch import load_file

        from distil.compress.quantise import dequantise_int8_state

        module.load_state_dict(dequantise_int8_state(load_file(str(weights))), strict=True)
    elif spec.get("quantisation"):
        module = quantise_linears(module, QuantScheme(spec["quantisation"]))
        load_quantised_module(module, weights)
    else:
        load_weights(module, weights)
    return module.eval()


class SentenceEmbedding(nn.Module):
    """A transformer body with masked mean pooling (and L2 normalisation): the graph exported
    to ONNX for a sentence encoder, so the file outputs sentence embeddings directly."""

    def __init__(self, body: nn.Module, normalize: bool) -> None:
        super().__init__()
        self.body = body
        self.normalize = normalize

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, D)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled


def export_onnx(
    module: nn.Module,
    inputs: Mapping[str, Tensor],
    path: Path | str,
    *,
    output_names: Sequence[str] = ("output",),
    dynamic_dims: Mapping[str, Mapping[int, str]] | None = None,
) -> Path:
    """Export ``module(**inputs)`` to ONNX with torch's dynamo exporter.

    Args:
        module: The model (put in eval mode).
        inputs: Keyword inputs of one call, e.g. ``{"x": images}``; their order is the graph's.
        path: The ``.onnx`` file.
        output_names: Names of the graph outputs.
        dynamic_dims: Input name → {dimension: symbol}; default: dimension 0 of every input is
            ``batch``.

    Returns:
        The path.
    """
    require("onnxscript")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    dims = dynamic_dims or {name: {0: "batch"} for name in inputs}
    dynamic_shapes = {
        name: {axis: torch.export.Dim.DYNAMIC for axis in dims.get(name, {})} for name in inputs
    }
    try:
        torch.onnx.export(
            module,
            (),
            str(path),
            kwargs=dict(inputs),
            input_names=list(inputs),
            output_names=list(output_names),
            dynamic_shapes=dynamic_shapes,
            dynamo=True,
            verbose=False,
        )
    except Exception as exc:  # the exporter raises many types; the cause is in the message
        raise DistilError(
            f"ONNX export of {type(module).__name__} failed: {str(exc).strip().splitlines()[0]}"
        ) from exc
    return path


@dataclass(frozen=True)
class OnnxCheck:
    """How an ONNX file's outputs compare with PyTorch's on the same inputs.

    Attributes:
        max_abs_diff: Largest absolute difference over all outputs.
        max_abs_reference: Largest absolute PyTorch output (for scale).
        batch_size: Batch size of the check (not the export's, to test the dynamic axis).
    """

    max_abs_diff: float
    max_abs_reference: float
    batch_size: int


def check_onnx(
    path: Path | str,
    module: nn.Module,
    inputs: Mapping[str, Tensor],
    *,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> OnnxCheck:
    """Run an ONNX file with onnxruntime and compare with ``module(**inputs)``.

    Raises:
        DistilError: When any output differs by more than ``atol + rtol * |reference|``.
    """
    require("onnxruntime")
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {name: value.detach().cpu().numpy() for name, value in inputs.items()}
    got = session.run(None, feed)
    module.eval()
    with torch.no_grad():
        expected = module(**inputs)
    expected_list = [expected] if isinstance(expected, Tensor) else list(expected)
    worst, scale = 0.0, 0.0
    for out, ref in zip(got, expected_list, strict=True):
        reference = ref.detach().cpu().numpy()
        if out.shape != reference.shape:
            raise DistilError(
                f"ONNX output shape {out.shape} differs from PyTorch's {reference.shape} ({path})"
            )
        diff = np.abs(out - reference)
        worst = max(worst, float(diff.max(initial=0.0)))
        scale = max(scale, float(np.abs(reference).max(initial=0.0)))
        if bool((diff > atol + rtol * np.abs(reference)).any()):
            raise DistilError(
                f"ONNX outputs of {path} differ from PyTorch by up to {worst:.3g} "
                f"(tolerance {atol} + {rtol}·|x|); the export is not faithful"
            )
    batch = next(iter(inputs.values())).shape[0]
    return OnnxCheck(max_abs_diff=worst, max_abs_reference=scale, batch_size=int(batch))
