"""Fidelity from saved logits: agreement, KL/JSD to the teacher, calibration, confusion.

Every function reads logits of shape ``(N, C)`` (a classifier's examples, or an LM's supervised
token positions flattened to rows with their next-token ids as labels), so one implementation
serves every recipe. Rows are processed in chunks: a language model's ``(N, V)`` logits never
need a second full-size fp32 copy.

``fidelity_part`` assembles the ``fidelity`` part of a report (see
:mod:`distil.evaluation.report`) from a ``{role: logits}`` mapping.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from distil.losses.divergences import forward_kl, generalized_jsd

FP32_NOISE = 1e-7  # mean divergences below this are rounding noise of fp32 log-softmax: report 0
CHUNK_ROWS = 4096  # rows per chunk: 4096 × 32k vocabulary × 4 bytes = 512 MiB at most
DEFAULT_BINS = 15  # the usual ECE binning (Guo et al. 2017)


def _rows(*tensors: Tensor, chunk: int = CHUNK_ROWS) -> Iterator[tuple[Tensor, ...]]:
    n = tensors[0].shape[0]
    for start in range(0, n, chunk):
        yield tuple(t[start : start + chunk] for t in tensors)


def _check_2d(name: str, logits: Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"{name} must have shape (N, C), got {tuple(logits.shape)}")


def agreement(student_logits: Tensor, teacher_logits: Tensor) -> float:
    """Top-1 agreement: the fraction of rows where student and teacher pick the same class.

    Args:
        student_logits: ``(N, C)``.
        teacher_logits: ``(N, C)``.

    Returns:
        A value in ``[0, 1]``; ``nan`` for ``N = 0``.
    """
    if student_logits.shape[0] == 0:
        return math.nan
    same = sum(
        int((s.argmax(-1) == t.argmax(-1)).sum()) for s, t in _rows(student_logits, teacher_logits)
    )
    return same / student_logits.shape[0]


def kl_to_teacher(student_logits: Tensor, teacher_logits: Tensor) -> float:
    """Mean forward KL(teacher ‖ student) per row at temperature 1, in nats.

    Args:
        student_logits: ``(N, C)``.
        teacher_logits: ``(N, C)``.
    """
    _check_2d("student_logits", student_logits)
    n = student_logits.shape[0]
    total = sum(
        float(forward_kl(s, t, reduction="sum")) for s, t in _rows(student_logits, teacher_logits)
    )
    return _clean(total / n) if n else math.nan


def jsd_to_teacher(student_logits: Tensor, teacher_logits: Tensor) -> float:
    """Mean Jensen-Shannon divergence (β = 0.5) per row at temperature 1, in nats (≤ ln 2).

    Args:
        student_logits: ``(N, C)``.
        teacher_logits: ``(N, C)``.
    """
    _check_2d("student_logits", student_logits)
    n = student_logits.shape[0]
    total = sum(
        float(generalized_jsd(s, t, reduction="sum", beta=0.5))
        for s, t in _rows(student_logits, teacher_logits)
    )
    return _clean(total / n) if n else math.nan


def _clean(value: float) -> float:
    return clamp_divergence(value)


def clamp_divergence(value: float) -> float:
    """A mean divergence as reported: never below 0 (a divergence is non-negative, so a negative
    mean is fp32 rounding, e.g. a model against itself through another batch layout) and 0 below
    the rounding noise of fp32 log-softmax (``FP32_NOISE``)."""
    return 0.0 if value < FP32_NOISE else value


def confidences(logits: Tensor) -> tuple[Tensor, Tensor]:
    """The top-1 probability and class of each row.

    Args:
        logits: ``(N, C)``.

    Returns:
        ``(confidence, prediction)``, both of shape ``(N,)`` (fp32 and int64).
    """
    conf: list[Tensor] = []
    pred: list[Tensor] = []
    for (chunk,) in _rows(logits):
        p, c = torch.softmax(chunk.float(), dim=-1).max(dim=-1)  # (n,), (n,)
        conf.append(p)
        pred.append(c)
    if not conf:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(conf), torch.cat(pred)


def reliability(logits: Tensor, labels: Tensor, num_bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """Expected calibration error and the reliability-diagram bins of one model.

    Equal-width confidence bins on ``[0, 1]``; ``ECE = Σ_b (n_b / N) · |acc_b − conf_b|``.

    Args:
        logits: ``(N, C)``.
        labels: ``(N,)`` class ids.
        num_bins: Number of equal-width bins.

    Returns:
        ``{"ece", "bin_edges", "confidence", "accuracy", "count"}``; ``confidence`` and
        ``accuracy`` are per-bin means (``None`` for an empty bin).
    """
    _check_2d("logits", logits)
    conf, pred = confidences(logits)
    correct = (pred == labels.to(pred.device)).float()  # (N,)
    edges = torch.linspace(0, 1, num_bins + 1)
    # A confidence of exactly 1 belongs to the last bin; 1/C (the minimum) to the first.
    index = torch.clamp(torch.bucketize(conf, edges[1:-1], right=True), 0, num_bins - 1)  # (N,)
    count = torch.bincount(index, minlength=num_bins).float()
    conf_sum = torch.bincount(index, weights=conf, minlength=num_bins)
    acc_sum = torch.bincount(index, weights=correct, minlength=num_bins)
    n = max(int(count.sum()), 1)
    ece = float(((acc_sum - conf_sum).abs()).sum() / n)
    mean = [
        (float(c / k), float(a / k)) if k > 0 else (None, None)
        for c, a, k in zip(conf_sum, acc_sum, count, strict=True)
    ]
    return {
        "ece": ece,
        "bin_edges": [float(e) for e in edges],
        "confidence": [m[0] for m in mean],
        "accuracy": [m[1] for m in mean],
        "count": [int(k) for k in count],
    }


def confusion_matrix(logits: Tensor, labels: Tensor, num_classes: int) -> list[list[int]]:
    """Counts ``M[true][predicted]``.

    Args:
        logits: ``(N, C)``.
        labels: ``(N,)`` class ids in ``[0, num_classes)``.
        num_classes: ``C``.
    """
    _, pred = confidences(logits)
    flat = labels.long().cpu() * num_classes + pred.cpu()  # (N,)
    counts = torch.bincount(flat, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes).tolist()


def fidelity_part(
    logits: Mapping[str, Tensor],
    labels: Tensor,
    *,
    teacher: str = "teacher",
    names: Mapping[str, str] | None = None,
    split: str = "test",
    class_names: Sequence[str] | None = None,
    num_bins: int = DEFAULT_BINS,
) -> dict[str, Any]:
    """The ``fidelity`` part of a report from held-out logits of several models.

    Args:
        logits: ``{role: (N, C) logits}``, the teacher's among them.
        labels: ``(N,)`` true class (or next-token) ids.
        teacher: The role whose outputs the others are compared to.
        names: Display name (the report table's ``model`` value) of each role; the role itself
            when absent.
        split: What the rows are, for the reader (e.g. ``"test (450 examples)"``).
        class_names: When given, a confusion matrix per model is added (classifiers only: a
            vocabulary-sized matrix helps nobody).
        num_bins: Bins of the reliability diagrams.

    Returns:
        ``{"split", "table", "reliability", "confusion"?}`` where ``table`` has one row per
        model with ``agreement``, ``kl_to_teacher``, ``jsd_to_teacher`` and ``ece``.
    """
    if teacher not in logits:
        raise ValueError(f"the teacher role {teacher!r} is not among the logits {sorted(logits)}")
    names = dict(names or {})
    ref = logits[teacher]
    rows: list[dict[str, Any]] = []
    bins: dict[str, Any] = {}
    for role, lg in logits.items():
        name = names.get(role, role)
        rel = reliability(lg, labels, num_bins)
        bins[name] = {k: rel[k] for k in ("bin_edges", "confidence", "accuracy", "count")}
        rows.append(
            {
                "model": name,
                "agreement": agreement(lg, ref),
                "kl_to_teacher": kl_to_teacher(lg, ref),
                "jsd_to_teacher": jsd_to_teacher(lg, ref),
                "ece": rel["ece"],
            }
        )
    part: dict[str, Any] = {
        "split": split,
        "table": {
            "columns": [
                {"key": "model", "label": "model"},
                {"key": "agreement", "label": "top-1 agreement"},
                {"key": "kl_to_teacher", "label": "KL(teacher‖model) nats"},
                {"key": "jsd_to_teacher", "label": "JSD nats"},
                {"key": "ece", "label": f"ECE ({num_bins} bins)"},
            ],
            "rows": rows,
        },
        "reliability": bins,
    }
    if class_names is not None:
        part["confusion"] = {
            "labels": list(class_names),
            "matrices": {
                names.get(role, role): confusion_matrix(lg, labels, len(class_names))
                for role, lg in logits.items()
            },
        }
    return part
