"""How good a draft is for speculative decoding with a given target, measured and predicted.

Definitions (``docs/speculative.md`` has them with their sources):

- **α, per-token acceptance.** At a position whose context the target wrote, the chance that
  the draft's token is accepted. Sampling at temperature T: ``Σ_v min(p_v, q_v) = 1 − TVD(p, q)``
  with ``p, q`` the target's and draft's softmax at T (exact, from both models' logits);
  greedy: ``1[argmax q = argmax p]``. α is their mean over the target's own continuations
  (sampled at T, or greedy), the contexts speculative decoding actually meets.
- **τ, block efficiency.** Tokens one verification round emits, the target's own token
  included (1 to γ + 1), averaged over rounds in which the draft proposed all γ tokens; the
  i.i.d. prediction from α is ``(1 − α^(γ+1)) / (1 − α)``.
- **tokens per target call.** Tokens emitted divided by the rounds each row took, the short
  last rounds (``max_new_tokens``, EOS) included: what a user gets.
- **c, cost ratio.** Draft / target time of one decoding step (1 new token, KV cache) measured
  here; **verification cost** ``v(γ)`` = target time on γ + 1 new tokens / on 1.
- **Speed-up, modelled**: ``τ / (γ·c + 1)`` on hardware where verifying γ + 1 tokens costs one
  step (memory-bound decoding), a model; **CPU model**: ``τ / (γ·c + v(γ))`` with this
  machine's costs; **measured**: wall-clock of target-alone decoding / speculative decoding.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from distil.decoding.cached_lm import CachedLM
from distil.decoding.speculative import (
    SpeculativeResult,
    autoregressive_generate,
    speculative_generate,
)
from distil.errors import DistilError
from distil.losses.divergences import total_variation

__all__ = [
    "TokenAcceptance",
    "acceptance_by_position",
    "block_summary",
    "expected_acceptance",
    "greedy_target_calls",
    "held_out_prompts",
    "lowest_acceptance_tokens",
    "merge_results",
    "modelled_speedup",
    "per_row",
    "predicted_block_efficiency",
    "predicted_from_positions",
    "step_costs",
    "token_acceptance",
    "top1_agreement",
]


# --------------------------------------------------------------------------------------------
# Formulas


def expected_acceptance(
    target_logits: Tensor, draft_logits: Tensor, *, sampling_temperature: float = 1.0
) -> Tensor:
    """``Σ_v min(p_v, q_v) = 1 − TVD(p, q)`` per position: the probability that speculative
    sampling at ``sampling_temperature`` accepts the draft's token there.

    Args:
        target_logits: ``(..., V)``.
        draft_logits: ``(..., V)``.
        sampling_temperature: > 0.

    Returns:
        Shape ``(...)``, in [0, 1].
    """
    tvd = total_variation(
        draft_logits, target_logits, kd_temperature=sampling_temperature, reduction="none"
    )
    return 1.0 - tvd


def top1_agreement(target_logits: Tensor, draft_logits: Tensor) -> Tensor:
    """Greedy acceptance per position: whether both argmaxes agree. ``(..., V)`` → ``(...)`` bool."""
    return target_logits.argmax(-1) == draft_logits.argmax(-1)


def predicted_block_efficiency(alpha: float, gamma: int) -> float:
    """``τ = (1 − α^(γ+1)) / (1 − α)``: expected tokens per round when each of the γ draft tokens
    is accepted independently with probability α (Leviathan et al. 2023, eq. 1); γ + 1 at α = 1."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if alpha == 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def modelled_speedup(
    block_efficiency: float, gamma: int, cost_ratio: float, verify_cost: float = 1.0
) -> float:
    """Speed-up over target-alone decoding: ``τ / (γ·c + v)``.

    Args:
        block_efficiency: τ, tokens per round.
        gamma: Draft tokens per round.
        cost_ratio: c, draft step time / target step time.
        verify_cost: v, target time on γ + 1 tokens / on 1 token (1 where decoding is
            memory-bound; measured on a CPU it is larger).
    """
    return block_efficiency / (gamma * cost_ratio + verify_cost)


def greedy_target_calls(agreement: Sequence[bool], gamma: int) -> tuple[int, list[int]]:
    """Target calls greedy speculative decoding needs for one row, derived from α alone.

    On the target's greedy continuation of ``n`` tokens, ``agreement[t]`` says whether the
    draft's argmax at position ``t`` equals the target's token. A round starting at ``t``
    proposes ``g = min(γ, n − t − 1)`` tokens, keeps the leading agreeing ones and adds the
    target's token, so the rounds follow from the agreement sequence exactly (no EOS in the
    continuation).

    Returns:
        ``(calls, accepted per round)``.
    """
    n, t, accepted = len(agreement), 0, []
    while t < n:
        g = min(gamma, n - t - 1)
        k = 0
        while k < g and agreement[t + k]:
            k += 1
        accepted.append(k)
        t += k + 1
    return len(accepted), accepted


def predicted_from_positions(alphas: Sequence[Sequence[float]], gamma: int) -> dict[str, float]:
    """τ expected from the acceptance of every position of every row, not from their mean.

    Along one row's text of ``n`` tokens, a round starting at ``t`` proposes
    ``g = min(γ, n − t − 1)`` tokens and accepts ``k`` of them with probability
    ``Π_{i<k} α_{t+i} · (1 − α_{t+k})`` (all ``g``: ``Π_{i<g} α_{t+i}``), then the next round
    starts at ``t + k + 1``. A forward pass over positions carries the probability that a round
    starts at each one. Where α varies along a text (easy and hard stretches) this differs from
    ``(1 − ᾱ^(γ+1)) / (1 − ᾱ)``; for greedy acceptance (α_t ∈ {0, 1}) it is exact.

    Args:
        alphas: Per row, the acceptance at each position of the target's continuation.
        gamma: Draft tokens per round.

    Returns:
        ``tau`` (over rounds proposing all γ, as measured), ``tokens_per_call`` and
        ``rounds`` (expected rounds, summed over rows).
    """
    full_rounds = full_tokens = rounds = tokens = 0.0
    for row in alphas:
        n = len(row)
        start = [0.0] * (n + 1)
        start[0] = 1.0
        for t in range(n):
            if start[t] == 0.0:
                continue
            g = min(gamma, n - t - 1)
            rounds += start[t]
            prefix = 1.0
            for k in range(g + 1):
                chance = prefix * (1.0 - row[t + k]) if k < g else prefix
                start[t + k + 1] += start[t] * chance
                if g == gamma:
                    full_rounds += start[t] * chance
                    full_tokens += start[t] * chance * (k + 1)
                if k < g:
                    prefix *= row[t + k]
        tokens += n
    return {
        "tau": full_tokens / full_rounds if full_rounds else math.nan,
        "tokens_per_call": tokens / rounds if rounds else math.nan,
        "rounds": rounds,
    }


# --------------------------------------------------------------------------------------------
# Acceptance on the target's own text


@dataclass(frozen=True)
class TokenAcceptance:
    """Per generated position of the target's continuations, how the draft fares there.

    Attributes:
        alpha: ``(N,)`` float64, ``Σ min(p, q)`` at the sampling temperature.
        agree: ``(N,)`` bool, top-1 agreement.
        token: ``(N,)`` int64, the token the target wrote there.
        draft_top: ``(N,)`` int64, the draft's argmax there.
        row: ``(N,)`` int64, prompt index.
        position: ``(N,)`` int64, index within the continuation.
    """

    alpha: Tensor
    agree: Tensor
    token: Tensor
    draft_top: Tensor
    row: Tensor
    position: Tensor


@torch.no_grad()
def token_acceptance(
    target: Any,
    draft: Any,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    vocab_size: int,
    sampling_temperature: float = 1.0,
    batch_size: int = 16,
) -> TokenAcceptance:
    """Score both models on ``prompt + continuation`` and compare them at every continuation
    position (teacher forcing on the target's text: one forward pass per model and batch).

    Args:
        target: The target causal LM.
        draft: The draft causal LM.
        prompts: Token ids per prompt.
        continuations: The target's generated ids per prompt (``autoregressive_generate``).
        vocab_size: The tokenizer's size; logits are sliced to it.
        sampling_temperature: Temperature of α (> 0; greedy acceptance is ``agree``).
        batch_size: Sequences per forward pass.

    Returns:
        A :class:`TokenAcceptance` over every continuation token.
    """
    device = next(target.parameters()).device
    parts: dict[str, list[Tensor]] = {k: [] for k in TokenAcceptance.__dataclass_fields__}
    pairs = [
        (i, list(p), list(c))
        for i, (p, c) in enumerate(zip(prompts, continuations, strict=True))
        if c
    ]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        width = max(len(p) + len(c) for _, p, c in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)  # (b, W), right-padded
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, (_, p, c) in enumerate(chunk):
            ids[r, : len(p) + len(c)] = torch.tensor(p + c)
            mask[r, : len(p) + len(c)] = 1
        ids, mask = ids.to(device), mask.to(device)
        t_logits = target(input_ids=ids, attention_mask=mask, use_cache=False).logits
        d_logits = draft(input_ids=ids, attention_mask=mask, use_cache=False).logits
        for r, (i, p, c) in enumerate(chunk):
            at = slice(len(p) - 1, len(p) - 1 + len(c))  # logits that predict the continuation
            t, d = t_logits[r, at, :vocab_size].float(), d_logits[r, at, :vocab_size].float()
            parts["alpha"].append(
                expected_acceptance(t, d, sampling_temperature=sampling_temperature).double().cpu()
            )
            parts["agree"].append(top1_agreement(t, d).cpu())
            parts["token"].append(torch.tensor(c))
            parts["draft_top"].append(d.argmax(-1).cpu())
            parts["row"].append(torch.full((len(c),), i))
            parts["position"].append(torch.arange(len(c)))
    if not parts["alpha"]:
        raise DistilError("the target generated no token for any prompt; nothing to measure")
    return TokenAcceptance(**{k: torch.cat(v) for k, v in parts.items()})


def per_row(acceptance: TokenAcceptance, *, greedy: bool) -> list[list[float]]:
    """Per prompt, the acceptance at each continuation position (agreement when ``greedy``)."""
    score = acceptance.agree.double() if greedy else acceptance.alpha
    rows = int(acceptance.row.max()) + 1 if acceptance.row.numel() else 0
    return [score[acceptance.row == r].tolist() for r in range(rows)]


def lowest_acceptance_tokens(
    acceptance: TokenAcceptance,
    tokenizer: Any,
    *,
    greedy: bool,
    min_count: int = 5,
    limit: int = 12,
) -> list[dict[str, Any]]:
    """The target tokens the draft is worst at anticipating.

    Groups positions by the token the target wrote there and ranks the groups seen at least
    ``min_count`` times by mean acceptance (``agree`` when ``greedy``, else ``alpha``).

    Returns:
        Up to ``limit`` rows ``{"token", "count", "acceptance", "draft_instead"}`` with token texts
        as ``repr`` strings (whitespace visible); ``draft_instead`` is the draft's most frequent
        argmax at those positions.
    """
    score = acceptance.agree.double() if greedy else acceptance.alpha
    rows: list[dict[str, Any]] = []
    for token in acceptance.token.unique().tolist():
        where = acceptance.token == token
        count = int(where.sum())
        if count < min_count:
            continue
        tops = acceptance.draft_top[where]
        instead = int(tops.mode().values) if tops.numel() else token
        rows.append(
            {
                "token": repr(tokenizer.decode([token])),
                "count": count,
                "acceptance": float(score[where].mean()),
                "draft_instead": repr(tokenizer.decode([instead])),
            }
        )
    rows.sort(key=lambda r: (r["acceptance"], -r["count"]))
    return rows[:limit]


# --------------------------------------------------------------------------------------------
# Block statistics of speculative runs


def merge_results(
    results: Sequence[SpeculativeResult], offsets: Sequence[int]
) -> SpeculativeResult:
    """One result from runs over consecutive chunks of a prompt list (``offsets[i]`` = index of
    chunk ``i``'s first prompt)."""
    first = results[0]
    return SpeculativeResult(
        tokens=[t for r in results for t in r.tokens],
        gamma=first.gamma,
        sampling_temperature=first.sampling_temperature,
        block_row=tuple(
            o + row for r, o in zip(results, offsets, strict=True) for row in r.block_row
        ),
        block_proposed=tuple(x for r in results for x in r.block_proposed),
        block_accepted=tuple(x for r in results for x in r.block_accepted),
        block_emitted=tuple(x for r in results for x in r.block_emitted),
        target_calls=sum(r.target_calls for r in results),
        draft_calls=sum(r.draft_calls for r in results),
        seconds=sum(r.seconds for r in results),
        cpu_seconds=sum(r.cpu_seconds for r in results),
    )


def acceptance_by_position(result: SpeculativeResult) -> list[float | None]:
    """For j = 1..γ, the share of rounds that reached draft token j (all before it accepted)
    in which it was accepted; rounds that proposed fewer than γ tokens are left out. ``None``
    where no round reached j. Under the i.i.d. model every entry is α."""
    out: list[float | None] = []
    full = [
        a
        for a, p in zip(result.block_accepted, result.block_proposed, strict=True)
        if p == result.gamma
    ]
    for j in range(1, result.gamma + 1):
        reached = sum(1 for a in full if a >= j - 1)
        out.append(sum(1 for a in full if a >= j) / reached if reached else None)
    return out


def block_summary(result: SpeculativeResult) -> dict[str, Any]:
    """Block efficiency and call counts of a run.

    Returns:
        ``tau`` (mean of accepted + 1 over rounds with all γ proposed), ``tokens_per_call``
        (emitted tokens / rounds per row, every round), ``acceptance`` (accepted / tested draft
        tokens over full rounds: a tested token is an accepted one or the first rejected one),
        ``rounds``, ``full_rounds``, ``tokens``, ``target_calls`` and ``draft_calls`` (forward
        passes, all rows at once), ``seconds``.
    """
    gamma = result.gamma
    full = [
        a for a, p in zip(result.block_accepted, result.block_proposed, strict=True) if p == gamma
    ]
    tested = sum(min(a + 1, gamma) for a in full)
    tokens = sum(len(t) for t in result.tokens)
    return {
        "gamma": gamma,
        "tau": sum(a + 1 for a in full) / len(full) if full else None,
        "tokens_per_call": tokens / len(result.block_row),
        "acceptance": sum(full) / tested if tested else None,
        "rounds": len(result.block_row),
        "full_rounds": len(full),
        "tokens": tokens,
        "target_calls": result.target_calls,
        "draft_calls": result.draft_calls,
        "seconds": result.seconds,
    }


# --------------------------------------------------------------------------------------------
# Costs on this machine


@torch.no_grad()
def step_costs(
    target: Any,
    draft: Any,
    *,
    batch_size: int,
    context_tokens: int,
    gammas: Iterable[int],
    repeats: int = 15,
) -> dict[str, Any]:
    """Median time of one decoding step of each model after ``context_tokens`` cached tokens,
    and of the target verifying γ + 1 tokens, measured interleaved (so load drifts hit every
    measurement alike) at the current thread count.

    Returns:
        ``target_step_ms``, ``draft_step_ms``, ``cost_ratio`` (c), ``verify_ms`` and
        ``verify_cost`` (``{γ: v(γ)}``), ``batch_size``, ``context_tokens``.
    """
    gammas = sorted(set(gammas))
    device = next(target.parameters()).device
    gen = torch.Generator().manual_seed(0)
    vocab = int(min(target.config.vocab_size, draft.config.vocab_size))
    context = torch.randint(0, vocab, (batch_size, context_tokens), generator=gen).to(device)
    full = torch.ones_like(context, dtype=torch.bool)
    lms = {
        "target": CachedLM(target, batch_size, device),
        "draft": CachedLM(draft, batch_size, device),
    }
    for lm in lms.values():
        lm.step(context, full)
    widths = {"draft": [1], "target": [1, *(g + 1 for g in gammas)]}
    times: dict[tuple[str, int], list[float]] = {(m, w): [] for m in widths for w in widths[m]}
    for i in range(repeats + 2):  # two warm-up rounds
        for model, ws in widths.items():
            for w in ws:
                tokens = torch.randint(0, vocab, (batch_size, w), generator=gen).to(device)
                start = time.perf_counter()
                lms[model].step(tokens, torch.ones_like(tokens, dtype=torch.bool))
                if i >= 2:
                    times[(model, w)].append(time.perf_counter() - start)
                lms[model].drop_last(torch.full((batch_size,), w, device=device))
    ms = {key: 1e3 * statistics.median(v) for key, v in times.items()}
    target_ms, draft_ms = ms[("target", 1)], ms[("draft", 1)]
    return {
        "batch_size": batch_size,
        "context_tokens": context_tokens,
        "target_step_ms": target_ms,
        "draft_step_ms": draft_ms,
        "cost_ratio": draft_ms / target_ms,
        "verify_ms": {g: ms[("target", g + 1)] for g in gammas},
        "verify_cost": {g: ms[("target", g + 1)] / target_ms for g in gammas},
    }


# --------------------------------------------------------------------------------------------
# Prompts


def held_out_prompts(tokenizer: Any, count: int, prompt_tokens: int) -> list[list[int]]:
    """``count`` prompts of ``prompt_tokens`` tokens cut from the built-in corpus's validation
    split (files ``lm_pretrain`` and ``lm_kd`` hold out), spread evenly over its windows."""
    import tempfile
    from pathlib import Path

    from distil.data.corpus import build_stdlib_corpus, read_corpus_texts

    with tempfile.TemporaryDirectory(prefix="distil-corpus-") as tmp:
        # the same call as lm_kd's data.builtin=stdlib, whose held-out files are validation.jsonl
        build_stdlib_corpus(Path(tmp), test_fraction=0.0)
        texts = list(read_corpus_texts([Path(tmp) / "validation.jsonl"]))
    windows = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        windows += [
            ids[s : s + prompt_tokens]
            for s in range(0, len(ids) - prompt_tokens + 1, prompt_tokens)
        ]
    if len(windows) < count:
        raise DistilError(
            f"the held-out split has {len(windows)} windows of {prompt_tokens} tokens, fewer than "
            f"the {count} prompts asked for; ask for fewer or shorter prompts"
        )
    return [list(windows[k * len(windows) // count]) for k in range(count)]


def run_in_batches(
    target: Any,
    draft: Any,
    prompts: Sequence[Sequence[int]],
    *,
    batch_size: int,
    **kwargs: Any,
) -> SpeculativeResult:
    """:func:`speculative_generate` over chunks of ``batch_size`` prompts, merged; chunk ``i``
    uses seed ``kwargs['seed'] + i`` so rows of different chunks draw different numbers."""
    seed = int(kwargs.pop("seed", 0))
    results, offsets = [], []
    for i, start in enumerate(range(0, len(prompts), batch_size)):
        offsets.append(start)
        results.append(
            speculative_generate(
                target, draft, prompts[start : start + batch_size], seed=seed + i, **kwargs
            )
        )
    return merge_results(results, offsets)


def target_alone_in_batches(
    target: Any, prompts: Sequence[Sequence[int]], *, batch_size: int, **kwargs: Any
) -> tuple[list[list[int]], float]:
    """:func:`autoregressive_generate` over chunks of prompts: the tokens and the total seconds."""
    seed = int(kwargs.pop("seed", 0))
    tokens: list[list[int]] = []
    seconds = 0.0
    for i, start in enumerate(range(0, len(prompts), batch_size)):
        out = autoregressive_generate(
            target, prompts[start : start + batch_size], seed=seed + i, **kwargs
        )
        tokens += out.tokens
        seconds += out.seconds
    return tokens, seconds


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
