"""Representation (intermediate-feature) distillation losses and projectors.

Feature losses take the student's features (after a projector when widths differ) and the
teacher's. Item-wise losses (hint, cosine, attention transfer, attention KL, CWD) follow the
reduction convention of :mod:`distil.losses.reduction`: a per-item value, summed over the
supervised items and divided by ``num_items``. Batch-level losses (relational KD, MI-α) compare
examples with each other, so they are defined per batch and return a scalar; they are not
invariant to how a batch is split for gradient accumulation, by construction.

No temperature² factor is applied here (CWD's τ² is applied by :mod:`distil.losses.objective`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distil.losses.divergences import Divergence, compute_divergence, upcast
from distil.losses.reduction import NumItems, Reduction, reduce_positions, select_positions

__all__ = [
    "REPRESENTATION_LOSSES",
    "ProjectorKind",
    "RepresentationLoss",
    "attention_kl",
    "attention_map",
    "attention_transfer",
    "channel_wise_distillation",
    "cosine_loss",
    "hint_loss",
    "make_projector",
    "mi_alpha_bound",
    "mi_alpha_loss",
    "rkd_angle",
    "rkd_distance",
    "separable_critic_scores",
]

_NEG_INF = float("-inf")


class ProjectorKind(str, Enum):
    """Projector families: ``linear`` for ``(..., D)`` features, ``conv1x1`` for ``(B, C, H, W)``."""

    LINEAR = "linear"
    CONV1X1 = "conv1x1"


class RepresentationLoss(str, Enum):
    """Names of the representation losses (keys of :data:`REPRESENTATION_LOSSES`)."""

    HINT = "hint"
    COSINE = "cosine"
    ATTENTION_TRANSFER = "attention_transfer"
    ATTENTION_KL = "attention_kl"
    CHANNEL_WISE = "channel_wise"
    RKD_DISTANCE = "rkd_distance"
    RKD_ANGLE = "rkd_angle"
    MI_ALPHA = "mi_alpha"


def make_projector(
    student_width: int,
    teacher_width: int,
    *,
    kind: ProjectorKind | str = ProjectorKind.LINEAR,
    bias: bool = True,
) -> nn.Module:
    """A learnable map from the student's feature width to the teacher's (FitNets regressor).

    The projector belongs to the distillation objective, not to the student: train it with the
    student and drop it at export.

    Args:
        student_width: D_s (channels C_s for ``conv1x1``).
        teacher_width: D_t (channels C_t).
        kind: ``"linear"`` acts on the last dim of ``(..., D_s)``; ``"conv1x1"`` on the channel
            dim of ``(B, C_s, H, W)``.
        bias: whether the map has a bias.

    Returns:
        ``nn.Identity()`` when the widths are equal, otherwise ``nn.Linear`` or a 1×1
        ``nn.Conv2d``.
    """
    kind = ProjectorKind(kind)
    if student_width == teacher_width:
        return nn.Identity()
    if kind is ProjectorKind.LINEAR:
        return nn.Linear(student_width, teacher_width, bias=bias)
    return nn.Conv2d(student_width, teacher_width, kernel_size=1, bias=bias)


def _check_same_shape(student: Tensor, teacher: Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"student features {tuple(student.shape)} and teacher features "
            f"{tuple(teacher.shape)} differ; project the student first (make_projector)"
        )


def hint_loss(
    student_features: Tensor,
    teacher_features: Tensor,
    mask: Tensor | None = None,
    *,
    feature_dims: int = 1,
    num_items: NumItems = None,
    reduction: Reduction | str = Reduction.MEAN,
) -> Tensor:
    """FitNets hint / MSE loss: per item, the mean over feature elements of ``(s − t)²``.

    Args:
        student_features: shape ``(*items, *features)`` (projected to the teacher's width).
        teacher_features: same shape.
        mask: bool, shape ``items``, True = supervised; None = all.
        feature_dims: how many trailing dims form one item's features (1 for ``(B, T, D)``
            token features, 3 for ``(B, C, H, W)`` maps).
        num_items: normaliser for ``reduction="mean"``; default = supervised items here.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        A scalar, or shape ``items`` for ``reduction="none"``. With ``feature_dims`` covering
        everything but the batch, ``"mean"`` equals ``F.mse_loss``.
    """
    _check_same_shape(student_features, teacher_features)
    items_shape = tuple(student_features.shape[: student_features.dim() - feature_dims])
    s = upcast(select_positions(student_features, mask, event_dims=feature_dims)).flatten(1)
    t = upcast(select_positions(teacher_features, mask, event_dims=feature_dims)).flatten(1)
    per_item = (s - t.to(s.dtype)).square().mean(dim=-1)
    return reduce_positions(per_item, mask, items_shape, num_items=num_items, reduction=reduction)


def cosine_loss(
    student_features: Tensor,
    teacher_features: Tensor,
    mask: Tensor | None = None,
    *,
    feature_dims: int = 1,
    num_items: NumItems = None,
    reduction: Reduction | str = Reduction.MEAN,
    eps: float = 1e-8,
) -> Tensor:
    """Cosine loss ``1 − cos(s, t)`` per item, over the flattened feature dims (in [0, 2]).

    Args:
        student_features: shape ``(*items, *features)``.
        teacher_features: same shape.
        mask: bool, shape ``items``, True = supervised; None = all.
        feature_dims: trailing dims that form one item's features.
        num_items: normaliser for ``reduction="mean"``; default = supervised items here.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        eps: lower bound on each norm (a zero vector has cosine 0).

    Returns:
        A scalar, or shape ``items`` for ``reduction="none"``.
    """
    _check_same_shape(student_features, teacher_features)
    items_shape = tuple(student_features.shape[: student_features.dim() - feature_dims])
    s = upcast(select_positions(student_features, mask, event_dims=feature_dims)).flatten(1)
    t = upcast(select_positions(teacher_features, mask, event_dims=feature_dims)).flatten(1)
    per_item = 1.0 - F.cosine_similarity(s, t.to(s.dtype), dim=-1, eps=eps)
    return reduce_positions(per_item, mask, items_shape, num_items=num_items, reduction=reduction)


def attention_map(features: Tensor, *, power: float = 2.0, eps: float = 1e-12) -> Tensor:
    """Zagoruyko & Komodakis spatial attention map: ``Q = mean_c |A_c|^p``, L2-normalised.

    Args:
        features: shape ``(B, C, H, W)``.
        power: p (the paper's default is 2).
        eps: lower bound on the norm (an all-zero map stays zero).

    Returns:
        Shape ``(B, H·W)``, unit L2 norm per row.
    """
    q = upcast(features).abs().pow(power).mean(dim=1).flatten(1)  # (B, H*W)
    return F.normalize(q, p=2.0, dim=-1, eps=eps)


def attention_transfer(
    student_features: Tensor,
    teacher_features: Tensor,
    mask: Tensor | None = None,
    *,
    power: float = 2.0,
    num_items: NumItems = None,
    reduction: Reduction | str = Reduction.MEAN,
) -> Tensor:
    """Attention transfer (AT): ``‖Q_s/‖Q_s‖ − Q_t/‖Q_t‖‖²`` per example.

    Channel counts may differ (the maps average over channels); spatial sizes must match
    (interpolate first otherwise). Interpretation note: the paper writes the (unsquared) p-norm
    of the difference with weight β/2 (β = 1000); the authors' code uses the squared distance
    averaged over positions as well, i.e. this value divided by ``H·W``.

    Args:
        student_features: shape ``(B, C_s, H, W)``.
        teacher_features: shape ``(B, C_t, H, W)``.
        mask: bool, shape ``(B,)``, True = supervised; None = all.
        power: exponent p of the attention map.
        num_items: normaliser for ``reduction="mean"``; default = supervised examples here.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        A scalar, or shape ``(B,)`` for ``reduction="none"``.
    """
    if student_features.dim() != 4 or teacher_features.dim() != 4:
        raise ValueError("attention_transfer expects (B, C, H, W) feature maps")
    if student_features.shape[0] != teacher_features.shape[0] or (
        student_features.shape[2:] != teacher_features.shape[2:]
    ):
        raise ValueError(
            f"batch and spatial sizes must match: {tuple(student_features.shape)} vs "
            f"{tuple(teacher_features.shape)}"
        )
    q_s = attention_map(select_positions(student_features, mask, event_dims=3), power=power)
    q_t = attention_map(select_positions(teacher_features, mask, event_dims=3), power=power)
    per_item = (q_s - q_t.to(q_s.dtype)).square().sum(dim=-1)
    return reduce_positions(
        per_item,
        mask,
        (student_features.shape[0],),
        num_items=num_items,
        reduction=reduction,
    )


def attention_kl(
    student_attention: Tensor,
    teacher_attention: Tensor,
    mask: Tensor | None = None,
    *,
    num_items: NumItems = None,
    reduction: Reduction | str = Reduction.MEAN,
    inputs_are_probs: bool = True,
) -> Tensor:
    """Attention-distribution KD for transformers: ``KL(A_t ‖ A_s)`` per head and query row.

    As in MiniLM-style self-attention distillation: each row of an attention matrix is a
    distribution over keys. Causal or padding zeros (probability 0 on both sides) contribute 0.

    Args:
        student_attention: shape ``(B, heads, T_q, T_k)``, probabilities (what
            ``output_attentions=True`` returns) or pre-softmax scores.
        teacher_attention: same shape (map heads first if the head counts differ).
        mask: bool, shape ``(B, T_q)``, True = supervised query; None = all.
        num_items: normaliser for ``reduction="mean"``; default = supervised (head, query)
            rows here.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shape ``(B, heads, T_q)``).
        inputs_are_probs: True for probabilities, False for pre-softmax scores.

    Returns:
        A scalar, or shape ``(B, heads, T_q)`` for ``reduction="none"``.
    """
    _check_same_shape(student_attention, teacher_attention)
    if student_attention.dim() != 4:
        raise ValueError("attention_kl expects (B, heads, T_q, T_k) attention tensors")
    s, t = upcast(student_attention), upcast(teacher_attention)
    if inputs_are_probs:
        s, t = s.log(), t.log()  # log(0) = -inf marks keys outside the support
    row_mask = None
    if mask is not None:
        row_mask = mask.unsqueeze(1).expand(-1, s.shape[1], -1)  # (B, heads, T_q)
    return compute_divergence(
        Divergence.FORWARD_KL,
        s,
        t.to(s.dtype),
        row_mask,
        num_items=num_items,
        reduction=reduction,
    )


def channel_wise_distillation(
    student_maps: Tensor,
    teacher_maps: Tensor,
    mask: Tensor | None = None,
    *,
    kd_temperature: float = 1.0,
    num_items: NumItems = None,
    reduction: Reduction | str = Reduction.MEAN,
) -> Tensor:
    """Channel-wise distillation (CWD, Shu et al. 2021) without its τ² factor.

    Each channel's map is turned into a distribution over its ``H·W`` positions,
    ``φ(y_c) = softmax(y_c / τ)``, and the loss is ``KL(φ(y_t,c) ‖ φ(y_s,c))`` averaged over the
    ``N·C`` (example, channel) pairs. The reference (mmrazor) multiplies by ``τ²``; here that
    factor is applied by :mod:`distil.losses.objective` (pass ``kd_temperature=τ`` to the term).

    Args:
        student_maps: shape ``(N, C, H, W)`` (channels matched with a 1×1 projector).
        teacher_maps: same shape.
        mask: bool, shape ``(N, C)``, True = supervised; None = all.
        kd_temperature: τ (published configs use 1).
        num_items: normaliser for ``reduction="mean"``; default = supervised ``N·C`` pairs.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shape ``(N, C)``).

    Returns:
        A scalar, or shape ``(N, C)`` for ``reduction="none"``.
    """
    _check_same_shape(student_maps, teacher_maps)
    if student_maps.dim() != 4:
        raise ValueError("channel_wise_distillation expects (N, C, H, W) maps")
    return compute_divergence(
        Divergence.FORWARD_KL,
        student_maps.flatten(2),
        teacher_maps.flatten(2),
        mask,
        kd_temperature=kd_temperature,
        num_items=num_items,
        reduction=reduction,
    )


def _pairwise_distances(x: Tensor) -> Tensor:
    """``(B, D) -> (B, B)`` Euclidean distances; ``vector_norm`` has a zero subgradient at 0."""
    return torch.linalg.vector_norm(x.unsqueeze(1) - x.unsqueeze(0), dim=-1)


def _off_diagonal(b: int, device: torch.device) -> Tensor:
    return ~torch.eye(b, dtype=torch.bool, device=device)


def rkd_distance(
    student_embeddings: Tensor,
    teacher_embeddings: Tensor,
    *,
    huber_delta: float = 1.0,
    eps: float = 1e-12,
) -> Tensor:
    """Relational KD, distance-wise (Park et al., CVPR 2019).

    ``ψ(t_i, t_j) = ‖t_i − t_j‖ / μ`` with ``μ`` the mean distance over pairs ``i ≠ j`` of the
    batch; the loss is the Huber loss between the student's and the teacher's ``ψ``, averaged
    over ordered pairs ``i ≠ j``. Widths may differ (only distances are compared). The paper
    weights this term by 25.

    Args:
        student_embeddings: shape ``(B, D_s)``, B >= 2.
        teacher_embeddings: shape ``(B, D_t)``.
        huber_delta: the Huber threshold (smooth-L1 β).
        eps: lower bound on μ (all examples identical).

    Returns:
        A scalar.
    """
    s, t = upcast(student_embeddings).flatten(1), upcast(teacher_embeddings).flatten(1)
    b = s.shape[0]
    if b < 2 or t.shape[0] != b:
        raise ValueError(f"need the same batch of >= 2 examples, got {s.shape[0]} and {t.shape[0]}")
    off = _off_diagonal(b, s.device)
    d_s, d_t = _pairwise_distances(s)[off], _pairwise_distances(t)[off]  # (B·(B−1),)
    psi_s = d_s / d_s.mean().clamp_min(eps)
    psi_t = d_t / d_t.mean().clamp_min(eps)
    return F.smooth_l1_loss(psi_s, psi_t.to(psi_s.dtype), beta=huber_delta)


def cosine_similarity_matching(student_embeddings: Tensor, teacher_embeddings: Tensor) -> Tensor:
    """Match the in-batch cosine-similarity matrices of student and teacher embeddings.

    ``S_ij = cos(s_i, s_j)``, ``T_ij = cos(t_i, t_j)``; the loss is the mean of ``(S_ij − T_ij)²``
    over ordered pairs ``i ≠ j``: the similarity-preserving idea of Tung & Mori (ICCV 2019)
    applied to sentence embeddings with cosine as the similarity, which is what retrieval and
    the Spearman-of-pair-similarities metric read. Unlike MSE on the embeddings it never asks the
    student to move into the teacher's coordinates: it is invariant to any rotation or scaling of
    either space, so a pretrained student with an embedding space of its own keeps it and only
    learns which sentences are close. Widths may differ.

    Args:
        student_embeddings: shape ``(B, D_s)``, B >= 2.
        teacher_embeddings: shape ``(B, D_t)``.

    Returns:
        A scalar (a per-batch mean).
    """
    s, t = upcast(student_embeddings).flatten(1), upcast(teacher_embeddings).flatten(1)
    b = s.shape[0]
    if b < 2 or t.shape[0] != b:
        raise ValueError(f"need the same batch of >= 2 examples, got {s.shape[0]} and {t.shape[0]}")
    off = _off_diagonal(b, s.device)
    s_n, t_n = F.normalize(s, dim=-1), F.normalize(t.to(s.dtype), dim=-1)
    return ((s_n @ s_n.T)[off] - (t_n @ t_n.T)[off]).square().mean()


def rkd_angle(
    student_embeddings: Tensor,
    teacher_embeddings: Tensor,
    *,
    huber_delta: float = 1.0,
    eps: float = 1e-12,
) -> Tensor:
    """Relational KD, angle-wise (Park et al., CVPR 2019).

    ``ψ(t_i, t_j, t_k) = ⟨e_ij, e_kj⟩`` with ``e_ij = (t_i − t_j)/‖t_i − t_j‖`` (the cosine of the
    angle at ``t_j``); Huber loss between student and teacher, averaged over triplets with
    ``i ≠ j`` and ``k ≠ j``. Costs ``O(B³)`` memory. The paper weights this term by 50.

    Args:
        student_embeddings: shape ``(B, D_s)``, B >= 3.
        teacher_embeddings: shape ``(B, D_t)``.
        huber_delta: the Huber threshold.
        eps: lower bound on ``‖t_i − t_j‖`` (duplicate examples give a zero direction).

    Returns:
        A scalar.
    """
    s, t = upcast(student_embeddings).flatten(1), upcast(teacher_embeddings).flatten(1)
    b = s.shape[0]
    if b < 3 or t.shape[0] != b:
        raise ValueError(f"need the same batch of >= 3 examples, got {s.shape[0]} and {t.shape[0]}")

    def cosines(x: Tensor) -> Tensor:
        directions = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2.0, dim=-1, eps=eps)
        # directions[j, i] = e_ij (from anchor j to i): (B, B, D) -> angles[j, i, k] (B, B, B)
        return directions @ directions.transpose(1, 2)

    off = _off_diagonal(b, s.device)
    valid = off.unsqueeze(2) & off.unsqueeze(1)  # [j, i, k]: i != j and k != j
    return F.smooth_l1_loss(cosines(s)[valid], cosines(t)[valid].to(s.dtype), beta=huber_delta)


def separable_critic_scores(
    student_features: Tensor,
    teacher_features: Tensor,
    *,
    critic_temperature: float = 0.1,
    normalize: bool = True,
) -> Tensor:
    """Scores ``f(t_i, s_j) = ⟨t̂_i, ŝ_j⟩ / τ`` of a separable critic for :func:`mi_alpha_bound`.

    Args:
        student_features: shape ``(B, D)`` (projected to the teacher's width).
        teacher_features: shape ``(B, D)``.
        critic_temperature: τ > 0.
        normalize: L2-normalise both sides first (a bounded, cosine critic).

    Returns:
        Shape ``(B, B)``; row i = teacher example i, column j = student example j; the
        diagonal holds the positive pairs.
    """
    _check_same_shape(student_features, teacher_features)
    s, t = upcast(student_features).flatten(1), upcast(teacher_features).flatten(1)
    if normalize:
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    return (t.to(s.dtype) @ s.T) / critic_temperature


def mi_alpha_bound(
    scores: Tensor, *, mi_alpha: float = 0.5, log_baseline: float | Tensor = 0.0
) -> Tensor:
    """Interpolated mutual-information lower bound ``I_α`` (Poole et al. 2019) from critic scores.

    Interpretation (METHODS.md B.3): Distiller's MI-α is taken to be this bound. With
    ``x`` = teacher and ``y`` = student examples, ``S[k, j] = f(x_k, y_j)``, positives on the
    diagonal, ``m(y_j) = mean_k e^{S[k, j]}`` and ``q(y_j) = exp(log_baseline_j)``::

        I_α = 1 + mean_j [S[j, j] − log(α·m(y_j) + (1−α)·q(y_j))]
                − mean_{i≠j} [e^{S[i, j]} / (α·m_{−j}(y_j) + (1−α)·q(y_j))]

    where ``m_{−j}`` averages over ``k ≠ j`` only (the examples independent of ``y_j``). At
    α = 1 the last term is exactly 1 and ``I_1`` is InfoNCE; at α = 0 it is the TUBA/NWJ-type
    bound with baseline ``q``. All in log space.

    Args:
        scores: shape ``(B, B)``, B >= 2 (see :func:`separable_critic_scores`).
        mi_alpha: α ∈ [0, 1] (0.5 by default; the paper's value is not confirmed).
        log_baseline: ``log q(y_j)``, a float or shape ``(B,)`` (e.g. from a learned module).

    Returns:
        A scalar, the bound (maximise it; :func:`mi_alpha_loss` returns its negative).
    """
    if not 0.0 <= mi_alpha <= 1.0:
        raise ValueError(f"mi_alpha must lie in [0, 1], got {mi_alpha}")
    s = upcast(scores)
    b = s.shape[0]
    if s.dim() != 2 or s.shape[1] != b or b < 2:
        raise ValueError(f"scores must be a square (B, B) matrix with B >= 2, got {tuple(s.shape)}")
    log_q = torch.as_tensor(log_baseline, dtype=s.dtype, device=s.device).expand(b)  # (B,)
    off = _off_diagonal(b, s.device)

    def log_denominator(log_m: Tensor) -> Tensor:
        if mi_alpha == 1.0:
            return log_m
        if mi_alpha == 0.0:
            return log_q
        return torch.logaddexp(log_m + math.log(mi_alpha), log_q + math.log1p(-mi_alpha))

    log_m_all = torch.logsumexp(s, dim=0) - math.log(b)  # (B,) over k for each y_j
    log_m_others = torch.logsumexp(s.masked_fill(~off, _NEG_INF), dim=0) - math.log(b - 1)
    joint = (s.diagonal() - log_denominator(log_m_all)).mean()
    marginal = torch.exp(s - log_denominator(log_m_others).unsqueeze(0))[off].mean()
    return 1.0 + joint - marginal


def mi_alpha_loss(
    student_features: Tensor,
    teacher_features: Tensor,
    *,
    mi_alpha: float = 0.5,
    log_baseline: float | Tensor = 0.0,
    critic_temperature: float = 0.1,
    normalize: bool = True,
) -> Tensor:
    """MI-α representation loss (interpretation): ``−I_α`` with a separable cosine critic.

    Args:
        student_features: shape ``(B, D)`` (projected to the teacher's width).
        teacher_features: shape ``(B, D)``.
        mi_alpha: α of :func:`mi_alpha_bound`.
        log_baseline: ``log q(y)`` of :func:`mi_alpha_bound`.
        critic_temperature: τ of :func:`separable_critic_scores`.
        normalize: cosine (True) or dot-product critic.

    Returns:
        A scalar to minimise.
    """
    scores = separable_critic_scores(
        student_features,
        teacher_features,
        critic_temperature=critic_temperature,
        normalize=normalize,
    )
    return -mi_alpha_bound(scores, mi_alpha=mi_alpha, log_baseline=log_baseline)


REPRESENTATION_LOSSES: dict[str, Callable[..., Tensor]] = {
    RepresentationLoss.HINT.value: hint_loss,
    RepresentationLoss.COSINE.value: cosine_loss,
    RepresentationLoss.ATTENTION_TRANSFER.value: attention_transfer,
    RepresentationLoss.ATTENTION_KL.value: attention_kl,
    RepresentationLoss.CHANNEL_WISE.value: channel_wise_distillation,
    RepresentationLoss.RKD_DISTANCE.value: rkd_distance,
    RepresentationLoss.RKD_ANGLE.value: rkd_angle,
    RepresentationLoss.MI_ALPHA.value: mi_alpha_loss,
}
"""Name → function table of the representation losses (signatures differ by family; see each)."""
