"""Width pruning of BERT-style sentence encoders (moved here from ``models.encoder``, which keeps
its ``narrow_encoder`` name for the imports that use it there).

The residual width, the attention heads (head size kept) and the FFN neurons are ranked by
their activations on calibration sentences and sliced, Minitron's width-pruning initialisation
applied to an encoder; distillation then trains the narrow student.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from distil.errors import DistilError
from distil.models.encoder import Encoder, tokenize
from distil.models.features import find_blocks

__all__ = ["narrow_encoder"]


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
