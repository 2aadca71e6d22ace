"""Depth and width pruning of Llama-style causal LMs, ranked by calibration importance.

Importance comes from one pass over calibration batches with forward hooks
(:func:`collect_lm_importance`):

- **Block influence** of each decoder layer (ShortGPT, Men et al. 2024):
  ``BI_l = 1 - mean_t cos(h_in, h_out)`` over real tokens; a layer that barely changes the
  residual stream is the cheapest to drop.
- **Minitron activation importance** (Muralidharan et al. 2024, "Compact Language Models via
  Pruning and Knowledge Distillation"), per layer: each MLP neuron by its activation (the input
  of ``down_proj``), each attention head by the L2 norm of its context vector (the input of
  ``o_proj``), and each residual (embedding) channel by the RMSNorm outputs of every layer.
  Minitron aggregates over the sequence with the mean and over the batch with the L2 norm; so
  does this module, on magnitudes (``|a|``) so activations of both signs do not cancel.

:func:`layer_loss_increase` is the exact depth score: the calibration loss with each layer
removed in turn (one forward pass per layer).

Pruning is homogeneous, as Hugging Face configs need it: every layer keeps the same number of
heads and neurons (each layer its own most important ones) and all layers share the kept
residual channels. Heads are removed in whole key/value groups so the grouped-query ratio
``num_attention_heads / num_key_value_heads`` is unchanged, and ``head_dim`` is written into
the config explicitly, so the saved folder loads with plain ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distil.errors import DistilError
from distil.models.lm import decoder_layers, init_student_from_teacher

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

Batch = Mapping[str, Tensor]

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


class DepthImportance(str, Enum):
    """How decoder layers are ranked for depth pruning."""

    block_influence = "block_influence"  # 1 - cos(input, output), one pass (ShortGPT)
    loss_increase = "loss_increase"  # calibration loss without the layer, one pass per layer
    uniform = "uniform"  # keep evenly spread layers (DistilBERT-style), no calibration


@dataclass(frozen=True)
class LMImportance:
    """Calibration importance of every prunable unit of a causal LM.

    Attributes:
        block_influence: ``(L,)`` ``1 - cos(h_in, h_out)`` per decoder layer.
        heads: ``(L, H)`` per attention head, L2 over sequences of the mean context-vector norm.
        neurons: ``(L, I)`` per MLP neuron, L2 over sequences of the mean ``|activation|``.
        channels: ``(D,)`` per residual channel, summed over every RMSNorm output.
        num_tokens: Real (unmasked) tokens the scores were computed on.
    """

    block_influence: Tensor
    heads: Tensor
    neurons: Tensor
    channels: Tensor
    num_tokens: int


def _check_llama_like(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-layer list, after checking every layer has Llama's module names."""
    layers_name, layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        attention = getattr(layer, "self_attn", None)
        mlp = getattr(layer, "mlp", None)
        missing = [n for n in _ATTENTION if not isinstance(getattr(attention, n, None), nn.Linear)]
        missing += [n for n in _MLP if not isinstance(getattr(mlp, n, None), nn.Linear)]
        missing += [
            n for n in ("input_layernorm", "post_attention_layernorm") if not hasattr(layer, n)
        ]
        if missing:
            raise DistilError(
                f"layer {index} of {type(model).__name__} has no {missing}: pruning supports "
                "Llama-style decoders (self_attn.q/k/v/o_proj, mlp.gate/up/down_proj, RMSNorms)"
            )
    return layers_name, layers


def _token_mask(batch: Batch) -> Tensor:
    """``(B, T)`` float mask of real tokens."""
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    return (torch.ones_like(input_ids) if mask is None else mask).to(torch.float32)


def _model_inputs(batch: Batch, device: torch.device) -> dict[str, Tensor]:
    keep = ("input_ids", "attention_mask")
    return {k: v.to(device) for k, v in batch.items() if k in keep}


def _mean_abs_per_sequence(x: Tensor, mask: Tensor) -> Tensor:
    """``(B, T, C)`` activations → ``(B, C)`` mean ``|x|`` over each sequence's real tokens."""
    m = mask.to(x.device).unsqueeze(-1)  # (B, T, 1)
    return (x.detach().float().abs() * m).sum(1) / m.sum(1).clamp(min=1.0)


@torch.no_grad()
def collect_lm_importance(model: PreTrainedModel, batches: Iterable[Batch]) -> LMImportance:
    """Score layers, heads, neurons and residual channels on calibration batches.

    Args:
        model: A Llama-style ``*ForCausalLM`` (left unchanged; run in eval mode).
        batches: Each with ``input_ids`` ``(B, T)`` and optionally ``attention_mask`` ``(B, T)``.

    Returns:
        The scores; larger means more important.

    Raises:
        DistilError: For a non-Llama-style model or no calibration tokens.
    """
    _, layers = _check_llama_like(model)
    config = model.config
    num_layers = len(layers)
    num_heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // num_heads)
    # Squared per-sequence means summed over sequences: the L2 over the batch is taken at the end.
    heads_sq = torch.zeros(num_layers, num_heads)
    neurons_sq = torch.zeros(num_layers, int(config.intermediate_size))
    channels_sq = torch.zeros(2 * num_layers, int(config.hidden_size))
    cosine_sum = torch.zeros(num_layers)
    state: dict[str, Tensor] = {}
    handles = []

    def on_o_proj(layer: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            context = args[0]  # (B, T, H * head_dim)
            b, t, _ = context.shape
            norms = context.float().reshape(b, t, num_heads, head_dim).norm(dim=-1)  # (B, T, H)
            heads_sq[layer] += _mean_abs_per_sequence(norms, state["mask"]).pow(2).sum(0).cpu()

        return hook

    def on_down_proj(layer: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            per_sequence = _mean_abs_per_sequence(args[0], state["mask"])  # (B, I)
            neurons_sq[layer] += per_sequence.pow(2).sum(0).cpu()

        return hook

    def on_norm(slot: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: tuple[Any, ...], out: Tensor) -> None:
            channels_sq[slot] += _mean_abs_per_sequence(out, state["mask"]).pow(2).sum(0).cpu()

        return hook

    def on_layer(layer: int) -> Callable[..., None]:
        def hook(
            _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
        ) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]  # (B, T, D)
            h_out = out[0] if isinstance(out, tuple) else out  # (B, T, D)
            cos = F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)  # (B, T)
            cosine_sum[layer] += float((cos * state["mask"].to(cos.device)).sum())

        return hook

    for i, layer in enumerate(layers):
        sub = layer.get_submodule
        handles.append(sub("self_attn.o_proj").register_forward_pre_hook(on_o_proj(i)))
        handles.append(sub("mlp.down_proj").register_forward_pre_hook(on_down_proj(i)))
        handles.append(sub("input_layernorm").register_forward_hook(on_norm(2 * i)))
        handles.append(sub("post_attention_layernorm").register_forward_hook(on_norm(2 * i + 1)))
        handles.append(layer.register_forward_hook(on_layer(i), with_kwargs=True))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tokens = 0.0
    try:
        for batch in batches:
            state["mask"] = _token_mask(batch)
            tokens += float(state["mask"].sum())
            model(**_model_inputs(batch, device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if tokens == 0:
        raise DistilError("calibration gave no tokens; pruning needs calibration batches")
    return LMImportance(
        block_influence=1.0 - cosine_sum / tokens,
        heads=heads_sq.sqrt(),
        neurons=neurons_sq.sqrt(),
        channels=channels_sq.sqrt().sum(0),
        num_tokens=int(tokens),
    )


def _calibration_loss(model: nn.Module, batches: Sequence[Batch], device: torch.device) -> float:
    """Mean next-token cross-entropy over the real tokens of the batches."""
    total, count = 0.0, 0.0
    for batch in batches:
        inputs = _model_inputs(batch, device)
        logits = model(**inputs, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
        targets = inputs["input_ids"][:, 1:]  # (B, T-1)
        mask = _token_mask(batch)[:, 1:].to(device)  # (B, T-1)
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T-1)
        total += float((nll * mask).sum())
        count += float(mask.sum())
    if count == 0:
        raise DistilError("calibration gave no target tokens; use sequences of 2+ tokens")
    return total / count


@torch.no_grad()
def layer_loss_increase(model: PreTrainedModel, batches: Sequence[Batch]) -> Tensor:
    """The calibration loss increase when each decoder layer alone is skipped.

    Exact but costs one pass over the batches per layer (plus one for the full model).

    Args:
        model: A Llama-style causal LM (restored unchanged afterwards).
        batches: Calibration batches with ``input_ids`` ``(B, T)`` (and ``attention_mask``).

    Returns:
        ``(L,)`` loss without layer ``l`` minus the full model's loss.
    """
    layers_name, layers = _check_llama_like(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    base = _calibration_loss(model, batches, device)
    increases = []
    original = list(layers)
    config = model.config
    try:
        for skip in range(len(original)):
            kept = nn.ModuleList(m for i, m in enumerate(original) if i != skip)
            _set_layers(model, layers_name, kept)
            config.num_hidden_layers = len(kept)  # LlamaModel iterates layers[:num_hidden_layers]
            increases.append(_calibration_loss(model, batches, device) - base)
    finally:
        _set_layers(model, layers_name, nn.ModuleList(original))
        config.num_hidden_layers = len(original)
        model.train(was_training)
    return torch.tensor(increases)


def _set_layers(model: nn.Module, layers_name: str, layers: nn.ModuleList) -> None:
    parent_name, _, attr = layers_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, layers)


def _top_sorted(scores: Tensor, keep: int) -> Tensor:
    """Indices of the ``keep`` largest scores, in increasing index order (ties: lower index)."""
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:keep]), dtype=torch.long)


def select_layers(scores: Tensor, num_layers: int) -> tuple[int, ...]:
    """The ``num_layers`` layers with the largest scores, in depth order.

    Raises:
        DistilError: If ``num_layers`` is not between 1 and the number of layers.
    """
    if not 1 <= num_layers <= scores.numel():
        raise DistilError(
            f"depth pruning keeps between 1 and {scores.numel()} layers, got num_layers={num_layers}"
        )
    return tuple(int(i) for i in _top_sorted(scores, num_layers))


def prune_lm_depth(model: PreTrainedModel, keep_layers: Sequence[int]) -> PreTrainedModel:
    """A copy of ``model`` with only the decoder layers ``keep_layers`` (config updated).

    Embeddings, final norm and LM head are copied; the copy is checked tensor by tensor.
    """
    return init_student_from_teacher(model, list(keep_layers))


@dataclass(frozen=True)
class WidthTarget:
    """Target widths; ``None`` keeps a dimension as it is.

    Attributes:
        hidden_size: Residual (embedding) channels.
        intermediate_size: MLP neurons per layer.
        num_heads: Query heads per layer; a multiple of the grouped-query ratio
            ``num_attention_heads / num_key_value_heads``.
    """

    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_heads: int | None = None


@dataclass(frozen=True)
class WidthKeep:
    """Which units survive width pruning: indices into the original model.

    Attributes:
        channels: ``(D',)`` residual channels.
        query_rows: Per layer, ``(H' * head_dim,)`` rows of ``q_proj``.
        kv_rows: Per layer, ``(K' * head_dim,)`` rows of ``k_proj``/``v_proj``.
        neurons: Per layer, ``(I',)`` MLP neurons.
    """

    channels: Tensor
    query_rows: list[Tensor]
    kv_rows: list[Tensor]
    neurons: list[Tensor]


def plan_width(model: PreTrainedModel, importance: LMImportance, target: WidthTarget) -> WidthKeep:
    """Choose the units to keep for ``target`` from ``importance``.

    Raises:
        DistilError: For sizes out of range or a head count that breaks the GQA ratio.
    """
    config = model.config
    width = int(config.hidden_size)
    inner = int(config.intermediate_size)
    num_heads = int(config.num_attention_heads)
    num_kv = int(getattr(config, "num_key_value_heads", None) or num_heads)
    head_dim = int(getattr(config, "head_dim", None) or width // num_heads)
    group = num_heads // num_kv
    hidden = target.hidden_size or width
    neurons = target.intermediate_size or inner
    heads = target.num_heads or num_heads
    problems = []
    if not 1 <= hidden <= width:
        problems.append(f"hidden_size={hidden} must be between 1 and {width}")
    if not 1 <= neurons <= inner:
        problems.append(f"intermediate_size={neurons} must be between 1 and {inner}")
    if not group <= heads <= num_heads or heads % group:
        problems.append(
            f"num_heads={heads} must be a multiple of the grouped-query ratio {group} "
            f"({num_heads} query / {num_kv} key-value heads) between {group} and {num_heads}"
        )
    if problems:
        raise DistilError("width pruning: " + "; ".join(problems))
    offsets = torch.arange(head_dim)
    query_rows, kv_rows, neuron_keep = [], [], []
    for layer in range(importance.heads.shape[0]):
        group_scores = importance.heads[layer].reshape(num_kv, group).sum(-1)  # (K,)
        kept_groups = _top_sorted(group_scores, heads // group)  # (K',)
        kept_heads = (kept_groups.unsqueeze(-1) * group + torch.arange(group)).reshape(-1)
        query_rows.append((kept_heads.unsqueeze(-1) * head_dim + offsets).reshape(-1))
        kv_rows.append((kept_groups.unsqueeze(-1) * head_dim + offsets).reshape(-1))
        neuron_keep.append(_top_sorted(importance.neurons[layer], neurons))
    return WidthKeep(_top_sorted(importance.channels, hidden), query_rows, kv_rows, neuron_keep)


def prune_lm_width(model: PreTrainedModel, keep: WidthKeep) -> PreTrainedModel:
    """A narrower copy of ``model`` holding the units ``keep`` names (config updated).

    Raises:
        DistilError: For a tensor this Llama-style slicing does not know.
    """
    layers_name, _ = _check_llama_like(model)
    config = model.config
    num_heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // num_heads)
    d = keep.channels
    layer_prefix = layers_name + "."

    def sliced(name: str, value: Tensor) -> Tensor:
        if name.startswith(layer_prefix):
            index_text, rest = name[len(layer_prefix) :].split(".", 1)
            i = int(index_text)
            q, kv, f = keep.query_rows[i], keep.kv_rows[i], keep.neurons[i]
            rows_cols: dict[str, tuple[Tensor | None, Tensor | None]] = {
                "self_attn.q_proj": (q, d),
                "self_attn.k_proj": (kv, d),
                "self_attn.v_proj": (kv, d),
                "self_attn.o_proj": (d, q),
                "mlp.gate_proj": (f, d),
                "mlp.up_proj": (f, d),
                "mlp.down_proj": (d, f),
                "input_layernorm": (d, None),
                "post_attention_layernorm": (d, None),
            }
            module_name, _, kind = rest.rpartition(".")
            if module_name in rows_cols and kind in ("weight", "bias"):
                rows, cols = rows_cols[module_name]
                out = value if rows is None else value[rows]
                return out[:, cols] if kind == "weight" and cols is not None else out
        elif value.dim() == 2 and value.shape[1] == int(config.hidden_size):
            return value[:, d]  # input embedding and LM head: (V, D)
        elif value.dim() == 1 and value.shape[0] == int(config.hidden_size):
            return value[d]  # final norm
        raise DistilError(
            f"width pruning does not know how to slice {name} {tuple(value.shape)}; "
            "only Llama-style decoders are supported"
        )

    new_config = copy.deepcopy(config)
    new_config.hidden_size = int(d.numel())
    new_config.intermediate_size = int(keep.neurons[0].numel())
    new_config.num_attention_heads = int(keep.query_rows[0].numel()) // head_dim
    new_config.num_key_value_heads = int(keep.kv_rows[0].numel()) // head_dim
    new_config.head_dim = head_dim  # no longer hidden_size // num_heads: must be explicit
    state = {name: sliced(name, value).clone() for name, value in model.state_dict().items()}
    narrow = type(model)(new_config)
    # transformers wraps PreTrainedModel.to in a decorator that mypy reads as unbound.
    narrow.to(dtype=model.dtype, device=model.device)  # type: ignore[call-arg]
    narrow.load_state_dict(state, strict=True)
    narrow.train(model.training)
    logger.info(
        "width-pruned %s: hidden %d -> %d, heads %d/%d -> %d/%d, MLP %d -> %d",
        type(model).__name__,
        config.hidden_size,
        new_config.hidden_size,
        config.num_attention_heads,
        getattr(config, "num_key_value_heads", config.num_attention_heads),
        new_config.num_attention_heads,
        new_config.num_key_value_heads,
        config.intermediate_size,
        new_config.intermediate_size,
    )
    return narrow


@dataclass(frozen=True)
class LMPruneResult:
    """A pruned model and what decided it.

    Attributes:
        model: The pruned model (a new object; the input is unchanged).
        kept_layers: Original indices of the decoder layers kept.
        layer_scores: ``(L,)`` the depth scores used (``None`` for uniform or no depth pruning).
        importance: The calibration importance (``None`` when no calibration was needed).
    """

    model: PreTrainedModel
    kept_layers: tuple[int, ...]
    layer_scores: Tensor | None
    importance: LMImportance | None


def prune_causal_lm(
    model: PreTrainedModel,
    batches: Sequence[Batch],
    *,
    width: WidthTarget | None = None,
    num_layers: int | None = None,
    depth_importance: DepthImportance = DepthImportance.block_influence,
) -> LMPruneResult:
    """Width- and/or depth-prune a Llama-style causal LM from calibration importance.

    Importance is measured once on the unpruned model; width pruning is applied first, then
    the layers chosen on the unpruned model are kept.

    Args:
        model: The model to prune (left unchanged).
        batches: Calibration batches (``input_ids`` ``(B, T)``, optional ``attention_mask``).
        width: Target widths; ``None`` for no width pruning.
        num_layers: Decoder layers to keep; ``None`` for no depth pruning.
        depth_importance: How layers are ranked.

    Returns:
        The pruned model with its config updated, and the scores behind it.
    """
    _, layers = _check_llama_like(model)
    total_layers = len(layers)
    needs_importance = width is not None or (
        num_layers is not None and depth_importance == DepthImportance.block_influence
    )
    importance = collect_lm_importance(model, batches) if needs_importance else None
    layer_scores: Tensor | None = None
    kept = tuple(range(total_layers))
    if num_layers is not None and num_layers != total_layers:
        if depth_importance == DepthImportance.block_influence:
            assert importance is not None
            layer_scores = importance.block_influence
        elif depth_importance == DepthImportance.loss_increase:
            layer_scores = layer_loss_increase(model, batches)
        if layer_scores is None:
            from distil.models.lm import uniform_layer_indices

            kept = uniform_layer_indices(total_layers, num_layers)
        else:
            kept = select_layers(layer_scores, num_layers)
        logger.info(
            "depth pruning by %s keeps layers %s of %d",
            depth_importance.value,
            list(kept),
            total_layers,
        )
    pruned = model
    if width is not None:
        assert importance is not None
        pruned = prune_lm_width(model, plan_width(model, importance, width))
    if kept != tuple(range(total_layers)):
        pruned = prune_lm_depth(pruned, kept)
    elif pruned is model:
        pruned = copy.deepcopy(model)
    return LMPruneResult(pruned, kept, layer_scores, importance)


def lm_parameter_count(config: Any, **changes: int) -> int:
    """Parameters of a model of ``config``'s class with some sizes changed, built on the meta
    device (no memory, no initialisation).

    Args:
        config: A transformers config (copied, not changed).
        **changes: Config attributes to override, e.g. ``hidden_size=128``.
    """
    from transformers import AutoModelForCausalLM

    new_config = copy.deepcopy(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    new_config.head_dim = head_dim
    for key, value in changes.items():
        setattr(new_config, key, value)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(new_config)
    return sum(p.numel() for p in model.parameters())


def uniform_ratio_target(config: Any, fraction: float) -> WidthTarget:
    """Widths that scale hidden, MLP and heads by about ``sqrt(fraction)`` each, so the
    non-embedding parameters shrink by about ``fraction`` (heads rounded to the GQA ratio)."""
    if not 0 < fraction <= 1:
        raise DistilError(f"fraction must be in (0, 1], got {fraction}")
    scale = math.sqrt(fraction)
    num_heads = int(config.num_attention_heads)
    group = num_heads // int(getattr(config, "num_key_value_heads", None) or num_heads)
    heads = max(group, round(num_heads * scale / group) * group)
    return WidthTarget(
        hidden_size=max(1, round(int(config.hidden_size) * scale)),
        intermediate_size=max(1, round(int(config.intermediate_size) * scale)),
        num_heads=heads,
    )
