"""Benchmark: distil ``lm_kd`` vs a minimal hand-written PyTorch loop vs TRL's GKDTrainer (lmbda=0).

Same teacher, same student initialisation, same token blocks in the same order, same token budget,
same optimiser and schedule, same objective (forward KL(teacher ‖ student) at temperature 1, no
hard term). Each tool runs in a fresh process; runs of different tools are interleaved so that
the noise of this shared machine hits all of them alike, and the table reports medians.

    python bench/lm_kd.py --teacher runs/lm-teacher --reps 3

Prints one JSON line per run and a Markdown table; writes both to ``bench/results/``.
The TRL run needs ``bench/.venv-peers`` (``python -m venv --system-site-packages bench/.venv-peers``
then ``bench/.venv-peers/bin/pip install -c /path/to/requirements-peers.txt trl==1.16.0``).

Timed: the training loop only (teacher forward + student forward/backward + optimiser step), as
each tool measures it. Memory: the peak resident set during training (``VmHWM`` reset right before
the loop; on CUDA ``max_memory_allocated``). Quality: every student is evaluated here with the same
code (``distil.evaluation.lm.held_out_metrics``) on the same held-out blocks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PEERS_PY = BENCH / ".venv-peers" / "bin" / "python"
STEPS, BATCH, SEQ, LR, SEED = 100, 8, 256, 1e-3, 0
STUDENT = {
    "num_layers": 2,
    "hidden_size": 128,
    "num_heads": 2,
    "intermediate_size": 512,
    "max_context": 256,
    "tie_word_embeddings": True,
}


class _OneProcess:
    """Stands in for an Accelerator when the harness prepares data in its own process."""

    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass


def _reset_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(work: Path, teacher: Path) -> None:
    """Student init folder, the ordered training blocks and the held-out blocks, from distil's own data path."""
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
    data = load_lm_data(
        LMDataSection(source={"builtin": "stdlib"}, max_length=SEQ, eval_limit=64),
        tok,
        work,
        _OneProcess(),
    )
    order = global_batches(  # the order lm_kd's student phase draws
        len(data.train),
        global_batch_size=BATCH,
        seed=SEED + PHASE_STREAMS["student"],
        epoch=0,
        drop_last=True,
    )[:STEPS]
    idx = torch.cat(order).tolist()  # the blocks distil's lm_kd consumes, in its order
    np.save(work / "train_tokens.npy", np.asarray(data.train[idx]["input_ids"], dtype=np.int64))
    np.save(work / "eval_tokens.npy", np.asarray(data.eval["input_ids"], dtype=np.int64))


def _load(work: Path, teacher_dir: Path) -> tuple[Any, Any, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    teacher = (
        AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
        .eval()
        .requires_grad_(False)
    )
    student = AutoModelForCausalLM.from_pretrained(work / "student-init", dtype=torch.float32)
    return teacher, student, torch.from_numpy(np.load(work / "train_tokens.npy"))


def run_minimal(work: Path, teacher_dir: Path, out: Path) -> dict[str, Any]:
    """The practical floor: teacher forward under no_grad, student forward/backward, forward KL."""
    import torch.nn.functional as F

    teacher, student, seqs = _load(work, teacher_dir)
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / STEPS)
    losses = []
    _reset_peak()
    start = time.perf_counter()
    for step in range(STEPS):
        x = seqs[step * BATCH : (step + 1) * BATCH]
        with torch.no_grad():
            t_logp = F.log_softmax(teacher(input_ids=x).logits[:, :-1].float(), -1)
        s_logp = F.log_softmax(student(input_ids=x).logits[:, :-1].float(), -1)
        loss = F.kl_div(
            s_logp.flatten(0, 1), t_logp.flatten(0, 1), log_target=True, reduction="batchmean"
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    wall = time.perf_counter() - start
    student.save_pretrained(out)
    return {
        "wall_s": wall,
        "peak_train_mb": _peak_mb(),
        "losses": [float(v) for v in losses],
        "threads": torch.get_num_threads(),
    }


def run_trl(work: Path, teacher_dir: Path, out: Path) -> dict[str, Any]:
    """TRL 1.16 GKDTrainer, off-policy (lmbda=0), forward KL (beta=0), TRL defaults overridden to match."""
    import tempfile

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    teacher, student, seqs = _load(work, teacher_dir)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    ds = Dataset.from_dict({"input_ids": seqs.tolist()})

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    class Clock(TrainerCallback):  # starts the clock and the memory peak when the loop starts
        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            self.threads = torch.get_num_threads()
            _reset_peak()
            self.start = time.perf_counter()

    losses: list[torch.Tensor] = []

    class Recording(GKDTrainer):
        def compute_loss(
            self,
            model: Any,
            inputs: Any,
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append((result[0] if return_outputs else result).detach())
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
            max_length=SEQ,
            lmbda=0.0,
            beta=0.0,
            temperature=1.0,
            seq_kd=False,
            disable_dropout=True,
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
        )
        trainer = Recording(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=ds,
            data_collator=collate,
            processing_class=tok,
            callbacks=[clock],
        )
        trainer.train()
        wall = time.perf_counter() - clock.start
        peak = _peak_mb()
        trainer.model.save_pretrained(out)
    return {
        "wall_s": wall,
        "peak_train_mb": peak,
        "losses": [float(v) for v in losses],
        "threads": clock.threads,
    }


def run_distil(work: Path, teacher_dir: Path, out: Path, baseline: bool) -> dict[str, Any]:
    """``distil run lm_kd`` through its CLI, on the same blocks in the same order (same seed)."""
    overrides = [
        f"teacher.model={{hf: {teacher_dir}}}",
        f"student.model={{hf: {work / 'student-init'}}}",
        "data.source={builtin: stdlib}",
        f"data.max_length={SEQ}",
        f"train.max_steps={STEPS}",
        f"train.batch_size={BATCH}",
        f"train.lr={LR}",
        "train.scheduler=linear",
        "train.warmup_steps=0",
        "train.max_grad_norm=1.0",
        "train.checkpoint_every=100000",
        "kd.kd_weight=1.0",
        "kd.kd_temperature=1.0",
        "kd.divergence=forward_kl",
        f"eval.baseline={str(baseline).lower()}",
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
    losses = [r["kd/raw"] for r in rows if r.get("phase") == "student" and "kd/raw" in r]
    return {
        "wall_s": summary["train_wall_s"],
        "peak_train_mb": summary.get("peak_cuda_mb", summary["peak_rss_mb"]),
        "losses": losses,
        "threads": json.loads((out / "env.json").read_text())["torch_threads"],
    }


def evaluate(student_dir: Path, teacher_dir: Path, work: Path) -> dict[str, float]:
    """Held-out perplexity, agreement and KL(teacher ‖ student), the same code for every tool."""
    from transformers import AutoModelForCausalLM

    from distil.evaluation.lm import held_out_metrics
    from distil.models.vocab import load_tokenizer_folder, tokenizer_vocab_size
    from distil.teachers import LiveLMTeacher

    seqs = torch.from_numpy(np.load(work / "eval_tokens.npy"))
    batches = [
        {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in seqs.split(16)
    ]
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    vocab = tokenizer_vocab_size(load_tokenizer_folder(teacher_dir))
    live = LiveLMTeacher(
        teacher,
        vocab_size=vocab,
        device=torch.device("cpu"),
        dtype=torch.float32,
        output_device=torch.device("cpu"),
    )
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    out = held_out_metrics(
        student, batches, vocab_size=vocab, device=torch.device("cpu"), teacher=live
    )
    out["teacher_ce"] = held_out_metrics(
        teacher, batches, vocab_size=vocab, device=torch.device("cpu")
    )["ce"]
    return out


def child(args: argparse.Namespace) -> None:
    torch.manual_seed(SEED)
    fn = {"minimal": run_minimal, "trl": run_trl}[args.child]
    result = fn(Path(args.work), Path(args.teacher), Path(args.out))
    print("RESULT " + json.dumps(result), flush=True)


def _one(tool: str, rep: int, work: Path, teacher: Path, baseline: bool) -> dict[str, Any]:
    out = work / "out" / f"{tool}-rep{rep}"
    load = os.getloadavg()[0]
    if tool == "distil":
        res = run_distil(work, teacher, out, baseline)
        student_dir = out / "student" / "final"
    else:
        py = str(PEERS_PY) if tool == "trl" else sys.executable
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        cmd = [
            py,
            __file__,
            "--child",
            tool,
            "--work",
            str(work),
            "--teacher",
            str(teacher),
            "--out",
            str(out),
            "--steps",
            str(STEPS),
            "--seq",
            str(SEQ),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"{tool} failed:\n{proc.stderr[-3000:]}")
        res = json.loads(line.removeprefix("RESULT "))
        student_dir = out
    tokens = STEPS * BATCH * SEQ
    rec = {
        "tool": {
            "distil": "distil-lm_kd",
            "minimal": "pytorch-minimal",
            "trl": "trl-GKDTrainer(lmbda=0,beta=0)",
        }[tool],
        "rep": rep,
        "wall_s": round(res["wall_s"], 3),
        "tokens_per_s": round(tokens / res["wall_s"], 1),
        "peak_train_mb": round(res["peak_train_mb"], 1),
        "first_loss": round(res["losses"][0], 6),
        "final_loss": round(statistics.fmean(res["losses"][-10:]), 6),
        "steps": STEPS,
        "tokens": tokens,
        "threads": res.get("threads"),
        "load_avg_1m_before": round(load, 2),
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
        "student_dir": str(student_dir),
    }
    print(json.dumps(rec), flush=True)
    return rec


def table(records: list[dict[str, Any]], quality: dict[str, dict[str, float]]) -> str:
    tools: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        tools.setdefault(r["tool"], []).append(r)
    ref = statistics.median(r["wall_s"] for r in tools["pytorch-minimal"])
    ref_mem = statistics.median(r["peak_train_mb"] for r in tools["pytorch-minimal"])
    lines = [
        "| tool | runs | train wall s (median) | time vs minimal | tokens/s (median) | spread of walls | peak train MB | memory vs minimal | first loss | final loss | held-out ppl | KL(t‖s) | top-1 agree |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rs in tools.items():
        walls = [r["wall_s"] for r in rs]
        wall, mem = statistics.median(walls), statistics.median(r["peak_train_mb"] for r in rs)
        q = quality.get(name, {})
        lines.append(
            f"| {name} | {len(rs)} | {wall:.1f} | {wall / ref:.2f}x | {statistics.median(r['tokens_per_s'] for r in rs):,.0f} | "
            f"{min(walls):.1f}-{max(walls):.1f} (±{50 * (max(walls) - min(walls)) / wall:.0f}%) | {mem:,.0f} | {mem / ref_mem:.2f}x | "
            f"{rs[0]['first_loss']:.4f} | {rs[-1]['final_loss']:.4f} | {q.get('perplexity', float('nan')):.1f} | "
            f"{q.get('kl_teacher_student', float('nan')):.4f} | {q.get('agreement', float('nan')):.3f} |"
        )
    for name in ("baseline (no teacher, distil)", "teacher"):
        if name in quality:
            q = quality[name]
            lines.append(
                f"| {name} | 1 | - | - | - | - | - | - | - | - | {q['perplexity']:.1f} | {q.get('kl_teacher_student', 0):.4f} | {q.get('agreement', 1):.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    global STEPS, SEQ
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--teacher", default=str(ROOT / "runs" / "lm-teacher"))
    ap.add_argument("--work", default=str(BENCH / "artifacts" / "lm_kd"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--first-rep",
        type=int,
        default=1,
        help="number of the first rep (add reps to earlier runs)",
    )
    ap.add_argument("--tools", default="distil,minimal,trl")
    ap.add_argument("--results", default=str(BENCH / "results" / "lm_kd.jsonl"))
    ap.add_argument("--child", choices=["minimal", "trl"])
    ap.add_argument("--out")
    ap.add_argument(
        "--steps", type=int, default=STEPS, help="optimiser steps per run (smoke tests: a few)"
    )
    ap.add_argument(
        "--seq", type=int, default=SEQ, help="tokens per block (at most the teacher's context)"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch/OpenMP threads of every tool (OMP_NUM_THREADS)",
    )
    args = ap.parse_args()
    STEPS, SEQ = args.steps, args.seq
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.child:
        return child(args)
    work, teacher = Path(args.work) / f"steps{STEPS}-seq{SEQ}", Path(args.teacher).resolve()
    if not (work / "train_tokens.npy").is_file():
        prepare(work, teacher)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    # recorded relative to the repository, so results name no machine-specific path
    teacher_key = str(teacher.relative_to(ROOT)) if teacher.is_relative_to(ROOT) else str(teacher)
    for rep in range(args.first_rep, args.first_rep + args.reps):
        for tool in args.tools.split(","):
            record = _one(tool, rep, work, teacher, baseline=(tool == "distil" and rep == 1))
            with results.open(
                "a"
            ) as f:  # one line per run, written at once: a killed benchmark keeps its runs
                f.write(json.dumps({**record, "work": str(work), "teacher": teacher_key}) + "\n")
    # the table covers every run of this workload in the results file (several invocations add reps)
    lines = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    records = [
        r
        for r in lines
        if r.get("work") == str(work)
        and r.get("teacher") in (teacher_key, str(teacher))
        and "tool" in r
    ]
    quality: dict[str, dict[str, float]] = {}
    for r in records:  # every run of a tool ends with the same weights (checked by final_loss); evaluate its last one
        if Path(r["student_dir"]).is_dir():
            quality[r["tool"]] = evaluate(Path(r["student_dir"]), teacher, work)
    baseline_dir = work / "out" / "distil-rep1" / "baseline" / "final"
    if baseline_dir.is_dir():
        quality["baseline (no teacher, distil)"] = evaluate(baseline_dir, teacher, work)
    teacher_ce = next(iter(quality.values()))["teacher_ce"]
    quality["teacher"] = {
        "perplexity": float(np.exp(teacher_ce)),
        "kl_teacher_student": 0.0,
        "agreement": 1.0,
    }
    with results.open("a") as f:
        f.write(
            json.dumps(
                {
                    "quality": quality,
                    "work": str(work),
                    "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
            )
            + "\n"
        )
    md = table(records, quality)
    results.with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
