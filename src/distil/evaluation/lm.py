"""Causal-LM evaluation: held-out perplexity, agreement with the teacher, KL, generation speed.

Every number is computed on next-token targets from ``distil.data.lm.shift_for_next_token``
(the one shift) at supervised positions only, summed over the whole held-out set and divided
once by its number of supervised tokens, so perplexities of different models are comparable.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence, Sized
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distil.config.lm import EvalSection
from distil.data.lm import IGNORE_INDEX, LMData, shift_for_next_token
from distil.evaluation.calibration import clamp_divergence
from distil.losses.divergences import forward_kl
from distil.models.vocab import KnownIdsOnly, tokenizer_vocab_size
from distil.progress import phase_progress
from distil.teachers.base import Teacher

Batch = Mapping[str, Tensor]


def _teacher_logits(teacher: Teacher, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    out = teacher({"input_ids": input_ids, "attention_mask": attention_mask})
    if out.logits is not None:
        return out.logits
    assert out.hidden is not None and out.weight is not None
    logits = out.hidden @ out.weight.T  # (B, T, V)
    return logits if out.bias is None else logits + out.bias


@torch.no_grad()
def held_out_metrics(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    vocab_size: int,
    device: torch.device,
    teacher: Teacher | None = None,
    description: str = "held-out metrics",
) -> dict[str, float]:
    """Cross-entropy, perplexity and (with a teacher) top-1 agreement and KL(teacher ‖ student).

    Args:
        model: A causal LM returning ``.logits`` of shape ``(B, T, V_model)``; evaluated in eval
            mode and returned to its previous mode.
        batches: Collated batches (``input_ids``, ``attention_mask``, ``labels``).
        vocab_size: The tokenizer's vocabulary; logits are sliced to it.
        device: Where the model runs.
        teacher: If given, agreement and KL are computed against it.
        description: What the progress bar says (shown when this takes more than 2 s).

    Returns:
        ``ce`` (nats/token), ``perplexity``, ``tokens`` (supervised targets), and with a teacher
        ``agreement`` (share of targets where both argmaxes agree) and ``kl_teacher_student``
        (nats/token).
    """
    was_training = model.training
    model.eval()
    ce_sum = kl_sum = 0.0
    agree = tokens = 0
    total = len(batches) if isinstance(batches, Sized) else None
    with phase_progress(description, total, unit="batches") as done:
        for batch in batches:
            ids, att = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            targets = shift_for_next_token(batch["labels"]).to(device)  # (B, T)
            mask = targets != IGNORE_INDEX
            logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits
            student = logits[..., :vocab_size][mask].float()  # (N, V)
            ce_sum += float(F.cross_entropy(student, targets[mask], reduction="sum"))
            tokens += int(mask.sum())
            if teacher is not None:
                t_logits = _teacher_logits(teacher, ids, att).to(device)[mask].float()  # (N, V)
                kl_sum += float(forward_kl(student, t_logits, reduction="sum"))
                agree += int((student.argmax(-1) == t_logits.argmax(-1)).sum())
            done(1)
    model.train(was_training)
    n = max(tokens, 1)
    out = {
        "ce": ce_sum / n,
        "perplexity": math.exp(min(ce_sum / n, 700.0)),
        "tokens": float(tokens),
    }
    if teacher is not None:
        out |= {"agreement": agree / n, "kl_teacher_student": clamp_divergence(kl_sum / n)}
    return out


@torch.no_grad()
def held_out_logits(
    model: nn.Module, batches: Iterable[Batch], *, vocab_size: int, max_rows: int
) -> tuple[Tensor, Tensor]:
    """The logits of the first ``max_rows`` supervised held-out positions and their next-token ids.

    What :func:`distil.evaluation.calibration.fidelity_part` reads: rows are token positions,
    labels the true next tokens, so ECE and the reliability diagram are token-level. Capped
    because ``(N, V)`` float32 logits of a whole held-out set can take gigabytes.

    Returns:
        ``(N, vocab_size)`` float32 logits on the CPU and ``(N,)`` int64 labels, ``N <= max_rows``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows: list[Tensor] = []
    labels: list[Tensor] = []
    have = 0
    for batch in batches:
        if have >= max_rows:
            break
        ids, att = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        targets = shift_for_next_token(batch["labels"]).to(device)  # (B, T)
        mask = targets != IGNORE_INDEX
        logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits[..., :vocab_size]
        take = logits[mask][: max_rows - have].float().cpu()  # (n, V)
        rows.append(take)
        labels.append(targets[mask][: take.shape[0]].cpu())
        have += take.shape[0]
    model.train(was_training)
    if not rows:
        return torch.empty(0, vocab_size), torch.empty(0, dtype=torch.long)
    return torch.cat(rows), torch.cat(labels)


def forward_cost(
    model: Any, input_ids: Tensor, *, threads: int = 1, measure_latency: bool = True
) -> dict[str, float]:
    """CPU cost of one forward pass over ``input_ids`` ``(B, T)``: median latency in ms at
    ``threads`` intra-op threads and the peak memory (weights + live activations, bytes).
    ``measure_latency=False`` gives the memory only (compare models' latencies with
    :func:`forward_speeds`, which times them interleaved)."""
    from distil.evaluation.cost import cpu_latency_ms, cpu_threads, peak_forward_memory_bytes

    was_training = model.training
    model.eval()
    ids = input_ids.to(next(model.parameters()).device)
    att = torch.ones_like(ids)

    def run() -> object:
        return model(input_ids=ids, attention_mask=att, use_cache=False).logits

    out: dict[str, float] = {}
    if measure_latency:
        with cpu_threads(threads):
            out["latency_ms"] = cpu_latency_ms(run, repeats=10, warmup=2, min_seconds=0.2)
    out["peak_memory_bytes"] = float(peak_forward_memory_bytes(run, model))
    model.train(was_training)
    return out


@torch.no_grad()
def generation_speed(
    model: Any,
    prompt_ids: Tensor,
    *,
    max_new_tokens: int,
    pad_token_id: int,
    vocab_size: int,
    repeats: int = 3,
) -> float:
    """Generated tokens per second with greedy decoding and the KV cache, median of ``repeats``.

    Every run generates exactly ``max_new_tokens`` per prompt (EOS does not stop it), so models
    are timed on the same amount of work.

    Args:
        model: A Hugging Face causal LM (``.generate``), on the device of ``prompt_ids``.
        prompt_ids: ``(B, P)`` prompts of equal length.
        max_new_tokens: Tokens generated per prompt.
        pad_token_id: Passed to ``generate``.
        vocab_size: The tokenizer's vocabulary; padded output rows past it are never decoded.
        repeats: Timed runs after one warm-up run.

    Returns:
        ``B * max_new_tokens / median seconds``.
    """
    from transformers import LogitsProcessorList

    model.eval()
    kwargs = {
        "attention_mask": torch.ones_like(prompt_ids),
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": max_new_tokens,
        "do_sample": False,
        "pad_token_id": pad_token_id,
        "eos_token_id": None,
        "logits_processor": LogitsProcessorList([KnownIdsOnly(vocab_size)]),
    }
    model.generate(prompt_ids, **kwargs)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(prompt_ids, **kwargs)
        times.append(time.perf_counter() - start)
    return prompt_ids.shape[0] * max_new_tokens / statistics.median(times)


@torch.no_grad()
def generate_texts(
    model: Any,
    prompts: list[Tensor],
    tokenizer: Any,
    *,
    max_new_tokens: int,
    sampling_temperature: float,
    seed: int,
) -> list[str]:
    """Continue each prompt; greedy when ``sampling_temperature == 0``, else seeded sampling.

    Ids past the tokenizer's vocabulary (padded output rows) are never drawn.

    Returns:
        The decoded continuations (prompt excluded), one per prompt.
    """
    from transformers import LogitsProcessorList

    known_ids = LogitsProcessorList([KnownIdsOnly(tokenizer_vocab_size(tokenizer))])
    model.eval()
    device = next(model.parameters()).device
    texts = []
    for prompt in prompts:
        ids = prompt.unsqueeze(0).to(device)  # (1, P)
        sample = sampling_temperature > 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=sample,
                temperature=sampling_temperature if sample else None,
                top_k=0 if sample else None,
                top_p=None,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                logits_processor=known_ids,
            )
        texts.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return texts


def prompts_from(dataset: Any, n: int, prompt_tokens: int) -> list[Tensor]:
    """Prompts from the first ``n`` held-out examples.

    The unsupervised prefix (the prompt of prompt/completion or chat data), or the first
    ``prompt_tokens`` tokens of packed text, at most ``prompt_tokens`` long.
    """
    out = []
    for row in dataset.select(range(min(n, len(dataset)))):
        labels = row["labels"]
        cut = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels))
        length = max(1, min(cut or prompt_tokens, prompt_tokens))
        out.append(torch.tensor(row["input_ids"][:length], dtype=torch.long))
    return out


def model_summary(
    role: str,
    model: Any,
    batches: Sequence[Batch],
    *,
    vocab_size: int,
    teacher: Teacher | None,
    speed_batch: int,
    speed_prompt_tokens: int,
    speed_new_tokens: int,
    pad_token_id: int,
    measure_speed: bool = True,
) -> dict[str, Any]:
    """One report row: held-out metrics, parameters and generation speed, on the model's device.

    Generation speed uses the first ``speed_batch`` held-out sequences cut to a common prompt
    length (at most ``speed_prompt_tokens``) and generates ``speed_new_tokens`` per prompt
    (fewer if the context is shorter). ``measure_speed=False`` leaves it out: to compare
    models, time them together with :func:`generation_speeds`.
    """
    from distil.models.lm import count_parameters

    device = next(model.parameters()).device
    metrics = held_out_metrics(
        model,
        batches,
        vocab_size=vocab_size,
        device=device,
        teacher=teacher,
        description=f"evaluating {role} on held-out data",
    )
    params = count_parameters(model)
    row = {
        "model": role,
        **metrics,
        "params": params.total,
        "non_embedding_params": params.non_embedding,
    }
    if measure_speed:
        ids, new_tokens = _speed_prompts(
            model, batches, speed_batch, speed_prompt_tokens, speed_new_tokens
        )
        row["gen_tokens_per_s"] = generation_speed(
            model,
            ids.to(device),
            max_new_tokens=new_tokens,
            pad_token_id=pad_token_id,
            vocab_size=vocab_size,
        )
    return row


def _speed_prompts(
    model: Any, batches: Sequence[Batch], speed_batch: int, prompt_tokens: int, new_tokens: int
) -> tuple[Tensor, int]:
    """The first ``speed_batch`` held-out sequences cut to a common prompt length, and the
    tokens to generate after them within the model's context."""
    ids = batches[0]["input_ids"][:speed_batch]  # (b, T)
    real = int(batches[0]["attention_mask"][:speed_batch].sum(-1).min())
    ids = ids[:, : max(1, min(prompt_tokens, real))]
    context = int(getattr(model.config, "max_position_embeddings", ids.shape[1] + new_tokens))
    return ids, max(1, min(new_tokens, context - ids.shape[1]))


@torch.no_grad()
def generation_speeds(
    models: Mapping[str, Any],
    batches: Sequence[Batch],
    *,
    speed_batch: int,
    speed_prompt_tokens: int,
    speed_new_tokens: int,
    pad_token_id: int,
    vocab_size: int,
    rounds: int = 5,
) -> dict[str, dict[str, Any]]:
    """Generated tokens per second of several models, timed interleaved, with each model's
    speed-up over the first and its spread.

    Every model greedily generates the same number of tokens for the same prompts (as in
    :func:`model_summary`; EOS does not stop it, padded vocabulary rows are never decoded), once
    per round, in an order that rotates from round to round.

    Returns:
        Per name: ``gen_tokens_per_s`` (median) with ``_q1``/``_q3``, ``gen_speedup`` over the
        first model with ``_q1``/``_q3``/``_noisy``/``_verdict`` (see
        :func:`distil.evaluation.cost.speed_columns`).
    """
    from transformers import LogitsProcessorList

    from distil.evaluation.cost import interleaved_seconds, speed_columns

    first = next(iter(models.values()))
    ids, new_tokens = _speed_prompts(
        first, batches, speed_batch, speed_prompt_tokens, speed_new_tokens
    )
    for model in models.values():  # the shortest context decides, so all do the same work
        new_tokens = _speed_prompts(model, batches, speed_batch, speed_prompt_tokens, new_tokens)[1]
    known_ids = LogitsProcessorList([KnownIdsOnly(vocab_size)])

    def call(model: Any) -> Any:
        model.eval()
        prompt = ids.to(next(model.parameters()).device)
        kwargs = {
            "attention_mask": torch.ones_like(prompt),
            "max_new_tokens": new_tokens,
            "min_new_tokens": new_tokens,
            "do_sample": False,
            "pad_token_id": pad_token_id,
            "eos_token_id": None,
            "logits_processor": known_ids,
        }
        return lambda: model.generate(prompt, **kwargs)

    seconds = interleaved_seconds(
        {name: call(m) for name, m in models.items()},
        rounds=rounds,
        warmup=1,
        min_round_seconds=0.0,
    )
    tokens = ids.shape[0] * new_tokens
    cols = speed_columns(
        seconds,
        next(iter(models)),
        time_key="gen_ms",
        speedup_key="gen_speedup",
        at=f"generating {new_tokens} tokens at batch {ids.shape[0]}",
    )
    for c in cols.values():
        c["gen_tokens_per_s"] = tokens / (c["gen_ms"] / 1e3)
        c["gen_tokens_per_s_q1"] = tokens / (c["gen_ms_q3"] / 1e3)
        c["gen_tokens_per_s_q3"] = tokens / (c["gen_ms_q1"] / 1e3)
    return cols


def forward_speeds(
    models: Mapping[str, Any], input_ids: Tensor, *, rounds: int = 15, threads: int = 1
) -> dict[str, dict[str, Any]]:
    """CPU latency of one forward pass over ``input_ids`` ``(B, T)`` for several models, timed
    interleaved at ``threads`` threads, with each model's speed-up over the first.

    Returns:
        Per name: ``latency_b1_ms`` (median) with ``_q1``/``_q3``, ``forward_speedup`` with
        ``_q1``/``_q3``/``_noisy``/``_verdict``.
    """
    from distil.evaluation.cost import cpu_threads, interleaved_seconds, speed_columns

    def call(model: Any) -> Any:
        model.eval()
        ids = input_ids.to(next(model.parameters()).device)
        att = torch.ones_like(ids)
        return lambda: model(input_ids=ids, attention_mask=att, use_cache=False).logits

    with cpu_threads(threads):
        seconds = interleaved_seconds({n: call(m) for n, m in models.items()}, rounds=rounds)
    return speed_columns(
        seconds,
        next(iter(models)),
        speedup_key="forward_speedup",
        at=f"for a {input_ids.shape[0]}x{input_ids.shape[1]} forward pass",
    )


def evaluate_models(
    models: list[tuple[str, Any, Teacher | None]],
    data: LMData,
    vocab: int,
    ev: EvalSection,
    tokenizer: Any,
    seed: int,
) -> tuple[list[dict[str, Any]], str]:
    """Report rows (held-out metrics, size, generation speed) and side-by-side sample generations."""
    gen, batches = ev.generation, data.eval_batches(ev.batch_size)
    speed: dict[str, Any] = {
        "speed_batch": gen.speed_batch,
        "speed_prompt_tokens": gen.prompt_tokens,
        "speed_new_tokens": gen.speed_new_tokens,
        "pad_token_id": data.pad_token_id,
    }
    rows = [
        model_summary(role, m, batches, vocab_size=vocab, teacher=t, measure_speed=False, **speed)
        for role, m, t in models
    ]
    speeds = generation_speeds(
        {role: m for role, m, _ in models}, batches, vocab_size=vocab, **speed
    )  # all models interleaved, so load changes do not decide the speed-ups
    for row in rows:
        row |= speeds[row["model"]]
    samples = []
    for i, prompt in enumerate(prompts_from(data.eval, gen.prompts, gen.prompt_tokens)):
        samples.append(
            f"### Prompt {i + 1}\n\n```\n{tokenizer.decode(prompt, skip_special_tokens=True)}\n```\n"
        )
        for role, model, _ in models:
            text = generate_texts(
                model,
                [prompt],
                tokenizer,
                max_new_tokens=gen.max_new_tokens,
                sampling_temperature=gen.sampling_temperature,
                seed=seed,
            )[0]
            samples.append(f"**{role}**\n\n```\n{text}\n```\n")
    return rows, "\n".join(samples)
