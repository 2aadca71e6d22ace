"""Teacher hacking in miniature: oracle -> teacher -> student, offline vs online data.

The setup of "On Teacher Hacking in Language Model Distillation" (Tiapkin et al. 2025), scaled to
this CPU: a ground-truth *oracle* LM (the built-in teacher, pre-trained longer), a *teacher*
distilled from the oracle, and a *student* distilled from the teacher

- offline: on a small fixed set of training blocks, revisited for many epochs;
- online: on the same prompts, with completions the student samples itself (``on_policy.fraction=1``).

Every run has the teacher-hacking monitor on: every ``--every`` steps the student's KL to the
teacher on held-out blocks and its KL to the oracle (the golden measure) are logged next to the
training divergence (the proxy). The paper's finding to check: with offline data the proxy keeps
falling while the golden measure turns up; online data prevents it.

    python bench/teacher_hacking.py --oracle runs/lm-teacher-600

Writes ``bench/results/teacher_hacking.{md,jsonl,png}`` and keeps the run folders under
``bench/artifacts/teacher_hacking/``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
STUDENT = [
    "student.model.spec.num_layers=1",
    "student.model.spec.hidden_size=64",
    "student.model.spec.num_heads=2",
    "student.model.spec.intermediate_size=256",
    "student.model.spec.max_context=256",
    "student.model.spec.tie_word_embeddings=true",
]
TEACHER = [
    "student.model.spec.num_layers=2",
    "student.model.spec.hidden_size=128",
    "student.model.spec.num_heads=2",
    "student.model.spec.intermediate_size=512",
    "student.model.spec.max_context=256",
    "student.model.spec.tie_word_embeddings=true",
]
QUIET = [
    "run.log_with=[]",
    "eval.generation.prompts=1",
    "eval.generation.speed_new_tokens=8",
    "eval.fidelity_tokens=512",
]


def rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def distil_run(args: list[str], run_dir: Path, threads: int) -> None:
    if (run_dir / "report.json").is_file():
        print(f"reusing {rel(run_dir)}", file=sys.stderr)
        return
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    cmd = [
        sys.executable,
        "-m",
        "distil",
        "run",
        "lm_kd",
        *args,
        f"run.cpu_threads={threads}",
        "--run-dir",
        str(run_dir),
    ]
    if run_dir.exists():
        cmd.append("--resume")
    print("$ distil run lm_kd " + " ".join(args), file=sys.stderr)
    subprocess.run(cmd, check=True, env=env, cwd=REPO)


def series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from distil.evaluation.hacking import monitor_series
    from distil.training.metrics import read_metrics

    return monitor_series(read_metrics(run_dir / "metrics.jsonl"))


def plot(runs: dict[str, Path], out: Path) -> None:
    from distil.evaluation.hacking import HELD_OUT, ORACLE, PROXY
    from distil.evaluation.plots import EXTRA_COLORS, new_figure, to_png

    fig = new_figure(11.0, 3.4)
    axes = fig.subplots(1, 3)
    titles = {
        PROXY: "proxy: training divergence to the teacher",
        HELD_OUT: "held-out KL(teacher ‖ student)",
        ORACLE: "golden: held-out KL(oracle ‖ student)",
    }
    for ax, key in zip(axes, titles, strict=True):
        for i, (name, run_dir) in enumerate(runs.items()):
            points = series(run_dir).get(key, [])
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, "-o", markersize=2.5, color=EXTRA_COLORS[i], label=name)
        ax.set_title(titles[key], fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("nats / token", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    out.write_bytes(to_png(fig))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--oracle", type=Path, default=REPO / "runs" / "lm-teacher-600")
    ap.add_argument("--teacher-steps", type=int, default=150)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument(
        "--train-blocks", type=int, default=16, help="offline: the fixed training set, in blocks"
    )
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=BENCH / "artifacts" / "teacher_hacking")
    ap.add_argument(
        "--tag",
        default="",
        help="suffix of the result files and run folders (several settings side by side)",
    )
    a = ap.parse_args()
    if not (a.oracle / "config.json").is_file():
        sys.exit(
            f"no oracle model in {a.oracle}: run `distil run lm_pretrain train.max_steps=600 export_dir={a.oracle}` first"
        )
    stem = "teacher_hacking" + (f"-{a.tag}" if a.tag else "")
    a.work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    # 1. the teacher: distilled from the oracle on the whole corpus
    teacher_run = a.work / "teacher"
    distil_run(
        [
            f"teacher.model={{hf: {a.oracle}}}",
            *TEACHER,
            "kd.kd_weight=1",
            f"train.max_steps={a.teacher_steps}",
            "train.lr=3e-3",
            "eval.baseline=false",
            *QUIET,
        ],
        teacher_run,
        a.threads,
    )
    teacher = teacher_run / "student" / "final"
    # 2. the student, offline and online, with the monitor (oracle = golden measure)
    common = [
        f"teacher.model={{hf: {teacher}}}",
        f"tokenizer={a.oracle}",
        *STUDENT,
        "kd.kd_weight=1",
        f"data.max_length={a.seq}",
        f"data.train_limit={a.train_blocks}",
        f"train.max_steps={a.steps}",
        "train.epochs=100000",
        "train.batch_size=8",
        "train.lr=3e-3",
        "train.warmup_steps=5",
        "eval.baseline=false",
        f"eval.monitor.every={a.every}",
        "eval.monitor.examples=16",
        f"eval.monitor.oracle={a.oracle}",
        f"train.checkpoint_every={a.steps}",
        *QUIET,
    ]
    half = a.seq // 2
    runs = {
        "offline (fixed blocks)": a.work / ("offline" + (f"-{a.tag}" if a.tag else "")),
        "online (student samples, λ=1)": a.work / ("online" + (f"-{a.tag}" if a.tag else "")),
    }
    distil_run(common, runs["offline (fixed blocks)"], a.threads)
    distil_run(
        [
            *common,
            "on_policy.fraction=1",
            f"on_policy.prompt_tokens={half}",
            f"on_policy.max_new_tokens={half}",
        ],
        runs["online (student samples, λ=1)"],
        a.threads,
    )
    # 3. the table and the plot
    results = BENCH / "results"
    results.mkdir(exist_ok=True)
    plot(runs, results / f"{stem}.png")
    lines, records = [], []
    for name, run_dir in runs.items():
        report = json.loads((run_dir / "report.json").read_text())
        s = series(run_dir)
        m = report["monitor"]
        rec: dict[str, Any] = {
            "run": name,
            "run_dir": rel(run_dir),
            "flag": m["flag"],
            "verdict": m["text"],
            "oracle_kl_first": s["monitor/kl_oracle"][0][1],
            "oracle_kl_best": m.get("best"),
            "oracle_kl_best_step": m.get("best_step"),
            "oracle_kl_last": m.get("last"),
            "proxy_first": s["kd/raw"][0][1],
            "proxy_last": s["kd/raw"][-1][1],
            "heldout_kl_teacher_last": s["monitor/kl_teacher"][-1][1],
        }
        records.append(rec)
        lines.append(
            f"| {name} | {rec['proxy_first']:.3f} → {rec['proxy_last']:.3f} | {rec['heldout_kl_teacher_last']:.3f} | "
            f"{rec['oracle_kl_first']:.3f} → best {rec['oracle_kl_best']:.3f} (step {rec['oracle_kl_best_step']}) → "
            f"{rec['oracle_kl_last']:.3f} | {'**yes**' if rec['flag'] else 'no'} |"
        )
    with (results / f"{stem}.jsonl").open("w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    load = os.getloadavg()[0]
    md = [
        "# Teacher hacking in miniature (`bench/teacher_hacking.py`)",
        "",
        f"{time.strftime('%Y-%m-%d')}, CPU, {a.threads} thread(s), 1-min load average {load:.1f} at the end; "
        f"{(time.time() - started) / 60:.1f} min in all.",
        "",
        f"Oracle: `{rel(a.oracle)}`. Teacher: 2 layers × 128 distilled from the oracle for {a.teacher_steps} steps "
        f"(forward KL). Student: 1 layer × 64, {a.steps} steps of 8 sequences, forward KL to the teacher. "
        f"Offline: {a.train_blocks} fixed blocks of {a.seq} tokens (≈{a.steps * 8 // a.train_blocks} epochs). "
        f"Online: the same blocks' first {half} tokens as prompts, {half} tokens sampled by the student (T = 1) "
        f"and scored by the teacher. Monitor every {a.every} steps on 16 held-out blocks.",
        "",
        "| student data | proxy (train divergence) first → last interval | held-out KL to teacher (end) | KL to oracle: start → best → end | hacking flagged |",
        "|---|---|---:|---|---|",
        *lines,
        "",
        f"![teacher hacking]({stem}.png)",
        "",
        *[f"- {r['run']}: {r['verdict']}" for r in records],
        "",
    ]
    (results / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
