"""Several teachers answering as one: multi-teacher distillation in every recipe.

The members' answers are combined into one target, so a recipe distils an ensemble exactly as
it distils a single teacher:

- ``mean_probs`` (default): ``p̄_T = Σ_i w_i softmax(z_i / T)`` at the KD temperature ``T``,
  returned as logits ``T · log p̄_T`` so that the loss's own ``softmax(logits / T)`` gives back
  ``p̄_T`` exactly. Because ``Σ_i w_i KL(p_i ‖ q) = H(p̄, q) − Σ_i w_i H(p_i)``, this is the same
  gradient as one forward KL per teacher, summed with weights ``w_i``.
- ``mean_logits``: ``z̄ = Σ_i w_i z_i`` (TextBrewer's multi-teacher rule). Its softmax is the
  normalised *geometric* mean of the members' probabilities: a sharper target that is not what
  summing per-teacher forward KLs optimises.

Member weights are static (normalised to sum 1) or, with ``confidence`` weighting, chosen per
example (per position for LMs) as a softmax over members of ``−CE_i(label)`` times the static
weights (CA-MKD, Zhang et al. 2022): the members that are right about an example count most.
Sentence-encoder members are combined by the weighted mean of their embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from distil.config.sources import CombineRule, MemberWeighting
from distil.errors import DistilError
from distil.teachers.base import Batch, Teacher, TeacherOutput

IGNORE_INDEX = -100


def combine_logits(
    member_logits: Sequence[Tensor],
    weights: Tensor,
    *,
    rule: CombineRule,
    kd_temperature: float,
) -> Tensor:
    """One target from the members' logits.

    Args:
        member_logits: ``N`` tensors ``(..., V)``.
        weights: ``(N,)`` static weights, or ``(N, ...)`` per example/position; summing to 1
            over members.
        rule: ``mean_probs`` or ``mean_logits`` (see the module docstring).
        kd_temperature: ``T`` of the loss that will read the target.

    Returns:
        ``(..., V)`` float32 logits whose ``softmax(· / T)`` is the combined target.
    """
    z = torch.stack([m.float() for m in member_logits])  # (N, ..., V)
    w = weights.to(z.device, torch.float32)
    w = w.reshape(*w.shape, *([1] * (z.dim() - w.dim())))  # broadcast over (..., V)
    if rule is CombineRule.MEAN_LOGITS:
        return (w * z).sum(0)
    log_p = F.log_softmax(z / kd_temperature, dim=-1)  # (N, ..., V)
    log_mean = torch.logsumexp(log_p + w.clamp_min(1e-30).log(), dim=0)  # log Σ w_i p_i
    return kd_temperature * log_mean


def confidence_weights(member_logits: Sequence[Tensor], labels: Tensor, static: Tensor) -> Tensor:
    """Per-example member weights ``softmax_i(−CE_i(label)) · w_i`` renormalised; positions with
    no label (``-100``) keep the static weights.

    Args:
        member_logits: ``N`` tensors ``(..., V)``.
        labels: ``(...)`` int64 class ids or next-token targets.
        static: ``(N,)`` static weights summing to 1.

    Returns:
        ``(N, ...)`` weights summing to 1 over members.
    """
    z = torch.stack([m.float() for m in member_logits])  # (N, ..., V)
    known = labels != IGNORE_INDEX
    safe = labels.clamp_min(0).to(z.device)
    ce = -F.log_softmax(z, dim=-1).gather(-1, safe.expand(z.shape[0], *safe.shape).unsqueeze(-1))
    ce = ce.squeeze(-1)  # (N, ...)
    s = static.to(z.device, torch.float32).reshape(-1, *([1] * (ce.dim() - 1)))
    w = torch.softmax(-ce, dim=0) * s
    w = w / w.sum(0, keepdim=True)
    return torch.where(known.to(z.device).unsqueeze(0), w, s.expand_as(w))


class EnsembleTeacher:
    """The ``Teacher`` protocol over several teachers (see the module docstring).

    Args:
        members: The member teachers (live or cached), all answering the same batch.
        weights: Static weights, one per member (normalised here).
        rule: How logits are combined.
        weighting: Static, or per-example confidence weights (needs ``labels`` or ``targets``
            in the batch).
        kd_temperature: The temperature of the loss that reads the combined logits.
        names: Member names for the mode line.
    """

    def __init__(
        self,
        members: Sequence[Teacher],
        weights: Sequence[float],
        *,
        rule: CombineRule = CombineRule.MEAN_PROBS,
        weighting: MemberWeighting = MemberWeighting.STATIC,
        kd_temperature: float = 1.0,
        names: Sequence[str] | None = None,
    ) -> None:
        if len(members) < 2 or len(weights) != len(members):
            raise DistilError("an ensemble needs two or more members, each with a weight")
        total = float(sum(weights))
        self.members = list(members)
        self.weights = torch.tensor([w / total for w in weights])
        self.rule, self.weighting = rule, weighting
        self.kd_temperature = kd_temperature
        self.names = list(names) if names else [m.describe() for m in members]

    def __call__(self, batch: Batch) -> TeacherOutput:
        outs = [m(batch) for m in self.members]
        if all(o.embedding is not None for o in outs):
            stacked = torch.stack([o.embedding for o in outs if o.embedding is not None])
            w = self.weights.to(stacked.device).reshape(-1, *([1] * (stacked.dim() - 1)))
            return TeacherOutput(embedding=(w * stacked).sum(0))
        logits = [o.logits for o in outs]
        if any(z is None for z in logits):
            raise DistilError(
                "every ensemble member must answer with logits (or every one with embeddings); "
                "a member answered with hidden states or sparse targets: set kd.chunked=false and "
                "do not combine teacher caches of top-k targets"
            )
        dense = [z for z in logits if z is not None]
        width = {z.shape[-1] for z in dense}
        if len(width) != 1:
            raise DistilError(f"ensemble members disagree on the output size: {sorted(width)}")
        weights = self.weights
        if self.weighting is MemberWeighting.CONFIDENCE:
            labels = batch.get("labels", batch.get("targets"))
            if labels is None:
                raise DistilError("confidence weighting needs the batch's labels or targets")
            weights = confidence_weights(dense, labels, self.weights)
        combined = combine_logits(
            dense, weights, rule=self.rule, kd_temperature=self.kd_temperature
        )
        return TeacherOutput(logits=combined)

    def member_outputs(self, batch: Batch) -> list[TeacherOutput]:
        """Each member's own answer (for per-teacher agreement in reports)."""
        return [m(batch) for m in self.members]

    def describe(self) -> str:
        parts = ", ".join(
            f"{name} (w={w:.2f})" for name, w in zip(self.names, self.weights.tolist(), strict=True)
        )
        how = {
            CombineRule.MEAN_PROBS: "mean of probabilities at the KD temperature",
            CombineRule.MEAN_LOGITS: "mean of logits (geometric mean of probabilities)",
        }[self.rule]
        weighting = (
            "per-example confidence × static weights"
            if self.weighting is MemberWeighting.CONFIDENCE
            else "static weights"
        )
        return f"ensemble of {len(self.members)}: {parts}; {how}, {weighting}"
