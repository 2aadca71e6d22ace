"""Memory-efficient distillation losses for large vocabularies, computed from hidden states.

The reference path builds ``student_logits = hidden @ weight.T`` of shape ``(B, T, V)`` and
then several fp32 tensors of the same size (log-softmax, probabilities, their gradients). At
``V = 128k`` and 4k tokens each of those is 2 GiB (failure mode F1). This module never builds
more than ``chunk_size × V`` elements at a time:

1. supervised positions are selected first (``hidden[mask]``), so padding and prompt tokens cost
   nothing;
2. for each chunk of ``C`` positions it computes the logits (in the model's dtype, as the model
   would), upcasts them to fp32, evaluates the hard CE and/or the divergence with the *same*
   functions as the reference path, and differentiates that chunk's loss with respect to its
   logits with autograd (a ``(C, V)`` tensor);
3. it immediately turns that logits gradient into the gradients of the hidden states
   (``g @ weight``) and of the weight (``g.T @ hidden``, accumulated in place), then frees the
   chunk.

So the gradients are computed during the forward pass (the approach of fused-linear losses) and
stored: ``(N, H)`` for the hidden states and one ``(V, H)`` buffer for the weight, the same size
the reference path's weight gradient has anyway. The custom ``backward`` only scales them by the
incoming gradient, which is exact because the loss is a scalar that enters the rest of the graph
linearly. No extra matmul is spent on recomputation (unlike per-chunk checkpointing). Double
backward is not supported. The teacher is treated as a constant (no gradient flows to it).

:func:`should_use_chunked_loss` decides the default; :func:`default_chunk_size` sizes chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from distil.losses.divergences import (
    Divergence,
    _p_log_ratio,
    check_kd_temperature,
    per_position_from_logits,
    upcast,
)
from distil.losses.reduction import NumItems, divide_by, normalizer, select_positions

__all__ = [
    "CHUNKED_ELEMENTS_THRESHOLD",
    "CHUNKED_VOCAB_THRESHOLD",
    "DEFAULT_CHUNK_ELEMENTS",
    "ChunkedLossParts",
    "chunked_divergence",
    "chunked_logits_loss",
    "default_chunk_size",
    "fused_linear_loss",
    "logits_chunk_size",
    "should_use_chunked_loss",
]

CHUNKED_VOCAB_THRESHOLD = 32_768
"""Vocabularies at least this wide use the chunked path by default."""

CHUNKED_ELEMENTS_THRESHOLD = 2**28
"""Narrower vocabularies still use it once ``positions × V`` reaches this (1 GiB per fp32 copy)."""

DEFAULT_CHUNK_ELEMENTS = 2**24
"""Target ``chunk_size × V`` (64 MiB per fp32 chunk tensor; a chunk holds about ten of them)."""


def should_use_chunked_loss(num_positions: int, vocab_size: int) -> bool:
    """Whether the logits loss should default to the chunked path.

    Chunked when ``vocab_size >= 32768`` (every modern LLM vocabulary) or when
    ``num_positions × vocab_size >= 2**28`` elements (1 GiB per fp32 tensor, and the reference
    path holds several). Otherwise the reference path is cheaper in time and small in memory.

    Args:
        num_positions: positions the loss covers (``B × T``, or the supervised count).
        vocab_size: ``V``.

    Returns:
        True if the chunked path should be used.
    """
    return vocab_size >= CHUNKED_VOCAB_THRESHOLD or num_positions * vocab_size >= (
        CHUNKED_ELEMENTS_THRESHOLD
    )


def default_chunk_size(vocab_size: int, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Positions per chunk so that one fp32 ``(chunk, V)`` tensor has about ``chunk_elements``.

    Returns:
        ``max(1, chunk_elements // vocab_size)`` (128 positions at V = 128k, 512 at V = 32k).
    """
    return max(1, chunk_elements // max(vocab_size, 1))


CPU_LOGITS_CHUNK_ELEMENTS = 2**19
"""Target ``chunk_size × V`` over materialised logits on CPU (2 MiB per fp32 chunk tensor).

Over logits that already exist a chunk is pure elementwise work, which runs fastest while its
three ``(C, V)`` buffers stay in the CPU caches: measured on one thread (N = 2040, V = 8192,
forward + backward of CE + forward KL), 64 rows took 0.42 s, 256 rows 0.72 s and a plain
``F.kl_div`` + ``F.cross_entropy`` 1.28 s. The fused path from hidden states keeps larger chunks,
where the ``(C, H) @ (H, V)`` product needs them."""


def logits_chunk_size(vocab_size: int, device: torch.device | str | None = None) -> int:
    """Rows per chunk of :func:`chunked_logits_loss`: :data:`CPU_LOGITS_CHUNK_ELEMENTS` on CPU,
    :data:`DEFAULT_CHUNK_ELEMENTS` on accelerators (fewer, larger kernels)."""
    on_cpu = device is None or torch.device(device).type == "cpu"
    elements = CPU_LOGITS_CHUNK_ELEMENTS if on_cpu else DEFAULT_CHUNK_ELEMENTS
    return default_chunk_size(vocab_size, chunk_elements=elements)


class ChunkedLossParts(NamedTuple):
    """Result of :func:`fused_linear_loss`.

    Attributes:
        loss: scalar ``hard_ce_coef·hard_ce_sum + kd_coef·kd_sum``, differentiable with respect
            to the student's hidden states, weight and bias.
        hard_ce_sum: detached scalar, summed hard cross-entropy (0 if not computed).
        kd_sum: detached scalar, summed divergence (0 if not computed).
        num_selected: supervised positions in this call.
    """

    loss: Tensor
    hard_ce_sum: Tensor
    kd_sum: Tensor
    num_selected: int


def _as_dtype(coef: float | Tensor, dtype: torch.dtype) -> float | Tensor:
    """Coefficients may arrive as float64 tensors (exact counts); apply them in the loss dtype."""
    return coef.to(dtype) if isinstance(coef, Tensor) else coef


def _take(x: Tensor, index: tuple[Tensor, ...], start: int, end: int) -> Tensor:
    """Rows ``start:end`` of the supervised positions of ``x`` (``(*positions, V)``), as
    ``(C, V)``. Advanced indexing works on non-contiguous views such as shifted logits
    ``logits[:, :-1]``, where a ``reshape(-1, V)`` would copy the whole tensor."""
    return x[tuple(i[start:end] for i in index)]


@dataclass
class _ChunkPlan:
    """Everything the chunk loop needs besides the differentiable inputs."""

    index: tuple[Tensor, ...]  # multi-index of the N supervised positions
    labels: Tensor | None  # (N,) int64 hard targets, or None for no CE
    teacher_logits: Tensor | None  # (*positions, V), indexed chunk by chunk
    teacher_hidden: Tensor | None  # (N, Ht)
    teacher_weight: Tensor | None  # (V, Ht)
    teacher_bias: Tensor | None  # (V,)
    hard_ce_coef: float | Tensor
    kd_coef: float | Tensor
    divergence: Divergence
    kd_temperature: float
    chunk_size: int
    method_params: dict[str, Any] = field(default_factory=dict)

    @property
    def has_teacher(self) -> bool:
        return self.teacher_logits is not None or self.teacher_hidden is not None

    def teacher_chunk(self, start: int, end: int) -> Tensor:
        with torch.no_grad():
            if self.teacher_hidden is not None:
                assert self.teacher_weight is not None
                logits = self.teacher_hidden[start:end] @ self.teacher_weight.T  # (C, V)
                if self.teacher_bias is not None:
                    logits = logits + self.teacher_bias
                return logits
            assert self.teacher_logits is not None
            return _take(self.teacher_logits, self.index, start, end)  # (C, V)

    def chunk_loss(self, logits: Tensor, start: int, end: int) -> tuple[Tensor, Tensor, Tensor]:
        """Weighted loss, CE sum and KD sum of one chunk of fp32 logits ``(C, V)``."""
        zero = logits.new_zeros(())
        total, ce_sum, kd_sum = zero, zero, zero
        if self.labels is not None:
            targets = self.labels[start:end].unsqueeze(-1)  # (C, 1)
            per_pos = torch.logsumexp(logits, -1) - logits.gather(-1, targets).squeeze(-1)
            ce_sum = per_pos.sum()
            total = total + _as_dtype(self.hard_ce_coef, logits.dtype) * ce_sum
        if self.has_teacher:
            teacher = self.teacher_chunk(start, end)
            kd_sum = per_position_from_logits(
                self.divergence,
                logits,
                teacher,
                kd_temperature=self.kd_temperature,
                **self.method_params,
            ).sum()
            total = total + _as_dtype(self.kd_coef, logits.dtype) * kd_sum
        return total, ce_sum, kd_sum


def _closed_form_step(
    plan: _ChunkPlan, logits: Tensor, start: int, end: int, any_grad: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """:func:`_chunk_step` for hard CE and forward KL, with their gradients written in closed form.

    ``∂CE/∂z = softmax(z) − onehot(y)`` and ``∂KL(p_T‖q_T)/∂z = (q_T − p_T) / T`` (the
    ``Σ_v p_v = Σ_v q_v = 1`` terms cancel), so no autograd graph is built and the buffers are
    reused in place: a chunk holds three ``(C, V)`` fp32 tensors instead of the ~ten autograd
    saves, and the loop runs about twice as fast on CPU. At ``T = 1`` one softmax serves both
    terms. Values follow :mod:`distil.losses.divergences` (``0·log 0 = 0`` where the teacher
    gives a token zero probability).
    """
    z = upcast(logits)  # (C, V) fp32 (fp64 stays fp64)
    zero = z.new_zeros(())
    ce_sum, kd_sum = zero, zero
    temp, has_t, has_ce = plan.kd_temperature, plan.has_teacher, plan.labels is not None
    ce_c, kd_c = _as_dtype(plan.hard_ce_coef, z.dtype), _as_dtype(plan.kd_coef, z.dtype)
    log_q = torch.log_softmax(z if temp == 1.0 else z / temp, -1) if has_t else None  # (C, V)
    shared = has_t and temp == 1.0  # softmax(z) is the student's distribution at T
    log_s = log_q if shared else (torch.log_softmax(z, -1) if has_ce else None)
    targets = None
    if has_ce:
        assert plan.labels is not None and log_s is not None
        targets = plan.labels[start:end].unsqueeze(-1)  # (C, 1)
        ce_sum = -log_s.gather(-1, targets).sum()
    p = None
    if has_t:
        assert log_q is not None
        t = upcast(plan.teacher_chunk(start, end))
        log_p = torch.log_softmax(t if temp == 1.0 else t / temp, -1)  # (C, V) teacher
        p = log_p.exp()
        if bool(torch.isneginf(log_p).any()):  # tokens the teacher rules out: 0·log 0 = 0
            kd_sum = _p_log_ratio(log_p, log_q).sum()
        else:
            kd_sum = torch.vdot(p.reshape(-1), log_p.sub_(log_q).reshape(-1))
        del log_p, t
    total = ce_c * ce_sum + kd_c * kd_sum
    grad = None
    if any_grad:
        if has_t:
            assert log_q is not None and p is not None
            q = log_q.exp_()  # q_T in place (and softmax(z) for the CE when shared)
            if shared and targets is not None:
                grad = q.mul_(kd_c + ce_c).sub_(p.mul_(kd_c))  # (kd+ce)·q − kd·p
            else:
                grad = q.sub_(p).mul_(kd_c / temp)
                if targets is not None:
                    assert log_s is not None
                    grad.add_(log_s.exp_().mul_(ce_c))
        else:
            assert log_s is not None
            grad = log_s.exp_().mul_(ce_c)
        if targets is not None:  # the −onehot(y) of the CE gradient
            grad.scatter_add_(
                -1,
                targets,
                torch.full(targets.shape, -1.0, dtype=z.dtype, device=z.device).mul_(ce_c),
            )
    return total.detach(), ce_sum.detach(), kd_sum.detach(), grad


def _chunk_step(
    plan: _ChunkPlan, logits: Tensor, start: int, end: int, any_grad: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Loss parts of one chunk of logits ``(C, V)`` and, if wanted, their gradient ``(C, V)``."""
    if plan.divergence is Divergence.FORWARD_KL and not plan.method_params:
        return _closed_form_step(plan, logits, start, end, any_grad)
    with torch.enable_grad():
        z = upcast(logits).detach().requires_grad_(any_grad)  # (C, V) fp32 leaf
        total, ce_sum, kd_sum = plan.chunk_loss(z, start, end)
        grad_z = torch.autograd.grad(total, z)[0] if any_grad else None  # (C, V)
    return total.detach(), ce_sum.detach(), kd_sum.detach(), grad_z


def _run_chunks(
    plan: _ChunkPlan,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    need: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The chunk loop from hidden states: loss parts and gradients of hidden, weight, bias."""
    need_h, need_w, need_b = need
    any_grad = need_h or need_w or need_b
    n = hidden.shape[0]
    acc_dtype = upcast(weight).dtype  # fp32 (fp64 stays fp64)
    grad_h = torch.zeros_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=acc_dtype, device=weight.device) if need_b else None
    sums = torch.zeros(3, dtype=acc_dtype, device=hidden.device)  # loss, ce, kd
    for start in range(0, n, plan.chunk_size):
        end = min(start + plan.chunk_size, n)
        h = hidden[start:end]  # (C, H)
        logits = h @ weight.T  # (C, V), in the model's dtype, as the model would compute it
        if bias is not None:
            logits = logits + bias
        *parts, grad_z = _chunk_step(plan, logits, start, end, any_grad)
        sums += torch.stack(parts).to(acc_dtype)
        if grad_z is not None:
            if grad_h is not None:
                grad_h[start:end] = grad_z.to(weight.dtype) @ weight  # (C, H)
            if grad_w is not None:
                grad_w.addmm_(grad_z.T, upcast(h).to(acc_dtype))  # (V, H) += (V, C) @ (C, H)
            if grad_b is not None:
                grad_b += grad_z.sum(0)
        del logits, grad_z
    return sums[0], sums[1], sums[2], grad_h, grad_w, grad_b


def _run_logit_chunks(
    plan: _ChunkPlan, logits: Tensor, need_grad: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The chunk loop over materialised logits ``(*positions, V)``; the gradient is written
    into one buffer of the logits' shape (zero at unsupervised positions)."""
    n = plan.index[0].shape[0] if plan.index else 0
    grad = torch.zeros_like(logits) if need_grad else None
    sums = torch.zeros(3, dtype=upcast(logits).dtype, device=logits.device)
    for start in range(0, n, plan.chunk_size):
        end = min(start + plan.chunk_size, n)
        chunk = _take(logits, plan.index, start, end)  # (C, V)
        *parts, grad_z = _chunk_step(plan, chunk, start, end, need_grad)
        sums += torch.stack(parts).to(sums.dtype)
        if grad is not None and grad_z is not None:
            rows = tuple(i[start:end] for i in plan.index)
            grad.index_put_(rows, grad_z.to(grad.dtype))
        del chunk, grad_z
    return sums[0], sums[1], sums[2], grad


def _scaled_grads(ctx: FunctionCtx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
    """The gradients stored by forward, times the incoming scalar gradient.

    The usual incoming gradient is exactly 1: the stored buffers are then returned as they are
    (no copy of a ``(V, H)`` or ``(N, V)`` buffer). Autograd never writes into a buffer that
    ``ctx`` still references, so calling backward again (``retain_graph``) stays correct.
    """
    grads: tuple[Tensor | None, ...] = ctx.grads  # type: ignore[attr-defined]
    if bool((grad_loss == 1).all()):
        return grads
    return tuple(None if g is None else g * grad_loss.to(g.dtype) for g in grads)


class _FusedLinearLoss(torch.autograd.Function):
    """Chunked linear + loss whose gradients are computed in the forward pass (see module)."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        plan: _ChunkPlan,
        need: tuple[bool, bool, bool],
    ) -> tuple[Tensor, Tensor, Tensor]:
        loss, ce_sum, kd_sum, grad_h, grad_w, grad_b = _run_chunks(plan, hidden, weight, bias, need)
        ctx.grads = (  # type: ignore[attr-defined]
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None or bias is None else grad_b.to(bias.dtype),
        )
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        return loss, ce_sum, kd_sum

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, grad_loss: Tensor, _grad_ce: Tensor, _grad_kd: Tensor
    ) -> tuple[Tensor | None, ...]:
        return (*_scaled_grads(ctx, grad_loss), None, None)


class _ChunkedLogitsLoss(torch.autograd.Function):
    """The same chunk loop over materialised logits: no fp32 intermediates beyond one chunk."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        logits: Tensor,
        plan: _ChunkPlan,
        need_grad: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        loss, ce_sum, kd_sum, grad = _run_logit_chunks(plan, logits, need_grad)
        ctx.grads = (grad,)  # type: ignore[attr-defined]
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        return loss, ce_sum, kd_sum

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, grad_loss: Tensor, _grad_ce: Tensor, _grad_kd: Tensor
    ) -> tuple[Tensor | None, ...]:
        return (*_scaled_grads(ctx, grad_loss), None, None)


def _make_plan(
    *,
    positions: tuple[int, ...],
    vocab: int,
    device: torch.device,
    mask: Tensor | None,
    labels: Tensor | None,
    teacher_logits: Tensor | None,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    teacher_bias: Tensor | None,
    hard_ce_coef: float | Tensor,
    kd_coef: float | Tensor,
    divergence: Divergence | str,
    kd_temperature: float,
    chunk_size: int | None,
    method_params: dict[str, Any],
) -> _ChunkPlan:
    """Validate the teacher arguments and gather everything per supervised row."""
    if teacher_logits is not None and teacher_hidden is not None:
        raise ValueError("pass teacher_logits or teacher_hidden + teacher_weight, not both")
    if (teacher_hidden is None) != (teacher_weight is None):
        raise ValueError("teacher_hidden and teacher_weight go together")
    if teacher_logits is not None and tuple(teacher_logits.shape) != (*positions, vocab):
        raise ValueError(
            f"teacher_logits {tuple(teacher_logits.shape)} must have shape {(*positions, vocab)}"
        )
    if teacher_weight is not None and teacher_weight.shape[0] != vocab:
        raise ValueError(
            f"teacher_weight has {teacher_weight.shape[0]} rows but the student vocabulary is "
            f"{vocab}; resolve vocabulary mismatches before the loss"
        )
    keep = mask if mask is not None else torch.ones(positions, dtype=torch.bool, device=device)
    t_hidden = None if teacher_hidden is None else select_positions(teacher_hidden.detach(), mask)
    skip_ce = isinstance(hard_ce_coef, float | int) and hard_ce_coef == 0
    return _ChunkPlan(
        index=keep.nonzero(as_tuple=True),
        labels=None if labels is None or skip_ce else select_positions(labels, mask, event_dims=0),
        teacher_logits=None if teacher_logits is None else teacher_logits.detach(),
        teacher_hidden=t_hidden,
        teacher_weight=None if teacher_weight is None else teacher_weight.detach(),
        teacher_bias=None if teacher_bias is None else teacher_bias.detach(),
        hard_ce_coef=hard_ce_coef,
        kd_coef=kd_coef,
        divergence=Divergence(divergence),
        kd_temperature=kd_temperature,
        chunk_size=chunk_size or default_chunk_size(vocab),
        method_params=dict(method_params),
    )


def fused_linear_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    mask: Tensor | None = None,
    *,
    student_bias: Tensor | None = None,
    labels: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    hard_ce_coef: float | Tensor = 0.0,
    kd_coef: float | Tensor = 1.0,
    divergence: Divergence | str = Divergence.FORWARD_KL,
    kd_temperature: float = 1.0,
    chunk_size: int | None = None,
    **method_params: Any,
) -> ChunkedLossParts:
    """Hard CE and a divergence from hidden states, in chunks of positions, in one pass.

    ``loss = hard_ce_coef · Σ CE + kd_coef · Σ D`` over supervised positions, where
    ``CE = −log softmax(z)[label]`` at temperature 1 and ``D`` is the divergence between
    ``softmax(z / T)`` and the teacher's ``softmax(z_t / T)``, ``z = hidden @ weight.T + bias``.
    The coefficients carry normalisation, mixing weights and T² (see objective.py).

    Args:
        student_hidden: shape ``(..., H)``, the student's final hidden states.
        student_weight: shape ``(V, H)``, the output (unembedding) weight, same dtype.
        mask: bool, shape ``(...)``, True = supervised; None = all positions.
        student_bias: shape ``(V,)`` or None.
        labels: shape ``(...)`` int64 hard targets (used at supervised positions), or None for
            no hard term.
        teacher_logits: shape ``(..., V)``, or None.
        teacher_hidden: shape ``(..., Ht)``, used with ``teacher_weight`` instead of
            ``teacher_logits`` so the teacher's logits are also built chunk by chunk.
        teacher_weight: shape ``(V, Ht)``.
        teacher_bias: shape ``(V,)`` or None.
        hard_ce_coef: factor on the summed CE (0 skips the CE).
        kd_coef: factor on the summed divergence.
        divergence: a :class:`~distil.losses.divergences.Divergence` name.
        kd_temperature: divides student and teacher logits in the divergence.
        chunk_size: positions per chunk; default :func:`default_chunk_size`.
        **method_params: the divergence's own parameters.

    Returns:
        :class:`ChunkedLossParts`.

    Raises:
        ValueError: on inconsistent shapes or teacher arguments.
    """
    if student_weight.dim() != 2 or student_hidden.shape[-1] != student_weight.shape[1]:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} and student_weight "
            f"{tuple(student_weight.shape)} do not fit: expected (..., H) and (V, H)"
        )
    hidden = select_positions(student_hidden, mask)  # (N, H), differentiable gather
    plan = _make_plan(
        positions=tuple(student_hidden.shape[:-1]),
        vocab=student_weight.shape[0],
        device=student_hidden.device,
        mask=mask,
        labels=labels,
        teacher_logits=teacher_logits,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        teacher_bias=teacher_bias,
        hard_ce_coef=hard_ce_coef,
        kd_coef=kd_coef,
        divergence=divergence,
        kd_temperature=kd_temperature,
        chunk_size=chunk_size,
        method_params=method_params,
    )
    grad_on = torch.is_grad_enabled()
    need = (
        grad_on and hidden.requires_grad,
        grad_on and student_weight.requires_grad,
        grad_on and student_bias is not None and student_bias.requires_grad,
    )
    loss, ce_sum, kd_sum = _FusedLinearLoss.apply(hidden, student_weight, student_bias, plan, need)
    return ChunkedLossParts(loss, ce_sum, kd_sum, hidden.shape[0])


def chunked_logits_loss(
    student_logits: Tensor,
    mask: Tensor | None = None,
    *,
    labels: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    hard_ce_coef: float | Tensor = 0.0,
    kd_coef: float | Tensor = 1.0,
    divergence: Divergence | str = Divergence.FORWARD_KL,
    kd_temperature: float = 1.0,
    chunk_size: int | None = None,
    **method_params: Any,
) -> ChunkedLossParts:
    """Hard CE and a divergence over already materialised logits, in chunks of rows.

    The same loop as :func:`fused_linear_loss`, for callers that hold ``(..., V)`` logits:
    nothing beyond the logits, the teacher's logits and one gradient buffer of the logits'
    shape and dtype is held, instead of the ~12 fp32 ``(N, V)`` intermediates that autograd
    keeps for the plain formulas.

    Args:
        student_logits: shape ``(..., V)``, any float dtype (math in fp32); a non-contiguous
            view such as shifted logits ``logits[:, :-1]`` is read in place, never copied whole.
        mask: bool, shape ``(...)``, True = supervised; None = all positions.
        labels: shape ``(...)`` int64 hard targets, or None for no hard term.
        teacher_logits: shape ``(..., V)``, or None for no divergence term.
        hard_ce_coef: factor on the summed CE (0 skips the CE).
        kd_coef: factor on the summed divergence.
        divergence: a :class:`~distil.losses.divergences.Divergence` name.
        kd_temperature: divides student and teacher logits in the divergence.
        chunk_size: rows per chunk; default :func:`logits_chunk_size`.
        **method_params: the divergence's own parameters.

    Returns:
        :class:`ChunkedLossParts`; ``loss`` is differentiable with respect to
        ``student_logits``.
    """
    vocab = student_logits.shape[-1]
    chunk_size = chunk_size or logits_chunk_size(vocab, student_logits.device)
    positions = tuple(student_logits.shape[:-1])
    plan = _make_plan(
        positions=positions,
        vocab=vocab,
        device=student_logits.device,
        mask=mask,
        labels=labels,
        teacher_logits=teacher_logits,
        teacher_hidden=None,
        teacher_weight=None,
        teacher_bias=None,
        hard_ce_coef=hard_ce_coef,
        kd_coef=kd_coef,
        divergence=divergence,
        kd_temperature=kd_temperature,
        chunk_size=chunk_size,
        method_params=method_params,
    )
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    loss, ce_sum, kd_sum = _ChunkedLogitsLoss.apply(student_logits, plan, need_grad)
    return ChunkedLossParts(loss, ce_sum, kd_sum, int(plan.index[0].shape[0]))


def chunked_divergence(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_logits: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    student_bias: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    divergence: Divergence | str = Divergence.FORWARD_KL,
    kd_temperature: float = 1.0,
    num_items: NumItems = None,
    chunk_size: int | None = None,
    **method_params: Any,
) -> Tensor:
    """A divergence from the student's hidden states without materialising ``(..., V)`` logits.

    Equal (within float tolerance, values and gradients) to
    ``compute_divergence(divergence, hidden @ weight.T + bias, teacher_logits, mask, ...)``.

    Args:
        student_hidden: shape ``(..., H)``.
        student_weight: shape ``(V, H)``.
        teacher_logits: shape ``(..., V)``; or None when ``teacher_hidden`` is given.
        mask: bool, shape ``(...)``, True = supervised; None = all positions.
        student_bias: shape ``(V,)`` or None.
        teacher_hidden: shape ``(..., Ht)`` (with ``teacher_weight``), instead of logits.
        teacher_weight: shape ``(V, Ht)``.
        teacher_bias: shape ``(V,)`` or None.
        divergence: a :class:`~distil.losses.divergences.Divergence` name.
        kd_temperature: divides both logits before the softmax (no T² here).
        num_items: normaliser (supervised positions over the accumulation window); default =
            supervised positions in this call.
        chunk_size: positions per chunk; default :func:`default_chunk_size`.
        **method_params: the divergence's own parameters.

    Returns:
        Scalar: summed divergence over supervised positions divided by ``num_items``.

    Raises:
        ValueError: if no teacher is given.
    """
    if teacher_logits is None and teacher_hidden is None:
        raise ValueError("chunked_divergence needs teacher_logits or teacher_hidden")
    n = int(mask.sum()) if mask is not None else student_hidden[..., 0].numel()
    parts = fused_linear_loss(
        student_hidden,
        student_weight,
        mask,
        student_bias=student_bias,
        teacher_logits=teacher_logits,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        teacher_bias=teacher_bias,
        hard_ce_coef=0.0,
        kd_coef=divide_by(torch.ones((), dtype=torch.float64), normalizer(num_items, n)),
        divergence=divergence,
        kd_temperature=kd_temperature,
        chunk_size=chunk_size,
        **method_params,
    )
    return parts.loss


def _topk_closed_form_step(
    z: Tensor,
    top_lp: Tensor,
    ids: Tensor,
    tail_lp: Tensor,
    labels: Tensor | None,
    ce_coef: float | Tensor,
    kd_coef: float | Tensor,
    temp: float,
    any_grad: bool,
    tail_samples: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Hard CE + forward KL to a top-k + tail teacher on ``k + 1`` buckets, for one chunk of rows,
    with the logit gradient in closed form.

    With ``q = softmax(z/T)``, ``q_tail = Σ_{j∉K} q_j`` and ``r = p_tail / q_tail``, the bucketed
    ``KL(p‖q)`` has ``∂/∂z_j = (q_j − p_j)/T`` for ``j`` in the top-k and ``q_j (1 − r)/T``
    otherwise. ``z`` ``(C, V)`` fp32; ``top_lp``/``ids`` ``(C, k)``; ``tail_lp`` ``(C,)``.

    With ``tail_samples = (ids (C, m), teacher log-probs (C, m), weights (C, m))``, the tail
    bucket is replaced by the importance-sampled sum ``Σ_i w_i (log p_{v_i} − log q_{v_i})``
    (``w_i = p_tail / m`` for ids drawn from the tail, :func:`~distil.losses.sparse.topk_sampled_tail_kl`;
    ``w_i = p_i / (n r_i)`` for ids drawn from a proposal ``r`` with no top-k head), whose gradient
    is ``(Σ_K p + Σ_i w_i) q/T`` minus ``p_j/T`` at each top-k id and ``w_i/T`` at each drawn id.
    """
    zero = z.new_zeros(())
    log_q = torch.log_softmax(z if temp == 1.0 else z / temp, -1)  # (C, V)
    log_q_top = log_q.gather(-1, ids)  # (C, k)
    top_lp, tail_lp = top_lp.to(z.dtype), tail_lp.to(z.dtype)
    p_top, p_tail = top_lp.exp(), tail_lp.exp()
    head_sum = torch.where(p_top > 0, p_top * (top_lp - log_q_top), 0.0).sum()
    if tail_samples is None:
        log_q_tail = torch.logsumexp(log_q.scatter(-1, ids, float("-inf")), -1)  # (C,), exact
        kd_sum = head_sum + torch.where(p_tail > 0, p_tail * (tail_lp - log_q_tail), 0.0).sum()
    else:
        s_ids, s_lp, s_w = tail_samples
        s_w = s_w.to(z.dtype)  # (C, m) weight of each drawn id
        kd_sum = (
            head_sum
            + torch.where(s_w > 0, s_w * (s_lp.to(z.dtype) - log_q.gather(-1, s_ids)), 0.0).sum()
        )
    ce_sum = zero
    log_s = None
    if labels is not None:
        log_s = log_q if temp == 1.0 else torch.log_softmax(z, -1)
        ce_sum = -log_s.gather(-1, labels.unsqueeze(-1)).sum()
    ce_c, kd_c = _as_dtype(ce_coef, z.dtype), _as_dtype(kd_coef, z.dtype)
    total = ce_c * ce_sum + kd_c * kd_sum
    grad = None
    if any_grad:
        kd_g = kd_c / temp
        shared = labels is not None and temp == 1.0
        if tail_samples is None:
            r = torch.where(p_tail > 0, p_tail / log_q_tail.exp(), 0.0)  # (C,)
            q = log_q.exp_()  # in place (also softmax(z) when T == 1)
            grad = q.mul_(((1 - r) * kd_g + (ce_c if shared else 0.0)).unsqueeze(-1))
            grad.scatter_add_(-1, ids, (log_q_top.exp() * r.unsqueeze(-1) - p_top) * kd_g)
        else:
            total_mass = torch.where(p_top > 0, p_top, 0.0).sum(-1) + s_w.sum(-1)  # (C,)
            q = log_q.exp_()
            grad = q.mul_((total_mass * kd_g + (ce_c if shared else 0.0)).unsqueeze(-1))
            grad.scatter_add_(-1, ids, torch.where(p_top > 0, p_top, 0.0) * -kd_g)
            grad.scatter_add_(-1, s_ids, s_w * -kd_g)
        if labels is not None:
            if not shared:
                assert log_s is not None
                grad.add_(log_s.exp_().mul_(ce_c))
            minus = torch.full(labels.shape, -1.0, dtype=z.dtype, device=z.device).mul_(ce_c)
            grad.scatter_add_(-1, labels.unsqueeze(-1), minus.unsqueeze(-1))
    return total.detach(), ce_sum.detach(), kd_sum.detach(), grad


class _ChunkedTopKLoss(torch.autograd.Function):
    """CE + forward KL to sparse targets (top-k + tail bucket, and/or weighted drawn ids) over
    materialised logits, chunk by chunk, gradients computed in the forward pass."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        logits: Tensor,
        index: tuple[Tensor, ...],
        targets: tuple[
            Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None
        ],
        coefs: tuple[float | Tensor, float | Tensor, float],
        chunk_size: int,
        need_grad: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        top_lp, ids, tail_lp, labels, s_ids, s_lp, s_w = targets
        n = index[0].shape[0] if index else 0
        grad = torch.zeros_like(logits) if need_grad else None
        sums = torch.zeros(3, dtype=upcast(logits).dtype, device=logits.device)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            z = upcast(_take(logits, index, start, end))  # (C, V)
            *parts, g = _topk_closed_form_step(
                z,
                top_lp[start:end],
                ids[start:end],
                tail_lp[start:end],
                None if labels is None else labels[start:end],
                *coefs,
                need_grad,
                None
                if s_ids is None or s_lp is None or s_w is None
                else (s_ids[start:end], s_lp[start:end], s_w[start:end]),
            )
            sums += torch.stack(parts).to(sums.dtype)
            if grad is not None and g is not None:
                grad.index_put_(tuple(i[start:end] for i in index), g.to(grad.dtype))
        ctx.grads = (grad,)  # type: ignore[attr-defined]
        ce_sum, kd_sum = sums[1].clone(), sums[2].clone()
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        return sums[0].clone(), ce_sum, kd_sum

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, grad_loss: Tensor, _grad_ce: Tensor, _grad_kd: Tensor
    ) -> tuple[Tensor | None, ...]:
        return (*_scaled_grads(ctx, grad_loss), None, None, None, None, None)


def _sparse_targets_loss(
    student_logits: Tensor,
    index: tuple[Tensor, ...],
    targets: tuple[
        Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None
    ],
    coefs: tuple[float | Tensor, float | Tensor, float],
    chunk_size: int | None,
) -> ChunkedLossParts:
    """Run :class:`_ChunkedTopKLoss` over the supervised rows ``index`` of the logits."""
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    size = chunk_size or logits_chunk_size(student_logits.shape[-1], student_logits.device)
    loss, ce_sum, kd_sum = _ChunkedTopKLoss.apply(
        student_logits, index, targets, coefs, size, need_grad
    )
    return ChunkedLossParts(loss, ce_sum, kd_sum, int(index[0].shape[0]))


def chunked_sampled_logits_loss(
    student_logits: Tensor,
    mask: Tensor,
    *,
    sample_ids: Tensor,
    teacher_sample_log_probs: Tensor,
    proposal_log_probs: Tensor | None = None,
    labels: Tensor | None = None,
    hard_ce_coef: float | Tensor = 0.0,
    kd_coef: float | Tensor = 1.0,
    kd_temperature: float = 1.0,
    chunk_size: int | None = None,
) -> ChunkedLossParts:
    """Hard CE + the importance-sampled forward KL over materialised logits, closed-form gradient.

    ``KL̂ = Σ_i w_i (log p_{v_i} − log q_{v_i})`` with ``w_i = p_{v_i} / (n r_{v_i})`` for ``n`` ids
    drawn from the proposal ``r`` (``w_i = 1/n`` when ``r`` is the teacher): unbiased for
    ``KL(p‖q)``, with gradient ``(Σ_i w_i) q/T − Σ_i w_i e_{v_i}/T``, the cross-entropy against the
    drawn ids. This is the plain estimator; :func:`~distil.losses.sparse.sampled_divergence` adds
    ``(q − p)/r``-type terms that keep every single estimate ``>= 0`` at the price of a gradient
    with weights ``q/p``, far noisier when the student puts mass where the teacher has little.

    Args:
        student_logits: ``(..., V)``.
        mask: bool ``(...)``, True = supervised.
        sample_ids: ``(..., n)`` int64 ids drawn with replacement.
        teacher_sample_log_probs: ``(..., n)`` the teacher's log-probs at them (at ``kd_temperature``).
        proposal_log_probs: ``(..., n)`` the proposal's log-probs; None = the teacher itself.
        labels, hard_ce_coef, kd_coef, kd_temperature, chunk_size: as in :func:`chunked_topk_logits_loss`.
    """
    check_kd_temperature(kd_temperature)
    index = mask.nonzero(as_tuple=True)
    skip_ce = labels is None or (isinstance(hard_ce_coef, float | int) and hard_ce_coef == 0)
    s_ids, s_lp = sample_ids[index], teacher_sample_log_probs[index]  # (N, n)
    n = s_ids.shape[-1]
    if proposal_log_probs is None:
        weights = torch.full(s_lp.shape, 1.0 / n, dtype=upcast(s_lp).dtype, device=s_lp.device)
    else:
        weights = (upcast(s_lp) - upcast(proposal_log_probs[index])).exp() / n
    rows = s_ids.shape[0]
    empty_lp = s_lp.new_zeros((rows, 0))
    empty_ids = s_ids.new_zeros((rows, 0))
    targets = (
        empty_lp,
        empty_ids,
        s_lp.new_full((rows,), float("-inf")),
        None if skip_ce or labels is None else labels[index],
        s_ids,
        s_lp,
        weights,
    )
    return _sparse_targets_loss(
        student_logits, index, targets, (hard_ce_coef, kd_coef, kd_temperature), chunk_size
    )


def chunked_topk_logits_loss(
    student_logits: Tensor,
    mask: Tensor,
    *,
    teacher_topk_log_probs: Tensor,
    teacher_topk_ids: Tensor,
    teacher_tail_log_prob: Tensor,
    labels: Tensor | None = None,
    hard_ce_coef: float | Tensor = 0.0,
    kd_coef: float | Tensor = 1.0,
    kd_temperature: float = 1.0,
    chunk_size: int | None = None,
    teacher_tail_sample_ids: Tensor | None = None,
    teacher_tail_sample_log_probs: Tensor | None = None,
) -> ChunkedLossParts:
    """Hard CE + forward KL to a top-k + tail teacher (k + 1 buckets) over materialised logits.

    Equal to ``hard_ce_coef · CE_sum + kd_coef · topk_divergence(..., reduction="sum")`` of
    :mod:`distil.losses.sparse` (values and gradients), computed in cache-sized chunks of rows
    with the gradient in closed form (see :func:`_topk_closed_form_step`).

    Args:
        student_logits: ``(..., V)``.
        mask: bool ``(...)``, True = supervised.
        teacher_topk_log_probs: ``(..., k)`` at ``kd_temperature``.
        teacher_topk_ids: ``(..., k)`` int64.
        teacher_tail_log_prob: ``(...)``; ``-inf`` when the top-k hold all the mass.
        labels: ``(...)`` int64 hard targets, or None.
        hard_ce_coef: factor on the summed CE (0 skips it).
        kd_coef: factor on the summed divergence.
        kd_temperature: divides the student's logits.
        chunk_size: rows per chunk; default :func:`logits_chunk_size`.
        teacher_tail_sample_ids: optional ``(..., m)`` ids drawn from the teacher's tail; with
            them the tail term is the unbiased estimate of
            :func:`~distil.losses.sparse.topk_sampled_tail_kl` instead of the tail bucket.
        teacher_tail_sample_log_probs: ``(..., m)`` the teacher's log-probs at those ids.
    """
    check_kd_temperature(kd_temperature)
    if (teacher_tail_sample_ids is None) != (teacher_tail_sample_log_probs is None):
        raise ValueError(
            "give both teacher_tail_sample_ids and teacher_tail_sample_log_probs, or neither"
        )
    index = mask.nonzero(as_tuple=True)
    skip_ce = labels is None or (isinstance(hard_ce_coef, float | int) and hard_ce_coef == 0)
    tail_lp = teacher_tail_log_prob[index]  # (N,)
    weights = None
    if teacher_tail_sample_ids is not None:  # p_tail / m on every id drawn from the tail
        p_tail = upcast(tail_lp).exp()
        weights = (
            torch.where(p_tail > 0, p_tail, 0.0)
            .unsqueeze(-1)
            .expand(-1, teacher_tail_sample_ids.shape[-1])
            / teacher_tail_sample_ids.shape[-1]
        )
    targets = (
        teacher_topk_log_probs[index],
        teacher_topk_ids[index],
        tail_lp,
        None if skip_ce or labels is None else labels[index],
        None if teacher_tail_sample_ids is None else teacher_tail_sample_ids[index],
        None if teacher_tail_sample_log_probs is None else teacher_tail_sample_log_probs[index],
        weights,
    )
    return _sparse_targets_loss(
        student_logits, index, targets, (hard_ce_coef, kd_coef, kd_temperature), chunk_size
    )


MAX_CHUNK_ROWS = 256


def loss_chunk_rows(
    chunk_size: int | None,
    vocab_size: int,
    *,
    fused: bool,
    device: torch.device | str | None = None,
) -> int:
    """Rows per chunk of the token loss: ``kd.chunk_size``, else the loss library's default.

    ``fused`` (loss from hidden states): the library's default capped at 256 rows; it sizes
    chunks to ~16M elements, i.e. 2048 rows at V = 8192, so one chunk would hold a whole CPU
    batch. Over materialised logits: :func:`distil.losses.chunked.logits_chunk_size`, small
    chunks that stay in the CPU caches (64 rows at V = 8192 on CPU).
    """
    if chunk_size:
        return chunk_size
    if fused:
        return min(default_chunk_size(vocab_size), MAX_CHUNK_ROWS)
    return logits_chunk_size(vocab_size, device)
