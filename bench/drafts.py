"""Benchmark (issue #17): draft models for speculative decoding, distilled or not, measured honestly.

DistillSpec's protocol on the built-in miniature: a small draft is first trained without the
target (plain next-token CE on the corpus), then trained further in five ways for the same
number of steps; every draft has the same shape (Llama 2 layers x 128, tied embeddings, 1.57M
parameters, 5.3x smaller than the 8.4M target) and the same tokenizer:

| draft | further training (same steps, same init) |
|---|---|
| ``no-target`` | CE on the corpus again: trained without the target, same compute |
| ``fkl-offpolicy`` | forward KL(target ‖ draft) on the corpus (the standard lm_kd) |
| ``tvd-onpolicy`` | TVD on the draft's own samples, scored by the target (``on_policy.fraction=1``) |
| ``jsd-onpolicy`` | generalized JSD (β = 0.5) on the draft's own samples |
| ``seqkd`` | CE on the target's own T = 1 samples (``distil generate``, then ``kd_weight=0``) |
| ``seqkd-greedy`` | CE on the target's own greedy text (the data matched to greedy decoding) |

plus ``pretrained`` (the shared starting point, fewer steps). Training is ``distil run lm_kd``
through the CLI (no training loop here)::

    nice -n 5 env OMP_NUM_THREADS=1 \\
        python bench/drafts.py train --target TARGET_FOLDER --work WORK_DIR

Evaluation (``distil.evaluation.speculative``): exact α on the target's own continuations of
held-out prompts (greedy: top-1 agreement; T = 1: ``Σ min(p, q)``), τ measured with distil's
batched speculative decoding at γ = 4 (and γ ∈ {1, 2, 4, 8} for two drafts), τ predicted from α,
tokens per target call, the lossless check (greedy output token-identical to the target's),
c and the verification cost measured here, the speed-up modelled for hardware where verifying
γ + 1 tokens costs one step, the same model with this CPU's costs, and the measured wall-clock
speed-up at batch 1::

    python bench/drafts.py eval --target TARGET_FOLDER --work WORK_DIR

Writes ``bench/results/drafts.jsonl`` and ``bench/results/drafts.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
PRETRAIN_STEPS, FURTHER_STEPS, BATCH, SEQ = 150, 100, 8, 256
ON_POLICY = ["on_policy.fraction=1.0", "on_policy.max_new_tokens=64", "on_policy.prompt_tokens=64"]
DRAFTS: dict[str, list[str]] = {
    "no-target": ["kd.kd_weight=0"],
    "fkl-offpolicy": ["kd.kd_weight=1.0", "kd.divergence=forward_kl"],
    "tvd-onpolicy": ["kd.kd_weight=1.0", "kd.divergence=total_variation", *ON_POLICY],
    "jsd-onpolicy": [
        "kd.kd_weight=1.0",
        "kd.divergence=generalized_jsd",
        "kd.divergence_params={beta: 0.5}",
        *ON_POLICY,
    ],
    "seqkd": ["kd.kd_weight=0", "data.format=prompt_completion"],
    "seqkd-greedy": ["kd.kd_weight=0", "data.format=prompt_completion"],
}
GENERATED_PROMPTS = 1024
# the target's own text, sampled at T = 1 or greedy (DistillSpec: match the decoding mode)
GENERATED = {"seqkd": ("generated", 1.0), "seqkd-greedy": ("generated-greedy", 0.0)}


def _common(target: Path, steps: int) -> list[str]:
    return [
        f"teacher.model={{hf: {target}}}",
        "run.log_with=[]",
        "run.cpu_threads=1",
        f"train.max_steps={steps}",
        f"train.batch_size={BATCH}",
        f"data.max_length={SEQ}",
        "train.checkpoint_every=50",
        "eval.baseline=false",
        "eval.generation.prompts=0",
        "data.eval_limit=32",
    ]


def _run(args: list[str], log: Path) -> float:
    """Run one ``python -m distil`` command, its output appended to ``log``; return seconds."""
    start = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n$ python -m distil {' '.join(args)}\n")
        out.flush()
        subprocess.run(
            [sys.executable, "-m", "distil", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
        )
    return time.perf_counter() - start


def train(target: Path, work: Path) -> None:
    """Train every draft with the CLI; a draft whose ``student/final`` exists is skipped."""
    work.mkdir(parents=True, exist_ok=True)
    log = work / "train.log"
    timings: dict[str, Any] = {}
    pre = work / "pretrained"
    if not (pre / "student" / "final").is_dir():
        load = os.getloadavg()
        # the shipped lm_kd student: Llama 2 x 128, 2 heads, MLP 512, tied embeddings
        args = ["run", "lm_kd", *_common(target, PRETRAIN_STEPS), "kd.kd_weight=0"]
        args += ["--run-dir", str(pre)]
        timings["pretrained"] = {"seconds": _run(args, log), "load_before": load}
    for folder, temperature in GENERATED.values():
        generated = work / folder
        if (generated / "manifest.json").is_file():
            continue
        load = os.getloadavg()
        args = [
            "generate",
            f"teacher.model={{hf: {target}}}",
            f"output={generated}",
            f"generation.sampling_temperature={temperature}",
            "generation.max_new_tokens=64",
            f"prompts.limit={GENERATED_PROMPTS}",
        ]
        timings[folder] = {"seconds": _run(args, log), "load_before": load}
    for name, extra in DRAFTS.items():
        run_dir = work / name
        if (run_dir / "student" / "final").is_dir():
            continue
        load = os.getloadavg()
        args = ["run", "lm_kd", *_common(target, FURTHER_STEPS)]
        args += [f"student.model={{hf: {pre / 'student' / 'final'}}}", *extra]
        if name in GENERATED:
            args += [f"data.source={{train: [{work / GENERATED[name][0]}]}}"]
        timings[name] = {
            "seconds": _run([*args, "--run-dir", str(run_dir)], log),
            "load_before": load,
        }
    with (work / "train_timings.jsonl").open("a") as out:
        out.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), **timings}) + "\n")


EVAL_PROMPTS, PROMPT_TOKENS, NEW_TOKENS, EVAL_BATCH = 64, 64, 64, 16
GAMMA, SWEEP, SPEED_PROMPTS, CHECK_SAMPLES = 4, (1, 2, 4, 8), 8, 1000
MODES = (0.0, 1.0)


def _held_out(target: Any, draft: Any, windows: list[list[int]], vocab: int) -> dict[str, float]:
    """The draft's perplexity and KL(target ‖ draft) on the same held-out corpus windows."""
    import math

    import torch
    import torch.nn.functional as F

    from distil.losses.divergences import forward_kl

    ids = torch.tensor(windows)  # (N, T)
    with torch.no_grad():
        d = draft(input_ids=ids).logits[:, :-1, :vocab].float()
        t = target(input_ids=ids).logits[:, :-1, :vocab].float()
    ce = float(F.cross_entropy(d.reshape(-1, vocab), ids[:, 1:].reshape(-1)))
    return {"perplexity": math.exp(ce), "kl_teacher_student": float(forward_kl(d, t))}


def evaluate(
    target_dir: Path, work: Path, out_dir: Path, only: list[str] | None = None
) -> list[dict[str, Any]]:
    """Measure every draft (or those in ``only``) with distil's speculative decoding against the
    same references (the target's seeded continuations: the same in every call)."""
    import torch

    from distil.evaluation.drafts import _eos_ids, _speed, first_token_check, mode_name
    from distil.evaluation.speculative import (
        acceptance_by_position,
        block_summary,
        held_out_prompts,
        modelled_speedup,
        per_row,
        predicted_block_efficiency,
        predicted_from_positions,
        run_in_batches,
        step_costs,
        target_alone_in_batches,
        token_acceptance,
    )
    from distil.models.lm import load_causal_lm
    from distil.models.vocab import load_tokenizer_folder, tokenizer_vocab_size

    torch.set_num_threads(1)
    tok = load_tokenizer_folder(target_dir)
    target = load_causal_lm(target_dir).eval()
    vocab, eos = tokenizer_vocab_size(tok), _eos_ids(tok, target)
    prompts = held_out_prompts(tok, EVAL_PROMPTS, PROMPT_TOKENS)
    windows = held_out_prompts(tok, 32, SEQ)
    drafts = {"pretrained": work / "pretrained"} | {name: work / name for name in DRAFTS}
    drafts = {k: v for k, v in drafts.items() if only is None or k in only}
    references = {}
    for temp in MODES:
        common = {"max_new_tokens": NEW_TOKENS, "sampling_temperature": temp}
        common |= {"eos_token_ids": eos, "vocab_size": vocab, "seed": 0}
        references[temp] = target_alone_in_batches(target, prompts, batch_size=EVAL_BATCH, **common)
    rows: list[dict[str, Any]] = []
    jsonl = out_dir / "drafts.jsonl"
    for name, run_dir in drafts.items():
        draft = load_causal_lm(run_dir / "student" / "final").eval()
        quality = _held_out(target, draft, windows, vocab)
        costs = step_costs(
            target,
            draft,
            batch_size=1,
            context_tokens=PROMPT_TOKENS + NEW_TOKENS // 2,
            gammas=SWEEP,
            repeats=30,
        )
        for temp in MODES:
            mode, greedy = mode_name(temp), temp == 0
            reference, _ = references[temp]
            common = {"max_new_tokens": NEW_TOKENS, "sampling_temperature": temp}
            common |= {"eos_token_ids": eos, "vocab_size": vocab, "seed": 0}
            acc = token_acceptance(
                target,
                draft,
                prompts,
                reference,
                vocab_size=vocab,
                sampling_temperature=temp or 1.0,
            )
            alpha = float(acc.agree.double().mean() if greedy else acc.alpha.mean())
            alpha_rows = per_row(acc, greedy=greedy)
            speed = _speed(
                target,
                draft,
                prompts[:SPEED_PROMPTS],
                gamma=GAMMA,
                sampling_temperature=temp,
                max_new_tokens=NEW_TOKENS,
                eos=eos,
                vocab=vocab,
                seed=0,
            )
            gammas = SWEEP if name in ("no-target", "tvd-onpolicy", "fkl-offpolicy") else (GAMMA,)
            for gamma in gammas:
                result = run_in_batches(
                    target, draft, prompts, batch_size=EVAL_BATCH, gamma=gamma, **common
                )
                summary = block_summary(result)
                tau = summary["tau"]
                row = {
                    "draft": name,
                    "mode": mode,
                    "gamma": gamma,
                    "alpha": alpha,
                    "alpha_t1": float(acc.alpha.mean()),
                    **summary,
                    "tau_predicted": predicted_block_efficiency(alpha, gamma),
                    "tau_positions": predicted_from_positions(alpha_rows, gamma)["tau"],
                    "cost_ratio": costs["cost_ratio"],
                    "verify_cost": costs["verify_cost"][gamma],
                    "target_step_ms": costs["target_step_ms"],
                    "speedup_model": modelled_speedup(tau, gamma, costs["cost_ratio"]),
                    "speedup_cpu_model": modelled_speedup(
                        tau, gamma, costs["cost_ratio"], costs["verify_cost"][gamma]
                    ),
                    "by_position": acceptance_by_position(result),
                    "load": list(os.getloadavg()),
                    "cpu_s": time.process_time(),
                    **quality,
                }
                if gamma == GAMMA:
                    row["speed"] = speed
                    row["speedup_measured"] = speed["measured_speedup"]
                if greedy:
                    same = sum(a == b for a, b in zip(result.tokens, reference, strict=True))
                    row["lossless"] = f"{same}/{len(prompts)} identical"
                elif gamma == GAMMA:
                    check = first_token_check(
                        target,
                        draft,
                        prompts[0],
                        samples=CHECK_SAMPLES,
                        sampling_temperature=temp,
                        vocab_size=vocab,
                        seed=0,
                    )
                    row["lossless"] = f"first token chi2 p={check['p_value']:.2f}"
                    row["first_token_check"] = check
                rows.append(row)
                with jsonl.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps({k: row[k] for k in ("draft", "mode", "gamma", "alpha", "tau")}))
    return rows


def larger_target_costs(target_dir: Path, work: Path) -> dict[str, Any]:
    """c and v(γ) of the built-in target and of an 8 x 512 Llama (42M parameters, random weights:
    the cost of a forward pass does not depend on them) against the same draft, measured
    interleaved: whether pre-training the larger target would show more on this CPU."""
    import torch

    from distil.evaluation.speculative import step_costs
    from distil.models.lm import CausalLMSpec, build_causal_lm, load_causal_lm

    torch.set_num_threads(1)
    draft = load_causal_lm(work / "no-target" / "student" / "final").eval()
    big = build_causal_lm(
        CausalLMSpec(
            num_layers=8,
            hidden_size=512,
            num_heads=8,
            intermediate_size=2048,
            vocab_size=int(draft.config.vocab_size),
            max_context=256,
        ),
        seed=0,
    ).eval()
    context = PROMPT_TOKENS + NEW_TOKENS // 2
    out = {}
    builtin = load_causal_lm(target_dir).eval()
    for name, target in (("built-in 4x256 (8.4M)", builtin), ("8x512 (42M)", big)):
        costs = step_costs(
            target, draft, batch_size=1, context_tokens=context, gammas=[GAMMA], repeats=30
        )
        out[name] = {k: costs[k] for k in ("target_step_ms", "draft_step_ms", "cost_ratio")}
        out[name]["verify_cost"] = costs["verify_cost"][GAMMA]
    return out


def write_markdown(
    rows: list[dict[str, Any]], work: Path, out: Path, larger: dict[str, Any]
) -> None:
    """The results table, the γ sweep, the goals and how the drafts were trained.

    Every draft has the same architecture, so c and v(γ) are one number each: the median of the
    per-draft measurements (their spread is the load's noise, shown) feeds the modelled speed-ups.
    """
    import statistics

    from distil.evaluation.speculative import modelled_speedup

    def f(v: Any, digits: int = 3) -> str:
        return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    main = [r for r in rows if r["gamma"] == GAMMA]
    per_draft_c = {r["draft"]: r["cost_ratio"] for r in main}
    c = statistics.median(per_draft_c.values())
    v = {
        g: statistics.median([r["verify_cost"] for r in rows if r["gamma"] == g] or [math.nan])
        for g in SWEEP
    }
    step = statistics.median(r["target_step_ms"] for r in main)
    lines = [
        "# Draft models for speculative decoding (issue #17)",
        "",
        "Target: the built-in `lm_pretrain` teacher (Llama 4 x 256, 8.39M parameters). Every draft:",
        "Llama 2 x 128, tied embeddings, 1.57M parameters, same tokenizer. Generated by",
        "`bench/drafts.py`; definitions in `docs/speculative.md`. α is exact on the target's own",
        "continuations; τ and the lossless checks come from distil's batched speculative decoding.",
        "",
        f"Costs at batch 1 (one thread, {PROMPT_TOKENS + NEW_TOKENS // 2} cached tokens): target step "
        f"{step:.2f} ms; c = draft / target step = {c:.3f} (median over the drafts, which share one "
        f"architecture; per draft {min(per_draft_c.values()):.3f}-{max(per_draft_c.values()):.3f}, "
        "the load's noise); v(γ) = target on γ + 1 tokens / on 1 = "
        + ", ".join(f"{x:.2f} (γ={g})" for g, x in v.items())
        + ". Speed-up (model, v=1) = τ / (γ·c + 1) is a model for hardware where verifying γ + 1 "
        "tokens costs one step; (model, this CPU) = τ / (γ·c + v(γ)); measured = tokens/s of "
        f"speculative over target-alone decoding at batch 1, {SPEED_PROMPTS} prompts interleaved, "
        "in wall time and in process CPU time.",
        "",
        f"## γ = {GAMMA}, {EVAL_PROMPTS} held-out prompts x {NEW_TOKENS} new tokens, batch {EVAL_BATCH}",
        "",
        "| draft | mode | α | τ measured | τ from α | measured / from α | τ from per-position α "
        "| tokens per target call | speed-up model (v=1) | speed-up model (this CPU) "
        "| speed-up measured (wall / CPU time) | lossless | held-out ppl | KL(target‖draft) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in main:
        lines.append(
            f"| {r['draft']} | {r['mode']} | {f(r['alpha'])} | {f(r['tau'])} | {f(r['tau_predicted'])} "
            f"| {f(r['tau'] / r['tau_predicted'])} | {f(r['tau_positions'])} "
            f"| {f(r['tokens_per_call'])} | {f(modelled_speedup(r['tau'], GAMMA, c), 2)} "
            f"| {f(modelled_speedup(r['tau'], GAMMA, c, v[GAMMA]), 2)} "
            f"| {f(r.get('speedup_measured'), 2)} / {f(r['speed']['cpu_time_speedup'], 2)} "
            f"| {r.get('lossless', '-')} | {f(r.get('perplexity'), 1)} | {f(r.get('kl_teacher_student'))} |"
        )
    lines += ["", "## Goals", ""]
    for mode in ("greedy", "T=1"):
        tau = {r["draft"]: r["tau"] for r in main if r["mode"] == mode}
        distilled = {k: x for k, x in tau.items() if k not in ("no-target", "pretrained")}
        if not distilled or "no-target" not in tau:
            continue
        best = max(distilled, key=lambda k: distilled[k])
        lines.append(
            f"- {mode}: best distilled draft `{best}` τ = {tau[best]:.3f}: "
            f"{tau[best] / tau['no-target']:.3f}x the no-target draft's (goal ≥ 1.25), "
            f"{tau[best] / tau['fkl-offpolicy']:.3f}x the off-policy FKL draft's (goal ≥ 1.1)"
        )
    for mode in ("greedy", "T=1"):
        mine = [r for r in rows if r["mode"] == mode]
        iid = max(abs(r["tau"] / r["tau_predicted"] - 1) for r in mine)
        pos = max(abs(r["tau"] / r["tau_positions"] - 1) for r in mine)
        lines.append(
            f"- {mode}, every draft and γ: largest |measured / from α − 1| = {100 * iid:.1f} %; "
            f"largest |measured / from per-position α − 1| = {100 * pos:.1f} % (goal ≤ 3 %)"
        )
    lines += [
        "",
        "## τ by γ",
        "",
        "| draft | mode | " + " | ".join(f"γ={g} measured / from α" for g in SWEEP) + " |",
    ]
    lines.append("|---|---|" + "---:|" * len(SWEEP))
    for name in dict.fromkeys(r["draft"] for r in rows if r["gamma"] != GAMMA):
        for mode in ("greedy", "T=1"):
            cells = []
            for g in SWEEP:
                r = next(
                    (x for x in rows if (x["draft"], x["mode"], x["gamma"]) == (name, mode, g)),
                    None,
                )
                cells.append("-" if r is None else f"{r['tau']:.3f} / {r['tau_predicted']:.3f}")
            lines.append(f"| {name} | {mode} | " + " | ".join(cells) + " |")
    lines += ["", "## Acceptance by position within a round (γ = 4)", ""]
    lines += ["| draft | mode | α | j=1 | j=2 | j=3 | j=4 |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in main:
        lines.append(
            f"| {r['draft']} | {r['mode']} | {f(r['alpha'])} | "
            + " | ".join(f(v) for v in r["by_position"])
            + " |"
        )
    lines += [
        "",
        "## A larger target?",
        "",
        f"Costs at batch 1, {PROMPT_TOKENS + NEW_TOKENS // 2} cached tokens, the no-target draft, "
        f"γ = {GAMMA} (an 8 x 512 target has random weights: a forward pass costs the same):",
        "",
        "| target | target step ms | draft step ms | c | v(γ) | speed-up at τ = 3 (model, this CPU) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, c in larger.items():
        model = 3.0 / (GAMMA * c["cost_ratio"] + c["verify_cost"])
        lines.append(
            f"| {name} | {c['target_step_ms']:.2f} | {c['draft_step_ms']:.2f} | "
            f"{c['cost_ratio']:.3f} | {c['verify_cost']:.2f} | {model:.2f} |"
        )
    timings = work / "train_timings.jsonl"
    if timings.is_file():
        lines += [
            "",
            "## Training (`distil run lm_kd`, heavy jobs under the lock, one thread)",
            "",
            "```",
        ]
        lines += timings.read_text().splitlines()
        lines += ["```"]
    (out / "drafts.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    global EVAL_PROMPTS, PROMPT_TOKENS, NEW_TOKENS, SEQ  # a smoke run on a tiny model shrinks them
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["train", "eval", "all", "report"])
    parser.add_argument("--target", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument("--prompts", type=int, default=EVAL_PROMPTS)
    parser.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--windows", type=int, default=SEQ, help="held-out window length")
    parser.add_argument("--only", nargs="*", help="eval: these drafts, appended to drafts.jsonl")
    args = parser.parse_args()
    EVAL_PROMPTS, PROMPT_TOKENS, NEW_TOKENS = args.prompts, args.prompt_tokens, args.new_tokens
    SEQ = args.windows
    if args.phase in ("train", "all"):
        train(args.target, args.work)
    if args.phase in ("eval", "all"):
        args.out.mkdir(parents=True, exist_ok=True)
        if args.only:
            evaluate(args.target, args.work, args.out, args.only)
        else:
            (args.out / "drafts.jsonl").unlink(missing_ok=True)
            evaluate(args.target, args.work, args.out)
            larger = larger_target_costs(args.target, args.work)
            with (args.out / "drafts.jsonl").open("a") as f:
                f.write(json.dumps({"larger_target_costs": larger, "load": os.getloadavg()}) + "\n")
        args.phase = "report"
    if args.phase == "report":  # the Markdown from drafts.jsonl
        lines = [json.loads(x) for x in (args.out / "drafts.jsonl").read_text().splitlines()]
        larger = next(x["larger_target_costs"] for x in lines if "larger_target_costs" in x)
        write_markdown([x for x in lines if "draft" in x], args.work, args.out, larger)
    print(json.dumps({"phase": args.phase, "platform": platform.platform()}))


if __name__ == "__main__":
    main()
