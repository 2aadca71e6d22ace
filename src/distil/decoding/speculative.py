"""Speculative decoding (Leviathan et al. 2023, Chen et al. 2023), batched, exactly lossless.

Each round, the draft proposes ``γ`` tokens one at a time; the target scores all of them in one
forward pass (``γ + 1`` positions: one per draft token plus the position after the last) and
each row keeps the longest prefix the target's own rule accepts, then one token of the
target's: the correction at the first rejection, or the bonus token after ``γ`` acceptances.
A round therefore emits between 1 and ``γ + 1`` tokens per row for one target call.

- **Greedy** (``sampling_temperature = 0``): draft token ``d_j`` is accepted while it equals
  the target's argmax at its position; the emitted text is the target's greedy text.
- **Sampling** (``T > 0``), Leviathan et al.'s rule on ``p = softmax(z_target / T)`` and
  ``q = softmax(z_draft / T)``: ``d_j ~ q_j`` is accepted with probability
  ``min(1, p_j(d_j) / q_j(d_j))``; at the first rejection the token is drawn from the residual
  ``max(0, p_j − q_j) / Σ max(0, p_j − q_j)``; after ``γ`` acceptances it is drawn from
  ``p_{γ+1}``. Each emitted token is then distributed exactly as the target's own sample.

Rows advance by different amounts (ragged acceptance); :class:`distil.decoding.cached_lm.CachedLM`
keeps one KV cache per model for the whole batch and rolls back each row's rejected tokens.
Logits are sliced to the tokenizer's ``vocab_size`` before any rule, so the padded rows of an
embedding matrix are never proposed, accepted or emitted. A row stops after an EOS (kept in its
output) or ``max_new_tokens``; finished rows leave the batch. Row ``r`` draws its random numbers
from its own generator seeded by ``(seed, r)``, ``2γ + 1`` uniforms a round, so its text does not
depend on how many other rows share the batch.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from distil.decoding.cached_lm import CachedLM
from distil.errors import DistilError

__all__ = [
    "DecodeResult",
    "SpeculativeResult",
    "autoregressive_generate",
    "proposal_lengths",
    "residual_distribution",
    "sample_categorical",
    "speculative_generate",
    "verify_greedy",
    "verify_sampled",
]


@dataclass(frozen=True)
class DecodeResult:
    """Output of :func:`autoregressive_generate` (one model decoding alone).

    Attributes:
        tokens: Per prompt, the generated ids (prompt excluded; a final EOS included).
        target_calls: Forward passes of the model.
        seconds: Wall-clock time of the decoding loop.
        cpu_seconds: Process CPU time of the loop.
    """

    tokens: list[list[int]]
    target_calls: int
    seconds: float
    cpu_seconds: float


@dataclass(frozen=True)
class SpeculativeResult:
    """Output of :func:`speculative_generate`, with one record per (row, verification round).

    Attributes:
        tokens: Per prompt, the generated ids (prompt excluded; a final EOS included).
        gamma: Draft tokens per round asked for.
        sampling_temperature: 0 for greedy.
        block_row: Prompt index of each record.
        block_proposed: Draft tokens the row offered that round (``γ``; fewer in its last rounds
            when ``max_new_tokens`` leaves less room, or up to an EOS the draft proposed).
        block_accepted: Draft tokens the target accepted (``0..proposed``).
        block_emitted: Tokens the round added to the row's output (accepted + the target's own
            token, less what EOS or ``max_new_tokens`` cut).
        target_calls: Forward passes of the target (one per round, all rows at once).
        draft_calls: Forward passes of the draft.
        seconds: Wall-clock time of the decoding loop.
        cpu_seconds: Process CPU time of the loop.
    """

    tokens: list[list[int]]
    gamma: int
    sampling_temperature: float
    block_row: tuple[int, ...]
    block_proposed: tuple[int, ...]
    block_accepted: tuple[int, ...]
    block_emitted: tuple[int, ...]
    target_calls: int
    draft_calls: int
    seconds: float
    cpu_seconds: float


# --------------------------------------------------------------------------------------------
# The accept / resample rule, on explicit distributions


def sample_categorical(weights: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF draw from unnormalised non-negative ``weights`` ``(B, V)`` with ``uniforms``
    ``(B,)`` in [0, 1): the smallest id whose cumulative weight exceeds ``u · total``, so an id of
    weight 0 is never drawn. Returns ``(B,)`` int64."""
    cdf = weights.double().cumsum(-1)  # (B, V)
    threshold = (uniforms.double() * cdf[:, -1]).unsqueeze(-1)  # (B, 1)
    picks = torch.searchsorted(cdf, threshold, right=True).squeeze(-1)  # (B,)
    return picks.clamp_max(weights.shape[-1] - 1)


def residual_distribution(target_probs: Tensor, draft_probs: Tensor) -> Tensor:
    """``max(0, p − q)`` normalised over the last dim: where a rejected token is redrawn from.

    Where ``p ≤ q`` everywhere (``p = q`` up to rounding, so a rejection has probability 0),
    returns ``p``, the limit of the rule as ``q → p``.

    Args:
        target_probs: ``p``, shape ``(..., V)``.
        draft_probs: ``q``, shape ``(..., V)``.

    Returns:
        Shape ``(..., V)``, summing to 1.
    """
    residual = (target_probs - draft_probs).clamp_min(0)
    total = residual.sum(-1, keepdim=True)
    return torch.where(total > 0, residual / total.clamp_min(1e-300), target_probs)


def proposal_lengths(drafts: Tensor, eos_token_ids: Iterable[int]) -> Tensor:
    """Draft tokens each row proposes: all ``γ``, or up to and including its first EOS (tokens
    after an EOS could never be emitted). ``drafts`` ``(B, γ)`` → ``(B,)`` int64."""
    batch, gamma = drafts.shape
    eos = sorted(set(eos_token_ids))
    full = torch.full((batch,), gamma, dtype=torch.long, device=drafts.device)
    if gamma == 0 or not eos:
        return full
    is_eos = torch.isin(drafts, torch.tensor(eos, device=drafts.device))  # (B, γ)
    first = is_eos.int().argmax(-1) + 1  # (B,)
    return torch.where(is_eos.any(-1), first, full)


def _leading_true(accept: Tensor) -> Tensor:
    """Length of the run of True at the start of each row: ``(B, γ)`` bool → ``(B,)`` int64."""
    return accept.long().cumprod(-1).sum(-1)


def verify_greedy(drafts: Tensor, target_logits: Tensor, proposed: Tensor) -> tuple[Tensor, Tensor]:
    """Greedy verification: accept while the draft token is the target's argmax.

    Args:
        drafts: ``(B, γ)`` draft tokens.
        target_logits: ``(B, γ + 1, V)``; position ``j`` scores the token at ``drafts[:, j]``,
            position ``γ`` the token after the last draft.
        proposed: ``(B,)`` draft tokens each row offers (see :func:`proposal_lengths`).

    Returns:
        ``accepted`` ``(B,)`` (draft tokens kept) and ``next_token`` ``(B,)``: the target's argmax
        after the accepted ones (the correction, or the bonus token).
    """
    gamma = drafts.shape[1]
    choice = target_logits.argmax(-1)  # (B, γ + 1)
    offered = torch.arange(gamma, device=drafts.device)[None, :] < proposed[:, None]  # (B, γ)
    accepted = _leading_true((drafts == choice[:, :gamma]) & offered)
    return accepted, choice.gather(1, accepted[:, None]).squeeze(1)


def verify_sampled(
    drafts: Tensor,
    draft_probs: Tensor,
    target_probs: Tensor,
    proposed: Tensor,
    accept_uniforms: Tensor,
    resample_uniforms: Tensor,
) -> tuple[Tensor, Tensor]:
    """Leviathan et al.'s rule: accept ``d_j`` if ``u_j · q_j(d_j) < p_j(d_j)`` (probability
    ``min(1, p/q)``), in order; at the first rejection draw from ``max(0, p_j − q_j)``; after
    all proposals are accepted draw the bonus token from ``p`` at the next position.

    Args:
        drafts: ``(B, γ)`` draft tokens, ``d_j ~ q_j``.
        draft_probs: ``(B, γ, V)``, ``q_j``.
        target_probs: ``(B, γ + 1, V)``, ``p_j`` (``p_γ`` is the bonus position).
        proposed: ``(B,)`` draft tokens each row offers.
        accept_uniforms: ``(B, γ)`` in [0, 1).
        resample_uniforms: ``(B,)`` in [0, 1).

    Returns:
        ``accepted`` ``(B,)`` and ``next_token`` ``(B,)``.
    """
    _batch, gamma = drafts.shape
    vocab = target_probs.shape[-1]
    index = drafts.unsqueeze(-1)  # (B, γ, 1)
    p_draft = target_probs[:, :gamma].gather(-1, index).squeeze(-1)  # (B, γ)
    q_draft = draft_probs.gather(-1, index).squeeze(-1)  # (B, γ)
    offered = torch.arange(gamma, device=drafts.device)[None, :] < proposed[:, None]
    accepted = _leading_true((accept_uniforms * q_draft < p_draft) & offered)  # (B,)
    rejected = accepted < proposed  # (B,); a rejection happened at position `accepted`
    at = accepted[:, None, None].expand(-1, 1, vocab)  # (B, 1, V)
    p_next = target_probs.gather(1, at).squeeze(1)  # (B, V)
    if gamma:
        q_next = draft_probs.gather(1, at.clamp_max(gamma - 1)).squeeze(1)  # (B, V)
        weights = torch.where(
            rejected[:, None], residual_distribution(p_next, q_next), p_next
        )  # (B, V)
    else:
        weights = p_next
    return accepted, sample_categorical(weights, resample_uniforms)


# --------------------------------------------------------------------------------------------
# Decoding loops


def _row_seed(seed: int, row: int) -> int:
    raw = hashlib.sha256(json.dumps(["speculative", seed, row]).encode()).digest()
    return int.from_bytes(raw[:8], "little") & ((1 << 63) - 1)


def _left_pad(seqs: Sequence[Sequence[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Ragged token lists → ``(B, W)`` ids (0 in the padding) and ``(B, W)`` bool presence."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    present = torch.zeros(len(seqs), width, dtype=torch.bool)
    for r, s in enumerate(seqs):
        if s:
            ids[r, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
            present[r, width - len(s) :] = True
    return ids.to(device), present.to(device)


def _probs(logits: Tensor, sampling_temperature: float) -> Tensor:
    return torch.softmax(logits.double() / sampling_temperature, dim=-1)


def _output_rows(model: Any) -> int:
    embeddings = model.get_output_embeddings()
    return (
        int(embeddings.weight.shape[0]) if embeddings is not None else int(model.config.vocab_size)
    )


def _context(model: Any) -> int | None:
    context = getattr(model.config, "max_position_embeddings", None)
    return context if isinstance(context, int) else None


def _check_inputs(
    models: dict[str, Any],
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling_temperature: float,
    vocab_size: int | None,
) -> int:
    """Refuse what cannot run; return the vocabulary the rules see."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise DistilError(
            "every prompt needs at least one token (got an empty prompt list or prompt)"
        )
    if max_new_tokens < 1:
        raise DistilError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not sampling_temperature >= 0:
        raise DistilError(
            f"sampling_temperature must be >= 0 (0 = greedy), got {sampling_temperature}"
        )
    rows = {role: _output_rows(m) for role, m in models.items()}
    vocab = vocab_size if vocab_size is not None else min(rows.values())
    short = {role: n for role, n in rows.items() if n < vocab}
    if short:
        raise DistilError(
            f"vocab_size={vocab} is more than the output rows of {short}; pass the tokenizer's size"
        )
    longest = max(len(p) for p in prompts)
    for role, model in models.items():
        context = _context(model)
        if context is not None and longest + max_new_tokens > context:
            raise DistilError(
                f"the longest prompt ({longest} tokens) + max_new_tokens={max_new_tokens} exceeds the "
                f"{role}'s context of {context} tokens; shorten the prompts or lower max_new_tokens"
            )
    return vocab


def _device(model: Any) -> torch.device:
    device: torch.device = next(model.parameters()).device
    return device


@torch.no_grad()
def autoregressive_generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling_temperature: float = 0.0,
    eos_token_ids: Iterable[int] = (),
    vocab_size: int | None = None,
    seed: int = 0,
) -> DecodeResult:
    """Plain batched decoding, one token per forward pass, with the same cache as
    :func:`speculative_generate`: the reference its output is checked against and timed against.

    Args:
        model: A Hugging Face causal LM.
        prompts: Token ids per prompt (ragged; left-padded internally).
        max_new_tokens: Tokens generated per prompt at most.
        sampling_temperature: 0 = greedy, else sampling from ``softmax(z / T)``.
        eos_token_ids: Ids that end a row (kept in its output).
        vocab_size: The tokenizer's size; logits are sliced to it (padded rows never emitted).
        seed: Seeds each row's generator (sampling only).

    Returns:
        A :class:`DecodeResult`.
    """
    vocab = _check_inputs(
        {"model": model},
        prompts,
        max_new_tokens=max_new_tokens,
        sampling_temperature=sampling_temperature,
        vocab_size=vocab_size,
    )
    eos, sampling, device = set(eos_token_ids), sampling_temperature > 0, _device(model)
    was_training = model.training
    model.eval()
    lm = CachedLM(model, len(prompts), device)
    gens = [torch.Generator().manual_seed(_row_seed(seed, r)) for r in range(len(prompts))]
    rows, pending = list(range(len(prompts))), [list(p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    wall, cpu = time.perf_counter(), time.process_time()
    while rows:
        ids, present = _left_pad(pending, device)
        logits = lm.step(ids, present, keep=1)[:, -1, :vocab]  # (b, V)
        if sampling:
            u = torch.stack([torch.rand((), generator=gens[r], dtype=torch.float64) for r in rows])
            chosen = sample_categorical(_probs(logits, sampling_temperature), u.to(device))
        else:
            chosen = logits.argmax(-1)
        keep: list[int] = []
        for i, (r, token) in enumerate(zip(rows, chosen.tolist(), strict=True)):
            out[r].append(token)
            if token not in eos and len(out[r]) < max_new_tokens:
                keep.append(i)
        if len(keep) < len(rows):
            lm.select_rows(torch.tensor(keep, dtype=torch.long, device=device))
            lm.compact()
        rows = [rows[i] for i in keep]
        pending = [[out[r][-1]] for r in rows]
    seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
    model.train(was_training)
    return DecodeResult(out, lm.calls, seconds, cpu_seconds)


@torch.no_grad()
def speculative_generate(
    target: Any,
    draft: Any,
    prompts: Sequence[Sequence[int]],
    *,
    gamma: int,
    max_new_tokens: int,
    sampling_temperature: float = 0.0,
    eos_token_ids: Iterable[int] = (),
    vocab_size: int | None = None,
    seed: int = 0,
) -> SpeculativeResult:
    """Speculative decoding of a batch of prompts; see the module docstring for the rule.

    Args:
        target: The Hugging Face causal LM whose output distribution is kept exactly.
        draft: A cheaper causal LM with the same tokenizer.
        prompts: Token ids per prompt (ragged).
        gamma: Draft tokens per round (>= 1); fewer when ``max_new_tokens`` leaves less room.
        max_new_tokens: Tokens generated per prompt at most.
        sampling_temperature: 0 = greedy, else the target's sampling temperature (the draft
            samples at the same temperature).
        eos_token_ids: Ids that end a row (kept in its output).
        vocab_size: The tokenizer's size; logits of both models are sliced to it.
        seed: Seeds each row's generator (sampling only).

    Returns:
        A :class:`SpeculativeResult` with the tokens and one record per (row, round).

    Raises:
        DistilError: On empty prompts, ``gamma < 1``, a vocabulary larger than either model's
            output rows, prompts too long for a context, or a cache that cannot be rolled back.
    """
    if gamma < 1:
        raise DistilError(f"gamma (draft tokens per round) must be at least 1, got {gamma}")
    vocab = _check_inputs(
        {"target": target, "draft": draft},
        prompts,
        max_new_tokens=max_new_tokens,
        sampling_temperature=sampling_temperature,
        vocab_size=vocab_size,
    )
    eos, sampling, device = set(eos_token_ids), sampling_temperature > 0, _device(target)
    modes = (target.training, draft.training)
    target.eval()
    draft.eval()
    n = len(prompts)
    tgt, drf = CachedLM(target, n, device), CachedLM(draft, n, device)
    gens = [torch.Generator().manual_seed(_row_seed(seed, r)) for r in range(n)]
    rows = list(range(n))  # batch position -> prompt index
    target_pending = [list(p) for p in prompts]  # tokens not yet in the target's cache
    draft_pending = [list(p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    records: list[tuple[int, int, int, int]] = []  # (row, proposed, accepted, emitted)
    wall, cpu = time.perf_counter(), time.process_time()
    while rows:
        b = len(rows)
        g = min(gamma, max(max_new_tokens - len(out[r]) for r in rows) - 1)
        uniforms = (
            torch.stack(
                [torch.rand(2 * gamma + 1, generator=gens[r], dtype=torch.float64) for r in rows]
            ).to(device)
            if sampling
            else None
        )  # (b, 2γ + 1): γ draft draws, γ acceptance tests, 1 resample
        drafts = torch.zeros(b, g, dtype=torch.long, device=device)  # (b, g)
        draft_probs = torch.zeros(
            b, g if sampling else 0, vocab, dtype=torch.float64, device=device
        )  # (b, g, V): the q each draft token was drawn from (sampling only)
        if g > 0:
            ids, present = _left_pad([draft_pending[r] for r in rows], device)
            logits = drf.step(ids, present, keep=1)[:, -1, :vocab]  # (b, V)
            for j in range(g):
                if uniforms is not None:
                    draft_probs[:, j] = _probs(logits, sampling_temperature)
                    drafts[:, j] = sample_categorical(draft_probs[:, j], uniforms[:, j])
                else:
                    drafts[:, j] = logits.argmax(-1)
                if j + 1 < g:
                    step_present = torch.ones(b, 1, dtype=torch.bool, device=device)
                    logits = drf.step(drafts[:, j : j + 1], step_present, keep=1)[:, -1, :vocab]
        # A row offers what could still be emitted: up to its first EOS, and at most room - 1
        # tokens (the round adds the target's own token), as it would alone in the batch.
        room = torch.tensor([max_new_tokens - len(out[r]) for r in rows], device=device)
        proposed = torch.minimum(proposal_lengths(drafts, eos), room - 1)  # (b,)
        ids, present = _left_pad([target_pending[r] for r in rows], device)
        ids = torch.cat([ids, drafts], dim=1)
        present = torch.cat([present, torch.ones_like(drafts, dtype=torch.bool)], dim=1)
        target_logits = tgt.step(ids, present, keep=g + 1)[:, :, :vocab]  # (b, g + 1, V)
        if uniforms is not None:
            accepted, next_token = verify_sampled(
                drafts,
                draft_probs,
                _probs(target_logits, sampling_temperature),
                proposed,
                uniforms[:, gamma : gamma + g],
                uniforms[:, 2 * gamma],
            )
        else:
            accepted, next_token = verify_greedy(drafts, target_logits, proposed)
        keep: list[int] = []
        accepted_list, next_list = accepted.tolist(), next_token.tolist()
        proposed_list, draft_list = proposed.tolist(), drafts.tolist()
        for i, r in enumerate(rows):
            k = accepted_list[i]
            new = draft_list[i][:k]
            if not (new and new[-1] in eos):  # after an accepted EOS the row has ended
                new.append(next_list[i])
            end = next((j for j, t in enumerate(new) if t in eos), None)
            new = new[: len(new) if end is None else end + 1][: max_new_tokens - len(out[r])]
            out[r].extend(new)
            records.append((r, proposed_list[i], k, len(new)))
            if not (new[-1] in eos or len(out[r]) >= max_new_tokens):
                keep.append(i)
                target_pending[r] = [next_list[i]]
                carried = draft_pending[r] if g == 0 else [draft_list[i][g - 1]] if k == g else []
                draft_pending[r] = [*carried, next_list[i]]
        # Roll back: the target forgets the rejected drafts; the draft, which never ran on its
        # last proposal, forgets the ones it ran on past the accepted prefix.
        tgt.drop_last(g - accepted)
        if g > 0:
            drf.drop_last((g - 1) - accepted.clamp_max(g - 1))
        if len(keep) < b:
            index = torch.tensor(keep, dtype=torch.long, device=device)
            tgt.select_rows(index)
            drf.select_rows(index)
        tgt.compact()
        drf.compact()
        rows = [rows[i] for i in keep]
    seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
    target.train(modes[0])
    draft.train(modes[1])
    row, prop, acc, emitted = (tuple(x) for x in zip(*records, strict=True))
    return SpeculativeResult(
        tokens=out,
        gamma=gamma,
        sampling_temperature=sampling_temperature,
        block_row=row,
        block_proposed=prop,
        block_accepted=acc,
        block_emitted=emitted,
        target_calls=tgt.calls,
        draft_calls=drf.calls,
        seconds=seconds,
        cpu_seconds=cpu_seconds,
    )
