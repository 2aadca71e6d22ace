"""Distillation losses between a teacher and a student that use different tokenizers.

The two sequences of logits do not line up position by position, so every loss here reads
**aligned groups** (:class:`distil.alignment.AlignedGroups`): pairs of contiguous token runs, one
per tokenizer, that cover the same bytes of text (see ``distil.alignment.groups``), or one-to-one
positional pairs for the original ULD. Each group is one loss position.

**Merging a group into one distribution** (TRL GOLD's two strategies, in the next-token
convention of ``distil.data.lm``: ``logits[:, t]`` predicts target ``t``). For a run of targets
``y_a .. y_b`` with next-token distributions ``P_a .. P_b``:

* ``observed``: ``P_a(v) · Π_{t=a+1..b} P_t(y_t)`` — which token starts the span, times the
  probability of the rest of the span as it was observed;
* ``bayesian``: ``Π_{t=a..b-1} P_t(y_t) · P_b(v)`` — the chain rule: the observed prefix, then
  which token ends the span.

Both are unnormalised (they sum to the scalar factor); a run of one token is its plain
distribution. TRL's ``observed`` slices logits at the answer positions, so its row ``k`` is the
distribution *after* token ``k``; here both strategies use the distribution that predicts each
token (the semantics its documentation states).

**Losses per group** (all at ``kd_temperature``, no T² here: see ``objective.py``):

* ``uld`` (Boizard et al. 2024, arXiv:2402.12030): ``Σ_i |p_(i) − q_(i)|`` over both merged
  distributions sorted in decreasing order, the shorter one zero-padded (the closed form of a
  Wasserstein-1 distance between the sorted probability vectors). It ignores which token is
  which, so it needs no vocabulary correspondence.
* ``hybrid`` (TRL GOLD): a divergence (default generalised JSD, β = 0.5) on the vocabulary
  entries both tokenizers share (``distil.alignment.shared_vocabulary``), plus the sorted L1 of
  ``uld`` on the other entries, weighted ``w_m = M / V_t`` and ``1 − w_m`` by default (GOLD's
  adaptive weights, ``M`` shared entries).
* ``min_ed`` (FuseLLM, Wan et al. 2024, arXiv:2401.10491): the teacher's distribution is carried
  onto the student vocabulary through the MinED map (each teacher entry → the student entry with
  the smallest edit distance; probabilities of entries mapped to the same student entry add up),
  then any divergence of ``distil.losses.divergences`` (default forward KL) against the student.
* ``first_token``: ``min_ed``'s projection through :func:`distil.alignment.first_token_map`
  (each teacher entry → the first token of the student's encoding of its text), so the
  projected teacher distribution is its probability of the student's next token at the group
  start.

**Reduction** follows ``distil.losses.reduction`` with groups as positions: ``"mean"`` divides the
sum over groups by ``num_items`` (default: the groups of this call; under gradient accumulation
pass the groups of the whole window), ``"sum"``, or ``"none"`` (shape ``(G,)``). No groups → 0
with zero gradient. Only the rows the groups name enter the computation, so padding and
unsupervised positions get exactly zero gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distil.alignment.groups import IGNORE_INDEX, AlignedGroups
from distil.alignment.vocab import SharedVocabulary
from distil.losses.divergences import (
    DIVERGENCE_TERMS,
    Divergence,
    check_kd_temperature,
    divergence_per_position,
    upcast,
)
from distil.losses.reduction import NumItems, Reduction, reduce_positions

__all__ = [
    "CROSS_TOKENIZER_LOSSES",
    "CrossTokenizerLoss",
    "GroupMerge",
    "group_log_probs",
    "hybrid_uld",
    "hybrid_uld_per_group",
    "min_ed",
    "min_ed_per_group",
    "sorted_l1",
    "uld",
    "uld_per_group",
]


class GroupMerge(str, Enum):
    """How a multi-token run becomes one distribution (TRL GOLD's ``uld_token_merge_strategy``).

    Attributes:
        OBSERVED: first position's distribution × probabilities of the observed later tokens.
        BAYESIAN: probabilities of the observed earlier tokens × last position's distribution.
    """

    OBSERVED = "observed"
    BAYESIAN = "bayesian"


class CrossTokenizerLoss(str, Enum):
    """Names of the cross-tokenizer losses (keys of :data:`CROSS_TOKENIZER_LOSSES`)."""

    ULD = "uld"
    HYBRID = "hybrid"
    MIN_ED = "min_ed"
    FIRST_TOKEN = "first_token"


def group_log_probs(
    logits: Tensor,
    targets: Tensor,
    example: Tensor,
    first: Tensor,
    last: Tensor,
    *,
    merge: GroupMerge | str = GroupMerge.OBSERVED,
    kd_temperature: float = 1.0,
) -> Tensor:
    """Log of each group's merged (unnormalised) distribution.

    Args:
        logits: ``(B, T, V)``, any float dtype (math in fp32, fp64 kept).
        targets: ``(B, T)`` next-token ids, ``-100`` where not supervised.
        example: ``(G,)`` batch row of each group.
        first: ``(G,)`` first target index of each group's run (inclusive).
        last: ``(G,)`` last target index (inclusive).
        merge: ``observed`` or ``bayesian``.
        kd_temperature: divides the logits before every softmax.

    Returns:
        ``(G, V)`` log-probabilities; a one-token run gives its ``log_softmax`` row.
    """
    check_kd_temperature(kd_temperature)
    merge = GroupMerge(merge)
    supervised = targets != IGNORE_INDEX  # (B, T)
    # Only supervised rows enter the math (groups only name supervised targets), so padding and
    # prompt rows, even nan ones, get exactly zero gradient.
    x = upcast(logits[supervised])  # (N, V)
    if kd_temperature != 1.0:
        x = x / kd_temperature
    lse = torch.logsumexp(x, dim=-1)  # (N,)
    picked = x.gather(-1, targets[supervised].unsqueeze(-1)).squeeze(-1) - lse  # (N,)
    observed = picked.new_zeros(targets.shape).masked_scatter(supervised, picked)  # (B, T)
    # Sums of observed log-probabilities over runs as differences of a float64 prefix sum: exact
    # enough for long sequences, one pass for all groups.
    prefix = F.pad(observed.double().cumsum(dim=1), (1, 0))  # (B, T + 1)
    if merge is GroupMerge.OBSERVED:
        base = first
        scalar = prefix[example, last + 1] - prefix[example, first + 1]  # targets a+1 .. b
    else:
        base = last
        scalar = prefix[example, last] - prefix[example, first]  # targets a .. b-1
    row_of = supervised.flatten().cumsum(0) - 1  # (B*T,) row of x for each supervised position
    rows = row_of[example * targets.shape[1] + base]  # (G,)
    base_log_probs = x[rows] - lse[rows].unsqueeze(-1)  # (G, V)
    return base_log_probs + scalar.to(base_log_probs.dtype).unsqueeze(-1)


def _both_sides(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    groups: AlignedGroups,
    merge: GroupMerge | str,
    kd_temperature: float,
    teacher_group_log_probs: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Merged log-probabilities ``(G, V_s)`` of the student and ``(G, V_t)`` of the teacher."""
    student = group_log_probs(
        student_logits,
        groups.student_targets,
        groups.example,
        groups.student_first,
        groups.student_last,
        merge=merge,
        kd_temperature=kd_temperature,
    )
    if (teacher_logits is None) == (teacher_group_log_probs is None):
        raise ValueError("give the teacher as teacher_logits or teacher_group_log_probs, not both")
    if teacher_group_log_probs is not None:
        if teacher_group_log_probs.shape[0] != groups.num_groups:
            raise ValueError(
                f"teacher_group_log_probs has {teacher_group_log_probs.shape[0]} rows for "
                f"{groups.num_groups} groups"
            )
        return student, upcast(teacher_group_log_probs.detach()).to(student.dtype)
    assert teacher_logits is not None
    with torch.no_grad():
        teacher = group_log_probs(
            teacher_logits.detach(),
            groups.teacher_targets,
            groups.example,
            groups.teacher_first,
            groups.teacher_last,
            merge=merge,
            kd_temperature=kd_temperature,
        )
    return student, teacher.to(student.dtype)


def _sorted_ascending(x: Tensor) -> Tensor:
    """``x`` sorted in increasing order along the last dim; differentiable through a gather.

    On the CPU the order comes from numpy, whose vectorised sort is an order of magnitude faster
    than ``torch.sort`` here (576 rows of 8,192 fp32: 0.04 s vs 0.64 s; of 4,096 with the
    gradient: 0.08 s vs 0.36 s). Ties may come in any order: the sorted values are the same.
    """
    if x.device.type == "cpu" and not x.requires_grad:  # the teacher: values only
        return torch.from_numpy(np.sort(x.numpy(), axis=-1))
    if x.device.type == "cpu":
        order = torch.from_numpy(np.argsort(x.detach().numpy(), axis=-1))
    else:
        order = torch.argsort(x, dim=-1)
    return x.gather(-1, order)


def sorted_l1(teacher_probs: Tensor, student_probs: Tensor) -> Tensor:
    """``Σ_i |p_(i) − q_(i)|`` of both rows sorted in decreasing order, the shorter zero-padded.

    Computed on increasing sorts aligned at their largest entries, which is the same sum.

    Args:
        teacher_probs: ``(G, V_t)`` non-negative.
        student_probs: ``(G, V_s)`` non-negative.

    Returns:
        ``(G,)``; 0 for rows that are permutations of each other.
    """
    with torch.no_grad():
        p = _sorted_ascending(teacher_probs)
    q = _sorted_ascending(student_probs)
    k = min(p.shape[-1], q.shape[-1])
    # Below the shorter vocabulary the other side is compared with zeros: its remaining mass.
    head = (p[:, p.shape[-1] - k :] - q[:, q.shape[-1] - k :]).abs().sum(-1)
    return head + p[:, : p.shape[-1] - k].sum(-1) + q[:, : q.shape[-1] - k].sum(-1)


def uld_per_group(student_group_log_probs: Tensor, teacher_group_log_probs: Tensor) -> Tensor:
    """ULD's sorted L1 per group from merged log-probabilities ``(G, V_s)``, ``(G, V_t)``."""
    return sorted_l1(teacher_group_log_probs.exp(), student_group_log_probs.exp())


def _reduce(per_group: Tensor, num_items: NumItems, reduction: Reduction | str) -> Tensor:
    return reduce_positions(
        per_group, None, (per_group.shape[0],), num_items=num_items, reduction=reduction
    )


def uld(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    groups: AlignedGroups,
    *,
    kd_temperature: float = 1.0,
    num_items: NumItems = None,
    reduction: Reduction | str = Reduction.MEAN,
    merge: GroupMerge | str = GroupMerge.OBSERVED,
    teacher_group_log_probs: Tensor | None = None,
) -> Tensor:
    """Universal Logit Distillation: sorted-probability L1 per aligned group.

    With :func:`distil.alignment.positional_alignment` this is the original ULD (Boizard et
    al.); with byte-span groups it is GOLD's extended ULD.

    Args:
        student_logits: ``(B, T_s, V_s)``.
        teacher_logits: ``(B, T_t, V_t)``, detached inside; vocabularies may differ in size.
        groups: aligned groups of this batch.
        kd_temperature: divides both logits before the softmax.
        num_items: normaliser for ``"mean"`` (groups over the accumulation window); default
            the groups of this call.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shape ``(G,)``).
        merge: ``observed`` or ``bayesian`` (for runs of several tokens).
        teacher_group_log_probs: instead of ``teacher_logits``, the teacher's merged
            distributions ``(G, V_t)`` already made (a teacher cache's), at ``kd_temperature``.

    Returns:
        A scalar, or ``(G,)`` for ``reduction="none"``.
    """
    student, teacher = _both_sides(
        student_logits, teacher_logits, groups, merge, kd_temperature, teacher_group_log_probs
    )
    return _reduce(uld_per_group(student, teacher), num_items, reduction)


def _complement(ids: Tensor, size: int) -> Tensor:
    keep = torch.ones(size, dtype=torch.bool, device=ids.device)
    keep[ids] = False
    return keep.nonzero(as_tuple=True)[0]


def hybrid_uld_per_group(
    student_group_log_probs: Tensor,
    teacher_group_log_probs: Tensor,
    shared: SharedVocabulary,
    *,
    matched_divergence: Divergence | str = Divergence.GENERALIZED_JSD,
    matched_weight: float | None = None,
    unmatched_weight: float | None = None,
    **divergence_params: Any,
) -> Tensor:
    """GOLD's hybrid per group: a divergence on shared entries plus sorted L1 on the rest.

    Args:
        student_group_log_probs: ``(G, V_s)`` merged log-probabilities.
        teacher_group_log_probs: ``(G, V_t)``.
        shared: the vocabulary entries both tokenizers have.
        matched_divergence: any pointwise divergence of ``DIVERGENCE_TERMS`` (not TVD++),
            applied to the matched columns as they are (not renormalised, as in GOLD).
        matched_weight: weight of the matched part; None with ``unmatched_weight`` None gives
            GOLD's adaptive ``M / V_t``.
        unmatched_weight: weight of the sorted-L1 part; None → ``1 − w_m`` (adaptive).
        **divergence_params: the matched divergence's parameters (``beta`` for the JSD,
            default 0.5).

    Returns:
        ``(G,)``.

    Raises:
        ValueError: on vocabulary sizes that differ from ``shared``'s, one weight given without
            the other, a negative weight, or a divergence that is not pointwise.
    """
    v_s, v_t = student_group_log_probs.shape[-1], teacher_group_log_probs.shape[-1]
    if (v_t, v_s) != (shared.teacher_vocab_size, shared.student_vocab_size):
        raise ValueError(
            f"logits have vocabularies teacher {v_t} / student {v_s}, the shared vocabulary was "
            f"built for {shared.teacher_vocab_size} / {shared.student_vocab_size}: slice the "
            "logits to the tokenizers' sizes first"
        )
    if (matched_weight is None) != (unmatched_weight is None):
        raise ValueError(
            "give both matched_weight and unmatched_weight, or neither (adaptive M / V_t)"
        )
    if matched_weight is None or unmatched_weight is None:
        matched_weight = len(shared) / max(v_t, 1)
        unmatched_weight = 1.0 - matched_weight
    if matched_weight < 0 or unmatched_weight < 0:
        raise ValueError(
            f"hybrid weights must be >= 0, got {matched_weight} and {unmatched_weight}"
        )
    name = Divergence(matched_divergence)
    if name.value not in DIVERGENCE_TERMS:
        raise ValueError(
            f"{name.value} is not a pointwise divergence; use one of {list(DIVERGENCE_TERMS)}"
        )
    if name is Divergence.GENERALIZED_JSD:
        divergence_params.setdefault("beta", 0.5)
    device = student_group_log_probs.device
    t_ids, s_ids = shared.teacher_ids.to(device), shared.student_ids.to(device)
    matched = DIVERGENCE_TERMS[name.value](
        student_group_log_probs[:, s_ids], teacher_group_log_probs[:, t_ids], **divergence_params
    ).sum(-1)
    t_rest, s_rest = _complement(t_ids, v_t), _complement(s_ids, v_s)
    unmatched = student_group_log_probs.new_zeros(student_group_log_probs.shape[0])
    if t_rest.numel() and s_rest.numel():
        unmatched = sorted_l1(
            teacher_group_log_probs[:, t_rest].exp(), student_group_log_probs[:, s_rest].exp()
        )
    return matched_weight * matched + unmatched_weight * unmatched


def hybrid_uld(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    groups: AlignedGroups,
    *,
    shared_vocabulary: SharedVocabulary,
    kd_temperature: float = 1.0,
    num_items: NumItems = None,
    reduction: Reduction | str = Reduction.MEAN,
    merge: GroupMerge | str = GroupMerge.OBSERVED,
    matched_divergence: Divergence | str = Divergence.GENERALIZED_JSD,
    matched_weight: float | None = None,
    unmatched_weight: float | None = None,
    teacher_group_log_probs: Tensor | None = None,
    **divergence_params: Any,
) -> Tensor:
    """GOLD's hybrid loss: exact divergence on shared vocabulary entries, ULD on the rest.

    With identical tokenizers every entry is shared, the adaptive weight is 1 and the loss is
    the matched divergence itself (e.g. GKD's generalised JSD).

    Args:
        student_logits: ``(B, T_s, V_s)``, ``V_s`` = the student tokenizer's size.
        teacher_logits: ``(B, T_t, V_t)``, detached inside.
        groups: aligned groups of this batch.
        shared_vocabulary: from :func:`distil.alignment.shared_vocabulary`.
        kd_temperature: divides both logits before the softmax.
        num_items: normaliser for ``"mean"``; default the groups of this call.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shape ``(G,)``).
        merge: ``observed`` or ``bayesian``.
        matched_divergence: divergence on the shared columns (default generalised JSD).
        matched_weight: see :func:`hybrid_uld_per_group`.
        unmatched_weight: see :func:`hybrid_uld_per_group`.
        teacher_group_log_probs: instead of ``teacher_logits``, the teacher's merged
            distributions ``(G, V_t)`` (see :func:`uld`).
        **divergence_params: e.g. ``beta`` of the JSD.

    Returns:
        A scalar, or ``(G,)`` for ``reduction="none"``.
    """
    student, teacher = _both_sides(
        student_logits, teacher_logits, groups, merge, kd_temperature, teacher_group_log_probs
    )
    per_group = hybrid_uld_per_group(
        student,
        teacher,
        shared_vocabulary,
        matched_divergence=matched_divergence,
        matched_weight=matched_weight,
        unmatched_weight=unmatched_weight,
        **divergence_params,
    )
    return _reduce(per_group, num_items, reduction)


def min_ed_per_group(
    student_group_log_probs: Tensor,
    teacher_group_log_probs: Tensor,
    vocab_map: Tensor,
    *,
    divergence: Divergence | str = Divergence.FORWARD_KL,
    **divergence_params: Any,
) -> Tensor:
    """MinED per group: the teacher's distribution carried onto the student vocabulary.

    Args:
        student_group_log_probs: ``(G, V_s)``.
        teacher_group_log_probs: ``(G, V_t)``.
        vocab_map: ``(V_t,)`` student id of every teacher entry
            (:func:`distil.alignment.min_edit_distance_map`).
        divergence: any divergence name of ``distil.losses.divergences``.
        **divergence_params: its parameters.

    Returns:
        ``(G,)``.

    Raises:
        ValueError: if ``vocab_map`` does not cover the teacher vocabulary or points outside
            the student's.
    """
    v_s, v_t = student_group_log_probs.shape[-1], teacher_group_log_probs.shape[-1]
    if vocab_map.shape != (v_t,):
        raise ValueError(
            f"vocab_map has shape {tuple(vocab_map.shape)}, expected ({v_t},): one student id per "
            "teacher entry (slice the teacher logits to its tokenizer's size first)"
        )
    vocab_map = vocab_map.to(student_group_log_probs.device)
    if vocab_map.numel() and (int(vocab_map.min()) < 0 or int(vocab_map.max()) >= v_s):
        raise ValueError(f"vocab_map points outside the student vocabulary of {v_s} entries")
    with torch.no_grad():
        projected = teacher_group_log_probs.new_zeros(teacher_group_log_probs.shape[0], v_s)
        projected.index_add_(1, vocab_map, teacher_group_log_probs.exp())  # (G, V_s)
        projected_log = projected.log()  # entries nothing maps to: -inf (contribute 0)
    return divergence_per_position(
        divergence, student_group_log_probs, projected_log, **divergence_params
    )


def min_ed(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    groups: AlignedGroups,
    *,
    vocab_map: Tensor,
    kd_temperature: float = 1.0,
    num_items: NumItems = None,
    reduction: Reduction | str = Reduction.MEAN,
    merge: GroupMerge | str = GroupMerge.OBSERVED,
    divergence: Divergence | str = Divergence.FORWARD_KL,
    teacher_group_log_probs: Tensor | None = None,
    **divergence_params: Any,
) -> Tensor:
    """MinED (FuseLLM): divergence between the student and the teacher mapped by edit distance.

    **Interpretation**: FuseLLM and DSKD pair positions by dynamic time warping over token
    strings and score only positions whose tokens map onto each other; here positions are the
    exact byte-span groups (every group starts at the same text prefix on both sides) and every
    group is scored. With identical tokenizers the map is the identity and the loss is the plain
    divergence.

    Args:
        student_logits: ``(B, T_s, V_s)``.
        teacher_logits: ``(B, T_t, V_t)``, detached inside.
        groups: aligned groups of this batch.
        vocab_map: ``(V_t,)`` student id of every teacher entry.
        kd_temperature: divides both logits before the softmax.
        num_items: normaliser for ``"mean"``; default the groups of this call.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shape ``(G,)``).
        merge: ``observed`` or ``bayesian``.
        divergence: default forward KL (FuseLLM's choice).
        teacher_group_log_probs: instead of ``teacher_logits``, the teacher's merged
            distributions ``(G, V_t)`` (see :func:`uld`).
        **divergence_params: the divergence's parameters.

    Returns:
        A scalar, or ``(G,)`` for ``reduction="none"``.
    """
    student, teacher = _both_sides(
        student_logits, teacher_logits, groups, merge, kd_temperature, teacher_group_log_probs
    )
    per_group = min_ed_per_group(
        student, teacher, vocab_map, divergence=divergence, **divergence_params
    )
    return _reduce(per_group, num_items, reduction)


CROSS_TOKENIZER_LOSSES: dict[str, Callable[..., Tensor]] = {
    CrossTokenizerLoss.ULD.value: uld,
    CrossTokenizerLoss.HYBRID.value: hybrid_uld,
    CrossTokenizerLoss.MIN_ED.value: min_ed,
    CrossTokenizerLoss.FIRST_TOKEN.value: min_ed,  # the same projection, another map
}
"""Name → function table: ``fn(student_logits, teacher_logits, groups, *, kd_temperature,
num_items, reduction, merge, ...)``; ``hybrid`` also takes ``shared_vocabulary``, ``min_ed``
``vocab_map`` (``first_token`` too: its map is :func:`distil.alignment.first_token_map`)."""
