"""Sequence-level losses on whole traces: SFT on teacher traces and REDI (positive + negative).

Both work on the log-likelihood the student gives a trace, ``log π(y|x) = Σ_t log π(y_t|x, y_<t)``
over the trace's supervised tokens (the completion and its EOS; the prompt is masked), and its
length ``|y|`` (the number of those tokens).

- :func:`sequence_nll` — supervised fine-tuning on traces (sequence-level KD, Kim & Rush 2016;
  rejection-sampling fine-tuning when the traces were filtered by a verifier). ``tokens``
  normalisation is the usual SFT loss (summed token NLL ÷ supervised tokens, as TRL's
  ``SFTTrainer`` and REDI's stage 1 compute it); ``sequence`` normalisation averages each
  trace's mean token NLL, so every trace weighs the same whatever its length.
- :func:`redi_loss` / :func:`redi_objective` — stage 2 of REDI (Reinforcement Distillation,
  "Harnessing Negative Signals", arXiv:2505.24850; METHODS.md F.2), reference-free:

  ``L = c⁺ · mean_{y⁺}[ −log π(y⁺|x) / |y⁺| ] + α · mean_{y⁻}[ w(y⁻) · log π(y⁻|x) / |y⁻| ]``

  with ``w = 1``, or ``w = exp(γ · log π(y⁻|x)/|y⁻|)`` when negative re-weighting is on.
  Minimising it raises the likelihood of correct traces and lowers that of incorrect ones;
  the negative term is weighted less (α < c⁺) because pushing likelihoods down without bound
  is what destabilises training (the paper's argument for the asymmetry).

Constants (defaults of :func:`redi_loss`), from the authors' released code and recipe
(Tim-Siu/reinforcement-distillation, ``trl/trainer/dpo2_trainer.py`` ``loss_type="reinforce"``
and ``experiments_trl/recipes/redi/redi_1_08_1e-6/config.yaml``):

=========================  =======  ==========================================================
constant                   default  where
=========================  =======  ==========================================================
``positive_weight`` (c⁺)   1.0      ``reinforce_chosen_coef: 1.0``
``negative_weight`` (α)    0.8      ``reinforce_rejected_coef: 0.8`` (the "1_08" in the name)
``negative_reweight_gamma`` None    ``use_neg_weighting`` is off in the recipe; the code's
                                    ``neg_weighting_gamma`` default is 1.0
=========================  =======  ==========================================================

The recipe's training constants (for a recipe, not this module): stage 2 at learning rate 1e-6,
1 epoch, linear schedule with warm-up ratio 0.1, effective batch 32 pairs, weight decay 1e-4,
sequences up to 19,800 tokens. Stage 1 (``sft_landmv_5ep``): SFT on positives at learning rate
5e-5, linear schedule, warm-up ratio 0.1, weight decay 1e-4; METHODS.md and the recipe's name
say 5 epochs, the stored ``config.yaml`` says ``num_train_epochs: 3``.

Averaging: the paper's batches are (y⁺, y⁻) pairs and the loss is the mean over pairs, which
equals the mean over positives plus the mean over negatives. Here the two means are taken
separately, so unpaired batches (more positives than negatives) work too; under gradient
accumulation pass the window's counts as ``num_positive``/``num_negative`` (normalise once).
As in the released code, the re-weighting factor ``w`` is *not* detached: the negative term
``α·w·ℓ`` (``ℓ`` = normalised log-likelihood) then has its minimum at ``ℓ = −1/γ``, so it stops
pushing a negative down once it is that unlikely (and pulls a less likely one back up).
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from distil.losses.objective import IGNORE_INDEX, ObjectiveOutput
from distil.losses.reduction import NumItems, divide_by, normalizer

__all__ = [
    "SequenceLogProbs",
    "SequenceNormalization",
    "redi_loss",
    "redi_objective",
    "sequence_log_probs",
    "sequence_nll",
]


class SequenceNormalization(str, Enum):
    """How :func:`sequence_nll` averages.

    Attributes:
        TOKENS: summed token NLL ÷ supervised tokens (``num_items`` over the accumulation
            window); long traces weigh more. The standard SFT loss.
        SEQUENCE: mean over traces of each trace's mean token NLL (``num_items`` = traces in
            the window); every trace weighs the same.
    """

    TOKENS = "tokens"
    SEQUENCE = "sequence"


class SequenceLogProbs(NamedTuple):
    """Per-trace log-likelihood and length.

    Attributes:
        total: shape ``(B,)`` float32, ``Σ_t log π(y_t | x, y_<t)`` over supervised tokens.
        length: shape ``(B,)`` float32, the number of supervised tokens (0 for a trace without).
    """

    total: Tensor
    length: Tensor


def sequence_log_probs(logits: Tensor, labels: Tensor) -> SequenceLogProbs:
    """Each row's summed log-probability of its supervised targets, and their count.

    Supervised positions are selected before any math (masked logits, even ``nan``, cannot
    leak and get zero gradient); the log-softmax is taken in float32 (float64 kept).

    Args:
        logits: shape ``(B, T, V)``, aligned with ``labels`` (``logits[:, t]`` predicts
            ``labels[:, t]``; build ``labels`` with ``distil.data.lm.shift_for_next_token``).
        labels: shape ``(B, T)`` int64, ``-100`` = not supervised.

    Returns:
        :class:`SequenceLogProbs` with ``total`` and ``length`` of shape ``(B,)``.

    Raises:
        ValueError: If the shapes do not line up.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be (B, T, V) and labels (B, T); got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    mask = labels != IGNORE_INDEX  # (B, T)
    selected = logits[mask]  # (N, V)
    if not selected.is_floating_point() or selected.dtype in (torch.float16, torch.bfloat16):
        selected = selected.float()
    token_log_probs = -F.cross_entropy(selected, labels[mask], reduction="none")  # (N,)
    rows = mask.nonzero()[:, 0]  # (N,) the trace each selected position belongs to
    total = token_log_probs.new_zeros(labels.shape[0]).index_add(0, rows, token_log_probs)  # (B,)
    return SequenceLogProbs(total, mask.sum(dim=1).to(total.dtype))


def _per_sequence(
    length: Tensor, weights: Tensor | None, batch: int, reference: Tensor
) -> Tensor | None:
    if weights is None:
        return None
    if weights.shape != (batch,):
        raise ValueError(f"sequence_weights must have shape ({batch},), got {tuple(weights.shape)}")
    return weights.to(reference.dtype)


def sequence_nll(
    logits: Tensor,
    labels: Tensor,
    *,
    normalization: SequenceNormalization | str = SequenceNormalization.TOKENS,
    sequence_weights: Tensor | None = None,
    num_items: NumItems = None,
) -> ObjectiveOutput:
    """Supervised fine-tuning on whole traces (the SFT and rejection-sampling SFT loss).

    Args:
        logits: shape ``(B, T, V)``, aligned with ``labels``.
        labels: shape ``(B, T)``, ``-100`` where not supervised (prompt, padding).
        normalization: ``tokens`` (Σ token NLL ÷ ``num_items`` tokens) or ``sequence`` (Σ of
            each trace's mean token NLL ÷ ``num_items`` traces); see
            :class:`SequenceNormalization`.
        sequence_weights: optional ``(B,)`` weight of each trace (e.g. from data selection);
            the normaliser is still the count, so weights below 1 shrink the loss.
        num_items: supervised tokens (``tokens``) or traces with a supervised token
            (``sequence``) over the accumulation window; default this call's count.

    Returns:
        ``ObjectiveOutput`` whose components are ``sft_nll/raw`` and ``sft_nll/weighted``
        (equal: there is one term).
    """
    normalization = SequenceNormalization(normalization)
    seq = sequence_log_probs(logits, labels)
    weights = _per_sequence(seq.length, sequence_weights, labels.shape[0], seq.total)
    nll = -seq.total if weights is None else -seq.total * weights  # (B,)
    if normalization is SequenceNormalization.TOKENS:
        count = int(seq.length.sum().item())
        loss = divide_by(nll.sum(), normalizer(num_items, count))
    else:
        has_tokens = seq.length > 0
        per_trace = nll[has_tokens] / seq.length[has_tokens]  # (B',) mean token NLL per trace
        loss = divide_by(per_trace.sum(), normalizer(num_items, int(has_tokens.sum().item())))
    detached = loss.detach()
    return ObjectiveOutput(loss, {"sft_nll/raw": detached, "sft_nll/weighted": detached})


def redi_loss(
    total_log_probs: Tensor,
    lengths: Tensor,
    is_positive: Tensor,
    *,
    positive_weight: float = 1.0,
    negative_weight: float = 0.8,
    negative_reweight_gamma: float | None = None,
    num_positive: NumItems = None,
    num_negative: NumItems = None,
) -> ObjectiveOutput:
    """The REDI objective from per-trace log-likelihoods (see the module docstring).

    Args:
        total_log_probs: shape ``(B,)``, ``log π(y|x)`` of each trace (from
            :func:`sequence_log_probs`).
        lengths: shape ``(B,)``, supervised tokens of each trace; 0-length traces are dropped
            (the released code clamps the length to 1 and warns; a trace with no token has no
            likelihood to move).
        is_positive: shape ``(B,)`` bool, True for a verified-correct trace.
        positive_weight: ``c⁺``, weight of the positive term (paper: 1.0).
        negative_weight: ``α``, weight of the negative term (paper: 0.8); 0 gives SFT on the
            positives with per-trace length normalisation.
        negative_reweight_gamma: ``γ`` of the optional factor ``exp(γ·log π(y⁻|x)/|y⁻|)`` on
            each negative (off in the paper's recipe; the code's default γ is 1.0).
        num_positive: positives over the accumulation window (default: this call's).
        num_negative: negatives over the accumulation window (default: this call's).

    Returns:
        ``ObjectiveOutput``: components ``redi_positive`` (mean ``−log π/|y|`` of positives) and
        ``redi_negative`` (mean ``w·log π/|y|`` of negatives), ``/raw`` and ``/weighted``.

    Raises:
        ValueError: On mismatched shapes, a non-bool ``is_positive`` or negative weights.
    """
    if (
        not (total_log_probs.shape == lengths.shape == is_positive.shape)
        or total_log_probs.dim() != 1
    ):
        raise ValueError(
            "total_log_probs, lengths and is_positive must all have shape (B,), got "
            f"{tuple(total_log_probs.shape)}, {tuple(lengths.shape)}, {tuple(is_positive.shape)}"
        )
    if is_positive.dtype != torch.bool:
        raise ValueError(f"is_positive must be a bool tensor, got {is_positive.dtype}")
    if positive_weight < 0 or negative_weight < 0:
        raise ValueError(
            f"REDI weights must be >= 0 (c+={positive_weight}, alpha={negative_weight}); "
            "the signs are already in the objective"
        )
    has_tokens = lengths > 0
    normalized = torch.where(
        has_tokens, total_log_probs / lengths.clamp_min(1).to(total_log_probs.dtype), 0.0
    )  # (B,) log π(y|x) / |y|
    positive = is_positive & has_tokens
    negative = ~is_positive & has_tokens
    positive_term = divide_by(
        -normalized[positive].sum(), normalizer(num_positive, int(positive.sum().item()))
    )
    negatives = normalized[negative]  # (B⁻,)
    if negative_reweight_gamma is not None:
        negatives = negatives * torch.exp(negative_reweight_gamma * negatives)  # not detached
    negative_term = divide_by(negatives.sum(), normalizer(num_negative, int(negative.sum().item())))
    positive_weighted = positive_weight * positive_term
    negative_weighted = negative_weight * negative_term
    return ObjectiveOutput(
        positive_weighted + negative_weighted,
        {
            "redi_positive/raw": positive_term.detach(),
            "redi_positive/weighted": positive_weighted.detach(),
            "redi_negative/raw": negative_term.detach(),
            "redi_negative/weighted": negative_weighted.detach(),
        },
    )


def redi_objective(
    logits: Tensor,
    labels: Tensor,
    is_positive: Tensor,
    *,
    positive_weight: float = 1.0,
    negative_weight: float = 0.8,
    negative_reweight_gamma: float | None = None,
    num_positive: NumItems = None,
    num_negative: NumItems = None,
) -> ObjectiveOutput:
    """:func:`redi_loss` from logits: a batch of positive and negative traces.

    Args:
        logits: shape ``(B, T, V)``, aligned with ``labels``.
        labels: shape ``(B, T)``, ``-100`` where not supervised (the prompt, padding).
        is_positive: shape ``(B,)`` bool, the verifier's verdict on each trace.
        positive_weight, negative_weight, negative_reweight_gamma, num_positive, num_negative:
            see :func:`redi_loss`.
    """
    seq = sequence_log_probs(logits, labels)
    return redi_loss(
        seq.total,
        seq.length,
        is_positive,
        positive_weight=positive_weight,
        negative_weight=negative_weight,
        negative_reweight_gamma=negative_reweight_gamma,
        num_positive=num_positive,
        num_negative=num_negative,
    )
