"""On-policy batches for causal-LM distillation: the student writes the completions it is taught on.

GKD (Agarwal et al. 2024) trains on a mix: with probability λ a batch's completions are sampled
from the student itself and scored by the teacher, otherwise the dataset's completions are used.
Training on its own samples removes the train/inference mismatch of fixed data (exposure bias),
and "On Teacher Hacking" (Tiapkin et al. 2025) finds online samples keep the student from
over-fitting a fixed offline set.

This module holds the pieces that do not depend on the training loop:

- :func:`is_on_policy_step`: which steps sample, a pure function of ``(seed, step)`` so every rank
  agrees and a resumed run makes the same choices;
- :func:`prompt_of`: the prompt of a training example (its unsupervised prefix, or the first
  ``prompt_tokens`` tokens of packed text);
- :func:`sample_completions`: batched sampling with left padding and the KV cache, in eval mode;
- :func:`completion_batch`: prompt + sampled completion as a batch whose labels cover the
  sampled tokens only (the prompt never enters the loss).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from distil.data.lm import IGNORE_INDEX
from distil.models.vocab import KnownIdsOnly


@dataclass(frozen=True)
class SamplingSettings:
    """How the student samples: ``temperature`` 0 is greedy; ``top_p`` 1 keeps the whole
    distribution; ``max_new_tokens`` per prompt; ``prompt_tokens`` caps the prompt of packed
    text (data without a prompt part)."""

    temperature: float
    top_p: float
    max_new_tokens: int
    prompt_tokens: int


def is_on_policy_step(fraction: float, *, seed: int, step: int) -> bool:
    """Whether optimiser step ``step`` trains on student samples (probability ``fraction``).

    A pure function of ``(seed, step)``: every rank takes the same decision without talking to
    the others, and a resumed run repeats the uninterrupted run's choices.
    """
    if fraction <= 0.0:
        return False
    if fraction >= 1.0:
        return True
    return random.Random(seed * 1_000_003 + step).random() < fraction


def prompt_of(input_ids: Sequence[int], labels: Sequence[int], prompt_tokens: int) -> list[int]:
    """The prompt the student continues: the example's unsupervised prefix (prompt/completion
    and chat data), or its first ``prompt_tokens`` tokens when every token is supervised
    (packed text)."""
    first = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels))
    cut = first if first > 0 else min(prompt_tokens, len(input_ids))
    return [int(t) for t in input_ids[: max(cut, 1)]]


@torch.no_grad()
def sample_completions(
    model: Any,
    prompts: Sequence[Sequence[int]],
    settings: SamplingSettings,
    *,
    pad_token_id: int,
    eos_token_ids: Sequence[int],
    vocab_size: int,
) -> list[list[int]]:
    """Sample one completion per prompt with the model's KV cache, in one left-padded batch.

    The model is switched to eval mode (no dropout while sampling) and back to its previous
    mode. Sampling draws from the global torch RNG, which the training loop seeds per step.

    Returns:
        The completion ids of each prompt, cut after the first EOS (kept: the student is taught
        to stop) and never longer than ``settings.max_new_tokens``.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)  # (B, P) left-padded
    att = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        att[r, width - len(p) :] = 1
    sample = settings.temperature > 0
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=sample,
        temperature=settings.temperature if sample else None,
        top_p=settings.top_p if sample else None,
        top_k=0 if sample else None,
        num_beams=1,
        repetition_penalty=1.0,
        pad_token_id=pad_token_id,
        eos_token_id=list(eos_token_ids),
        use_cache=True,
    )
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            ids.to(device),
            attention_mask=att.to(device),
            generation_config=config,
            logits_processor=LogitsProcessorList([KnownIdsOnly(vocab_size)]),
        )  # (B, P + new)
    finally:
        model.train(was_training)
    eos = set(int(e) for e in eos_token_ids)
    completions = []
    for row in out[:, width:].tolist():
        end = next((i for i, t in enumerate(row) if t in eos), None)
        completions.append(row if end is None else row[: end + 1])
    return completions


def completion_batch(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    example_ids: Sequence[int],
) -> dict[str, Tensor]:
    """Prompt + completion rows, right-padded, with labels on the completion tokens only.

    Labels follow :func:`distil.data.lm.collate_lm_batch`: ``labels[t] = input_ids[t]`` at
    supervised positions and ``-100`` elsewhere, before the one next-token shift. A prompt
    whose completion is empty contributes no target.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` of shape ``(B, T)`` and ``example_id``
        ``(B,)``, int64.
    """
    rows = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    att = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for r, (p, row) in enumerate(zip(prompts, rows, strict=True)):
        ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        att[r, : len(row)] = 1
        labels[r, len(p) : len(row)] = ids[r, len(p) : len(row)]
    return {
        "input_ids": ids,
        "attention_mask": att,
        "labels": labels,
        "example_id": torch.tensor(list(example_ids), dtype=torch.long),
    }
