"""Selecting supervised positions and normalising a loss over them, exactly once.

Every token/class loss in :mod:`distil.losses` follows one reduction convention:

* a boolean ``mask`` of shape ``(...)`` (True = supervised) picks positions out of inputs of shape
  ``(..., V)`` *before* any math, so masked positions never enter the computation: their values
  (even ``inf``/``nan`` padding) cannot change the loss and they receive exactly zero gradient;
* the per-position values are summed and divided by ``num_items``. By default ``num_items`` is
  the number of supervised positions in this call. Under gradient accumulation the caller counts
  the supervised positions of the whole accumulation window and passes that count to every
  micro-batch, so the window is normalised once (failure mode F6: per-micro-batch means weight
  short micro-batches too heavily, and ``batchmean`` on ``(B, T, V)`` scales with ``T``).
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor

__all__ = [
    "NumItems",
    "Reduction",
    "divide_by",
    "normalizer",
    "reduce_positions",
    "select_positions",
]

NumItems = int | float | Tensor | None


class Reduction(str, Enum):
    """How per-position loss values are combined.

    Attributes:
        MEAN: sum over supervised positions divided by ``num_items`` (the default everywhere).
        SUM: plain sum over supervised positions (``num_items`` must not be given).
        NONE: per-position values in the mask's shape, zero at masked positions.
    """

    MEAN = "mean"
    SUM = "sum"
    NONE = "none"


def select_positions(x: Tensor, mask: Tensor | None, *, event_dims: int = 1) -> Tensor:
    """Flatten the position dims of ``x`` and keep only supervised positions.

    Args:
        x: tensor of shape ``(*positions, *event)`` where ``event`` has ``event_dims`` dims.
        mask: bool tensor of shape ``positions`` (True = keep) or None (keep all).
        event_dims: number of trailing dims that belong to one position (1 for ``(..., V)``).

    Returns:
        Tensor of shape ``(N, *event)`` with ``N`` the number of kept positions. Boolean
        indexing is differentiable: dropped positions get exactly zero gradient.

    Raises:
        ValueError: if the mask is not bool or its shape does not match the position dims.
    """
    positions = x.shape[: x.dim() - event_dims]
    event = x.shape[x.dim() - event_dims :]
    if mask is None:
        return x.reshape(-1, *event)
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = supervised), got dtype {mask.dtype}")
    if mask.shape != positions:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match the position dims {tuple(positions)} "
            f"of an input of shape {tuple(x.shape)}"
        )
    return x[mask]


def normalizer(num_items: NumItems, num_selected: int) -> Tensor | float:
    """The divisor applied to a summed loss.

    Args:
        num_items: caller-supplied count of supervised positions over the normalisation window
            (python number or scalar tensor), or None to use ``num_selected``.
        num_selected: supervised positions in this call.

    Returns:
        ``max(num_items, 1)``: an empty window sums to exactly 0, and dividing 0 by 1 keeps it 0
        instead of producing ``nan``. Counts are integers, so the floor changes nothing else.
        A tensor count is returned as a float64 scalar (exact beyond 2**24 tokens); divide with
        :func:`divide_by` so the result keeps the loss's dtype.

    Raises:
        ValueError: on a negative count or a non-scalar tensor.
    """
    if num_items is None:
        return float(max(num_selected, 1))
    if isinstance(num_items, Tensor):
        if num_items.numel() != 1:
            raise ValueError(f"num_items must be a scalar, got shape {tuple(num_items.shape)}")
        return num_items.detach().to(torch.float64).clamp_min(1.0).reshape(())
    if num_items < 0:
        raise ValueError(f"num_items must be >= 0, got {num_items}")
    return float(max(num_items, 1))


def divide_by(value: Tensor, denominator: Tensor | float) -> Tensor:
    """``value / denominator`` in ``value``'s dtype (a float64 count must not promote it)."""
    if isinstance(denominator, Tensor):
        return value / denominator.to(value.dtype)
    return value / denominator


def reduce_positions(
    per_position: Tensor,
    mask: Tensor | None,
    positions_shape: tuple[int, ...],
    *,
    num_items: NumItems = None,
    reduction: Reduction | str = Reduction.MEAN,
) -> Tensor:
    """Reduce values computed on selected positions.

    Args:
        per_position: shape ``(N,)``, one value per selected position (see
            :func:`select_positions`).
        mask: the mask used for the selection, or None.
        positions_shape: the position dims of the original input, used for ``"none"``.
        num_items: normaliser for ``"mean"`` (see :func:`normalizer`).
        reduction: a :class:`Reduction` value.

    Returns:
        A scalar for ``"mean"``/``"sum"``; shape ``positions_shape`` for ``"none"`` with zeros
        at masked positions.

    Raises:
        ValueError: on an unknown reduction, or ``num_items`` given without ``"mean"``.
    """
    reduction = Reduction(reduction)
    if num_items is not None and reduction is not Reduction.MEAN:
        raise ValueError(f"num_items only applies to reduction='mean', got {reduction.value!r}")
    if reduction is Reduction.NONE:
        if mask is None:
            return per_position.reshape(positions_shape)
        out = per_position.new_zeros(positions_shape)
        return out.masked_scatter(mask, per_position)
    total = per_position.sum()
    if reduction is Reduction.SUM:
        return total
    return divide_by(total, normalizer(num_items, per_position.shape[0]))
