"""Benchmark (issue #7): on-policy distillation, distil ``lm_kd`` vs TRL's GKDTrainer at λ ∈ {0, 0.5, 1}.

Same teacher, same student initialisation, same prompt/completion pairs in the same order, same
step budget, optimiser and schedule, same objective (generalized JSD, β = 0.5, on the completion
tokens; no hard term), same sampling (temperature 1, top-p 1, no top-k, the same number of new
tokens). Each (tool, λ) run is a fresh process; tools are interleaved per λ.

    python bench/on_policy.py --teacher runs/lm-teacher --steps 24 --threads 2

Measured per run: wall time per step, split into generation (the student sampling completions)
and training (teacher + student forward, backward, optimiser); peak resident set during the loop;
afterwards, every student's held-out KL(teacher ‖ student) and perplexity with the same code
(``distil.evaluation.lm.held_out_metrics``, via ``bench/lm_kd.py``'s ``evaluate``) on the same
held-out blocks. Writes ``bench/results/on_policy.jsonl`` and ``bench/results/on_policy.md``.

The TRL run needs ``bench/.venv-peers`` (see ``bench/lm_kd.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lm_kd import PEERS_PY, ROOT, STUDENT, _OneProcess, _peak_mb, _reset_peak, evaluate

BENCH = Path(__file__).resolve().parent
PROMPT, COMPLETION, BATCH, LR, SEED, BETA = 64, 64, 8, 1e-3, 0, 0.5
STEPS, NEW_TOKENS = 24, 64
MAX_LENGTH = PROMPT + COMPLETION + 1  # distil appends EOS to every completion
FRACTIONS = (0.0, 0.5, 1.0)


def _rel(path: Path) -> str:
    """A path as the results show it: relative to the repository when it lies inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def prepare(work: Path, teacher: Path) -> None:
    """Student init, the prompt/completion pairs both tools read, distil's order of them, held-out blocks.

    Pairs are cut from the built-in stdlib corpus (packed into blocks of PROMPT + COMPLETION
    tokens): the first PROMPT tokens are the prompt, the rest the completion. Only blocks whose
    decoded halves re-tokenize to exactly the same ids (and hold no EOS) are kept, so the text
    in the JSONL is the token sequence, whichever tool tokenizes it.
    """
    from distil.config.lm import LMDataSection
    from distil.config.sources import LMSpec
    from distil.data.lm import load_lm_data
    from distil.models.lm import build_from_spec, save_model_folder
    from distil.models.vocab import load_tokenizer_folder
    from distil.training.batches import global_batches
    from distil.training.loop import PHASE_STREAMS

    work.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer_folder(teacher)
    student = build_from_spec(LMSpec(**STUDENT), tok, seed=SEED)
    save_model_folder(student, work / "student-init", tokenizer=tok, overwrite=True)
    packed = load_lm_data(
        LMDataSection(
            source={"builtin": "stdlib"}, max_length=PROMPT + COMPLETION, eval_limit=None
        ),
        tok,
        work / "packed",
        _OneProcess(),
    )

    def pairs(blocks: Any, limit: int) -> list[dict[str, str]]:
        out = []
        for row in blocks:
            ids = list(row["input_ids"])
            if len(ids) != PROMPT + COMPLETION or tok.eos_token_id in ids:
                continue
            prompt, completion = tok.decode(ids[:PROMPT]), tok.decode(ids[PROMPT:])
            if (
                tok(prompt, add_special_tokens=True)["input_ids"] == ids[:PROMPT]
                and tok(completion, add_special_tokens=False)["input_ids"] == ids[PROMPT:]
            ):
                out.append({"prompt": prompt, "completion": completion})
            if len(out) == limit:
                break
        if len(out) < limit:
            raise RuntimeError(f"only {len(out)} clean prompt/completion pairs, {limit} needed")
        return out

    n_train = STEPS * BATCH  # exactly one epoch: every pair is seen once
    rng = np.random.default_rng(SEED)
    train_rows = packed.train.select(rng.permutation(len(packed.train))[: 4 * n_train].tolist())
    for name, rows in (
        ("train.jsonl", pairs(train_rows, n_train)),
        ("eval.jsonl", pairs(packed.eval, 64)),
    ):
        with (work / name).open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    # held-out blocks for every student's KL and perplexity: the 64 held-out pairs, joined
    eval_rows = [json.loads(line) for line in (work / "eval.jsonl").read_text().splitlines()]
    blocks = [tok(r["prompt"] + r["completion"])["input_ids"] for r in eval_rows]
    np.save(work / "eval_tokens.npy", np.asarray(blocks, dtype=np.int64))
    # distil's own tokenization of the pairs and the order its loop consumes them: TRL gets these ids
    data = load_lm_data(_data_section(work), tok, work, _OneProcess())
    order = global_batches(  # the order lm_kd's student phase draws
        len(data.train),
        global_batch_size=BATCH,
        seed=SEED + PHASE_STREAMS["student"],
        epoch=0,
        drop_last=True,
    )[:STEPS]
    idx = torch.cat(order).tolist()
    rows = data.train[idx]
    with (work / "trl_rows.jsonl").open("w", encoding="utf-8") as f:
        for ids, labels in zip(rows["input_ids"], rows["labels"], strict=True):
            mask = [int(lab != -100) for lab in labels]
            prompt = tok.decode(ids[: mask.index(1)])
            f.write(
                json.dumps({"prompt": prompt, "input_ids": ids, "completion_mask": mask}) + "\n"
            )


def _data_section(work: Path) -> Any:
    from distil.config.lm import LMDataSection

    return LMDataSection(
        source={"train": [str(work / "train.jsonl")], "eval": [str(work / "eval.jsonl")]},
        format="prompt_completion",
        max_length=MAX_LENGTH,
    )


def run_distil(work: Path, teacher: Path, out: Path, fraction: float) -> dict[str, Any]:
    """``distil run lm_kd`` through its CLI on the pairs (prompt_completion format)."""
    overrides = [
        f"teacher.model={{hf: {teacher}}}",
        f"student.model={{hf: {work / 'student-init'}}}",
        f"data.source={{train: [{work / 'train.jsonl'}], eval: [{work / 'eval.jsonl'}]}}",
        "data.format=prompt_completion",
        f"data.max_length={MAX_LENGTH}",
        f"train.max_steps={STEPS}",
        f"train.batch_size={BATCH}",
        f"train.lr={LR}",
        "train.scheduler=linear",
        "train.warmup_steps=0",
        "train.max_grad_norm=1.0",
        "train.checkpoint_every=100000",
        "kd.kd_weight=1.0",
        "kd.kd_temperature=1.0",
        "kd.divergence=generalized_jsd",
        f"kd.divergence_params={{beta: {BETA}}}",
        f"on_policy.fraction={fraction}",
        "on_policy.sampling_temperature=1.0",
        "on_policy.top_p=1.0",
        f"on_policy.max_new_tokens={NEW_TOKENS}",
        "eval.baseline=false",
        "eval.generation.prompts=0",
        "run.log_with=[]",
        f"seed={SEED}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "distil", "run", "lm_kd", *overrides, "--run-dir", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    summary = json.loads((out / "student" / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("phase") == "student" and "kd/raw" in r]
    times = [r["time_s"] for r in steps]
    return {
        "wall_s": summary["train_wall_s"],
        "gen_s": [r.get("gen_s", 0.0) for r in steps],
        # per-step wall from the log's clock (the same for every λ; the first entry includes the loop's start)
        "step_s": [b - a for a, b in zip([0.0, *times[:-1]], times, strict=True)],
        "on_policy": [int(r.get("on_policy", 0)) for r in steps],
        "peak_train_mb": summary.get("peak_cuda_mb", summary["peak_rss_mb"]),
        "losses": [r["kd/raw"] for r in steps],
        "threads": json.loads((out / "env.json").read_text())["torch_threads"],
        "student_dir": out / "student" / "final",
    }


def run_trl(work: Path, teacher_dir: Path, out: Path, fraction: float) -> dict[str, Any]:
    """TRL 1.16 GKDTrainer with its own collator (DataCollatorForChatML) on distil's token ids.

    Timing: ``generate_on_policy_outputs`` (TRL's whole sampling call: ``model.generate`` plus
    the masks) is wrapped with a clock; a callback times every optimiser step from
    ``on_step_begin`` to ``on_step_end``. The on/off-policy choice of each step is forced to
    distil's (``is_on_policy_step``; TRL draws ``random.random() <= lmbda``), so both tools
    sample on the same steps and do the same amount of work.
    """
    import tempfile

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from distil.training.on_policy import is_on_policy_step

    teacher = (
        AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
        .eval()
        .requires_grad_(False)
    )
    student = AutoModelForCausalLM.from_pretrained(work / "student-init", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    rows = [json.loads(line) for line in (work / "trl_rows.jsonl").read_text().splitlines()]
    ds = Dataset.from_list(rows)
    record: dict[str, list[Any]] = {
        "gen_s": [],
        "step_s": [],
        "on_policy": [],
        "losses": [],
        "targets": [],
        "num_items": [],
    }

    class Clock(TrainerCallback):
        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            self.threads = torch.get_num_threads()
            _reset_peak()
            self.start = time.perf_counter()

        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            self.step_start = time.perf_counter()
            record["gen_s"].append(0.0)

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            record["step_s"].append(time.perf_counter() - self.step_start)

    class Timed(GKDTrainer):
        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
            sampled = is_on_policy_step(fraction, seed=SEED, step=self.state.global_step)
            self.lmbda = 1.0 if sampled else 0.0  # TRL then samples iff random.random() <= 1.0
            record["on_policy"].append(int(sampled))
            record["num_items"].append(
                None if num_items_in_batch is None else int(num_items_in_batch)
            )
            return super().training_step(model, inputs, num_items_in_batch)

        def generate_on_policy_outputs(
            self, model: Any, inputs: Any, generation_config: Any
        ) -> Any:
            start = time.perf_counter()
            result = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
            record["gen_s"][-1] += time.perf_counter() - start
            return result

        def compute_loss(
            self,
            model: Any,
            inputs: Any,
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            record["losses"].append(float((result[0] if return_outputs else result).detach()))
            record["targets"].append(int((inputs["labels"][:, 1:] != -100).sum()))
            return result

    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        args = GKDConfig(
            output_dir=tmp,
            per_device_train_batch_size=BATCH,
            gradient_accumulation_steps=1,
            max_steps=STEPS,
            learning_rate=LR,
            lr_scheduler_type="linear",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            optim="adamw_torch",
            seed=SEED,
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
            train_sampling_strategy="sequential",
            logging_steps=10,
            report_to="none",
            save_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            max_length=256,
            lmbda=fraction,
            beta=BETA,
            temperature=1.0,
            max_new_tokens=NEW_TOKENS,
            seq_kd=False,
            disable_dropout=True,
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
        )
        trainer = Timed(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=ds,
            processing_class=tok,
            callbacks=[clock],
        )
        trainer.train()
        wall = time.perf_counter() - clock.start
        peak = _peak_mb()
        trainer.model.save_pretrained(out)
    return {
        **record,
        "wall_s": wall,
        "peak_train_mb": peak,
        "threads": clock.threads,
        "student_dir": out,
        "generation_config": trainer.generation_config.to_diff_dict(),
    }


def _one(tool: str, fraction: float, rep: int, work: Path, teacher: Path) -> dict[str, Any]:
    out = work / "out" / f"{tool}-lambda{fraction}-rep{rep}"
    if out.exists():  # a fresh run folder: distil refuses to start over a finished run
        shutil.rmtree(out)
    load = os.getloadavg()[0]
    if tool == "distil":
        res = run_distil(work, teacher, out, fraction)
    else:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        cmd = [
            str(PEERS_PY),
            __file__,
            "--child",
            "--work",
            str(work),
            "--teacher",
            str(teacher),
            "--out",
            str(out),
            "--fraction",
            str(fraction),
            "--steps",
            str(STEPS),
            "--new-tokens",
            str(NEW_TOKENS),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"trl failed at lambda={fraction}:\n{proc.stderr[-3000:]}")
        res = json.loads(line.removeprefix("RESULT "))
    steps = len(res["losses"])
    gen_total = sum(res["gen_s"])
    per_step = res["wall_s"] / steps
    rec = {
        "tool": {"distil": "distil-lm_kd", "trl": "trl-GKDTrainer"}[tool],
        "lambda": fraction,
        "beta": BETA,
        "rep": rep,
        "steps": steps,
        "on_policy_steps": sum(res["on_policy"]),
        "wall_s": round(res["wall_s"], 3),
        "s_per_step": round(per_step, 4),
        "gen_s_per_step": round(gen_total / steps, 4),
        "train_s_per_step": round(per_step - gen_total / steps, 4),
        "gen_s_per_sampled_step": round(gen_total / max(1, sum(res["on_policy"])), 4),
        "median_step_s_after_first": round(statistics.median(res["step_s"][1:]), 4)
        if len(res["step_s"]) > 1
        else None,
        "peak_train_mb": round(res["peak_train_mb"], 1),
        "first_loss": round(res["losses"][0], 6),
        "final_loss": round(statistics.fmean(res["losses"][-5:]), 6),
        "threads": res.get("threads"),
        "load_avg_1m_before": round(load, 2),
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
        "student_dir": _rel(Path(res["student_dir"])),
        "per_step": {
            "on_policy": res["on_policy"],
            "gen_s": [round(v, 4) for v in res["gen_s"]],
            "step_s": [round(v, 4) for v in res["step_s"]],
            "loss": [round(v, 6) for v in res["losses"]],
        },
    }
    if tool == "trl":
        rec["per_step"] |= {"targets": res["targets"], "num_items_in_batch": res["num_items"]}
        rec["trl_generation_config"] = res["generation_config"]
    print(json.dumps({k: v for k, v in rec.items() if k != "per_step"}), flush=True)
    return rec


def _median(rs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rs)


def _fastest(rs: list[dict[str, Any]], sampled: int) -> str:
    """The fastest off-policy (0) or on-policy (1) step over all reps, the first step of each run
    left out: on a shared machine the lower envelope is the least noisy estimate of a step's cost."""
    times = [
        t
        for r in rs
        for t, o in list(zip(r["per_step"]["step_s"], r["per_step"]["on_policy"], strict=True))[1:]
        if o == sampled
    ]
    return f"{min(times):.2f}" if times else "-"


def table(records: list[dict[str, Any]], quality: dict[str, dict[str, float]]) -> str:
    """One row per (tool, λ): medians over the reps; quality of the last rep's student."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["tool"], r["lambda"]), []).append(r)
    lines = [
        "| tool | λ | reps | steps (sampled) | s/step (median) | s/step per rep | gen s/step | train s/step | s/step distil/TRL | "
        "median s/step after step 1 (distil/TRL) | fastest step s, off / on-policy | gen s per sampled step | held-out KL(t‖s) | held-out ppl | peak RSS MB | first loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (tool, lam), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        trl = groups.get(("trl-GKDTrainer", lam))
        other = trl is not None and tool != "trl-GKDTrainer"
        per_step, steady = _median(rs, "s_per_step"), _median(rs, "median_step_s_after_first")
        ratio = f"{per_step / _median(trl, 's_per_step'):.2f}x" if other else "-"
        steady_text = f"{steady:.3f}" + (
            f" ({steady / _median(trl, 'median_step_s_after_first'):.2f}x)" if other else ""
        )
        q = quality.get(rs[-1]["student_dir"], {})
        walls = ", ".join(f"{r['s_per_step']:.2f}" for r in rs)
        lines.append(
            f"| {tool} | {lam:g} | {len(rs)} | {rs[-1]['steps']} ({rs[-1]['on_policy_steps']}) | {per_step:.3f} | "
            f"{walls} | {_median(rs, 'gen_s_per_step'):.3f} | "
            f"{_median(rs, 'train_s_per_step'):.3f} | {ratio} | {steady_text} | {_fastest(rs, 0)} / {_fastest(rs, 1)} | {_median(rs, 'gen_s_per_sampled_step'):.3f} | "
            f"{q.get('kl_teacher_student', float('nan')):.4f} | {q.get('perplexity', float('nan')):.1f} | "
            f"{_median(rs, 'peak_train_mb'):,.0f} | {rs[-1]['first_loss']:.4f} |"
        )
    for name in ("student init (untrained)", "teacher"):
        if name in quality:
            q = quality[name]
            lines.append(
                f"| {name} | - | - | - | - | - | - | - | - | - | - | - | {q['kl_teacher_student']:.4f} | {q['perplexity']:.1f} | - | - |"
            )
    return "\n".join(lines)


def main() -> None:
    global STEPS, NEW_TOKENS
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--teacher", default=str(ROOT / "runs" / "lm-teacher"))
    ap.add_argument("--work", default=str(BENCH / "artifacts" / "on_policy"))
    ap.add_argument("--results", default=str(BENCH / "results" / "on_policy.jsonl"))
    ap.add_argument(
        "--steps", type=int, default=STEPS, help="optimiser steps per run (one epoch of pairs)"
    )
    ap.add_argument(
        "--new-tokens", type=int, default=NEW_TOKENS, help="max_new_tokens of every sampled step"
    )
    ap.add_argument(
        "--fractions",
        default=",".join(f"{f:g}" for f in FRACTIONS),
        help="λ values, comma-separated",
    )
    ap.add_argument("--tools", default="distil,trl")
    ap.add_argument(
        "--rep",
        type=int,
        default=1,
        help="number of this repetition (several invocations add reps)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch/OpenMP threads of every tool (OMP_NUM_THREADS)",
    )
    ap.add_argument(
        "--table-only", action="store_true", help="rebuild the Markdown table from the JSON lines"
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--fraction", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    STEPS, NEW_TOKENS = args.steps, args.new_tokens
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.child:
        torch.manual_seed(SEED)
        res = run_trl(Path(args.work), Path(args.teacher), Path(args.out), args.fraction)
        print("RESULT " + json.dumps(res, default=str), flush=True)
        return
    work, teacher = Path(args.work) / f"steps{STEPS}-new{NEW_TOKENS}", Path(args.teacher).resolve()
    if not (work / "trl_rows.jsonl").is_file():
        prepare(work, teacher)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    if args.table_only:
        return report(results, work, teacher, args, evaluate_students=False)
    for fraction in (float(f) for f in args.fractions.split(",")):
        for tool in args.tools.split(","):
            try:
                rec = _one(tool, fraction, args.rep, work, teacher)
            except (
                RuntimeError
            ) as err:  # recorded, not dropped: the table shows which run failed and why
                rec = {"tool": tool, "lambda": fraction, "rep": args.rep, "error": str(err)[-2000:]}
                print(json.dumps(rec), flush=True)
            with results.open("a") as f:  # one line per run, written at once
                f.write(json.dumps({**rec, "work": _rel(work), "teacher": _rel(teacher)}) + "\n")
    report(results, work, teacher, args, evaluate_students=True)


def report(
    results: Path, work: Path, teacher: Path, args: argparse.Namespace, *, evaluate_students: bool
) -> None:
    """Evaluate the students (or reuse the last evaluation in the results) and write the table."""
    lines = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    mine = [r for r in lines if r.get("work") == _rel(work) and "tool" in r]
    records = [r for r in mine if "error" not in r]  # every rep of this workload
    if not evaluate_students:
        saved = [r for r in lines if r.get("work") == _rel(work) and "quality" in r][-1]
        quality, when = saved["quality"], saved["time_utc"]
    else:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        quality = {}
        last = {
            (r["tool"], r["lambda"]): r for r in records
        }  # the last rep's student of each (tool, λ)
        for r in last.values():
            quality[r["student_dir"]] = evaluate(ROOT / r["student_dir"], teacher, work)
        quality["student init (untrained)"] = evaluate(work / "student-init", teacher, work)
        quality["teacher"] = {
            "perplexity": float(np.exp(quality["student init (untrained)"]["teacher_ce"])),
            "kl_teacher_student": 0.0,
        }
        with results.open("a") as f:
            f.write(
                json.dumps(
                    {"quality": quality, "work": _rel(work), "rep": args.rep, "time_utc": when}
                )
                + "\n"
            )
    failed = [r for r in mine if "error" in r and r["rep"] == args.rep]
    md = [table(records, quality)]
    for r in failed:
        md.append(f"\n**{r['tool']} at λ={r['lambda']:g} failed:**\n\n```\n{r['error']}\n```")
    md.append(
        f"\nStudents evaluated {when}; table written by `{' '.join(['python', _rel(Path(__file__)), *sys.argv[1:]])}`; "
        f"torch {torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"{args.threads} thread(s) per tool; 1-minute load average before/after each run: "
        + ", ".join(
            f"{r['tool']} λ={r['lambda']:g} rep {r['rep']} {r['load_avg_1m_before']}/{r['load_avg_1m_after']}"
            for r in records
        )
    )
    text = "\n".join(md)
    md_path = results.with_suffix(".md")
    old = md_path.read_text() if md_path.is_file() else ""
    if "\n## Notes" in old:  # hand-written notes below the generated part survive a rebuild
        text += "\n" + old[old.index("\n## Notes") :].rstrip("\n")
    md_path.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
