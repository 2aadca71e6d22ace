"""``distil speculate``: evaluate a draft model for speculative decoding with a target.

For every sampling temperature asked for (0 = greedy) the target first continues the prompts
alone (the reference text and the baseline time); then α is computed exactly on that text, and
distil's batched speculative decoding runs at every γ, giving τ measured, τ predicted from α,
the lossless check (greedy: token-identical rows; sampling: a chi-square test of the first
token against the target's exact distribution) and acceptance by position within a block.
The draft/target cost ratio and the verification cost are measured on this machine, and the
wall-clock speed-up at batch 1. The result is a report (``report.json/.md/.html``) whose
``speculative`` part :mod:`distil.evaluation.report` renders. Definitions:
:mod:`distil.evaluation.speculative` and ``docs/speculative.md``.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from distil.config.base import StrictModel
from distil.decoding.speculative import autoregressive_generate, speculative_generate
from distil.errors import DistilError
from distil.evaluation.report import make_table
from distil.evaluation.speculative import (
    acceptance_by_position,
    block_summary,
    greedy_target_calls,
    held_out_prompts,
    lowest_acceptance_tokens,
    modelled_speedup,
    per_row,
    predicted_block_efficiency,
    predicted_from_positions,
    run_in_batches,
    step_costs,
    target_alone_in_batches,
    token_acceptance,
)

logger = logging.getLogger(__name__)


class SpeculateConfig(StrictModel):
    """What ``distil speculate TARGET DRAFT`` measures (its options, validated in one place)."""

    command: Literal["speculate"] = "speculate"
    target: str = Field(description="HF causal-LM folder with its tokenizer")
    draft: str = Field(description="HF causal-LM folder, same tokenizer")
    output: str = Field(default="runs/speculate", description="report folder")
    gammas: list[int] = Field(default=[1, 2, 4, 8], description="draft tokens per round")
    sampling_temperatures: list[float] = Field(default=[0.0, 1.0], description="0 = greedy")
    prompts_file: str | None = Field(
        default=None, description="JSONL with a `prompt` a line; else held-out corpus windows"
    )
    prompts: int = Field(default=64, ge=1, description="prompts evaluated")
    prompt_tokens: int = Field(default=64, ge=1, description="corpus windows: tokens a prompt")
    max_new_tokens: int = Field(default=64, ge=1)
    batch_size: int = Field(default=16, ge=1, description="rows decoded together")
    speed_gamma: int = Field(default=4, ge=1, description="γ of the wall-clock comparison")
    speed_prompts: int = Field(default=8, ge=0, description="batch-1 wall-clock runs; 0 = skip")
    check_samples: int = Field(
        default=1000, ge=0, description="first-token samples of the sampled lossless check"
    )
    seed: int = 0
    cpu_threads: int = Field(default=1, ge=1)
    trust_remote_code: bool = False

    @field_validator("gammas")
    @classmethod
    def _gammas(cls, value: list[int]) -> list[int]:
        if not value or any(g < 1 for g in value):
            raise ValueError(f"give at least one γ, each >= 1 (got {value})")
        return sorted(set(value))

    @field_validator("sampling_temperatures")
    @classmethod
    def _temperatures(cls, value: list[float]) -> list[float]:
        if not value or any(not (t >= 0 and math.isfinite(t)) for t in value):
            raise ValueError(f"give at least one temperature, each finite and >= 0 (got {value})")
        return sorted(set(value))


def mode_name(sampling_temperature: float) -> str:
    """``greedy`` or ``T=1`` (the label of a decoding mode in tables)."""
    return "greedy" if sampling_temperature == 0 else f"T={sampling_temperature:g}"


def _eos_ids(tokenizer: Any, model: Any) -> list[int]:
    found = getattr(model.generation_config, "eos_token_id", None)
    ids = {tokenizer.eos_token_id, *(found if isinstance(found, list) else [found])} - {None}
    return sorted(int(i) for i in ids)


def _prompts(cfg: SpeculateConfig, tokenizer: Any) -> list[list[int]]:
    if cfg.prompts_file is None:
        return held_out_prompts(tokenizer, cfg.prompts, cfg.prompt_tokens)
    from distil.config.sources import FileData
    from distil.data.prompts import PromptsSection, load_prompts

    section = PromptsSection(source=FileData(train=[cfg.prompts_file]), limit=cfg.prompts)
    prompts = load_prompts(section, tokenizer)
    encoded = tokenizer([p.text for p in prompts], add_special_tokens=True)["input_ids"]
    empty = [p.id for p, ids in zip(prompts, encoded, strict=True) if not ids]
    if empty:
        raise DistilError(f"prompt(s) {empty[:5]} of {cfg.prompts_file} tokenize to no token")
    return [list(ids) for ids in encoded]


@torch.no_grad()
def first_token_check(
    target: Any,
    draft: Any,
    prompt: list[int],
    *,
    samples: int,
    sampling_temperature: float,
    vocab_size: int,
    seed: int,
) -> dict[str, Any]:
    """Chi-square test of speculative sampling's first token against the target's exact
    next-token distribution at one prompt (``samples`` rows of the same prompt, two new tokens
    so the first comes from the draft/accept/resample path). Cells expected below 5 are pooled.

    Returns:
        ``chi2``, ``dof``, ``p_value``, ``samples``, ``acceptance`` (first-position acceptance
        measured, next to its exact value ``alpha``).
    """
    device = next(target.parameters()).device
    logits = target(input_ids=torch.tensor([prompt], device=device)).logits[0, -1, :vocab_size]
    p = torch.softmax(logits.double() / sampling_temperature, -1).cpu()  # (V,)
    q_logits = draft(input_ids=torch.tensor([prompt], device=device)).logits[0, -1, :vocab_size]
    q = torch.softmax(q_logits.double() / sampling_temperature, -1).cpu()
    result = speculative_generate(
        target,
        draft,
        [prompt] * samples,
        gamma=1,
        max_new_tokens=2,
        sampling_temperature=sampling_temperature,
        vocab_size=vocab_size,
        seed=seed,
    )
    counts = torch.bincount(
        torch.tensor([t[0] for t in result.tokens]), minlength=vocab_size
    ).double()
    expected = p * samples
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    dof = int(obs.numel()) - 1
    p_value = (
        float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(chi2 / 2)))
        if dof > 0
        else 1.0
    )
    first = result.block_accepted[:samples]  # round 1 of every row, in row order
    return {
        "chi2": chi2,
        "dof": dof,
        "p_value": p_value,
        "samples": samples,
        "acceptance": sum(first) / samples,
        "alpha": float(torch.minimum(p, q).sum()),
    }


def _speed(
    target: Any,
    draft: Any,
    prompts: list[list[int]],
    *,
    gamma: int,
    sampling_temperature: float,
    max_new_tokens: int,
    eos: list[int],
    vocab: int,
    seed: int,
) -> dict[str, Any]:
    """Wall-clock (and process CPU time) at batch 1, target alone and speculative interleaved
    prompt by prompt."""
    alone = spec = cpu_alone = cpu_spec = 0.0
    tokens_alone = tokens_spec = 0
    common: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "sampling_temperature": sampling_temperature,
        "eos_token_ids": eos,
        "vocab_size": vocab,
    }
    for i, prompt in enumerate(prompts):
        a = autoregressive_generate(target, [prompt], seed=seed + i, **common)
        s = speculative_generate(target, draft, [prompt], gamma=gamma, seed=seed + i, **common)
        alone += a.seconds
        spec += s.seconds
        cpu_alone += a.cpu_seconds
        cpu_spec += s.cpu_seconds
        tokens_alone += len(a.tokens[0])
        tokens_spec += len(s.tokens[0])
    return {
        "gamma": gamma,
        "prompts": len(prompts),
        "target_alone_s": alone,
        "speculative_s": spec,
        "target_alone_tokens_per_s": tokens_alone / alone,
        "speculative_tokens_per_s": tokens_spec / spec,
        # Throughputs, not times: rows may stop at EOS after different numbers of tokens.
        "measured_speedup": (tokens_spec / spec) / (tokens_alone / alone),
        # The same ratio in process CPU time: steadier than wall time on a loaded machine.
        "cpu_time_speedup": (tokens_spec / cpu_spec) / (tokens_alone / cpu_alone),
    }


TABLE_COLUMNS = [
    ("model", "mode / γ"),
    ("alpha", "α"),
    ("tau", "τ measured"),
    ("tau_predicted", "τ from α"),
    ("tau_positions", "τ from per-position α"),
    ("tau_ratio", "measured / predicted"),
    ("tokens_per_call", "tokens per target call"),
    ("acceptance", "acceptance measured"),
    ("target_calls", "target passes (all rows)"),
    ("speedup_model", "speed-up (model, v=1)"),
    ("speedup_cpu_model", "speed-up (model, this CPU)"),
    ("speedup_measured", "speed-up measured"),
    ("lossless", "lossless"),
]


def evaluate_draft(cfg: SpeculateConfig) -> dict[str, Any]:
    """Run every measurement of a ``distil speculate`` config; return the report dict.

    Raises:
        DistilError: If a folder, tokenizer or prompt set is missing or the tokenizers differ.
    """
    from distil.evaluation.cost import cpu_threads
    from distil.models.lm import load_causal_lm
    from distil.models.vocab import (
        check_same_tokenizer,
        load_tokenizer_folder,
        tokenizer_vocab_size,
    )

    tokenizer = load_tokenizer_folder(cfg.target, trust_remote_code=cfg.trust_remote_code)
    draft_dir = Path(cfg.draft)
    if (draft_dir / "tokenizer_config.json").is_file() or (draft_dir / "tokenizer.json").is_file():
        check_same_tokenizer(
            tokenizer, load_tokenizer_folder(draft_dir, trust_remote_code=cfg.trust_remote_code)
        )
    target = load_causal_lm(cfg.target, trust_remote_code=cfg.trust_remote_code).eval()
    draft = load_causal_lm(cfg.draft, trust_remote_code=cfg.trust_remote_code).eval()
    vocab, eos = tokenizer_vocab_size(tokenizer), _eos_ids(tokenizer, target)
    prompts = _prompts(cfg, tokenizer)
    part: dict[str, Any] = {
        "target": cfg.target,
        "draft": cfg.draft,
        "prompts": len(prompts),
        "max_new_tokens": cfg.max_new_tokens,
        "batch_size": cfg.batch_size,
        "gammas": cfg.gammas,
        "alpha": {},
        "by_position": {},
        "lowest": {},
        "lossless": {},
        "speed": {},
    }
    rows: list[dict[str, Any]] = []
    with cpu_threads(cfg.cpu_threads):
        context = max(len(p) for p in prompts) + cfg.max_new_tokens // 2
        costs = step_costs(target, draft, batch_size=1, context_tokens=context, gammas=cfg.gammas)
        part["costs"] = costs
        part["costs_batch"] = step_costs(
            target, draft, batch_size=cfg.batch_size, context_tokens=context, gammas=cfg.gammas
        )
        for temperature in cfg.sampling_temperatures:
            mode, greedy = mode_name(temperature), temperature == 0
            common = {
                "max_new_tokens": cfg.max_new_tokens,
                "sampling_temperature": temperature,
                "eos_token_ids": eos,
                "vocab_size": vocab,
                "seed": cfg.seed,
            }
            reference, _ = target_alone_in_batches(
                target, prompts, batch_size=cfg.batch_size, **common
            )
            acceptance = token_acceptance(
                target,
                draft,
                prompts,
                reference,
                vocab_size=vocab,
                sampling_temperature=temperature if temperature > 0 else 1.0,
                batch_size=cfg.batch_size,
            )
            alpha = float(acceptance.agree.double().mean() if greedy else acceptance.alpha.mean())
            part["alpha"][mode] = alpha
            part["lowest"][mode] = lowest_acceptance_tokens(acceptance, tokenizer, greedy=greedy)
            part["by_position"][mode] = {}
            alpha_rows = per_row(acceptance, greedy=greedy)
            speed = None
            if cfg.speed_prompts:
                speed = _speed(
                    target,
                    draft,
                    prompts[: cfg.speed_prompts],
                    gamma=cfg.speed_gamma,
                    sampling_temperature=temperature,
                    max_new_tokens=cfg.max_new_tokens,
                    eos=eos,
                    vocab=vocab,
                    seed=cfg.seed,
                )
                part["speed"][mode] = speed
            for gamma in cfg.gammas:
                result = run_in_batches(
                    target, draft, prompts, batch_size=cfg.batch_size, gamma=gamma, **common
                )
                summary = block_summary(result)
                predicted = predicted_block_efficiency(alpha, gamma)
                part["by_position"][mode][str(gamma)] = acceptance_by_position(result)
                row = {
                    "model": f"{mode} γ={gamma}",
                    "mode": mode,
                    "gamma": gamma,
                    "alpha": alpha,
                    **summary,
                    "tau_predicted": predicted,
                    "tau_positions": predicted_from_positions(alpha_rows, gamma)["tau"],
                    "tau_ratio": summary["tau"] / predicted if summary["tau"] else None,
                    "speedup_model": modelled_speedup(
                        summary["tau"] or 1.0, gamma, costs["cost_ratio"]
                    ),
                    "speedup_cpu_model": modelled_speedup(
                        summary["tau"] or 1.0,
                        gamma,
                        costs["cost_ratio"],
                        costs["verify_cost"][gamma],
                    ),
                    "speedup_measured": speed["measured_speedup"]
                    if speed and gamma == cfg.speed_gamma
                    else None,
                }
                if greedy:
                    same = sum(a == b for a, b in zip(result.tokens, reference, strict=True))
                    derived = _greedy_calls_check(acceptance, result, reference, gamma, eos)
                    row["lossless"] = f"{same}/{len(prompts)} identical"
                    part["lossless"][f"{mode} γ={gamma}"] = {
                        "identical_rows": same,
                        "rows": len(prompts),
                        **derived,
                    }
                rows.append(row)
            if not greedy and cfg.check_samples:
                check = first_token_check(
                    target,
                    draft,
                    prompts[0],
                    samples=cfg.check_samples,
                    sampling_temperature=temperature,
                    vocab_size=vocab,
                    seed=cfg.seed,
                )
                part["lossless"][mode] = check
                for row in rows:
                    if row["mode"] == mode:
                        row["lossless"] = f"χ² p={check['p_value']:.2g}"
    keys = [*(c for c, _ in TABLE_COLUMNS), "mode", "gamma"]  # mode and γ feed the plots
    part["table"] = make_table(TABLE_COLUMNS, [{k: r.get(k) for k in keys} for r in rows])
    return _report(cfg, part, rows)


def _greedy_calls_check(
    acceptance: Any, result: Any, reference: list[list[int]], gamma: int, eos: list[int]
) -> dict[str, Any]:
    """Target calls derived from the top-1 agreement sequence (:func:`greedy_target_calls`)
    against the rounds speculative decoding counted, over rows without EOS."""
    derived = counted = rows = 0
    per_row: dict[int, int] = {}
    for r in result.block_row:
        per_row[r] = per_row.get(r, 0) + 1
    for r, continuation in enumerate(reference):
        if any(t in eos for t in continuation):
            continue
        agree = acceptance.agree[acceptance.row == r].tolist()
        derived += greedy_target_calls(agree, gamma)[0]
        counted += per_row.get(r, 0)
        rows += 1
    return {"calls_from_alpha": derived, "calls_counted": counted, "rows_compared": rows}


def _report(
    cfg: SpeculateConfig, part: dict[str, Any], rows: list[dict[str, Any]]
) -> dict[str, Any]:
    costs = part["costs"]
    highlights: dict[str, Any] = {
        "draft / target step cost c (batch 1)": costs["cost_ratio"],
        f"verification cost v(γ={cfg.speed_gamma}) (batch 1)": costs["verify_cost"].get(
            cfg.speed_gamma
        ),
    }
    for mode, alpha in part["alpha"].items():
        highlights[f"α {mode}"] = alpha
        best = next((r for r in rows if r["mode"] == mode and r["gamma"] == cfg.speed_gamma), None)
        if best is not None:
            highlights[f"τ {mode} γ={cfg.speed_gamma} (measured / from α)"] = (
                f"{best['tau']:.3f} / {best['tau_predicted']:.3f}"
            )
        speed = part["speed"].get(mode)
        if speed:
            highlights[f"measured speed-up {mode} γ={cfg.speed_gamma} (batch 1)"] = speed[
                "measured_speedup"
            ]
    return {
        "title": f"speculative decoding: draft {Path(cfg.draft).name} for target {Path(cfg.target).name}",
        "recipe": "speculate",
        "table": part["table"],
        "highlights": highlights,
        "speculative": part,
        "details": {"load_average": list(os.getloadavg()), "cpu_threads": cfg.cpu_threads},
    }
