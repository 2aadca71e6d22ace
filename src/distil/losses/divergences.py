"""Token/class-level divergences between a teacher distribution p and a student distribution q.

Conventions (see ``docs/losses.md`` for the table with sources):

* ``p = softmax(teacher_logits / kd_temperature)``, ``q = softmax(student_logits / kd_temperature)``
  over the last dim ``V``; all math is in fp32 (bf16/fp16 inputs are upcast; fp64 stays fp64)
  and in log space.
* Every public function has the signature
  ``fn(student_logits, teacher_logits, mask=None, *, kd_temperature=1.0, num_items=None,
  reduction="mean", **method_params) -> Tensor`` with logits of shape ``(..., V)`` and a bool
  ``mask`` of shape ``(...)``. The reduction is described in :mod:`distil.losses.reduction`.
* No ``kd_temperature**2`` factor here: the T² factor lives only in
  :mod:`distil.losses.objective`.
* Each divergence except TVD++ is a sum over the vocabulary of a *pointwise* term
  ``t(p_v, q_v) >= 0``. KL-type terms are written in their extended form
  ``a·log(a/b) − a + b``, which sums to the usual KL when both distributions are normalised and
  stays non-negative term by term otherwise. The same term functions serve the full-vocabulary
  path, the top-k + tail path and the importance-sampled path (:mod:`distil.losses.sparse`).
* Vocabulary entries with ``-inf`` logits on both sides (padded ids, F2) contribute exactly 0 and
  get zero gradient, never ``nan``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from distil.losses.reduction import NumItems, Reduction, reduce_positions, select_positions

__all__ = [
    "DIVERGENCES",
    "DIVERGENCE_TERMS",
    "Divergence",
    "DivergenceFn",
    "TermFn",
    "check_kd_temperature",
    "compute_divergence",
    "divergence_per_position",
    "forward_kl",
    "forward_kl_terms",
    "generalized_jsd",
    "generalized_jsd_terms",
    "log_probs",
    "per_position_from_logits",
    "reverse_kl",
    "reverse_kl_terms",
    "skew_kl",
    "skew_kl_terms",
    "skew_reverse_kl",
    "skew_reverse_kl_terms",
    "symmetric_kl",
    "symmetric_kl_terms",
    "total_variation",
    "total_variation_terms",
    "tvd_plus_plus",
    "tvd_plus_plus_per_position",
    "upcast",
]

_NEG_INF = float("-inf")

DivergenceFn = Callable[..., Tensor]
"""``fn(student_logits, teacher_logits, mask=None, *, kd_temperature, num_items, reduction,
**method_params) -> Tensor``."""

TermFn = Callable[..., Tensor]
"""``fn(student_log_probs, teacher_log_probs, **method_params) -> Tensor`` of pointwise terms."""


class Divergence(str, Enum):
    """Names of the token/class divergences (keys of :data:`DIVERGENCES`)."""

    FORWARD_KL = "forward_kl"
    REVERSE_KL = "reverse_kl"
    SYMMETRIC_KL = "symmetric_kl"
    GENERALIZED_JSD = "generalized_jsd"
    SKEW_KL = "skew_kl"
    SKEW_REVERSE_KL = "skew_reverse_kl"
    TOTAL_VARIATION = "total_variation"
    TVD_PLUS_PLUS = "tvd_plus_plus"


# --------------------------------------------------------------------------------------------
# Numerics shared by every term
# --------------------------------------------------------------------------------------------


def upcast(x: Tensor) -> Tensor:
    """Return ``x`` in fp32 if it is a 16-bit float; fp32/fp64 pass through unchanged.

    Raises:
        TypeError: if ``x`` is not a floating-point tensor.
    """
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {x.dtype}")
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def check_kd_temperature(kd_temperature: float) -> None:
    """Raise ValueError unless ``kd_temperature`` is a finite number > 0."""
    if not (kd_temperature > 0 and math.isfinite(kd_temperature)):
        raise ValueError(f"kd_temperature must be a finite number > 0, got {kd_temperature}")


def log_probs(logits: Tensor, kd_temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / kd_temperature)`` over the last dim, in fp32 (or fp64).

    Args:
        logits: shape ``(..., V)``, any float dtype.
        kd_temperature: softmax temperature of the distillation loss (> 0).

    Returns:
        Log-probabilities of shape ``(..., V)``.
    """
    check_kd_temperature(kd_temperature)
    x = upcast(logits)
    if kd_temperature != 1.0:
        x = x / kd_temperature
    return torch.log_softmax(x, dim=-1)


def _p_log_ratio(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Elementwise ``a·(log a − log b)`` with the convention ``0·log(0/b) = 0``.

    The double ``where`` keeps gradients finite where ``a = 0`` (``log a = -inf``): the unused
    branch is fed zeros instead of ``-inf``, so no ``0·inf`` appears in the backward pass.
    """
    live = log_a > _NEG_INF
    la = torch.where(live, log_a, 0.0)
    lb = torch.where(live, log_b, 0.0)
    return torch.where(live, la.exp() * (la - lb), 0.0)


def _log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """``log(w·a + (1−w)·b)`` computed with ``logaddexp`` in probability space (never by
    averaging log-probabilities, F5). Entries where both ``a`` and ``b`` are 0 give ``-inf`` with
    zero gradient."""
    if weight_a == 1.0:
        return log_a
    if weight_a == 0.0:
        return log_b
    dead = (log_a == _NEG_INF) & (log_b == _NEG_INF)
    la = torch.where(dead, 0.0, log_a) + math.log(weight_a)
    lb = torch.where(dead, 0.0, log_b) + math.log1p(-weight_a)
    return torch.where(dead, _NEG_INF, torch.logaddexp(la, lb))


def _extended_kl_terms(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Pointwise ``a·log(a/b) − a + b >= 0``; sums to ``KL(a‖b)`` when both sum to 1."""
    return _p_log_ratio(log_a, log_b) - log_a.exp() + log_b.exp()


def _check_unit_interval(name: str, value: float, *, upper_open: bool = False) -> None:
    ok = 0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0
    if not ok:
        interval = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(f"{name} must lie in {interval}, got {value} (values are never clamped)")


# --------------------------------------------------------------------------------------------
# Pointwise terms on log-probabilities, shape (..., V) -> (..., V)
# --------------------------------------------------------------------------------------------


def forward_kl_terms(student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
    """Terms of ``KL(p‖q) = Σ_v p_v (log p_v − log q_v)`` (mode-covering)."""
    return _extended_kl_terms(teacher_log_probs, student_log_probs)


def reverse_kl_terms(student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
    """Terms of ``KL(q‖p) = Σ_v q_v (log q_v − log p_v)`` (mode-seeking)."""
    return _extended_kl_terms(student_log_probs, teacher_log_probs)


def symmetric_kl_terms(
    student_log_probs: Tensor, teacher_log_probs: Tensor, *, reverse_kl_weight: float = 0.5
) -> Tensor:
    """Terms of ``(1−λ)·KL(p‖q) + λ·KL(q‖p)`` with ``λ = reverse_kl_weight`` ∈ [0, 1].

    ``λ = 0.5`` is the symmetric (Jeffreys/2) divergence; DistiLLM's ``symmetric_kl`` uses 0.9.
    """
    _check_unit_interval("reverse_kl_weight", reverse_kl_weight)
    forward = forward_kl_terms(student_log_probs, teacher_log_probs)
    reverse = reverse_kl_terms(student_log_probs, teacher_log_probs)
    return (1.0 - reverse_kl_weight) * forward + reverse_kl_weight * reverse


def generalized_jsd_terms(
    student_log_probs: Tensor, teacher_log_probs: Tensor, *, beta: float = 0.5
) -> Tensor:
    """Terms of the generalised Jensen-Shannon divergence of GKD.

    ``JSD(β) = β·KL(p‖m) + (1−β)·KL(q‖m)`` with ``m = β·p + (1−β)·q`` (teacher weight β).
    As β→0, ``JSD(β)/β → KL(p‖q)`` (forward KL); as β→1, ``JSD(β)/(1−β) → KL(q‖p)`` (reverse KL).
    The raw JSD is 0 at both endpoints, so, as in GKD/TRL, the endpoints are defined as those
    limits: ``β = 0`` returns the forward-KL terms and ``β = 1`` the reverse-KL terms.
    """
    _check_unit_interval("beta", beta)
    if beta == 0.0:
        return forward_kl_terms(student_log_probs, teacher_log_probs)
    if beta == 1.0:
        return reverse_kl_terms(student_log_probs, teacher_log_probs)
    log_m = _log_mixture(teacher_log_probs, student_log_probs, beta)
    # β·p·log(p/m) + (1−β)·q·log(q/m) >= 0 pointwise (convexity of x·log x); no extension needed.
    return beta * _p_log_ratio(teacher_log_probs, log_m) + (1.0 - beta) * _p_log_ratio(
        student_log_probs, log_m
    )


def skew_kl_terms(
    student_log_probs: Tensor, teacher_log_probs: Tensor, *, skew_alpha: float = 0.1
) -> Tensor:
    """Terms of DistiLLM's skew KL ``KL(p ‖ α·p + (1−α)·q)``, α ∈ [0, 1); α = 0 is forward KL.

    Gradients flow through the student inside the mixture (as in DistiLLM).
    """
    _check_unit_interval("skew_alpha", skew_alpha, upper_open=True)
    log_m = _log_mixture(teacher_log_probs, student_log_probs, skew_alpha)
    return _extended_kl_terms(teacher_log_probs, log_m)


def skew_reverse_kl_terms(
    student_log_probs: Tensor, teacher_log_probs: Tensor, *, skew_alpha: float = 0.1
) -> Tensor:
    """Terms of DistiLLM's skew reverse KL ``KL(q ‖ (1−α)·p + α·q)``, α ∈ [0, 1); α = 0 is
    reverse KL."""
    _check_unit_interval("skew_alpha", skew_alpha, upper_open=True)
    log_m = _log_mixture(student_log_probs, teacher_log_probs, skew_alpha)
    return _extended_kl_terms(student_log_probs, log_m)


def total_variation_terms(student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
    """Terms of ``TVD(p, q) = ½·Σ_v |p_v − q_v|`` (bounded in [0, 1])."""
    return 0.5 * (teacher_log_probs.exp() - student_log_probs.exp()).abs()


DIVERGENCE_TERMS: dict[str, TermFn] = {
    Divergence.FORWARD_KL.value: forward_kl_terms,
    Divergence.REVERSE_KL.value: reverse_kl_terms,
    Divergence.SYMMETRIC_KL.value: symmetric_kl_terms,
    Divergence.GENERALIZED_JSD.value: generalized_jsd_terms,
    Divergence.SKEW_KL.value: skew_kl_terms,
    Divergence.SKEW_REVERSE_KL.value: skew_reverse_kl_terms,
    Divergence.TOTAL_VARIATION.value: total_variation_terms,
}
"""Pointwise term functions of every divergence that is a sum over the vocabulary (all but
TVD++). Used by the sparse (top-k + tail, importance-sampled) paths."""


def tvd_plus_plus_per_position(
    student_log_probs: Tensor, teacher_log_probs: Tensor, *, advantage_eps: float = 1e-5
) -> Tensor:
    """TVD++ surrogate loss per position (draft-model alignment for speculative decoding).

    Interpretation of a third-party reference implementation (METHODS.md G.2; the paper's own
    normalisation is not confirmed): reward ``r_v = 1[p_v > q_v]`` with ``q`` detached, advantage
    ``Â_v = (r_v − mean_v r) / (std_v r + advantage_eps)`` with mean and (unbiased) std over the
    vocabulary, loss ``−mean_v(Â_v · log q_v)``. Entries the student cannot emit
    (``log q_v = -inf``) are left out of the statistics and of the mean.

    This is a policy-gradient *surrogate*: its gradient pushes up every logit where ``p > q``
    (``∂L/∂z_v = −Â_v / V``), its value is not a divergence and can be negative. It is exactly 0
    where ``p = q``.

    Args:
        student_log_probs: shape ``(..., V)``.
        teacher_log_probs: shape ``(..., V)``.
        advantage_eps: added to the std (the reference value is 1e-5).

    Returns:
        Shape ``(...)``.
    """
    live = student_log_probs > _NEG_INF
    count = live.sum(dim=-1, keepdim=True).clamp_min(1)
    with torch.no_grad():
        reward = ((teacher_log_probs > student_log_probs) & live).to(student_log_probs.dtype)
        mean = reward.sum(dim=-1, keepdim=True) / count
        centred = torch.where(live, reward - mean, 0.0)
        var = centred.square().sum(dim=-1, keepdim=True) / (count - 1).clamp_min(1)
        advantage = centred / (var.sqrt() + advantage_eps)
    safe_log_q = torch.where(live, student_log_probs, 0.0)
    return -(advantage * safe_log_q).sum(dim=-1) / count.squeeze(-1)


def divergence_per_position(
    divergence: Divergence | str,
    student_log_probs: Tensor,
    teacher_log_probs: Tensor,
    **method_params: Any,
) -> Tensor:
    """Per-position value of a named divergence from log-probabilities.

    Args:
        divergence: a :class:`Divergence` name.
        student_log_probs: shape ``(..., V)``.
        teacher_log_probs: shape ``(..., V)``.
        **method_params: the divergence's own parameters (``beta``, ``skew_alpha``, ...).

    Returns:
        Shape ``(...)``.
    """
    name = Divergence(divergence)
    if name is Divergence.TVD_PLUS_PLUS:
        return tvd_plus_plus_per_position(student_log_probs, teacher_log_probs, **method_params)
    terms = DIVERGENCE_TERMS[name.value](student_log_probs, teacher_log_probs, **method_params)
    return terms.sum(dim=-1)


def per_position_from_logits(
    divergence: Divergence | str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    kd_temperature: float = 1.0,
    **method_params: Any,
) -> Tensor:
    """Per-position divergence from logits of shape ``(..., V)``; returns shape ``(...)``.

    Raises:
        ValueError: if the two logits tensors do not have the same shape (e.g. vocab mismatch).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape; a vocabulary mismatch must "
            "be resolved by an explicit vocab policy before the loss"
        )
    return divergence_per_position(
        divergence,
        log_probs(student_logits, kd_temperature),
        log_probs(teacher_logits, kd_temperature),
        **method_params,
    )


def compute_divergence(
    divergence: Divergence | str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    kd_temperature: float = 1.0,
    num_items: NumItems = None,
    reduction: Reduction | str = Reduction.MEAN,
    **method_params: Any,
) -> Tensor:
    """Compute a named divergence with the standard masking and reduction.

    Args:
        divergence: a :class:`Divergence` name.
        student_logits: shape ``(..., V)``.
        teacher_logits: shape ``(..., V)``.
        mask: bool, shape ``(...)``, True = supervised; None = all positions.
        kd_temperature: applied to both logits before the softmax.
        num_items: normaliser for ``reduction="mean"``; default = supervised positions here.
        reduction: ``"mean"`` (sum / num_items), ``"sum"`` or ``"none"`` (shape ``(...)``).
        **method_params: the divergence's own parameters.

    Returns:
        A scalar, or shape ``(...)`` for ``reduction="none"``.
    """
    positions_shape = tuple(student_logits.shape[:-1])
    student = select_positions(student_logits, mask)
    teacher = select_positions(teacher_logits, mask)
    per_position = per_position_from_logits(
        divergence, student, teacher, kd_temperature=kd_temperature, **method_params
    )
    return reduce_positions(
        per_position, mask, positions_shape, num_items=num_items, reduction=reduction
    )


# --------------------------------------------------------------------------------------------
# Public functions, one per divergence
# --------------------------------------------------------------------------------------------


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    kd_temperature: float = 1.0,
    num_items: NumItems = None,
    reduction: Reduction | str = Reduction.MEAN,
) -> Tensor:
    """Forward KL ``KL(p‖q) = Σ_v p_v (log p_v − log q_v)``, teacher p, student q.

    Mode-covering; the standard token-level distillation loss.

    Args:
        student_logits: shape ``(..., V)``, any float dtype (math in fp32).
        teacher_logits: shape ``(..., V)``.
        mask: bool, shape ``(...)``, True = supervised position; None = all positions.
        kd_temperature: divides both logits before the softmax (no T² here; see objective.py).
        num_items: normaliser for ``reduction="mean"`` (supervised positions over the whole
            gradient-accumulation window); default = supervised positions in this call.
        reduction: ``"mean"`` (sum / num_items), ``"sum"``, or ``"none"`` (shape ``(...)``,
            zero at masked positions).

    Returns:
        A scalar, or per-position values of shape ``(...)`` for ``reduction="none"``.
        All positions masked: exactly 0 with zero gradient.
    """
    return compute_divergence(
        Divergence.FORWARD_KL,
        student_logits,
        teacher_logits,
        mask,
        kd_temperature=kd_temperature,
        num_items=num_items,
        reduction=reduction,
    )


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    kd_temperature: float = 1.0,
    num_items: NumItems = None,
    reduction: Reduction | str = Reduction.MEAN,
) -> Tensor:
    """Reverse KL ``KL(q‖p) = Σ_v q_v (log q_v − log p_v)`` (mode-seeking, MiniLLM-style).

    Args:
        student_logits: shape ``(..., V)``, any float dtype (math in fp32).
        teacher_logits: shape ``(..., V)``.
        mask: bool, shape ``(...)``, True = supervised position; None = all positions.
        kd_temperature: divides both logits before the softmax (no T² here; see objective.py).
        num_items: normaliser for ``reduction="mean"`` (supervised positions over the whole
            gradient-accumulation window); default = supervised positions in this call.
        reduction: ``"mean"`` (sum / num_items), ``"sum"``, or ``"none"`` (shape ``(...)``,
            zero at masked positions).

    Returns:
        A scalar, or per-position values of shape ``(...)`` for ``reduction="none"``.
        All positions masked: exactly 0 with zero gradient.
    """
    return compute_divergence(
        Divergence.REVERSE_KL,
        student_logits,
        teacher_logits,
        mask,
        kd_temperature=kd_temperature,
        num_items=num_items,
        reduction=reduction,
    )


def symmetric_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    kd_temperature: float = 1.0,
    num_items: NumItems = None,
    reduction: Reduction | str = Reduction.MEAN,
    reverse_kl_weight: float = 0.5,
) -> Tensor:
    """Mixed KL ``(1−λ)·KL(p‖q) + λ·KL(q‖p)`` with ``λ = reverse_kl_weight``.

    Args:
        student_logits: shape ``(..., V)``, any float dtype (math in fp32).
        teacher_logits: shape ``(..., V)``.
        mask: bool, shape ``(...)``, True = supervised position; None = all positions.
        kd_temperature: divides both logits before the softmax (no T² here; see objective.py).
        num_items: normaliser for ``reduction="mean"`` (supervised positions over the whole
            gradient-accumulation window); default = supervised positions in this call.
        reduction: ``"mean"`` (sum / num_items), ``"sum"``, or ``"none"`` (shape ``(...)``,
            zero at masked positions).
        reverse_kl_weight: λ ∈ [0, 1]; 0.5 (default) is the symmetric divergence,
            DistiLLM's ``symmetric_kl`` uses 0.9.

    Returns:
        A scalar, or per-position values of shape ``(...)`` for ``reduction="none"``.
        All positions masked: exactly 0 with zero gradient.
    """
    return compute_divergence(
        Divergence.SYMMETRIC_KL,
        student_logits,
        teacher_logits,
        mask,
        kd_temperature=kd_temperature,
        num_items=num_items,
        reduction=reduction,
        reverse_kl_weight=reverse_kl_weight,
    )


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    kd_temperature: float = 1.0,
    num_items: NumItems = None,
    reduction: Reduction | str = Reduction.MEAN,
    beta: float = 0.5,
) -> Tensor:
    """Generalised JSD of GKD: ``β·KL(p‖m) + (1−β)·KL(q‖m)``, ``m = β·p + (1−β)·q``.

    The mixture is formed in probability space (logsumexp), never by averaging log-probs.
    ``JSD(β)/β → KL(p‖q)`` as β→0 and ``JSD(β)/(1−β) → KL(q‖p)`` as β→1. The raw JSD is 0
    at both endpoints, so the endpoints return those limits: β=0 is forward KL, β=1 is
    reverse KL (as in TRL). Between them the value is the raw JSD, bounded by
    ``−β·log β − (1−β)·log(1−β)``. DistiLLM's ``lam`` corresponds to ``1−β``.

    Args:
        student_logits: shape ``(..., V)``, any float dtype (math in fp32).
        teacher_logits: shape ``(..., V)``.
        mask: bool, shape ``(...)``, True = supervised position; None = all positions.
        kd_temperature: divides both logits before the softmax (no T² here; see objective.py).
        num_items: normaliser for ``reduction="mean"`` (supervised positions over the whole
            gradient-accumulation window); default = supervised positions in this call.
        reduction: ``"mean"`` (sum / num_items), ``"sum"``, or ``"none"`` (shape ``(...)``,
            zero at masked positions).
        beta: teacher weight in the mixture, β ∈ [0, 1] (default 0.5); never clamped.

    Returns:
        A scalar, or per-position values of shape ``(...)`` for ``reduction="none"``.
        All positions masked: exactly 0 with zero gradient.
    """
    return compute_divergence(
        Divergence.GENERALIZED_JSD,
        student_logits,
        teacher_logits,
        mask,
        kd_temperature=kd_temperature,
        num_items=num_items,
        reduction=reduction,
        beta=beta,
    )


def skew_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    kd_temperature: float = 1.0,
    num_items: NumItems = None,
    reduction: Reduction | str = Reduction.MEAN,
    skew_alpha: float = 0.1,
) -> Tensor:
    """DistiLLM skew KL ``KL(p ‖ α·p + (1−α)·q)``; α = 0 is forward KL.

    Bounded where the student assigns no mass (``≤ −log α``), the stated motivation.

    Args:
        student_logits: shape ``(..., V)``, any float dtype (math in fp32).
        teacher_logits: shape ``(..., V)``.
        mask: bool, shape ``(...)``, True = supervised position; None = all positions.
        kd_temperature: divides both logits before the softmax (no T² here; see objective.py).
        num_items: normaliser for ``reduction="mean"`` (supervised positions over the whole
            gradient-accumulation window); default = supervised positions in this call.
        reduction: ``"mean"`` (sum / num_items), ``"sum"``, or ``"none"`` (shape ``(...)``,
            zero at masked positions).
        skew_alpha: α ∈ [0, 1) (default 0.1, DistiLLM's default).

    Returns:
        A scalar, or per-position values of shape ``(...)`` for ``reduction="none"``.
        All positions masked: exactly 0 with zero gradient.
    """
    return compute_divergence(
        Divergence.SKEW_KL,
        student_logits,
        teacher_logits,
        mask,
        kd_temperature=kd_temperature,
        num_items=num_items,
        reduction=reduction,
        skew_alpha=skew_alpha,
    )


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    kd_temperature: float = 1.0,
    num_items: NumItems = None,
    reduction: Reduction | str = Reduction.MEAN,
    skew_alpha: float = 0.1,
) -> Tensor:
    """DistiLLM skew reverse KL ``KL(q ‖ (1−α)·p + α·q)``; α = 0 is reverse KL.

    Args:
        student_logits: shape ``(..., V)``, any float dtype (math in fp32).
        teacher_logits: shape ``(..., V)``.
        mask: bool, shape ``(...)``, True = supervised position; None = all positions.
        kd_temperature: divides both logits before the softmax (no T² here; see objective.py).
        num_items: normaliser for ``reduction="mean"`` (supervised positions over the whole
            gradient-accumulation window); default = supervised positions in this call.
        reduction: ``"mean"`` (sum / num_items), ``"sum"``, or ``"none"`` (shape ``(...)``,
            zero at masked positions).
        skew_alpha: α ∈ [0, 1) (default 0.1).

    Returns:
        A scalar, or per-position values of shape ``(...)`` for ``reduction="none"``.
        All positions masked: exactly 0 with zero gradient.
    """
    return compute_divergence(
        Divergence.SKEW_REVERSE_KL,
        student_logits,
        teacher_logits,
        mask,
        kd_temperature=kd_temperature,
        num_items=num_items,
        reduction=reduction,
        skew_alpha=skew_alpha,
    )


def total_variation(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    kd_temperature: float = 1.0,
    num_items: NumItems = None,
    reduction: Reduction | str = Reduction.MEAN,
) -> Tensor:
    """Total variation distance ``½·Σ_v |p_v − q_v|`` ∈ [0, 1].

    ``1 − TVD`` is the speculative-decoding acceptance rate of a draft q for a target p.

    Args:
        student_logits: shape ``(..., V)``, any float dtype (math in fp32).
        teacher_logits: shape ``(..., V)``.
        mask: bool, shape ``(...)``, True = supervised position; None = all positions.
        kd_temperature: divides both logits before the softmax (no T² here; see objective.py).
        num_items: normaliser for ``reduction="mean"`` (supervised positions over the whole
            gradient-accumulation window); default = supervised positions in this call.
        reduction: ``"mean"`` (sum / num_items), ``"sum"``, or ``"none"`` (shape ``(...)``,
            zero at masked positions).

    Returns:
        A scalar, or per-position values of shape ``(...)`` for ``reduction="none"``.
        All positions masked: exactly 0 with zero gradient.
    """
    return compute_divergence(
        Divergence.TOTAL_VARIATION,
        student_logits,
        teacher_logits,
        mask,
        kd_temperature=kd_temperature,
        num_items=num_items,
        reduction=reduction,
    )


def tvd_plus_plus(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    kd_temperature: float = 1.0,
    num_items: NumItems = None,
    reduction: Reduction | str = Reduction.MEAN,
    advantage_eps: float = 1e-5,
) -> Tensor:
    """TVD++ policy-gradient surrogate for draft models (interpretation).

    See :func:`tvd_plus_plus_per_position` for the definition. The value is a surrogate whose
    gradient matters, not a divergence; it is 0 when p = q and may be negative otherwise.

    Args:
        student_logits: shape ``(..., V)``, any float dtype (math in fp32).
        teacher_logits: shape ``(..., V)``.
        mask: bool, shape ``(...)``, True = supervised position; None = all positions.
        kd_temperature: divides both logits before the softmax (no T² here; see objective.py).
        num_items: normaliser for ``reduction="mean"`` (supervised positions over the whole
            gradient-accumulation window); default = supervised positions in this call.
        reduction: ``"mean"`` (sum / num_items), ``"sum"``, or ``"none"`` (shape ``(...)``,
            zero at masked positions).
        advantage_eps: added to the reward std (reference value 1e-5).

    Returns:
        A scalar, or per-position values of shape ``(...)`` for ``reduction="none"``.
        All positions masked: exactly 0 with zero gradient.
    """
    return compute_divergence(
        Divergence.TVD_PLUS_PLUS,
        student_logits,
        teacher_logits,
        mask,
        kd_temperature=kd_temperature,
        num_items=num_items,
        reduction=reduction,
        advantage_eps=advantage_eps,
    )


DIVERGENCES: dict[str, DivergenceFn] = {
    Divergence.FORWARD_KL.value: forward_kl,
    Divergence.REVERSE_KL.value: reverse_kl,
    Divergence.SYMMETRIC_KL.value: symmetric_kl,
    Divergence.GENERALIZED_JSD.value: generalized_jsd,
    Divergence.SKEW_KL.value: skew_kl,
    Divergence.SKEW_REVERSE_KL.value: skew_reverse_kl,
    Divergence.TOTAL_VARIATION.value: total_variation,
    Divergence.TVD_PLUS_PLUS.value: tvd_plus_plus,
}
"""Name → function table of the token/class divergences."""
