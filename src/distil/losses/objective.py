"""The one place where hard and soft terms, their weights and the T² factor are combined.

Every objective returns an :class:`ObjectiveOutput`: the scalar to back-propagate and, for
logging, each component both raw and weighted (detached), e.g. ``"hard_ce/raw"``,
``"hard_ce/weighted"``, ``"kd/raw"``, ``"kd/weighted"``. The classic mix is

    ``loss = (1 − kd_weight) · CE_sum / num_items + kd_weight · kd_temperature² · KD_sum / num_items``

The T² factor keeps the soft term's gradient magnitude independent of the temperature (Hinton et
al. 2015; omitting it is failure mode F5). ``num_items`` normalises once over the whole
gradient-accumulation window (F6): count the supervised items of every micro-batch in the window
and pass that count to each call. The teacher is always treated as a constant here (its tensors
are detached).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from distil.alignment.groups import AlignedGroups
from distil.losses.chunked import (
    ChunkedLossParts,
    chunked_logits_loss,
    chunked_sampled_logits_loss,
    chunked_topk_logits_loss,
    fused_linear_loss,
    should_use_chunked_loss,
)
from distil.losses.classifier import (
    CLASSIFIER_LOSSES,
    ClassifierLoss,
    soft_target_cross_entropy,
    standardize_logits,
)
from distil.losses.cross_tokenizer import CROSS_TOKENIZER_LOSSES, CrossTokenizerLoss
from distil.losses.divergences import DIVERGENCES, Divergence, check_kd_temperature, upcast
from distil.losses.reduction import NumItems, divide_by, normalizer
from distil.losses.sparse import SampledTargets, TopKTargets, sampled_divergence, topk_divergence

__all__ = [
    "IGNORE_INDEX",
    "ObjectiveOutput",
    "WeightedTerm",
    "classifier_objective",
    "cross_tokenizer_objective",
    "feature_objective",
    "mixup_classifier_objective",
    "token_objective",
    "token_objective_from_hidden",
    "token_objective_sparse",
]

IGNORE_INDEX = -100
"""Label value of positions without supervision (Hugging Face convention)."""


class ObjectiveOutput(NamedTuple):
    """What every objective returns.

    Attributes:
        loss: scalar to back-propagate.
        components: detached scalars for logging, ``"<name>/raw"`` and ``"<name>/weighted"``.
    """

    loss: Tensor
    components: dict[str, Tensor]


class WeightedTerm(NamedTuple):
    """A loss term and its weight for :func:`feature_objective`.

    Attributes:
        weight: multiplies the term.
        loss: scalar loss (e.g. from :mod:`distil.losses.representation`).
        kd_temperature: if set, the term is a temperature-softened divergence (e.g. CWD) and
            is also multiplied by ``kd_temperature²``.
    """

    weight: float
    loss: Tensor
    kd_temperature: float | None = None


def _check_mix(kd_weight: float, kd_temperature: float) -> None:
    if not 0.0 <= kd_weight <= 1.0:
        raise ValueError(f"kd_weight must lie in [0, 1], got {kd_weight} (never clamped)")
    check_kd_temperature(kd_temperature)


def _name(option: str | Enum) -> str:
    """The plain string of an option that may be given as a str enum member."""
    return str(option.value) if isinstance(option, Enum) else option


def _mix(
    ce_raw: Tensor, kd_raw: Tensor | None, kd_weight: float, kd_temperature: float
) -> ObjectiveOutput:
    """Combine raw (already normalised) terms; the only place T² is applied to logits KD."""
    if kd_raw is None:
        return ObjectiveOutput(
            ce_raw, {"hard_ce/raw": ce_raw.detach(), "hard_ce/weighted": ce_raw.detach()}
        )
    ce_weighted = (1.0 - kd_weight) * ce_raw
    kd_weighted = kd_weight * kd_temperature**2 * kd_raw
    return ObjectiveOutput(
        ce_weighted + kd_weighted,
        {
            "hard_ce/raw": ce_raw.detach(),
            "hard_ce/weighted": ce_weighted.detach(),
            "kd/raw": kd_raw.detach(),
            "kd/weighted": kd_weighted.detach(),
        },
    )


def _classifier_kd_sum(
    divergence: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    kd_temperature: float,
    divergence_params: dict[str, Any],
) -> Tensor:
    """Summed KD term for classifiers: a token divergence or a classifier KD loss."""
    if divergence in DIVERGENCES:
        return DIVERGENCES[divergence](
            student_logits,
            teacher_logits,
            kd_temperature=kd_temperature,
            reduction="sum",
            **divergence_params,
        )
    if divergence in CLASSIFIER_LOSSES and divergence != ClassifierLoss.PLD.value:
        return CLASSIFIER_LOSSES[divergence](
            student_logits,
            teacher_logits,
            labels=labels,
            kd_temperature=kd_temperature,
            reduction="sum",
            **divergence_params,
        )
    known = sorted(DIVERGENCES) + sorted(set(CLASSIFIER_LOSSES) - {ClassifierLoss.PLD.value})
    hint = (
        " (PLD replaces CE + KD; use classifier.pld with feature_objective)"
        if divergence == ClassifierLoss.PLD.value
        else ""
    )
    raise ValueError(f"unknown divergence {divergence!r}{hint}; choose one of {known}")


def classifier_objective(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    *,
    kd_weight: float,
    kd_temperature: float,
    divergence: str = "forward_kl",
    num_items: int | float | Tensor | None = None,
    **divergence_params: Any,
) -> ObjectiveOutput:
    """Hard cross-entropy mixed with a KD term for classifiers.

    ``loss = (1 − kd_weight)·CE_sum/num_items + kd_weight·kd_temperature²·KD_sum/num_items``.
    With ``teacher_logits=None``: ``loss = CE_sum/num_items`` (no-teacher baseline; kd_weight
    ignored) and the components hold only ``hard_ce``.

    Args:
        student_logits: shape ``(B, C)``.
        teacher_logits: shape ``(B, C)`` or None.
        labels: shape ``(B,)`` int64; ``-100`` drops an example from the CE term only.
        kd_weight: in [0, 1].
        kd_temperature: T > 0 of the KD term (the CE uses T = 1).
        divergence: a :data:`~distil.losses.divergences.DIVERGENCES` name, or ``"hinton_kd"``,
            ``"dkd"``, ``"standardized_kd"`` from :data:`~distil.losses.classifier.CLASSIFIER_LOSSES`.
        num_items: normaliser over the accumulation window; default B.
        **divergence_params: the divergence's own parameters (``beta``, ``nckd_weight``, ...).

    Returns:
        :class:`ObjectiveOutput` with ``hard_ce/{raw,weighted}`` and ``kd/{raw,weighted}``.
    """
    _check_mix(kd_weight, kd_temperature)
    denominator = normalizer(num_items, labels.shape[0])
    ce_sum = F.cross_entropy(
        upcast(student_logits), labels, reduction="sum", ignore_index=IGNORE_INDEX
    )
    ce_raw = divide_by(ce_sum, denominator)
    if teacher_logits is None:
        return _mix(ce_raw, None, kd_weight, kd_temperature)
    kd_sum = _classifier_kd_sum(
        _name(divergence),
        student_logits,
        teacher_logits.detach(),
        labels,
        kd_temperature,
        dict(divergence_params),
    )
    return _mix(ce_raw, divide_by(kd_sum, denominator), kd_weight, kd_temperature)


def mixup_classifier_objective(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    target_probs: Tensor,
    *,
    kd_weight: float,
    kd_temperature: float,
    divergence: str = "forward_kl",
    standardize: bool = False,
    num_items: int | float | Tensor | None = None,
    **divergence_params: Any,
) -> ObjectiveOutput:
    """Mixup/cutmix-aware KD: soft-target CE on mixed labels plus KD on the mixed input.

    The teacher must see the same mixed input as the student. With ``standardize=True`` this is
    MIX-STD (METHODS.md C.1): both the CE and the KD term use z-scored logits (with
    ``kd_temperature = 1`` that is exactly MIX-STD; other values add a base temperature, as in
    logit-standardisation KD). ``loss = (1 − w)·CE + w·T²·KD``, both over ``num_items``.

    Args:
        student_logits: shape ``(B, C)`` on the mixed input.
        teacher_logits: shape ``(B, C)`` on the mixed input, or None (CE only).
        target_probs: shape ``(B, C)``, e.g. :func:`~distil.losses.classifier.mixed_targets`.
        kd_weight: in [0, 1].
        kd_temperature: T > 0.
        divergence: a :data:`~distil.losses.divergences.DIVERGENCES` name.
        standardize: z-score logits before both softmaxes.
        num_items: normaliser over the accumulation window; default B.
        **divergence_params: the divergence's own parameters.

    Returns:
        :class:`ObjectiveOutput`.
    """
    _check_mix(kd_weight, kd_temperature)
    denominator = normalizer(num_items, student_logits.shape[0])
    ce_sum = soft_target_cross_entropy(
        student_logits, target_probs, reduction="sum", standardize=standardize
    )
    ce_raw = divide_by(ce_sum, denominator)
    if teacher_logits is None:
        return _mix(ce_raw, None, kd_weight, kd_temperature)
    student, teacher = student_logits, teacher_logits.detach()
    if standardize:
        student, teacher = standardize_logits(student), standardize_logits(teacher)
    kd_sum = DIVERGENCES[Divergence(divergence).value](
        student, teacher, kd_temperature=kd_temperature, reduction="sum", **divergence_params
    )
    return _mix(ce_raw, divide_by(kd_sum, denominator), kd_weight, kd_temperature)


def _supervised_count(mask: Tensor, num_items: NumItems) -> NumItems:
    """Default normaliser as a tensor (no host sync); an explicit value passes through."""
    return mask.sum() if num_items is None else num_items


def _token_output(
    parts: ChunkedLossParts,
    denominator: Tensor | float,
    ce_coef: float,
    kd_coef: float,
    has_teacher: bool,
) -> ObjectiveOutput:
    """Components of a chunked token objective (its loss already holds the weights)."""
    ce_raw = divide_by(parts.hard_ce_sum, denominator)
    components = {"hard_ce/raw": ce_raw, "hard_ce/weighted": ce_coef * ce_raw}
    if has_teacher:
        kd_raw = divide_by(parts.kd_sum, denominator)
        components |= {"kd/raw": kd_raw, "kd/weighted": kd_coef * kd_raw}
    return ObjectiveOutput(parts.loss, {k: v.detach() for k, v in components.items()})


def _token_coefficients(
    labels: Tensor, num_items: NumItems, kd_weight: float, kd_temperature: float, has_teacher: bool
) -> tuple[Tensor, Tensor | float, float, float]:
    """Supervision mask, normaliser and the two mixing factors (T² on the soft term)."""
    mask = labels != IGNORE_INDEX  # (B, T)
    denominator = normalizer(_supervised_count(mask, num_items), 0)
    ce_coef = (1.0 - kd_weight) if has_teacher else 1.0
    return mask, denominator, ce_coef, kd_weight * kd_temperature**2


def _per_item(coef: float, denominator: Tensor | float) -> Tensor:
    """``coef / denominator`` as a float64 scalar; the chunk loop applies it in the loss dtype."""
    return divide_by(torch.tensor(coef, dtype=torch.float64), denominator)


def token_objective(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    *,
    kd_weight: float,
    kd_temperature: float,
    divergence: str = "forward_kl",
    num_items: int | float | Tensor | None = None,
    chunk_size: int | None = None,
    **divergence_params: Any,
) -> ObjectiveOutput:
    """Token-level hard CE mixed with a token-level divergence, from full logits.

    Positions with ``labels == -100`` are dropped before any math. ``loss = (1 − w)·CE_sum/N +
    w·T²·KD_sum/N`` with ``N = num_items`` (default: supervised tokens in this call). The
    logits already exist here, but the loss is evaluated in chunks of rows
    (:func:`~distil.losses.chunked.chunked_logits_loss`), so beyond the logits it holds only one
    gradient buffer of their shape rather than a dozen fp32 intermediates. For large
    vocabularies prefer :func:`token_objective_from_hidden`, which never builds ``(B, T, V)``.

    Args:
        student_logits: shape ``(B, T, V)``, already shifted/aligned with ``labels``.
        teacher_logits: shape ``(B, T, V)`` or None (CE only; kd_weight ignored).
        labels: shape ``(B, T)`` int64, ``-100`` = ignored.
        kd_weight: in [0, 1].
        kd_temperature: T > 0 of the divergence (the CE uses T = 1).
        divergence: a :data:`~distil.losses.divergences.DIVERGENCES` name.
        num_items: supervised tokens over the accumulation window; default this call's count.
        chunk_size: rows per chunk (default sized to the vocabulary).
        **divergence_params: the divergence's own parameters.

    Returns:
        :class:`ObjectiveOutput`.
    """
    _check_mix(kd_weight, kd_temperature)
    has_teacher = teacher_logits is not None
    mask, denominator, ce_coef, kd_coef = _token_coefficients(
        labels, num_items, kd_weight, kd_temperature, has_teacher
    )
    parts = chunked_logits_loss(
        student_logits,
        mask,
        labels=labels,
        teacher_logits=teacher_logits,
        hard_ce_coef=_per_item(ce_coef, denominator),
        kd_coef=_per_item(kd_coef, denominator),
        divergence=_name(divergence),
        kd_temperature=kd_temperature,
        chunk_size=chunk_size,
        **divergence_params,
    )
    return _token_output(parts, denominator, ce_coef, kd_coef, has_teacher)


def cross_tokenizer_objective(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    groups: AlignedGroups,
    *,
    kd_weight: float,
    kd_temperature: float,
    loss: CrossTokenizerLoss | str = CrossTokenizerLoss.ULD,
    num_items: NumItems = None,
    num_groups: NumItems = None,
    **loss_params: Any,
) -> ObjectiveOutput:
    """Hard CE on the student's own tokens mixed with a cross-tokenizer loss over aligned groups.

    ``loss = (1 − w)·CE_sum/N + w·T²·KD_sum/G``: the CE is normalised by the supervised
    student tokens ``N``, the soft term by the aligned groups ``G`` (its positions); under
    gradient accumulation pass both counts of the whole window. The T² factor is applied as for
    every soft term (no effect at the default T = 1).

    Args:
        student_logits: ``(B, T_s, V_s)``, aligned with ``groups.student_targets``.
        teacher_logits: ``(B, T_t, V_t)`` in the teacher's own tokenization, or None with
            ``teacher_group_log_probs`` (a cache's merged distributions) in ``loss_params``.
        groups: the batch's aligned groups (they carry both sides' next-token targets).
        kd_weight: in [0, 1].
        kd_temperature: T > 0 of the soft term (the CE uses T = 1).
        loss: a :data:`~distil.losses.cross_tokenizer.CROSS_TOKENIZER_LOSSES` name.
        num_items: supervised student tokens over the window; default this call's.
        num_groups: aligned groups over the window; default this call's.
        **loss_params: the loss's own parameters (``merge``, ``shared_vocabulary``,
            ``vocab_map``, ``beta``, ...).

    Returns:
        :class:`ObjectiveOutput` with ``hard_ce`` and ``kd`` components.
    """
    _check_mix(kd_weight, kd_temperature)
    targets = groups.student_targets
    mask = targets != IGNORE_INDEX  # (B, T_s)
    ce_sum = F.cross_entropy(upcast(student_logits[mask]), targets[mask], reduction="sum")
    ce_raw = divide_by(ce_sum, normalizer(_supervised_count(mask, num_items), 0))
    kd_raw = CROSS_TOKENIZER_LOSSES[_name(loss)](
        student_logits,
        teacher_logits,
        groups,
        kd_temperature=kd_temperature,
        num_items=num_groups,
        **loss_params,
    )
    return _mix(ce_raw, kd_raw, kd_weight, kd_temperature)


def _linear(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    logits = hidden @ weight.T  # (..., V)
    return logits if bias is None else logits + bias


def token_objective_from_hidden(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    *,
    kd_weight: float,
    kd_temperature: float,
    divergence: str = "forward_kl",
    num_items: int | float | Tensor | None = None,
    student_bias: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    chunked: bool | None = None,
    chunk_size: int | None = None,
    **divergence_params: Any,
) -> ObjectiveOutput:
    """:func:`token_objective` computed from the student's final hidden states.

    Hard CE and the divergence are computed in the same chunks of positions, so neither the
    student's nor (when ``teacher_hidden`` is given) the teacher's ``(B, T, V)`` logits are ever
    materialised (see :mod:`distil.losses.chunked`). Values and gradients equal the reference
    path's within float tolerance.

    Args:
        student_hidden: shape ``(B, T, H)``, aligned with ``labels``.
        student_weight: shape ``(V, H)``, the student's output weight.
        teacher_logits: shape ``(B, T, V)``, or None (then ``teacher_hidden`` or no teacher).
        labels: shape ``(B, T)`` int64, ``-100`` = ignored.
        kd_weight: in [0, 1].
        kd_temperature: T > 0 of the divergence.
        divergence: a :data:`~distil.losses.divergences.DIVERGENCES` name.
        num_items: supervised tokens over the accumulation window; default this call's count.
        student_bias: shape ``(V,)`` or None.
        teacher_hidden: shape ``(B, T, Ht)``, with ``teacher_weight``, instead of logits.
        teacher_weight: shape ``(V, Ht)``.
        teacher_bias: shape ``(V,)`` or None.
        chunked: force the chunked (True) or reference (False) path; None decides with
            :func:`~distil.losses.chunked.should_use_chunked_loss` (chunked for V >= 32768).
        chunk_size: positions per chunk (default sized to the vocabulary).
        **divergence_params: the divergence's own parameters.

    Returns:
        :class:`ObjectiveOutput`.
    """
    _check_mix(kd_weight, kd_temperature)
    vocab = student_weight.shape[0]
    if chunked is None:
        chunked = should_use_chunked_loss(labels.numel(), vocab)
    has_teacher = teacher_logits is not None or teacher_hidden is not None
    if not chunked:
        if teacher_hidden is not None:
            if teacher_weight is None:
                raise ValueError("teacher_hidden and teacher_weight go together")
            with torch.no_grad():
                teacher_logits = _linear(teacher_hidden, teacher_weight, teacher_bias)
        return token_objective(
            _linear(student_hidden, student_weight, student_bias),
            teacher_logits,
            labels,
            kd_weight=kd_weight,
            kd_temperature=kd_temperature,
            divergence=divergence,
            num_items=num_items,
            chunk_size=chunk_size,
            **divergence_params,
        )
    mask, denominator, ce_coef, kd_coef = _token_coefficients(
        labels, num_items, kd_weight, kd_temperature, has_teacher
    )
    parts = fused_linear_loss(
        student_hidden,
        student_weight,
        mask,
        student_bias=student_bias,
        labels=labels,
        teacher_logits=teacher_logits,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        teacher_bias=teacher_bias,
        hard_ce_coef=_per_item(ce_coef, denominator),
        kd_coef=_per_item(kd_coef, denominator),
        divergence=_name(divergence),
        kd_temperature=kd_temperature,
        chunk_size=chunk_size,
        **divergence_params,
    )
    return _token_output(parts, denominator, ce_coef, kd_coef, has_teacher)


def feature_objective(
    terms: Mapping[str, WeightedTerm | tuple[float, Tensor]],
    base: ObjectiveOutput | None = None,
) -> ObjectiveOutput:
    """Add weighted terms (representation losses, PLD, ...) to an objective, or build one.

    ``loss = base.loss + Σ_name weight · (kd_temperature² if given) · term``; each term is
    logged as ``"<name>/raw"`` and ``"<name>/weighted"``.

    Args:
        terms: name → :class:`WeightedTerm` or ``(weight, loss)``; losses are scalars.
        base: an objective to extend (e.g. from :func:`token_objective`), or None.

    Returns:
        :class:`ObjectiveOutput`.

    Raises:
        ValueError: on a name that is already a component, or a non-scalar term.
    """
    loss = base.loss if base is not None else None
    components = dict(base.components) if base is not None else {}
    for name, term in terms.items():
        item = term if isinstance(term, WeightedTerm) else WeightedTerm(*term)
        if item.loss.dim() != 0:
            raise ValueError(f"term {name!r} must be a scalar, got shape {tuple(item.loss.shape)}")
        if f"{name}/raw" in components:
            raise ValueError(f"term name {name!r} is already used")
        factor = item.weight
        if item.kd_temperature is not None:
            check_kd_temperature(item.kd_temperature)
            factor *= item.kd_temperature**2
        weighted = factor * item.loss
        components[f"{name}/raw"] = item.loss.detach()
        components[f"{name}/weighted"] = weighted.detach()
        loss = weighted if loss is None else loss + weighted
    if loss is None:
        raise ValueError("feature_objective needs at least one term or a base objective")
    return ObjectiveOutput(loss, components)


def token_objective_sparse(
    student_logits: Tensor,
    teacher: TopKTargets | SampledTargets,
    labels: Tensor,
    *,
    kd_weight: float,
    kd_temperature: float,
    divergence: str = "forward_kl",
    num_items: int | float | Tensor | None = None,
    **divergence_params: Any,
) -> ObjectiveOutput:
    """:func:`token_objective` against a sparse teacher: a top-k + tail cache or importance samples.

    The divergence is the library's exact sparse form, never a dense distribution guessed from
    the sparse one: on ``k + 1`` buckets (the top-k ids and the rest) for
    :class:`~distil.losses.sparse.TopKTargets` (:func:`~distil.losses.sparse.topk_divergence`),
    the unbiased importance-sampled estimate for :class:`~distil.losses.sparse.SampledTargets`
    (:func:`~distil.losses.sparse.sampled_divergence`). ``loss = (1 − w)·CE_sum/N +
    w·T²·KD_sum/N`` as in :func:`token_objective`; the teacher's values are at the temperature
    they were cached at, the student's logits are divided by ``kd_temperature``.

    Args:
        student_logits: shape ``(B, T, V)``, aligned with ``labels``.
        teacher: per-position targets with shape ``(B, T, k)`` fields (``(B, T)`` tail).
        labels: shape ``(B, T)`` int64, ``-100`` = ignored.
        kd_weight: in [0, 1].
        kd_temperature: T > 0.
        divergence: a :data:`~distil.losses.divergences.DIVERGENCES` name.
        num_items: supervised tokens over the accumulation window; default this call's count.
        **divergence_params: the divergence's own parameters.
    """
    _check_mix(kd_weight, kd_temperature)
    mask, denominator, ce_coef, kd_coef = _token_coefficients(
        labels, num_items, kd_weight, kd_temperature, True
    )
    sampled_tail = isinstance(teacher, TopKTargets) and teacher.tail_sample_ids is not None
    if sampled_tail and (_name(divergence) != Divergence.FORWARD_KL.value or divergence_params):
        raise ValueError(
            f"a cache with tail samples estimates forward KL only, not {_name(divergence)!r}; set kd.divergence=forward_kl "
            "or write the cache without cache.tail_samples"
        )
    if (
        isinstance(teacher, TopKTargets)
        and _name(divergence) == Divergence.FORWARD_KL.value
        and not divergence_params
    ):  # the common case: chunked, gradient in closed form, no (N, V) autograd intermediates
        parts = chunked_topk_logits_loss(
            student_logits,
            mask,
            teacher_topk_log_probs=teacher.log_probs,
            teacher_topk_ids=teacher.ids,
            teacher_tail_log_prob=teacher.tail_log_prob,
            labels=labels,
            hard_ce_coef=_per_item(ce_coef, denominator) if ce_coef else 0.0,
            kd_coef=_per_item(kd_coef, denominator),
            kd_temperature=kd_temperature,
            teacher_tail_sample_ids=teacher.tail_sample_ids,
            teacher_tail_sample_log_probs=teacher.tail_sample_log_probs,
        )
        return _token_output(parts, denominator, ce_coef, kd_coef, True)
    if (
        isinstance(teacher, SampledTargets)
        and _name(divergence) == Divergence.FORWARD_KL.value
        and not divergence_params
    ):  # the plain importance-sampled KL (low-variance gradient), chunked, closed form
        parts = chunked_sampled_logits_loss(
            student_logits,
            mask,
            sample_ids=teacher.ids,
            teacher_sample_log_probs=teacher.teacher_log_probs,
            proposal_log_probs=teacher.proposal_log_probs,
            labels=labels,
            hard_ce_coef=_per_item(ce_coef, denominator) if ce_coef else 0.0,
            kd_coef=_per_item(kd_coef, denominator),
            kd_temperature=kd_temperature,
        )
        return _token_output(parts, denominator, ce_coef, kd_coef, True)
    zero = student_logits.new_zeros((), dtype=torch.float32)
    ce_sum = (
        F.cross_entropy(upcast(student_logits[mask]), labels[mask], reduction="sum")
        if ce_coef
        else zero
    )
    common: dict[str, Any] = {
        "divergence": _name(divergence),
        "kd_temperature": kd_temperature,
        "reduction": "sum",
        **divergence_params,
    }
    if isinstance(teacher, TopKTargets):
        kd_sum = topk_divergence(
            student_logits,
            teacher.log_probs,
            teacher.ids,
            mask,
            teacher_tail_log_prob=teacher.tail_log_prob,
            **common,
        )
    else:
        kd_sum = sampled_divergence(
            student_logits,
            teacher.ids,
            teacher.teacher_log_probs,
            mask,
            proposal_log_probs=teacher.proposal_log_probs,
            **common,
        )
    ce_raw, kd_raw = divide_by(ce_sum, denominator), divide_by(kd_sum, denominator)
    loss = ce_coef * ce_raw + kd_coef * kd_raw
    components = {
        "hard_ce/raw": ce_raw,
        "hard_ce/weighted": ce_coef * ce_raw,
        "kd/raw": kd_raw,
        "kd/weighted": kd_coef * kd_raw,
    }
    return ObjectiveOutput(loss, {k: v.detach() for k, v in components.items()})
