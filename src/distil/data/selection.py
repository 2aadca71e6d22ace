"""Choosing a subset of distillation data at a budget, and the controls to compare it with.

The unit is whatever the caller keys by: a problem id (with all its traces) or a trace. Every
method returns the chosen keys, best first; ties are broken by a seeded shuffle, never by input
order. Methods (:class:`SelectionMethod`):

- ``all`` — no selection (control).
- ``random`` — a seeded random subset of the same size (control).
- ``pass_rate`` — by the teacher's pass rate on the problem (its difficulty): ``medium`` prefers
  problems closest to 50 % (both correct and incorrect traces exist, what REDI needs),
  ``hardest`` the lowest non-zero rates (problems the teacher can solve but rarely does),
  ``easiest`` the highest.
- ``learning_impact`` — LIMR's Learning Impact Measurement (Li et al. 2025, "LIMR: Less is More
  for RL Scaling", arXiv:2502.11886; METHODS.md F.4): from a short training run, each sample's
  reward trajectory ``r_i(1..K)`` over epochs is compared with the average trajectory
  ``r̄(k) = mean_i r_i(k)``::

      s_i = 1 − Σ_k (r_i(k) − r̄(k))² / Σ_k (1 − r̄(k))²

  (GAIR-NLP/LIMR ``lim/lim_selection.py``: ``calculate_similarity_score``; 1 is the maximum
  reward). Samples that learn like the model as a whole score near 1; LIMR keeps ``s ≥ 0.2``
  (its ``similarity_threshold`` default; 1,389 of 8,523 MATH problems). LIMR's rewards are
  RL accuracies per epoch; without an RL loop this module turns a short SFT run's per-example
  losses into rewards with :func:`rewards_from_losses`, ``r = exp(−mean token NLL)`` (the
  per-token likelihood, also 1 at best) — our interpretation, not the paper's.
- ``scorer`` — by any score per key (a process reward model, a judge, or
  :func:`mean_logprob_scores`: the teacher's mean token log-probability of a trace, from the
  log-probs ``distil generate`` recorded), highest first.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Mapping, Sequence
from enum import Enum
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from pydantic import Field, model_validator

from distil.config.base import StrictModel
from distil.errors import DistilError

__all__ = [
    "LIMR_THRESHOLD",
    "PassRatePreference",
    "ScorerKind",
    "SelectionMethod",
    "SelectionSection",
    "TraceScorer",
    "budget_count",
    "learning_impact_scores",
    "mean_logprob_scores",
    "per_example_nll",
    "per_key_mean",
    "rewards_from_losses",
    "select_above",
    "select_by_pass_rate",
    "select_random",
    "select_top",
]

Key = TypeVar("Key", bound=Hashable)

LIMR_THRESHOLD = 0.2
"""LIMR's ``similarity_threshold``: keep samples whose learning-impact score is at least this."""


class SelectionMethod(str, Enum):
    """How a subset is chosen (see the module docstring)."""

    ALL = "all"
    RANDOM = "random"
    PASS_RATE = "pass_rate"
    LEARNING_IMPACT = "learning_impact"
    SCORER = "scorer"


class PassRatePreference(str, Enum):
    """Which teacher pass rates ``pass_rate`` selection prefers."""

    MEDIUM = "medium"
    HARDEST = "hardest"
    EASIEST = "easiest"


class ScorerKind(str, Enum):
    """Where ``scorer`` selection's scores come from."""

    TEACHER_LOGPROB = "teacher_logprob"  # the traces' recorded mean token log-probability
    MODEL = "model"  # mean token log-likelihood under another model (``scorer_model``)


class SelectionSection(StrictModel):
    """How a run chooses its problems (a recipe's ``selection`` section)."""

    method: SelectionMethod = SelectionMethod.ALL
    budget: float = Field(default=1.0, gt=0, description="a fraction < 1 or a count of problems")
    prefer: PassRatePreference = PassRatePreference.MEDIUM
    scorer: ScorerKind = ScorerKind.TEACHER_LOGPROB
    scorer_model: str | None = Field(default=None, description="HF folder for scorer=model")
    probe_steps: int = Field(default=60, ge=2, description="learning_impact: the short run")
    probe_points: int = Field(default=4, ge=2, description="learning_impact: K loss measurements")

    @model_validator(mode="after")
    def _consistent(self) -> SelectionSection:
        if self.scorer is ScorerKind.MODEL and self.scorer_model is None:
            raise ValueError("selection.scorer=model needs selection.scorer_model (an HF folder)")
        if self.budget >= 1 and not float(self.budget).is_integer():
            raise ValueError("selection.budget is a fraction in (0, 1) or a whole count")
        return self


class TraceScorer(Protocol):
    """A scorer model: one score per record, higher is better (a PRM, a judge, a likelihood)."""

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> list[float]: ...


def budget_count(total: int, budget: float | int) -> int:
    """How many of ``total`` items a budget allows: a fraction in ``(0, 1)`` (rounded, at least
    one) or a count (at most ``total``).

    Raises:
        DistilError: On a non-positive budget or an empty pool.
    """
    if total < 1:
        raise DistilError("nothing to select from: the pool is empty")
    if isinstance(budget, float) and 0 < budget < 1:
        return max(1, round(total * budget))
    if budget <= 0 or (isinstance(budget, float) and not budget.is_integer()):
        raise DistilError(f"a budget is a fraction in (0, 1) or a positive count, got {budget}")
    return min(int(budget), total)


def _shuffled(keys: Sequence[Key], seed: int) -> list[Key]:
    out = list(keys)
    random.Random(seed).shuffle(out)
    return out


def select_random(keys: Sequence[Key], budget: float | int, *, seed: int = 0) -> list[Key]:
    """A seeded random subset of ``budget`` keys (the control for every other method)."""
    return _shuffled(keys, seed)[: budget_count(len(keys), budget)]


def select_top(scores: Mapping[Key, float], budget: float | int, *, seed: int = 0) -> list[Key]:
    """The ``budget`` keys with the highest scores (ties in seeded random order).

    Raises:
        DistilError: If a score is NaN.
    """
    if any(math.isnan(v) for v in scores.values()):
        raise DistilError("a selection score is NaN; fix the scorer before selecting")
    order = sorted(
        _shuffled(list(scores), seed), key=lambda k: -scores[k]
    )  # stable: ties stay shuffled
    return order[: budget_count(len(order), budget)]


def select_above(scores: Mapping[Key, float], threshold: float = LIMR_THRESHOLD) -> list[Key]:
    """Every key whose score is at least ``threshold`` (LIMR's rule), best first."""
    return sorted((k for k, v in scores.items() if v >= threshold), key=lambda k: -scores[k])


def select_by_pass_rate(
    rates: Mapping[Key, float],
    budget: float | int,
    prefer: PassRatePreference | str = PassRatePreference.MEDIUM,
    *,
    seed: int = 0,
) -> list[Key]:
    """Problems chosen by the teacher's pass rate on them (see the module docstring).

    ``hardest`` ranks problems the teacher never solves last (there is no correct trace to
    learn from); ``easiest`` ranks those it always solves first.
    """
    prefer = PassRatePreference(prefer)
    if prefer is PassRatePreference.MEDIUM:
        scores = {k: -abs(r - 0.5) for k, r in rates.items()}
    elif prefer is PassRatePreference.HARDEST:
        scores = {k: (-r if r > 0 else -2.0) for k, r in rates.items()}
    else:
        scores = dict(rates)
    return select_top(scores, budget, seed=seed)


def learning_impact_scores(
    trajectories: np.ndarray | Sequence[Sequence[float]], *, max_reward: float = 1.0
) -> np.ndarray:
    """LIMR's learning-impact score of every sample (see the module docstring).

    Args:
        trajectories: shape ``(N, K)``: sample ``i``'s reward after each of ``K`` epochs (or
            checkpoints), all at most ``max_reward``.
        max_reward: The best reward (1 for accuracy or ``exp(−NLL)``).

    Returns:
        Shape ``(N,)`` float64: ``1 − Σ_k (r_ik − r̄_k)² / Σ_k (max − r̄_k)²``; 1 for a sample on
        the average curve, lower (possibly below 0) the further it strays.

    Raises:
        DistilError: On a non-2-D input, NaNs, rewards above ``max_reward``, or an average
            trajectory already at ``max_reward`` everywhere (nothing left to learn).
    """
    r = np.asarray(trajectories, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] == 0 or r.shape[1] == 0:
        raise DistilError(f"trajectories must have shape (samples, epochs), got {r.shape}")
    if np.isnan(r).any() or (r > max_reward + 1e-12).any():
        raise DistilError(f"rewards must be finite and at most max_reward={max_reward}")
    mean = r.mean(axis=0)  # (K,) the average learning curve
    room = ((max_reward - mean) ** 2).sum()
    if room <= 0:
        raise DistilError(
            "the average reward is already maximal at every epoch; learning impact is undefined"
        )
    return np.asarray(1.0 - ((r - mean) ** 2).sum(axis=1) / room)


def rewards_from_losses(losses: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """``exp(−loss)``: a per-token likelihood in ``(0, 1]`` from mean token NLLs of shape
    ``(N, K)``, the reward :func:`learning_impact_scores` reads for an SFT run."""
    values = np.asarray(losses, dtype=np.float64)
    if (values < 0).any():
        raise DistilError("losses must be non-negative mean token NLLs")
    return np.asarray(np.exp(-values))


def per_key_mean(keys: Sequence[Key], values: Sequence[float]) -> dict[Key, float]:
    """The mean of ``values`` per key (e.g. a problem's score from its traces' scores)."""
    grouped: dict[Key, list[float]] = {}
    for key, value in zip(keys, values, strict=True):
        grouped.setdefault(key, []).append(float(value))
    return {k: sum(v) / len(v) for k, v in grouped.items()}


def mean_logprob_scores(traces: Sequence[Mapping[str, Any]]) -> list[float]:
    """A :class:`TraceScorer` that needs no model: the teacher's mean token log-probability of
    each trace, from the ``token_logprobs`` that ``distil generate`` recorded.

    Raises:
        DistilError: If a trace has no recorded log-probs (generate with ``generation.logprobs``).
    """
    out = []
    for t in traces:
        logprobs = t.get("token_logprobs")
        if not logprobs:
            raise DistilError(
                f"trace {t.get('id')!r}/{t.get('sample')!r} has no token_logprobs; collect traces with "
                "generation.logprobs=true"
            )
        out.append(float(sum(logprobs)) / len(logprobs))
    return out


@torch.no_grad()
def per_example_nll(
    model: Any, batches: Sequence[Mapping[str, torch.Tensor]], *, vocab_size: int | None = None
) -> dict[int, float]:
    """Each example's mean token NLL under ``model`` (eval mode, restored afterwards): what a
    short training run records per epoch for :func:`learning_impact_scores`.

    Args:
        model: A causal LM returning ``.logits``.
        batches: Collated batches (``input_ids``, ``attention_mask``, ``labels`` aligned with
            the inputs, ``example_id``), e.g. ``LMData.collate``'s.
        vocab_size: The tokenizer's size: output rows beyond it (padding) are dropped before
            the softmax, as everywhere in evaluation.

    Returns:
        ``{example_id: mean NLL over its supervised targets}``.
    """
    from distil.data.lm import shift_for_next_token
    from distil.losses.sequence import sequence_log_probs

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: dict[int, float] = {}
    try:
        for batch in batches:
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
            ).logits[..., :vocab_size]  # (B, T, V)
            seq = sequence_log_probs(logits, shift_for_next_token(batch["labels"]).to(device))
            for example_id, total, length in zip(
                batch["example_id"].tolist(), seq.total.tolist(), seq.length.tolist(), strict=True
            ):
                out[int(example_id)] = -total / max(length, 1.0)
    finally:
        model.train(was_training)
    return out
