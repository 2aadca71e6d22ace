"""Evaluating a model that writes worked solutions: pass@k, format errors, trace length, cost.

A model samples ``n`` solutions per problem (batched, left-padded, with the KV cache, through
:func:`distil.training.on_policy.sample_completions`); a verifier ``fn(record, completion) ->
bool`` marks each one. From the verdicts:

- ``pass@k``: the unbiased estimator of Chen et al. 2021 (Codex paper, eq. 1),
  ``1 − C(n−c, k)/C(n, k)`` for a problem with ``c`` correct of ``n`` samples, averaged over
  problems (:func:`pass_at_k`). pass@1 is then the mean share of correct samples.
- ``format_error_rate``: share of samples without a well-formed answer line (a sample cut by
  ``max_new_tokens`` before its answer counts), separate from wrong answers.
- ``mean_trace_tokens``: generated tokens per sample (EOS included when one was generated).
- ``tokens_per_solved``: all generated tokens divided by the number of correct samples, i.e. the
  decoding cost of one correct solution (None when nothing was solved).

Everything is also broken down by the record's ``kind`` and ``size`` when present.
"""

from __future__ import annotations

import copy
import json
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator

from distil.config.base import StrictModel
from distil.data.lm import pad_token_id_for
from distil.data.reasoning import answer_format_ok, check_answer
from distil.errors import DistilError
from distil.models.vocab import tokenizer_vocab_size
from distil.training.on_policy import SamplingSettings, sample_completions

__all__ = [
    "Checker",
    "ReasoningEvalSection",
    "ReasoningScores",
    "SampledSolution",
    "checkpoint_curve",
    "evaluate_reasoning",
    "pass_at_k",
    "sample_solutions",
    "score_solutions",
]

Checker = Callable[[Mapping[str, Any], str], bool]
"""A verifier: ``fn(record, completion) -> bool`` (e.g. ``distil.data.reasoning.check_answer``)."""


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """The unbiased pass@k estimate for one problem (Chen et al. 2021).

    ``1 − C(n−c, k) / C(n, k)``, computed as ``1 − Π_{i=n−c+1}^{n} (1 − k/i)`` so that large
    ``n`` does not overflow a binomial coefficient.

    Args:
        num_samples: ``n``, samples drawn for the problem.
        num_correct: ``c``, how many of them are correct.
        k: The budget of attempts, ``1 <= k <= n``.

    Raises:
        ValueError: If ``k`` is outside ``1..n`` or ``c`` outside ``0..n``.
    """
    n, c = num_samples, num_correct
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"num_correct must lie in 0..{n}, got {c}")
    if n - c < k:  # every draw of k samples holds a correct one
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


@dataclass(frozen=True)
class SampledSolution:
    """One sampled solution: ``completion`` is the text before EOS, ``tokens`` the generated
    token count (EOS included when generated), ``ended_by_eos`` False when cut by
    ``max_new_tokens``."""

    problem_index: int
    sample: int
    completion: str
    tokens: int
    ended_by_eos: bool


@dataclass(frozen=True)
class ReasoningScores:
    """The summary of :func:`score_solutions` (see the module docstring for each number).

    ``by_group`` maps ``"kind=addition"`` / ``"size=3"`` to the same numbers for that subset.
    """

    problems: int
    samples_per_problem: int
    pass_at: dict[int, float]
    format_error_rate: float
    mean_trace_tokens: float
    tokens_per_solved: float | None
    correct_samples: int
    by_group: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def row(self, prefix: str = "") -> dict[str, float | None]:
        """A flat dict for a report table or ``metrics.jsonl`` (``pass@1``, ``pass@4``, …)."""
        out: dict[str, float | None] = {f"{prefix}pass@{k}": v for k, v in self.pass_at.items()}
        return out | {
            f"{prefix}format_errors": self.format_error_rate,
            f"{prefix}trace_tokens": self.mean_trace_tokens,
            f"{prefix}tokens_per_solved": self.tokens_per_solved,
        }


def _summary(
    samples: Sequence[Sequence[SampledSolution]],
    verdicts: Sequence[Sequence[bool]],
    formats: Sequence[Sequence[bool]],
    ks: Sequence[int],
) -> dict[str, Any]:
    n = len(samples[0])
    flat = [s for row in samples for s in row]
    correct = sum(sum(row) for row in verdicts)
    tokens = sum(s.tokens for s in flat)
    pass_at = {k: sum(pass_at_k(n, sum(row), k) for row in verdicts) / len(verdicts) for k in ks}
    return {
        "pass_at": pass_at,
        "format_error_rate": sum(not ok for row in formats for ok in row) / len(flat),
        "mean_trace_tokens": tokens / len(flat),
        "tokens_per_solved": tokens / correct if correct else None,
        "correct_samples": correct,
    }


def score_solutions(
    records: Sequence[Mapping[str, Any]],
    samples: Sequence[Sequence[SampledSolution]],
    *,
    ks: Sequence[int] = (1,),
    checker: Checker = check_answer,
    format_checker: Checker = answer_format_ok,
) -> ReasoningScores:
    """Verify every sample and summarise (pure: no model involved).

    Args:
        records: The problems, each with what ``checker`` reads (``answer``, ``kind``).
        samples: ``samples[i]`` are the ``n`` samples of ``records[i]`` (the same ``n`` for all).
        ks: The pass@k values to report; each must be at most ``n``.
        checker: The verifier.
        format_checker: Whether a sample's answer line is well formed.

    Raises:
        DistilError: On no problems, a count mismatch, or samples of unequal number.
    """
    if not records:
        raise DistilError("no problems to score")
    if len(records) != len(samples):
        raise DistilError(f"{len(records)} problems but samples for {len(samples)}")
    n = len(samples[0])
    if n == 0 or any(len(row) != n for row in samples):
        raise DistilError("every problem needs the same, non-zero number of samples")
    if any(not 1 <= k <= n for k in ks):
        raise DistilError(f"pass@k needs 1 <= k <= {n} samples per problem, got ks={list(ks)}")
    verdicts = [
        [bool(checker(r, s.completion)) for s in row]
        for r, row in zip(records, samples, strict=True)
    ]
    formats = [
        [bool(format_checker(r, s.completion)) for s in row]
        for r, row in zip(records, samples, strict=True)
    ]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        for key in ("kind", "size"):
            if key in record:
                groups[f"{key}={record[key]}"].append(i)
    by_group = {}
    for name in sorted(groups, key=lambda g: (g.split("=")[0], _sort_key(g.split("=")[1]))):
        idx = groups[name]
        part = _summary(
            [samples[i] for i in idx], [verdicts[i] for i in idx], [formats[i] for i in idx], ks
        )
        by_group[name] = {
            **{f"pass@{k}": v for k, v in part["pass_at"].items()},
            "format_errors": part["format_error_rate"],
            "trace_tokens": part["mean_trace_tokens"],
            "problems": float(len(idx)),
        }
    whole = _summary(samples, verdicts, formats, ks)
    return ReasoningScores(
        problems=len(records),
        samples_per_problem=n,
        pass_at=whole["pass_at"],
        format_error_rate=whole["format_error_rate"],
        mean_trace_tokens=whole["mean_trace_tokens"],
        tokens_per_solved=whole["tokens_per_solved"],
        correct_samples=whole["correct_samples"],
        by_group=by_group,
    )


def _sort_key(value: str) -> tuple[int, int | str]:
    return (0, int(value)) if value.lstrip("-").isdigit() else (1, value)


def sample_solutions(
    model: Any,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    samples_per_problem: int = 1,
    sampling_temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 128,
    batch_size: int = 64,
    seed: int = 0,
) -> list[list[SampledSolution]]:
    """Sample ``samples_per_problem`` solutions of every problem's ``prompt``.

    Rows (problem, sample) are generated in batches of ``batch_size`` with
    :func:`~distil.training.on_policy.sample_completions`. The global torch RNG is seeded with
    ``seed`` inside :func:`torch.random.fork_rng`, so the caller's RNG state is untouched and the
    same call gives the same samples (for the same ``batch_size``). Prompts are tokenized as
    ``distil.data.lm`` tokenizes them for training (with the tokenizer's special tokens).

    Returns:
        ``out[i][j]``: sample ``j`` of ``records[i]``.
    """
    if samples_per_problem < 1 or batch_size < 1:
        raise DistilError("samples_per_problem and batch_size must be at least 1")
    prompt_ids = [list(ids) for ids in tokenizer([r["prompt"] for r in records])["input_ids"]]
    rows = [(i, j) for i in range(len(records)) for j in range(samples_per_problem)]
    eos = [int(tokenizer.eos_token_id)]
    settings = SamplingSettings(
        temperature=sampling_temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        prompt_tokens=max(len(p) for p in prompt_ids),
    )
    out: list[list[SampledSolution]] = [[] for _ in records]
    devices = [] if not torch.cuda.is_available() else list(range(torch.cuda.device_count()))
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            completions = sample_completions(
                model,
                [prompt_ids[i] for i, _ in batch],
                settings,
                pad_token_id=pad_token_id_for(tokenizer),
                eos_token_ids=eos,
                vocab_size=tokenizer_vocab_size(tokenizer),
            )
            for (i, j), ids in zip(batch, completions, strict=True):
                ended = bool(ids) and ids[-1] in eos
                text = tokenizer.decode(ids[:-1] if ended else ids, skip_special_tokens=True)
                out[i].append(SampledSolution(i, j, text, len(ids), ended))
    return out


def evaluate_reasoning(
    model: Any,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    samples_per_problem: int = 1,
    ks: Sequence[int] = (1,),
    sampling_temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 128,
    batch_size: int = 64,
    seed: int = 0,
    checker: Checker = check_answer,
) -> ReasoningScores:
    """Sample solutions and score them: :func:`sample_solutions` then :func:`score_solutions`."""
    samples = sample_solutions(
        model,
        tokenizer,
        records,
        samples_per_problem=samples_per_problem,
        sampling_temperature=sampling_temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
    )
    return score_solutions(records, samples, ks=ks, checker=checker)


class ReasoningEvalSection(StrictModel):
    """How a recipe evaluates reasoning: ``problems`` of each split, ``samples_per_problem`` at
    ``sampling_temperature``, pass@k for ``ks``; ``curve_samples`` per problem at every kept
    checkpoint (0: no learning curve)."""

    problems: int = Field(default=200, ge=1, description="the first N of each split")
    samples_per_problem: int = Field(default=4, ge=1)
    ks: list[int] = Field(default_factory=lambda: [1, 4], min_length=1)
    sampling_temperature: float = Field(default=1.0, ge=0)
    max_new_tokens: int = Field(default=160, ge=1)
    batch_size: int = Field(default=64, ge=1)
    curve_samples: int = Field(default=1, ge=0, description="per problem and checkpoint; 0: none")
    teacher: bool = Field(default=True, description="also evaluate the teacher")

    @model_validator(mode="after")
    def _ks(self) -> ReasoningEvalSection:
        if any(not 1 <= k <= self.samples_per_problem for k in self.ks):
            raise ValueError(
                f"eval.ks must lie in 1..samples_per_problem={self.samples_per_problem}"
            )
        return self

    def score(
        self,
        model: Any,
        tokenizer: Any,
        records: Sequence[Mapping[str, Any]],
        *,
        samples: int | None = None,
        seed: int = 0,
    ) -> ReasoningScores:
        """:func:`evaluate_reasoning` with these settings (``samples`` overrides the count; the
        ``ks`` above it are dropped)."""
        n = samples or self.samples_per_problem
        return evaluate_reasoning(
            model,
            tokenizer,
            records,
            samples_per_problem=n,
            ks=[k for k in self.ks if k <= n] or [1],
            sampling_temperature=self.sampling_temperature,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            seed=seed,
        )


def checkpoint_curve(
    phase_dirs: Sequence[Path],
    arch: Any,
    tokenizer: Any,
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    section: ReasoningEvalSection,
    *,
    sequences_per_step: int,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """pass@1 of every checkpoint the training phases kept, in training order, against the
    training sequences and tokens seen so far (a learning curve across phases).

    Args:
        phase_dirs: Phase folders (``checkpoints/step-N/model.safetensors``, ``summary.json``)
            in the order they trained; a later phase continues the earlier one's steps.
        arch: A model of the trained architecture; each checkpoint is loaded into a copy.
        tokenizer: The run's tokenizer.
        splits: Problems to score, by split name.
        section: The evaluation settings (``curve_samples`` samples per problem).
        sequences_per_step: Training sequences per optimiser step (the global batch).
        seed: The sampling seed.

    Returns:
        One dict per checkpoint: ``step``, ``examples``, ``tokens`` (from each phase's mean
        tokens per step in ``summary.json``) and ``<split>/pass@1``.
    """
    from safetensors.torch import load_file

    points: list[dict[str, Any]] = []
    offset, tokens_before = 0, 0.0
    for folder in phase_dirs:
        summary_file = Path(folder) / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        steps = sorted(
            int(p.name.split("-")[1]) for p in (Path(folder) / "checkpoints").glob("step-*")
        )
        per_step = float(summary.get("tokens", 0.0)) / max(float(summary.get("steps", 1)), 1.0)
        for step in steps:
            model = copy.deepcopy(arch)
            model.load_state_dict(
                load_file(str(Path(folder) / "checkpoints" / f"step-{step}" / "model.safetensors"))
            )
            point: dict[str, Any] = {
                "step": offset + step,
                "examples": (offset + step) * sequences_per_step,
                "tokens": tokens_before + step * per_step,
            }
            for split, records in splits.items():
                scores = section.score(
                    model, tokenizer, records, samples=section.curve_samples, seed=seed
                )
                point[f"{split}/pass@1"] = scores.pass_at[1]
            points.append(point)
        offset += int(summary.get("steps", steps[-1] if steps else 0))
        tokens_before += float(summary.get("tokens", 0.0))
    return points
