"""Classifier distillation losses: Hinton KD, DKD, PLD, logit standardisation, mixup targets.

Inputs are class logits of shape ``(..., C)`` (usually ``(B, C)``) with the reduction convention
of :mod:`distil.losses.reduction`. As everywhere in :mod:`distil.losses`, the ``kd_temperature²``
factor is not applied here; :mod:`distil.losses.objective` applies it to the KD term.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from distil.losses.divergences import (
    Divergence,
    forward_kl_terms,
    log_probs,
    per_position_from_logits,
    upcast,
)
from distil.losses.reduction import NumItems, Reduction, reduce_positions, select_positions
from distil.losses.sparse import student_bucket_log_probs

__all__ = [
    "CLASSIFIER_LOSSES",
    "ClassifierLoss",
    "ClassifierLossFn",
    "SoftTargetForm",
    "dkd",
    "hinton_kd",
    "mixed_targets",
    "pld",
    "soft_target_cross_entropy",
    "standardize_logits",
    "standardized_kd",
]

_NEG_INF = float("-inf")

ClassifierLossFn = Callable[..., Tensor]
"""``fn(student_logits, teacher_logits, mask=None, *, labels=None, kd_temperature, num_items,
reduction, **method_params) -> Tensor``."""


class ClassifierLoss(str, Enum):
    """Names of the classifier KD losses (keys of :data:`CLASSIFIER_LOSSES`)."""

    HINTON_KD = "hinton_kd"
    DKD = "dkd"
    PLD = "pld"
    STANDARDIZED_KD = "standardized_kd"


class SoftTargetForm(str, Enum):
    """Form of the Hinton soft-target term.

    Attributes:
        KL: ``KL(p‖q)``, 0 when the student matches the teacher.
        CROSS_ENTROPY: ``−Σ p log q`` = KL + H(p); same gradient, offset by the teacher entropy.
    """

    KL = "kl"
    CROSS_ENTROPY = "cross_entropy"


def _require_labels(labels: Tensor | None, name: str) -> Tensor:
    if labels is None:
        raise ValueError(f"{name} needs labels (the gold class of each example)")
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 class indices, got {labels.dtype}")
    return labels


def hinton_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    labels: Tensor | None = None,
    kd_temperature: float = 1.0,
    num_items: NumItems = None,
    reduction: Reduction | str = Reduction.MEAN,
    form: SoftTargetForm | str = SoftTargetForm.KL,
) -> Tensor:
    """Hinton et al. (2015) soft-target term ``KL(σ(z_t/T) ‖ σ(z_s/T))`` (T² in objective.py).

    Args:
        student_logits: shape ``(..., C)``.
        teacher_logits: shape ``(..., C)``.
        mask: bool, shape ``(...)``, True = supervised; None = all.
        labels: unused; accepted so every classifier loss has one signature.
        kd_temperature: T, divides both logits.
        num_items: normaliser for ``reduction="mean"``; default = supervised items here.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        form: ``"kl"`` (default) or ``"cross_entropy"`` (adds the teacher entropy).

    Returns:
        A scalar, or shape ``(...)`` for ``reduction="none"``.
    """
    del labels
    positions_shape = tuple(student_logits.shape[:-1])
    lq = log_probs(select_positions(student_logits, mask), kd_temperature)
    lp = log_probs(select_positions(teacher_logits, mask), kd_temperature)
    per_position = forward_kl_terms(lq, lp).sum(-1)
    if SoftTargetForm(form) is SoftTargetForm.CROSS_ENTROPY:
        entropy = -(lp.exp() * torch.where(lp > _NEG_INF, lp, 0.0)).sum(-1)
        per_position = per_position + entropy
    return reduce_positions(
        per_position, mask, positions_shape, num_items=num_items, reduction=reduction
    )


def dkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    labels: Tensor | None = None,
    kd_temperature: float = 1.0,
    num_items: NumItems = None,
    reduction: Reduction | str = Reduction.MEAN,
    tckd_weight: float = 1.0,
    nckd_weight: float = 8.0,
) -> Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): ``α·TCKD + β·NCKD`` (T² in objective.py).

    * ``TCKD = KL(b_t ‖ b_s)`` on the binary split ``b = [p_gold, 1 − p_gold]``;
    * ``NCKD = KL(p̂_t ‖ p̂_s)`` where ``p̂`` is the softmax over the non-gold classes only.

    Both at temperature T, in log space: ``log(1 − p_gold)`` is a logsumexp over the non-gold
    logits (no cancellation), and the gold class is excluded with ``-inf`` rather than a large
    negative constant.

    Args:
        student_logits: shape ``(..., C)``.
        teacher_logits: shape ``(..., C)``.
        mask: bool, shape ``(...)``, True = supervised; None = all.
        labels: shape ``(...)`` int64 gold classes (required).
        kd_temperature: T (paper: 4 on CIFAR-100, 1 on ImageNet).
        num_items: normaliser for ``reduction="mean"``; default = supervised items here.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        tckd_weight: α (paper default 1.0).
        nckd_weight: β (paper: 8.0 on CIFAR-100 (default here), 0.5 on ImageNet).

    Returns:
        A scalar, or shape ``(...)`` for ``reduction="none"``.
    """
    gold = _require_labels(labels, "dkd")
    positions_shape = tuple(student_logits.shape[:-1])
    student = select_positions(student_logits, mask)  # (N, C)
    teacher = select_positions(teacher_logits, mask)  # (N, C)
    ids = select_positions(gold, mask, event_dims=0).unsqueeze(-1)  # (N, 1)
    binary_s = student_bucket_log_probs(student, ids, kd_temperature=kd_temperature)  # (N, 2)
    binary_t = student_bucket_log_probs(teacher, ids, kd_temperature=kd_temperature)  # (N, 2)
    tckd = forward_kl_terms(binary_s, binary_t).sum(-1)
    non_gold_s = log_probs(upcast(student).scatter(-1, ids, _NEG_INF), kd_temperature)
    non_gold_t = log_probs(upcast(teacher).scatter(-1, ids, _NEG_INF), kd_temperature)
    nckd = forward_kl_terms(non_gold_s, non_gold_t).sum(-1)
    per_position = tckd_weight * tckd + nckd_weight * nckd
    return reduce_positions(
        per_position, mask, positions_shape, num_items=num_items, reduction=reduction
    )


def pld(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    labels: Tensor | None = None,
    kd_temperature: float = 1.0,
    num_items: NumItems = None,
    reduction: Reduction | str = Reduction.MEAN,
) -> Tensor:
    """Plackett-Luce distillation (PLD, arXiv:2506.12542): teacher-weighted list-wise loss.

    ``π*`` = the gold class first, then the other classes by descending teacher logit;
    ``α_k = softmax(z_t / T)[π*_k]``; the loss is
    ``Σ_k α_k · (logsumexp_{j >= k} z_s[π*_j] − z_s[π*_k])``, a confidence-weighted ListMLE
    computed with a reversed ``logcumsumexp``. Its ``k = 1`` term is ``α_gold · CE(z_s, gold)``,
    so PLD replaces CE + KD rather than adding to them. Convex and shift-invariant in ``z_s``,
    always ``> 0``. Interpretation notes: T applies to the teacher weights only (the student
    logits enter untempered, as in the formula), α is not renormalised (it already sums to 1
    over all C ranks), and the default T is open in the paper.

    Args:
        student_logits: shape ``(..., C)``.
        teacher_logits: shape ``(..., C)``.
        mask: bool, shape ``(...)``, True = supervised; None = all.
        labels: shape ``(...)`` int64 gold classes (required).
        kd_temperature: T of the teacher weights.
        num_items: normaliser for ``reduction="mean"``; default = supervised items here.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        A scalar, or shape ``(...)`` for ``reduction="none"``.
    """
    gold = _require_labels(labels, "pld")
    positions_shape = tuple(student_logits.shape[:-1])
    student = upcast(select_positions(student_logits, mask))  # (N, C)
    teacher = upcast(select_positions(teacher_logits, mask))  # (N, C)
    ids = select_positions(gold, mask, event_dims=0).unsqueeze(-1)  # (N, 1)
    ranking_key = teacher.scatter(-1, ids, float("inf"))
    order = ranking_key.argsort(dim=-1, descending=True, stable=True)  # (N, C) = π*
    weights = log_probs(teacher, kd_temperature).exp().gather(-1, order)  # (N, C) α_k
    ranked = student.gather(-1, order)  # (N, C) z_s[π*_k]
    suffix_lse = ranked.flip(-1).logcumsumexp(-1).flip(-1)  # logsumexp_{j >= k}
    per_position = (weights.to(ranked.dtype) * (suffix_lse - ranked)).sum(-1)
    return reduce_positions(
        per_position, mask, positions_shape, num_items=num_items, reduction=reduction
    )


def standardize_logits(logits: Tensor, *, eps: float = 1e-7) -> Tensor:
    """Z-score logits over the class dim: ``(z − mean) / sqrt(var + eps)``.

    Logit standardisation (Sun et al., CVPR 2024; MIX-STD in METHODS.md C.1) replaces a fixed
    temperature by each example's own logit spread. The variance is the unbiased one (torch's
    default ``std``); ``eps`` inside the square root keeps the gradient finite for constant
    logits. Softmax is shift-invariant, so this equals MIX-STD's ``z / std(z)`` up to ``eps``.

    Args:
        logits: shape ``(..., C)``, C >= 2.
        eps: added to the variance.

    Returns:
        Shape ``(..., C)``, fp32 (or fp64).
    """
    z = upcast(logits)
    classes = z.shape[-1]
    if classes < 2:
        raise ValueError(f"standardising needs at least 2 classes, got {classes}")
    centred = z - z.mean(dim=-1, keepdim=True)
    var = centred.square().sum(dim=-1, keepdim=True) / (classes - 1)  # unbiased
    return centred / torch.sqrt(var + eps)


def standardized_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    labels: Tensor | None = None,
    kd_temperature: float = 1.0,
    num_items: NumItems = None,
    reduction: Reduction | str = Reduction.MEAN,
    divergence: Divergence | str = Divergence.FORWARD_KL,
    **method_params: Any,
) -> Tensor:
    """A divergence between standardised logits: ``D(σ(std(z_t)/T), σ(std(z_s)/T))``.

    Interpretation: the logit-standardisation paper z-scores both sides then applies a base
    temperature; MIX-STD uses T = 1. Both are this function.

    Args:
        student_logits: shape ``(..., C)``.
        teacher_logits: shape ``(..., C)``.
        mask: bool, shape ``(...)``, True = supervised; None = all.
        labels: unused; accepted so every classifier loss has one signature.
        kd_temperature: base temperature applied after standardisation.
        num_items: normaliser for ``reduction="mean"``; default = supervised items here.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        divergence: which divergence to apply (default forward KL).
        **method_params: the divergence's own parameters.

    Returns:
        A scalar, or shape ``(...)`` for ``reduction="none"``.
    """
    del labels
    positions_shape = tuple(student_logits.shape[:-1])
    student = standardize_logits(select_positions(student_logits, mask))
    teacher = standardize_logits(select_positions(teacher_logits, mask))
    per_position = per_position_from_logits(
        divergence, student, teacher, kd_temperature=kd_temperature, **method_params
    )
    return reduce_positions(
        per_position, mask, positions_shape, num_items=num_items, reduction=reduction
    )


def mixed_targets(
    labels_a: Tensor, labels_b: Tensor, lam: float | Tensor, num_classes: int
) -> Tensor:
    """Soft targets ``λ·onehot(a) + (1 − λ)·onehot(b)`` for mixup or cutmix.

    For cutmix, ``λ`` is the area fraction kept from image ``a``. A per-example ``λ`` of shape
    ``(B,)`` expresses partial mixup (``λ = 1`` for examples left unmixed).

    Args:
        labels_a: shape ``(B,)`` int64.
        labels_b: shape ``(B,)`` int64 (labels of the partner examples).
        lam: scalar or shape ``(B,)`` in [0, 1].
        num_classes: C.

    Returns:
        Shape ``(B, C)`` fp32 probabilities.
    """
    onehot_a = torch.nn.functional.one_hot(labels_a, num_classes).float()
    onehot_b = torch.nn.functional.one_hot(labels_b, num_classes).float()
    weight = torch.as_tensor(lam, dtype=torch.float32, device=onehot_a.device)
    if weight.dim() == 1:
        weight = weight.unsqueeze(-1)
    return weight * onehot_a + (1.0 - weight) * onehot_b


def soft_target_cross_entropy(
    student_logits: Tensor,
    target_probs: Tensor,
    mask: Tensor | None = None,
    *,
    num_items: NumItems = None,
    reduction: Reduction | str = Reduction.MEAN,
    standardize: bool = False,
) -> Tensor:
    """Cross-entropy with soft (e.g. mixed) targets: ``−Σ_c y_c log σ(z_s)_c``.

    Args:
        student_logits: shape ``(..., C)``.
        target_probs: shape ``(..., C)``, rows summing to 1 (see :func:`mixed_targets`).
        mask: bool, shape ``(...)``, True = supervised; None = all.
        num_items: normaliser for ``reduction="mean"``; default = supervised items here.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        standardize: z-score the student logits first (MIX-STD's hard term).

    Returns:
        A scalar, or shape ``(...)`` for ``reduction="none"``.
    """
    positions_shape = tuple(student_logits.shape[:-1])
    student = select_positions(student_logits, mask)
    if standardize:
        student = standardize_logits(student)
    lq = log_probs(student)
    targets = upcast(select_positions(target_probs, mask)).to(lq.dtype)
    # Targets are exactly 0 on most classes; where the student also has -inf this avoids 0·inf.
    per_position = -(targets * torch.where(targets > 0, lq, 0.0)).sum(-1)
    return reduce_positions(
        per_position, mask, positions_shape, num_items=num_items, reduction=reduction
    )


CLASSIFIER_LOSSES: dict[str, ClassifierLossFn] = {
    ClassifierLoss.HINTON_KD.value: hinton_kd,
    ClassifierLoss.DKD.value: dkd,
    ClassifierLoss.PLD.value: pld,
    ClassifierLoss.STANDARDIZED_KD.value: standardized_kd,
}
"""Name → function table of the classifier KD losses (uniform signature with ``labels=``)."""
