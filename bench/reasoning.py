"""Benchmark (issue #16): reasoning distillation arms against each other on checkable problems.

Every arm is one ``distil run reasoning_kd`` with the same teacher, student shape, problems,
traces and step budget; only the method, what it trains on, and the problem selection differ.
Runs are interleaved seed by seed (all arms of seed 0, then seed 1, ...), each a fresh process
with one thread; a run whose ``report.json`` exists is read, not re-run, so the benchmark can be
stopped and continued.

    python bench/reasoning.py --teacher runs/reasoning-teacher --data runs/reasoning-data \\
        --traces runs/reasoning-traces.jsonl --seeds 0 1 2 --steps 600

Measured per run: pass@1 and pass@k on held-out problems of training difficulty and on harder
ones, answer-format errors, mean trace length, tokens generated per solved problem, training
sequences and tokens, wall and CPU time with the load average around the run; the learning
curve (pass@1 at every checkpoint against training sequences and tokens). Writes
``bench/results/reasoning.jsonl``, ``reasoning.md`` (mean ± sd over seeds) and
``reasoning-curve.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# name -> overrides of reasoning_kd; the table (selection arms train rejection-sampling SFT)
ARMS: dict[str, list[str]] = {
    "no teacher (gold SFT)": ["problems.completions=gold"],
    "SFT on all traces": ["problems.completions=all_traces"],
    "rejection-sampling SFT": [],
    "REDI": ["method=redi"],
    "token-level KD": ["method=token_kd"],
    "on-policy KD (λ=0.5)": [
        "method=on_policy",
        "on_policy.fraction=0.5",
        "on_policy.max_new_tokens=128",
    ],
    "pass-rate subset 10%": ["selection.method=pass_rate", "selection.budget=0.1"],
    "random subset 10%": ["selection.method=random", "selection.budget=0.1"],
    "LIMR subset 10%": ["selection.method=learning_impact", "selection.budget=0.1"],
    "pass-rate subset 30%": ["selection.method=pass_rate", "selection.budget=0.3"],
    "random subset 30%": ["selection.method=random", "selection.budget=0.3"],
    "LIMR subset 30%": ["selection.method=learning_impact", "selection.budget=0.3"],
}
SPLITS = ("held_out", "harder")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def arm_dir(args: argparse.Namespace, name: str, seed: int) -> Path:
    """The run folder of one arm and seed (its log sits next to it, ``<folder>.log``)."""
    return Path(args.work) / f"seed{seed}-{_slug(name)}"


def run_arm(args: argparse.Namespace, name: str, seed: int) -> dict[str, Any]:
    """One arm and seed: run it (unless finished) and read its report."""
    run_dir = arm_dir(args, name, seed)
    data = Path(args.data)
    command = [
        sys.executable,
        "-m",
        "distil",
        "run",
        "reasoning_kd",
        "--run-dir",
        str(run_dir),
        f"seed={seed}",
        f"teacher.model.hf={args.teacher}",
        f"problems.pool={data / 'pool.jsonl'}",
        f"problems.traces={args.traces}",
        f"problems.held_out={data / 'held_out.jsonl'}",
        f"problems.harder={data / 'harder.jsonl'}",
        f"train.max_steps={args.steps}",
        f"train.checkpoint_every={max(1, args.steps // args.curve_points)}",
        f"eval.problems={args.problems}",
        "eval.teacher=false",
        "run.log_with=[]",
        "run.cpu_threads=1",
        *ARMS[name],
    ]
    load_before, wall, cpu = os.getloadavg()[0], None, None
    if not (run_dir / "report.json").is_file():
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        timing = {"wall_s": wall, "cpu_s": cpu, "load_before": load_before}
        (run_dir / "bench-timing.json").write_text(json.dumps(timing))
    elif (run_dir / "bench-timing.json").is_file():  # run earlier, maybe by another process
        timing = json.loads((run_dir / "bench-timing.json").read_text())
        wall, cpu, load_before = timing["wall_s"], timing["cpu_s"], timing["load_before"]
    report = json.loads((run_dir / "report.json").read_text())
    row = report["quality"]["table"]["rows"][-1]
    cost = report["cost"]["table"]["rows"][-1]
    return {
        "arm": name,
        "seed": seed,
        **{k: row.get(k) for k in row if k != "model"},
        "train_sequences": cost.get("train_sequences"),
        "train_tokens": cost.get("train_tokens"),
        "problems": report["details"]["problems"]["trained_on"],
        "curve": report["details"]["curve"],
        "wall_s": wall,
        "cpu_s": cpu,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "run_dir": str(
            run_dir.resolve().relative_to(ROOT)
            if run_dir.resolve().is_relative_to(ROOT)
            else run_dir
        ),
    }


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def write_table(
    rows: list[dict[str, Any]], out: Path, ks: list[int], meta: dict[str, Any], plot: str
) -> None:
    """The Markdown table: one line per arm, mean ± sd over seeds (percent)."""
    head = ["arm", "seeds", "problems", "train seq."]
    head += [f"{sp} pass@{k}" for sp in SPLITS for k in ks]
    head += [f"{sp} format err." for sp in SPLITS] + ["trace tok.", "tok./solved", "CPU s"]
    lines = [
        "# reasoning_kd arms (issue #16)",
        "",
        "Mean ± sd over seeds, in percent (pass@k, format errors); trace tokens and tokens per",
        "solved problem on the held-out split; CPU seconds per run (training + evaluation).",
        "",
        *(f"- {k}: {v}" for k, v in meta.items()),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for arm in ARMS:
        mine = [r for r in rows if r["arm"] == arm]
        if not mine:
            continue
        cells = [arm, str(len(mine)), str(mine[0]["problems"]), f"{mine[0]['train_sequences']:,}"]
        cells += [_mean_sd([r.get(f"{sp}/pass@{k}") for r in mine]) for sp in SPLITS for k in ks]
        cells += [_mean_sd([r.get(f"{sp}/format_errors") for r in mine]) for sp in SPLITS]
        for key in ("held_out/trace_tokens", "held_out/tokens_per_solved"):
            values = [r[key] for r in mine if r.get(key) is not None]
            cells.append(f"{statistics.mean(values):.1f}" if values else "-")
        cpu = [r["cpu_s"] for r in mine if r.get("cpu_s")]
        cells.append(f"{statistics.mean(cpu):.0f}" if cpu else "-")
        lines.append("| " + " | ".join(cells) + " |")
    out.write_text(
        "\n".join(lines) + f"\n\n![pass@1 against training sequences and tokens]({plot})\n"
    )


def write_curve(rows: list[dict[str, Any]], out: Path) -> None:
    """pass@1 on the held-out split against training sequences and tokens, mean over seeds."""
    from distil.evaluation.plots import color_for, new_figure, to_png

    fig = new_figure(11.0, 4.0)
    axes = fig.subplots(1, 2)
    for i, arm in enumerate(ARMS):
        curves = [r["curve"] for r in rows if r["arm"] == arm and r["curve"]]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        for ax, x in zip(axes, ("examples", "tokens"), strict=True):
            xs = [statistics.mean(c[j][x] for c in curves) for j in range(n)]
            ys = [statistics.mean(c[j]["held_out/pass@1"] for c in curves) for j in range(n)]
            ax.plot(  # 12 arms, 7 colours: the line style and marker tell repeats apart
                xs,
                ys,
                marker="os^"[i // 7 % 3],
                linestyle=("-", "--", ":")[i // 7 % 3],
                markersize=3,
                linewidth=1.1,
                color=color_for(arm, i),
                label=arm,
            )
    for ax, x in zip(axes, ("training sequences", "training tokens"), strict=True):
        ax.set_xlabel(x, fontsize=8)
        ax.set_ylabel("held-out pass@1", fontsize=8)
    axes[1].legend(fontsize=6, frameon=False)
    out.write_bytes(to_png(fig))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--data", required=True, help="the `distil problems` folder")
    parser.add_argument("--traces", required=True, help="verified traces of the pool")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--curve-points", type=int, default=4)
    parser.add_argument("--problems", type=int, default=200, help="per split")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-reasoning"))
    parser.add_argument("--name", default="reasoning")
    parser.add_argument(
        "--finished-only",
        action="store_true",
        help="run nothing: tabulate the arms and seeds whose runs have finished",
    )
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        for arm in args.arms:
            if args.finished_only and not (arm_dir(args, arm, seed) / "report.json").is_file():
                continue
            row = run_arm(args, arm, seed)
            print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
            rows.append(row)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f"{args.name}.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    meta = {
        "teacher": args.teacher,
        "steps": f"{args.steps} × 32 sequences per arm",
        "evaluation": f"first {args.problems} problems per split, 4 samples at temperature 1",
        "machine": f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the end",
    }
    write_table(rows, RESULTS / f"{args.name}.md", [1, 4], meta, f"{args.name}-curve.png")
    write_curve(rows, RESULTS / f"{args.name}-curve.png")


if __name__ == "__main__":
    main()
