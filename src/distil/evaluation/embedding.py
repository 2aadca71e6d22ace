"""How closely a student encoder reproduces its teacher's embedding space.

All functions take ``(N, D)`` embeddings of the same N held-out sentences, in the same order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["mean_cosine", "neighbour_recall", "pairwise_spearman", "rank"]


def mean_cosine(student: Tensor, teacher: Tensor) -> float:
    """Mean cosine between each sentence's student and teacher embedding (same width needed)."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"cosine needs equal shapes, got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    return float(F.cosine_similarity(student.float(), teacher.float(), dim=-1).mean())


def _similarities(x: Tensor) -> Tensor:
    x = F.normalize(x.float(), dim=-1)
    return x @ x.T  # (N, N) cosine similarities


def neighbour_recall(student: Tensor, teacher: Tensor, k: int = 10) -> float:
    """Recall@k of the teacher's k nearest neighbours (cosine, self excluded) among the student's.

    For each sentence, the fraction of the teacher's top-k neighbours that are also in the
    student's top-k; averaged over sentences. Widths may differ.
    """
    n = student.shape[0]
    if teacher.shape[0] != n or n <= k:
        raise ValueError(
            f"need the same N > k sentences, got {n} and {teacher.shape[0]} with k={k}"
        )
    eye = torch.eye(n, dtype=torch.bool)
    s_top = _similarities(student).masked_fill(eye, -torch.inf).topk(k, dim=-1).indices  # (N, k)
    t_top = _similarities(teacher).masked_fill(eye, -torch.inf).topk(k, dim=-1).indices  # (N, k)
    hits = (s_top.unsqueeze(-1) == t_top.unsqueeze(-2)).any(dim=-1).sum(dim=-1)  # (N,)
    return float(hits.float().mean() / k)


def rank(x: Tensor) -> Tensor:
    """Average ranks (ties share the mean rank), as float64, for Spearman correlation."""
    x = x.double().flatten()
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(x.numel(), dtype=torch.float64)
    uniq, inverse = torch.unique(x, return_inverse=True)
    if uniq.numel() < x.numel():  # ties: replace each rank by its group's mean
        sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
        counts = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(
            0, inverse, torch.ones_like(ranks)
        )
        ranks = (sums / counts)[inverse]
    return ranks


def pairwise_spearman(student: Tensor, teacher: Tensor) -> float:
    """Spearman correlation between the student's and the teacher's cosine similarities over all
    ``N(N−1)/2`` sentence pairs. Widths may differ."""
    n = student.shape[0]
    iu = torch.triu_indices(n, n, offset=1)
    s = rank(_similarities(student)[iu[0], iu[1]])
    t = rank(_similarities(teacher)[iu[0], iu[1]])
    s, t = s - s.mean(), t - t.mean()
    return float((s * t).sum() / (s.norm() * t.norm()).clamp(min=1e-12))
