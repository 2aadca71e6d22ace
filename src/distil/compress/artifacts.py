"""Model folders as the pipeline passes them between stages: load, save, size, example inputs.

Every stage reads a folder and writes a folder that the outside world loads as it is:

- ``causal_lm``: a ``save_pretrained`` folder with its tokenizer files (quantised folders carry
  torchao's ``quantization_config`` and load with plain ``AutoModelForCausalLM``).
- ``classifier``: a distil zoo folder (``distil_model.json`` + ``model.safetensors``, or
  ``model.pt2`` for a PT2E static-int8 model, which ``torch.export.load`` runs).
- ``encoder``: a folder transformers (``AutoModel``) and sentence-transformers both load.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distil.compress.config import ModelKind
from distil.errors import DistilError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
)
SENTENCE_TRANSFORMERS_FILES = (
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)
SENTENCE_TRANSFORMERS_DIRS = ("1_Pooling", "2_Normalize")
WEIGHT_SUFFIXES = (".safetensors", ".pt2", ".onnx")


@dataclass
class LoadedModel:
    """A model read from a stage folder.

    Attributes:
        kind: What it is.
        module: The network (LM, classifier, or the encoder's transformer body).
        folder: Where it was read from.
        encoder: The sentence encoder wrapper (encoders only).
        zoo_spec: The ``distil_model.json`` (classifiers only).
    """

    kind: ModelKind
    module: nn.Module
    folder: Path
    encoder: Any = None
    zoo_spec: dict[str, Any] | None = None


def load_model(
    kind: ModelKind, folder: Path | str, *, max_length: int | None = None
) -> LoadedModel:
    """Load a stage folder of ``kind`` (eval mode).

    Raises:
        DistilError: If the folder does not hold a model of that kind.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DistilError(f"model folder {folder} does not exist")
    if kind == ModelKind.causal_lm:
        from distil.models.lm import load_causal_lm

        return LoadedModel(kind, load_causal_lm(folder).eval(), folder)
    if kind == ModelKind.classifier:
        from distil.compress.export import load_zoo_classifier, read_zoo_spec

        return LoadedModel(
            kind, load_zoo_classifier(folder), folder, zoo_spec=read_zoo_spec(folder)
        )
    from distil.models.encoder import load_encoder

    encoder = load_encoder(folder, max_length=max_length)
    encoder.model.eval()
    return LoadedModel(kind, encoder.model, folder, encoder=encoder)


def copy_side_files(source: Path, target: Path, *, sentence_transformers: bool = False) -> None:
    """Copy tokenizer files (and sentence-transformers module files) that a weights-only save
    does not write."""
    names = list(TOKENIZER_FILES)
    if sentence_transformers:
        names += SENTENCE_TRANSFORMERS_FILES
    for name in names:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    if sentence_transformers:
        for name in SENTENCE_TRANSFORMERS_DIRS:
            if (source / name).is_dir():
                shutil.copytree(source / name, target / name, dirs_exist_ok=True)


def save_float_model(
    loaded: LoadedModel,
    module: nn.Module,
    folder: Path,
    *,
    zoo_kwargs: dict[str, Any] | None = None,
    encoder: Any = None,
) -> None:
    """Save a (pruned, distilled) float model of ``loaded``'s kind as a stage folder.

    Args:
        loaded: The model it came from (kind, side files, zoo spec).
        module: The new network.
        folder: Target folder (created).
        zoo_kwargs: Classifiers: zoo kwargs of the new shape (default: the old ones).
        encoder: Encoders: the new ``Encoder`` (default: ``loaded``'s with ``module``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    if loaded.kind == ModelKind.causal_lm:
        module.save_pretrained(str(folder))  # type: ignore[operator]
        copy_side_files(loaded.folder, folder)
    elif loaded.kind == ModelKind.classifier:
        from distil.compress.export import save_zoo_classifier

        spec = loaded.zoo_spec or {}
        if spec.get("quantisation"):
            raise DistilError(f"{loaded.folder} is quantised; save_float_model takes float models")
        save_zoo_classifier(
            module,
            folder,
            zoo=spec["zoo"],
            kwargs=zoo_kwargs if zoo_kwargs is not None else spec["kwargs"],
            in_shape=spec["in_shape"],
            num_classes=int(spec["num_classes"]),
        )
    else:
        from dataclasses import replace

        from distil.models.encoder import save_sentence_encoder

        new = encoder if encoder is not None else replace(loaded.encoder, model=module)
        save_sentence_encoder(new, folder)


def weight_bytes_on_disk(folder: Path | str) -> int:
    """Bytes of the weight files (safetensors, pt2, onnx) under a folder."""
    from distil.compress.latency import folder_bytes

    return folder_bytes(folder, suffixes=WEIGHT_SUFFIXES)


def parameter_count(module: nn.Module) -> int:
    """Logical parameters: a quantised weight counts its elements, not its bytes. A PT2E
    program (a graph module) keeps its int8 weights as constants, not parameters: every tensor
    its graph reads counts (weights, biases and their quantisation scales)."""
    tensors = {id(p): p.numel() for p in module.parameters()}
    if isinstance(module, torch.fx.GraphModule):
        from distil.compress.quantise import graph_constants

        tensors |= {id(t): t.numel() for t in graph_constants(module).values()}
    return sum(tensors.values())


def usable_length(loaded: LoadedModel, sequence_length: int) -> int:
    """``sequence_length`` capped at the model's positions (and an encoder's ``max_length``)."""
    config: Any = getattr(loaded.module, "config", None)
    limits = [sequence_length, int(getattr(config, "max_position_embeddings", sequence_length))]
    if loaded.encoder is not None:
        limits.append(int(loaded.encoder.max_length))
    return min(limits)


def example_inputs(loaded: LoadedModel, batch_size: int, sequence_length: int) -> dict[str, Any]:
    """Inputs of one forward pass at ``batch_size`` (random token ids of
    :func:`usable_length` / images), for latency and ONNX checks."""
    g = torch.Generator().manual_seed(batch_size)
    if loaded.kind == ModelKind.classifier:
        assert loaded.zoo_spec is not None
        shape = (batch_size, *loaded.zoo_spec["in_shape"])
        return {"x": torch.randn(shape, generator=g)}
    config: Any = getattr(loaded.module, "config", None)
    vocab = int(config.vocab_size)
    length = usable_length(loaded, sequence_length)
    ids = torch.randint(0, vocab, (batch_size, length), generator=g)
    if loaded.kind == ModelKind.causal_lm:
        return {"input_ids": ids, "use_cache": False}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
