"""Compression around distillation: pruning, quantisation, LoRA students, export, and the stage
runner that chains them (``prune -> distil -> quantise -> distil (QAT) -> export``).

Modules (each imported on its own; this package imports nothing heavy):

- ``lm_prune``: depth and width pruning of Llama-style causal LMs by calibration importance.
- ``cnn_prune``: output-channel pruning of CNN classifiers (own slicing, or torch-pruning).
- ``encoder``: width pruning of BERT-style sentence encoders (``narrow_encoder``).
- ``quantise``: torchao post-training int8 and quantisation-aware training, PT2E static int8.
- ``latency``: size on disk and latency (batch 1 / 64, eager / compiled, median and spread).
- ``lora``: LoRA students through peft.
- ``export``: safetensors folders and ONNX files checked with onnxruntime.
- ``config`` and ``pipeline``: the pipeline schema and its fingerprinted, resumable runner.
"""

from __future__ import annotations

import importlib.util

from distil.errors import DistilError

_EXTRA_PACKAGES = {
    "torchao": "torchao",
    "torch_pruning": "torch-pruning",
    "peft": "peft",
    "onnxruntime": "onnxruntime",
    "onnxscript": "onnxscript",
}


def require(module: str) -> None:
    """Refuse early, naming the install command, when an optional package is missing.

    Raises:
        DistilError: If ``module`` cannot be imported.
    """
    if importlib.util.find_spec(module) is None:
        package = _EXTRA_PACKAGES.get(module, module)
        raise DistilError(
            f"this needs the {package} package: pip install 'distil[compress]' (or {package})"
        )
