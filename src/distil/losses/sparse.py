"""Divergences against a sparse teacher: top-k log-probs with a tail bucket, or importance samples.

A cached or served teacher rarely ships its full distribution (about 300 KB per token at a
128k vocabulary). Two sparse forms are supported, both with the full-vocabulary student:

**Top-k + tail.** The teacher gives ``k`` log-probs, their token ids and (optionally) the log of
the remaining mass. Both distributions are coarsened to ``k + 1`` buckets: the ``k`` ids and one
tail bucket holding everything else. The student's tail is ``logsumexp`` over its non-top-k
logits minus ``logsumexp`` over all of them, computed directly (no ``log(1 − Σ)`` cancellation).
Any divergence that is a sum of pointwise terms is then evaluated on the buckets. Because both
bucket distributions are proper, the result is a true divergence between coarsenings: never
negative, 0 when student = teacher, and for KL/JSD/TVD at most the full-vocabulary value (data
processing inequality). Nothing is clamped (the truncated-KL failure F7: dropping the tail makes
KL negative, and clamping it at 0 discards the gradient). At ``k = V`` it equals the full
divergence.

**Importance samples.** The teacher gives ``n`` token ids drawn with replacement from a proposal
``r`` (by default the teacher itself), the teacher's log-probs at those ids and the proposal's
log-probs. For ``D = Σ_v t(p_v, q_v)`` the estimate ``(1/n)·Σ_i t(p_i, q_i) / r_i`` is unbiased,
and because every term ``t`` is written to be ``>= 0`` pointwise (extended KL form), every
estimate is non-negative too. Its gradient is an unbiased estimate of the true gradient.

The teacher's log-probs must already be at ``kd_temperature`` (a cache records the temperature it
was written at; :func:`teacher_topk` and :func:`sample_teacher_targets` take it as an argument).
``kd_temperature`` here only divides the student's logits.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from distil.losses.divergences import DIVERGENCE_TERMS, Divergence, log_probs, upcast
from distil.losses.reduction import NumItems, Reduction, reduce_positions, select_positions

__all__ = [
    "SampledTargets",
    "TopKTargets",
    "sample_tail_targets",
    "sample_teacher_targets",
    "sampled_divergence",
    "student_bucket_log_probs",
    "teacher_bucket_log_probs",
    "teacher_topk",
    "topk_divergence",
    "topk_sampled_tail_kl",
]

_NEG_INF = float("-inf")


class TopKTargets(NamedTuple):
    """A teacher distribution truncated to its top k entries plus one tail bucket.

    Attributes:
        log_probs: shape ``(..., k)``, the teacher's log-probs of its k most likely tokens.
        ids: shape ``(..., k)`` int64, their token ids (distinct within a position).
        tail_log_prob: shape ``(...)``, ``log(1 − Σ exp(log_probs))``; ``-inf`` when k = V.
        tail_sample_ids: optional ``(..., m)`` int64 ids drawn from the teacher's tail (its
            distribution renormalised outside the top-k), with replacement; with them the
            forward KL is estimated without bias instead of bucketed (see
            :func:`topk_sampled_tail_kl`).
        tail_sample_log_probs: ``(..., m)`` the teacher's log-probs at ``tail_sample_ids``.
    """

    log_probs: Tensor
    ids: Tensor
    tail_log_prob: Tensor
    tail_sample_ids: Tensor | None = None
    tail_sample_log_probs: Tensor | None = None


class SampledTargets(NamedTuple):
    """Token ids sampled from a proposal, with the teacher's and the proposal's log-probs.

    Attributes:
        ids: shape ``(..., n)`` int64, drawn with replacement from the proposal.
        teacher_log_probs: shape ``(..., n)``, ``log p`` at ``ids`` (at ``kd_temperature``).
        proposal_log_probs: shape ``(..., n)``, ``log r`` at ``ids``.
    """

    ids: Tensor
    teacher_log_probs: Tensor
    proposal_log_probs: Tensor


def _safe_logsumexp(x: Tensor) -> Tensor:
    """``logsumexp`` over the last dim that returns ``-inf`` with zero gradient for rows that are
    all ``-inf`` (plain ``logsumexp`` back-propagates ``nan`` there)."""
    dead = (x == _NEG_INF).all(dim=-1, keepdim=True)
    out = torch.logsumexp(torch.where(dead, 0.0, x), dim=-1)
    return torch.where(dead.squeeze(-1), _NEG_INF, out)


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 − exp(x))`` for ``x <= 0``, stable at both ends (``-inf`` at ``x >= 0``)."""
    neg = x < 0
    safe = torch.where(neg, x, -1.0)
    near_zero = safe > -math.log(2.0)
    out = torch.where(near_zero, torch.log(-torch.expm1(safe)), torch.log1p(-torch.exp(safe)))
    return torch.where(neg, out, _NEG_INF)


def teacher_topk(teacher_logits: Tensor, k: int, *, kd_temperature: float = 1.0) -> TopKTargets:
    """Truncate a full teacher distribution to top-k + tail (what a cache writer stores).

    Args:
        teacher_logits: shape ``(..., V)``.
        k: entries to keep, ``1 <= k <= V``.
        kd_temperature: temperature of the stored distribution.

    Returns:
        :class:`TopKTargets` in fp32; the tail is computed from the non-top-k logits directly.

    Raises:
        ValueError: if ``k`` is out of range.
    """
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must lie in [1, V={vocab}], got {k}")
    lp = log_probs(teacher_logits, kd_temperature)  # (..., V)
    top_lp, ids = lp.topk(k, dim=-1)  # (..., k) each
    tail = _safe_logsumexp(lp.scatter(-1, ids, _NEG_INF))  # (...)
    return TopKTargets(top_lp, ids, tail)


def teacher_bucket_log_probs(
    teacher_topk_log_probs: Tensor,
    teacher_tail_log_prob: Tensor | None = None,
    *,
    vocab_size: int | None = None,
    mass_tolerance: float | None = 1e-2,
) -> Tensor:
    """The teacher's ``k + 1`` bucket log-probs ``[top-k..., tail]``, normalised.

    Args:
        teacher_topk_log_probs: shape ``(..., k)`` (bf16/fp16 caches are upcast).
        teacher_tail_log_prob: shape ``(...)``, or None to derive it as ``log(1 − Σ p_topk)``
            (in float64). Prefer storing it: :func:`teacher_topk` computes it exactly from the
            non-top-k logits, while a derived tail is only as good as the stored log-probs; if
            they sum to exactly 1 the derived tail is 0, and mode-seeking divergences (reverse
            KL) are then infinite wherever the student keeps tail mass.
        vocab_size: if equal to k, there are no tokens outside the top-k and the tail is 0 by
            definition (its derived value would be rounding noise).
        mass_tolerance: the top-k + tail mass must be within this of 1 (derived tail: the top-k
            mass must not exceed 1 + tolerance); otherwise a ValueError names the likely cause.
            Within tolerance the buckets are renormalised, which absorbs quantisation of a
            bf16/fp16 cache. None skips the check (it costs a device sync).

    Returns:
        Shape ``(..., k + 1)``; the last bucket is the tail.

    Raises:
        ValueError: if the mass check fails.
    """
    top = upcast(teacher_topk_log_probs)
    k = top.shape[-1]
    if vocab_size is not None and k >= vocab_size:
        tail = torch.full_like(top[..., 0], _NEG_INF)
    elif teacher_tail_log_prob is None:
        # In float64: log-probs near 0 are precise even in fp32, but their exp rounds to 1.0
        # there, so an fp32 ``1 − Σp`` loses any tail below ~1e-7 (and reverse KL becomes inf).
        top_mass = torch.logsumexp(top.double(), dim=-1)  # (...)
        if mass_tolerance is not None and bool((top_mass > math.log1p(mass_tolerance)).any()):
            raise ValueError(
                "teacher top-k probabilities sum to more than 1 + mass_tolerance "
                f"(max {float(top_mass.max().exp()):.4f}); were logits passed instead of log-probs?"
            )
        tail = _log1mexp(top_mass).to(top.dtype)
    else:
        tail = upcast(teacher_tail_log_prob).to(top.dtype)
    buckets = torch.cat([top, tail.unsqueeze(-1)], dim=-1)  # (..., k + 1)
    total = torch.logsumexp(buckets, dim=-1)
    if (
        mass_tolerance is not None
        and teacher_tail_log_prob is not None
        and bool(((total.exp() - 1.0).abs() > mass_tolerance).any())
    ):
        worst = float((total.exp() - 1.0).abs().max())
        raise ValueError(
            f"teacher top-k + tail mass differs from 1 by up to {worst:.4f} (> {mass_tolerance}); "
            "check that the cache stores log-probs at the same kd_temperature"
        )
    return buckets - total.unsqueeze(-1)


def student_bucket_log_probs(
    student_logits: Tensor, ids: Tensor, *, kd_temperature: float = 1.0
) -> Tensor:
    """The student's ``k + 1`` bucket log-probs ``[q at ids..., log(1 − Σ q at ids)]``.

    The tail is ``logsumexp(non-top-k logits) − logsumexp(all logits)``: exact, no cancellation
    even when the top-k hold almost all the mass, and ``-inf`` (zero gradient) when ``ids``
    cover the whole support.

    Args:
        student_logits: shape ``(..., V)``.
        ids: shape ``(..., k)`` int64, distinct within a position.
        kd_temperature: divides the student's logits.

    Returns:
        Shape ``(..., k + 1)``.
    """
    lq = log_probs(student_logits, kd_temperature)  # (..., V)
    top = lq.gather(-1, ids)  # (..., k)
    tail = _safe_logsumexp(lq.scatter(-1, ids, _NEG_INF))  # (...)
    return torch.cat([top, tail.unsqueeze(-1)], dim=-1)


def _term_fn(divergence: Divergence | str) -> Any:
    name = Divergence(divergence)
    if name.value not in DIVERGENCE_TERMS:
        raise ValueError(
            f"{name.value!r} is not a sum of pointwise terms, so it has no sparse form; "
            f"choose one of {sorted(DIVERGENCE_TERMS)}"
        )
    return DIVERGENCE_TERMS[name.value]


def topk_divergence(
    student_logits: Tensor,
    teacher_topk_log_probs: Tensor,
    teacher_topk_ids: Tensor,
    mask: Tensor | None = None,
    *,
    teacher_tail_log_prob: Tensor | None = None,
    divergence: Divergence | str = Divergence.FORWARD_KL,
    kd_temperature: float = 1.0,
    num_items: NumItems = None,
    reduction: Reduction | str = Reduction.MEAN,
    mass_tolerance: float | None = 1e-2,
    **method_params: Any,
) -> Tensor:
    """A divergence between the student and a top-k + tail teacher, on ``k + 1`` buckets.

    Args:
        student_logits: shape ``(..., V)``.
        teacher_topk_log_probs: shape ``(..., k)``, at ``kd_temperature``.
        teacher_topk_ids: shape ``(..., k)`` int64.
        mask: bool, shape ``(...)``, True = supervised; None = all positions.
        teacher_tail_log_prob: shape ``(...)`` or None (derived from the top-k).
        divergence: any :data:`~distil.losses.divergences.DIVERGENCE_TERMS` name (not TVD++).
        kd_temperature: divides the student's logits only (see module docstring).
        num_items: normaliser for ``reduction="mean"``; default = supervised positions here.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        mass_tolerance: see :func:`teacher_bucket_log_probs`.
        **method_params: the divergence's parameters (``beta``, ``skew_alpha``, ...).

    Returns:
        A scalar, or shape ``(...)`` for ``reduction="none"``.
    """
    terms_fn = _term_fn(divergence)
    positions_shape = tuple(student_logits.shape[:-1])
    vocab = student_logits.shape[-1]
    student = select_positions(student_logits, mask)  # (N, V)
    top_lp = select_positions(teacher_topk_log_probs, mask)  # (N, k)
    ids = select_positions(teacher_topk_ids, mask)  # (N, k)
    tail = (
        None
        if teacher_tail_log_prob is None
        else select_positions(teacher_tail_log_prob, mask, event_dims=0)
    )
    teacher_buckets = teacher_bucket_log_probs(
        top_lp, tail, vocab_size=vocab, mass_tolerance=mass_tolerance
    )  # (N, k + 1)
    student_buckets = student_bucket_log_probs(student, ids, kd_temperature=kd_temperature)
    per_position = terms_fn(
        student_buckets, teacher_buckets.to(student_buckets.dtype), **method_params
    ).sum(-1)
    return reduce_positions(
        per_position, mask, positions_shape, num_items=num_items, reduction=reduction
    )


def sample_teacher_targets(
    teacher_logits: Tensor,
    num_samples: int,
    *,
    kd_temperature: float = 1.0,
    proposal_temperature: float | None = None,
    generator: torch.Generator | None = None,
) -> SampledTargets:
    """Draw ``num_samples`` token ids per position from a proposal built from the teacher.

    Args:
        teacher_logits: shape ``(..., V)``.
        num_samples: ids per position (with replacement).
        kd_temperature: temperature of the teacher distribution p that the loss targets.
        proposal_temperature: temperature of the proposal ``r = softmax(logits / τ_r)``;
            default ``kd_temperature`` (sample from p itself). A higher value covers the tail
            better at the cost of larger importance weights.
        generator: optional RNG for reproducible draws.

    Returns:
        :class:`SampledTargets` with shapes ``(..., num_samples)``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    shape = teacher_logits.shape
    lp = log_probs(teacher_logits, kd_temperature).reshape(-1, shape[-1])  # (N, V)
    lr = (
        lp
        if proposal_temperature is None
        else log_probs(teacher_logits, proposal_temperature).reshape(-1, shape[-1])
    )
    ids = torch.multinomial(lr.exp(), num_samples, replacement=True, generator=generator)
    out_shape = (*shape[:-1], num_samples)
    return SampledTargets(
        ids.reshape(out_shape),
        lp.gather(-1, ids).reshape(out_shape),
        lr.gather(-1, ids).reshape(out_shape),
    )


def sample_tail_targets(
    teacher_logits: Tensor,
    top_ids: Tensor,
    num_samples: int,
    *,
    kd_temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw ``num_samples`` ids per position from the teacher's tail: ``p`` renormalised outside
    ``top_ids``, with replacement; return them and the teacher's log-probs at them.

    A position whose tail is empty (the top-k hold all the mass) gets arbitrary ids; their
    weight in :func:`topk_sampled_tail_kl` is the tail mass, 0.

    Args:
        teacher_logits: ``(..., V)``.
        top_ids: ``(..., k)`` int64, the ids kept exactly.
        num_samples: ids per position.
        kd_temperature: temperature of the teacher distribution ``p``.
        generator: optional RNG for reproducible draws.

    Returns:
        ``(ids, log_probs)``, each ``(..., num_samples)``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    shape = teacher_logits.shape
    lp = log_probs(upcast(teacher_logits), kd_temperature).reshape(-1, shape[-1])  # (N, V)
    tail = lp.exp().scatter_(-1, top_ids.reshape(-1, top_ids.shape[-1]), 0.0)  # (N, V)
    empty = tail.sum(-1) <= 0
    if bool(empty.any()):
        tail[empty] = 1.0
    ids = torch.multinomial(tail, num_samples, replacement=True, generator=generator)  # (N, m)
    out_shape = (*shape[:-1], num_samples)
    return ids.reshape(out_shape), lp.gather(-1, ids).reshape(out_shape)


def topk_sampled_tail_kl(
    student_logits: Tensor,
    teacher: TopKTargets,
    mask: Tensor | None = None,
    *,
    kd_temperature: float = 1.0,
    num_items: NumItems = None,
    reduction: Reduction | str = Reduction.MEAN,
) -> Tensor:
    """Forward KL(p‖q) estimated without bias: exact on the top-k, importance-sampled on the tail.

    ``KL̂ = Σ_{j∈K} p_j (log p_j − log q_j) + (p_tail / m) Σ_i (log p_{v_i} − log q_{v_i})`` with
    ``v_i ~ p(·)/p_tail`` outside the top-k, so ``E[KL̂] = KL(p‖q)`` over the whole vocabulary.
    Its gradient is that of a cross-entropy against the sparse target that puts ``p_j`` on each
    top-k id and ``p_tail / m`` on each drawn tail id (a distribution whose mean is ``p``),
    unlike the bucketed top-k loss, which only matches the tail's total mass.

    Args:
        student_logits: ``(..., V)``.
        teacher: :class:`TopKTargets` with ``tail_sample_ids`` and ``tail_sample_log_probs``.
        mask: bool ``(...)``, True = supervised; None = all positions.
        kd_temperature: divides the student's logits.
        num_items: normaliser for ``reduction="mean"``; default = supervised positions here.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    """
    if teacher.tail_sample_ids is None or teacher.tail_sample_log_probs is None:
        raise ValueError(
            "topk_sampled_tail_kl needs TopKTargets with tail_sample_ids and tail_sample_log_probs"
        )
    positions_shape = tuple(student_logits.shape[:-1])
    lq = log_probs(select_positions(student_logits, mask), kd_temperature)  # (N, V)
    top_lp = upcast(select_positions(teacher.log_probs, mask)).to(lq.dtype)  # (N, k)
    tail_lp = upcast(select_positions(teacher.tail_log_prob, mask, event_dims=0)).to(
        lq.dtype
    )  # (N,)
    sample_lp = upcast(select_positions(teacher.tail_sample_log_probs, mask)).to(lq.dtype)  # (N, m)
    p_top, p_tail = top_lp.exp(), tail_lp.exp()
    head = torch.where(
        p_top > 0, p_top * (top_lp - lq.gather(-1, select_positions(teacher.ids, mask))), 0.0
    ).sum(-1)
    sample_terms = (
        sample_lp - lq.gather(-1, select_positions(teacher.tail_sample_ids, mask))
    ).mean(-1)  # (N,)
    per_position = head + torch.where(p_tail > 0, p_tail * sample_terms, 0.0)
    return reduce_positions(
        per_position, mask, positions_shape, num_items=num_items, reduction=reduction
    )


def sampled_divergence(
    student_logits: Tensor,
    sample_ids: Tensor,
    teacher_sample_log_probs: Tensor,
    mask: Tensor | None = None,
    *,
    proposal_log_probs: Tensor | None = None,
    divergence: Divergence | str = Divergence.FORWARD_KL,
    kd_temperature: float = 1.0,
    num_items: NumItems = None,
    reduction: Reduction | str = Reduction.MEAN,
    **method_params: Any,
) -> Tensor:
    """Unbiased importance-sampled estimate of a divergence to the teacher.

    ``D̂ = (1/n)·Σ_i t(p_{v_i}, q_{v_i}) / r_{v_i}`` with ``v_i ~ r``; ``E[D̂] = Σ_v t(p_v, q_v)``.
    Every term is ``>= 0``, so every estimate is ``>= 0``. Teacher and proposal probabilities
    are only needed at the sampled ids. The price of that guarantee is gradient noise: the
    pointwise terms carry ``q/r`` weights that explode where the student puts mass the proposal
    rarely draws. For training with forward KL, :func:`~distil.losses.objective.token_objective_sparse`
    uses the plain estimator of :func:`~distil.losses.chunked.chunked_sampled_logits_loss` instead.

    Args:
        student_logits: shape ``(..., V)``.
        sample_ids: shape ``(..., n)`` int64, drawn with replacement from the proposal.
        teacher_sample_log_probs: shape ``(..., n)``, teacher log-probs at ``sample_ids``.
        mask: bool, shape ``(...)``, True = supervised; None = all positions.
        proposal_log_probs: shape ``(..., n)``; None means the proposal is the teacher itself.
        divergence: any :data:`~distil.losses.divergences.DIVERGENCE_TERMS` name (not TVD++).
        kd_temperature: divides the student's logits only.
        num_items: normaliser for ``reduction="mean"``; default = supervised positions here.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        **method_params: the divergence's parameters.

    Returns:
        A scalar, or shape ``(...)`` for ``reduction="none"``.
    """
    terms_fn = _term_fn(divergence)
    positions_shape = tuple(student_logits.shape[:-1])
    student = select_positions(student_logits, mask)  # (N, V)
    ids = select_positions(sample_ids, mask)  # (N, n)
    lp = upcast(select_positions(teacher_sample_log_probs, mask))  # (N, n)
    lr = lp if proposal_log_probs is None else upcast(select_positions(proposal_log_probs, mask))
    lq = log_probs(student, kd_temperature).gather(-1, ids)  # (N, n)
    lp = lp.to(lq.dtype)
    weights = torch.exp(-lr.to(lq.dtype))  # 1 / r at the samples
    per_position = (terms_fn(lq, lp, **method_params) * weights).mean(dim=-1)
    return reduce_positions(
        per_position, mask, positions_shape, num_items=num_items, reduction=reduction
    )
