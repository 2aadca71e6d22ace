"""Align two tokenizations of one text into groups of tokens that cover the same bytes.

Everything here is in **target space**, the convention of ``distil.data.lm``: target ``t`` is
input token ``t + 1``, the token that ``logits[:, t]`` predicts. A group is a pair of contiguous
target runs, one per tokenizer, covering exactly the same unit span ``[a, b)``; ``a`` and ``b`` are
boundaries of both tokenizations. Groups are found with set operations, not a two-pointer walk:
the common boundaries are the intersection of both sides' token ends, and each token belongs to
the first common boundary at or after its end (``searchsorted``). Tokens that share an end (the
byte tokens of one character) therefore always land in the same group, and a zero-width token
(BOS, a prepended ``"▁"``) joins the group that ends where it sits.

A group is kept only if both runs are supervised, contiguous and start at the same unit. What is
left out (the bytes before the first common boundary when the two sides start predicting at
different places, a trailing run with no common end) is counted in ``coverage``.

The per-example result is a ``(G, 4)`` int32 array, computed once per example (off-policy) and
stored with the data or the teacher cache; :func:`collate_groups` turns a batch of them into the
index tensors (:class:`AlignedGroups`) that the losses of ``distil.losses.cross_tokenizer``
consume without a Python loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch
from torch import Tensor

from distil.alignment.offsets import TokenSpans

__all__ = [
    "AlignedGroups",
    "AlignmentKind",
    "SpanAlignment",
    "align_spans",
    "alignment_stats",
    "batch_groups",
    "collate_groups",
    "groups_from_padded",
    "positional_alignment",
]

IGNORE_INDEX = -100  # the label convention of distil.data.lm (kept in sync by a test)


class AlignmentKind(str, Enum):
    """How the tokens of two tokenizations are paired.

    Attributes:
        BYTE_SPAN: groups of tokens that cover the same bytes (TRL GOLD); needs byte spans.
        POSITIONAL: the k-th supervised target with the k-th (the original ULD); needs nothing.
    """

    BYTE_SPAN = "byte_span"
    POSITIONAL = "positional"


GROUP_COLUMNS = ("student_first", "student_last", "teacher_first", "teacher_last")


@dataclass(frozen=True)
class SpanAlignment:
    """The aligned groups of one example and how much of the text they cover.

    Attributes:
        groups: ``(G, 4)`` int32, columns ``student_first, student_last, teacher_first,
            teacher_last``: inclusive target indices of each group's runs, in text order.
        covered_units: units (bytes, special tokens) inside the kept groups.
        student_units: units covered by the student's supervised targets.
        teacher_units: units covered by the teacher's supervised targets.
    """

    groups: np.ndarray
    covered_units: int
    student_units: int
    teacher_units: int

    @property
    def coverage(self) -> float:
        """Share of the student's supervised units that lie in a kept group (1.0 if none)."""
        return self.covered_units / self.student_units if self.student_units else 1.0


def _supervised_targets(
    spans: TokenSpans, supervised: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Target indices, starts and ends of the supervised targets (input token 0 is never one)."""
    inputs = np.arange(1, len(spans))
    if supervised is not None:
        mask = np.asarray(supervised, dtype=bool)
        if mask.shape != (len(spans),):
            raise ValueError(
                f"supervised mask has shape {mask.shape}, expected ({len(spans)},) (one per input token)"
            )
        inputs = inputs[mask[1:]]
    return inputs - 1, spans.starts[inputs], spans.ends[inputs]


def _runs(
    group: np.ndarray, targets: np.ndarray, starts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per group present on one side: id, first target, last target, start unit; plus counts."""
    ids, first, counts = np.unique(group, return_index=True, return_counts=True)
    last = first + counts - 1
    contiguous = targets[last] - targets[first] + 1 == counts
    return ids, np.stack([targets[first], targets[last]], axis=1), starts[first], contiguous


def align_spans(
    student: TokenSpans,
    teacher: TokenSpans,
    *,
    student_supervised: np.ndarray | None = None,
    teacher_supervised: np.ndarray | None = None,
) -> SpanAlignment:
    """Align the supervised targets of two tokenizations of the same units.

    Args:
        student: the student's input tokens and spans.
        teacher: the teacher's input tokens and spans, in the same unit coordinate.
        student_supervised: ``(T_s,)`` bool per *input* token, True where it is a supervised
            target (``labels != -100``); None = every token after the first.
        teacher_supervised: the same for the teacher.

    Returns:
        The kept groups and the coverage counts.
    """
    s_idx, s_start, s_end = _supervised_targets(student, student_supervised)
    t_idx, t_start, t_end = _supervised_targets(teacher, teacher_supervised)
    student_units = int((s_end - s_start).sum())
    teacher_units = int((t_end - t_start).sum())
    if s_idx.shape[0] == 0 or t_idx.shape[0] == 0:
        return SpanAlignment(np.zeros((0, 4), np.int32), 0, student_units, teacher_units)
    common = np.intersect1d(s_end, t_end)  # sorted boundaries where both sides end a token
    s_ids, s_runs, s_first_unit, s_ok = _runs(
        np.searchsorted(common, s_end, side="left"), s_idx, s_start
    )
    t_ids, t_runs, t_first_unit, t_ok = _runs(
        np.searchsorted(common, t_end, side="left"), t_idx, t_start
    )
    both, si, ti = np.intersect1d(s_ids, t_ids, assume_unique=True, return_indices=True)
    keep = (both < common.shape[0]) & (s_first_unit[si] == t_first_unit[ti]) & s_ok[si] & t_ok[ti]
    groups = np.concatenate([s_runs[si][keep], t_runs[ti][keep]], axis=1).astype(np.int32)
    covered = int((common[both[keep]] - s_first_unit[si][keep]).sum())
    return SpanAlignment(groups, covered, student_units, teacher_units)


def alignment_stats(alignments: Sequence[SpanAlignment]) -> dict[str, float]:
    """Summary of many examples' alignments (what the bench and the run log report).

    Returns:
        ``groups``, ``one_to_one`` (share of groups with one token on each side),
        ``student_tokens_one_to_one`` / ``teacher_tokens_one_to_one`` (share of aligned tokens
        in 1:1 groups), ``max_group_tokens`` (largest group, both sides' tokens together),
        ``mean_student_tokens`` / ``mean_teacher_tokens`` per group and ``coverage`` (kept units
        over the student's supervised units).
    """
    rows = [a.groups for a in alignments if a.groups.shape[0]]
    groups = np.concatenate(rows) if rows else np.zeros((0, 4), np.int32)
    s_len = groups[:, 1] - groups[:, 0] + 1
    t_len = groups[:, 3] - groups[:, 2] + 1
    one = (s_len == 1) & (t_len == 1)
    n = max(groups.shape[0], 1)
    units = sum(a.student_units for a in alignments)
    covered = sum(a.covered_units for a in alignments)
    return {
        "groups": float(groups.shape[0]),
        "one_to_one": float(one.sum() / n),
        "student_tokens_one_to_one": float(one.sum() / max(int(s_len.sum()), 1)),
        "teacher_tokens_one_to_one": float(one.sum() / max(int(t_len.sum()), 1)),
        "max_group_tokens": float((s_len + t_len).max()) if groups.shape[0] else 0.0,
        "mean_student_tokens": float(s_len.sum() / n),
        "mean_teacher_tokens": float(t_len.sum() / n),
        "coverage": covered / units if units else 1.0,
    }


@dataclass(frozen=True)
class AlignedGroups:
    """A batch of aligned groups as index tensors: what the cross-tokenizer losses consume.

    Attributes:
        example: ``(G,)`` int64 batch row of each group.
        student_first: ``(G,)`` int64 first student target index (inclusive).
        student_last: ``(G,)`` int64 last student target index (inclusive).
        teacher_first: ``(G,)`` int64 first teacher target index.
        teacher_last: ``(G,)`` int64 last teacher target index.
        student_targets: ``(B, T_s)`` int64 next-token ids (``-100`` where not supervised).
        teacher_targets: ``(B, T_t)`` int64 next-token ids of the teacher's tokenization.
    """

    example: Tensor
    student_first: Tensor
    student_last: Tensor
    teacher_first: Tensor
    teacher_last: Tensor
    student_targets: Tensor
    teacher_targets: Tensor

    @property
    def num_groups(self) -> int:
        """G, the number of aligned groups (the loss's positions)."""
        return int(self.example.numel())

    def to(self, device: torch.device | str) -> AlignedGroups:
        """The same groups with every tensor on ``device``."""
        return AlignedGroups(
            *(
                getattr(self, name).to(device)
                for name in (
                    "example",
                    "student_first",
                    "student_last",
                    "teacher_first",
                    "teacher_last",
                    "student_targets",
                    "teacher_targets",
                )
            )
        )


def collate_groups(
    groups: Sequence[np.ndarray | Tensor], student_targets: Tensor, teacher_targets: Tensor
) -> AlignedGroups:
    """Stack per-example ``(G_i, 4)`` groups into one batch.

    Args:
        groups: one ``(G_i, 4)`` array per batch row (``SpanAlignment.groups``).
        student_targets: ``(B, T_s)`` next-token targets of the student batch
            (``shift_for_next_token(labels)``).
        teacher_targets: ``(B, T_t)`` next-token targets of the teacher batch.

    Returns:
        The batch's groups.

    Raises:
        ValueError: if the counts do not match or a group points outside a row or at an
            unsupervised target.
    """
    if len(groups) != student_targets.shape[0] or len(groups) != teacher_targets.shape[0]:
        raise ValueError(
            f"{len(groups)} group arrays for {student_targets.shape[0]} student and "
            f"{teacher_targets.shape[0]} teacher rows"
        )
    tensors = [torch.as_tensor(np.asarray(g), dtype=torch.long).reshape(-1, 4) for g in groups]
    flat = torch.cat(tensors) if tensors else torch.zeros(0, 4, dtype=torch.long)
    example = torch.repeat_interleave(
        torch.arange(len(tensors)), torch.tensor([t.shape[0] for t in tensors], dtype=torch.long)
    )
    flat = flat.to(student_targets.device)
    example = example.to(student_targets.device)
    out = AlignedGroups(
        example,
        flat[:, 0],
        flat[:, 1],
        flat[:, 2],
        flat[:, 3],
        student_targets,
        teacher_targets.to(student_targets.device),
    )
    _check_groups(out)
    return out


def _check_groups(groups: AlignedGroups) -> None:
    if groups.num_groups == 0:
        return
    for side in ("student", "teacher"):
        first, last = getattr(groups, f"{side}_first"), getattr(groups, f"{side}_last")
        targets = getattr(groups, f"{side}_targets")
        if bool((first < 0).any()) or bool((last < first).any()):
            raise ValueError(f"{side} groups must have 0 <= first <= last")
        if int(last.max()) >= targets.shape[1]:
            raise ValueError(
                f"a {side} group ends at target {int(last.max())}, beyond the batch's "
                f"{targets.shape[1]} positions (groups and batch come from different tokenizations?)"
            )
        ends = targets[groups.example, last]
        starts = targets[groups.example, first]
        if bool((ends == IGNORE_INDEX).any()) or bool((starts == IGNORE_INDEX).any()):
            raise ValueError(
                f"a {side} group points at an unsupervised target (-100): groups and targets "
                "do not come from the same example"
            )


def positional_alignment(student_targets: Tensor, teacher_targets: Tensor) -> AlignedGroups:
    """One-to-one groups by position, the alignment of the original ULD (Boizard et al.).

    The ``k``-th supervised target of the student is paired with the ``k``-th supervised target
    of the teacher, for ``k`` below the smaller count of the row (the rest is truncated). It needs
    no offsets, so it is the alignment for tokenizers without any; it pairs tokens that cover
    different text whenever the tokenizations differ.

    Args:
        student_targets: ``(B, T_s)`` next-token targets (``-100`` = not supervised).
        teacher_targets: ``(B, T_t)`` next-token targets.

    Returns:
        Groups of one token on each side.
    """
    s_mask = student_targets != IGNORE_INDEX
    t_mask = teacher_targets != IGNORE_INDEX
    keep = torch.minimum(s_mask.sum(1), t_mask.sum(1))  # (B,)
    s_rank = s_mask.cumsum(1) - 1
    t_rank = t_mask.cumsum(1) - 1
    s_sel = s_mask & (s_rank < keep[:, None])
    t_sel = t_mask & (t_rank < keep[:, None])
    s_row, s_pos = s_sel.nonzero(as_tuple=True)  # row-major: (row, rank) order on both sides
    _, t_pos = t_sel.nonzero(as_tuple=True)
    return AlignedGroups(
        s_row,
        s_pos,
        s_pos,
        t_pos,
        t_pos,
        student_targets,
        teacher_targets.to(student_targets.device),
    )


def groups_from_padded(
    padded: Tensor, student_targets: Tensor, teacher_targets: Tensor
) -> AlignedGroups:
    """A batch's groups from the padded ``(B, G_max, 4)`` form a collate makes (-1 = padding).

    Args:
        padded: ``(B, G_max, 4)`` int64, each row's groups first, then rows of -1.
        student_targets: ``(B, T_s)`` next-token targets of the student batch.
        teacher_targets: ``(B, T_t)`` next-token targets of the teacher batch.

    Returns:
        The groups, example by example in order (checked as in :func:`collate_groups`).
    """
    present = padded[..., 0] >= 0  # (B, G_max)
    flat = padded[present].to(student_targets.device)  # (G, 4), row-major: example by example
    example = present.nonzero(as_tuple=True)[0].to(student_targets.device)
    out = AlignedGroups(
        example,
        flat[:, 0],
        flat[:, 1],
        flat[:, 2],
        flat[:, 3],
        student_targets,
        teacher_targets.to(student_targets.device),
    )
    _check_groups(out)
    return out


def batch_groups(
    kind: AlignmentKind | str,
    padded: Tensor,
    student_targets: Tensor,
    teacher_targets: Tensor,
) -> AlignedGroups:
    """The groups a batch is distilled over: the stored byte-span groups, or positional pairs.

    Args:
        kind: ``byte_span`` or ``positional``.
        padded: ``(B, G_max, 4)`` byte-span groups of the batch (read for ``byte_span`` only).
        student_targets: ``(B, T_s)`` next-token targets of the student batch.
        teacher_targets: ``(B, T_t)`` next-token targets of the teacher batch.
    """
    if AlignmentKind(kind) is AlignmentKind.POSITIONAL:
        return positional_alignment(student_targets, teacher_targets)
    return groups_from_padded(padded, student_targets, teacher_targets)
