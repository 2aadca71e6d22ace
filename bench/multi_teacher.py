"""Benchmark: multi-teacher (ensemble) distillation on Fashion-MNIST vs each single teacher.

Three different teachers are trained once with ``distil run classifier_kd`` (its teacher phase):

* ``cnn``: a zoo CNN, channels [48, 96, 128] (the Fashion-MNIST benchmark's teacher);
* ``mlp``: a wide MLP, hidden [1024, 512] with dropout 0.2;
* ``cnn-b``: a zoo CNN of another shape, channels [32, 64, 96], trained from another seed.

Then the same 61k-parameter CNN student (channels [8, 16, 32]) is distilled, with the same
initial weights and batches per seed, from each teacher alone and from the ensemble of the three
(``teacher.model.ensemble``) with each combination rule, and trained without a teacher. Every
teacher is read from a teacher cache written once per arm (the ensemble's combined target is
cached as one), so the students' runs cost the student only. Test accuracy on the 10k test images,
mean ± sd over seeds, and per seed.

    python bench/multi_teacher.py --seeds 0 1 2 --epochs 3

Writes ``bench/results/multi_teacher.{jsonl,md}``; needs the Debian package
``dataset-fashion-mnist``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
STUDENT = "{zoo: cnn, kwargs: {channels: [8, 16, 32]}}"
# name -> (zoo architecture, its kwargs as YAML, the seed of its run)
TEACHERS: dict[str, tuple[str, str, int]] = {
    "cnn": ("cnn", "{channels: [48, 96, 128]}", 0),
    "mlp": ("mlp", "{hidden: [1024, 512], dropout: 0.2}", 0),
    "cnn-b": ("cnn", "{channels: [32, 64, 96]}", 1),
}
COMMON = [
    "data.source={builtin: fashion-mnist}",
    "run.log_with=[]",
    "run.cpu_threads=1",
    "train.batch_size=128",
    "train.lr=0.003",
    "train.weight_decay=0.01",
    "kd.kd_weight=0.5",
    "kd.kd_temperature=2.0",
]


def distil(args: list[str], run_dir: Path) -> float:
    """Run ``distil run classifier_kd ARGS`` (skipped when its report exists); return seconds."""
    if (run_dir / "report.json").is_file():
        return 0.0
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "distil", "run", "classifier_kd", *args, "--run-dir", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{run_dir.name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def train_teacher(name: str, work: Path, epochs: int) -> Path:
    """Train one teacher (the teacher phase of a run whose student phase takes one step)."""
    run_dir = work / f"teacher-{name}"
    distil(
        [
            *COMMON,
            f"teacher.model={teacher_source(name)}",
            f"seed={TEACHERS[name][2]}",
            "teacher.train=true",
            f"teacher.training.epochs={epochs}",
            "teacher.training.batch_size=128",
            "teacher.training.lr=0.003",
            "teacher.training.weight_decay=0.01",
            f"student.model={STUDENT}",
            "train.max_steps=1",
            "eval.baseline=false",
        ],
        run_dir,
    )
    return run_dir / "teacher" / "final" / "model.safetensors"


def teacher_source(name: str, weights: Path | None = None) -> str:
    """The teacher's model source as a YAML mapping (with its trained weights when given)."""
    zoo, kwargs, _ = TEACHERS[name]
    trained = "" if weights is None else f", weights: {weights}"
    return f"{{zoo: {zoo}, kwargs: {kwargs}{trained}}}"


def arms(weights: dict[str, Path]) -> dict[str, list[str]]:
    """The student runs: scratch, each teacher alone, the ensemble with each rule."""
    members = ", ".join(f"{{model: {teacher_source(n, w)}}}" for n, w in weights.items())
    out: dict[str, list[str]] = {}
    for name, w in weights.items():
        out[f"teacher {name}"] = [f"teacher.model={teacher_source(name, w)}"]
    for rule, weighting in (
        ("mean_probs", "static"),
        ("mean_logits", "static"),
        ("mean_probs", "confidence"),
    ):
        ensemble = f"{{ensemble: [{members}], combine: {rule}, weighting: {weighting}}}"
        out[f"ensemble {rule} {weighting}"] = [f"teacher.model={ensemble}"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--teacher-epochs", type=int, default=6)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "artifacts" / "multi_teacher")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    weights = {name: train_teacher(name, args.work, args.teacher_epochs) for name in TEACHERS}
    records: list[dict[str, Any]] = []
    for seed in args.seeds:
        for arm, extra in arms(weights).items():
            slug = arm.replace(" ", "-")
            run_dir = args.work / f"{slug}-s{seed}"
            cache = args.work / f"cache-{slug}"
            # the first arm also trains the no-teacher baseline: same initial weights and batches
            baseline = "eval.baseline=true" if arm == "teacher cnn" else "eval.baseline=false"
            load = os.getloadavg()[0]
            seconds = distil(
                [
                    *COMMON,
                    f"seed={seed}",
                    f"student.model={STUDENT}",
                    f"train.epochs={args.epochs}",
                    "teacher.train=false",
                    baseline,
                    *extra,
                    f"teacher.cache.path={cache}",
                ],
                run_dir,
            )
            rows = json.loads((run_dir / "report.json").read_text())["table"]["rows"]
            by = {r["model"]: r for r in rows}
            record = {
                "arm": arm,
                "seed": seed,
                "accuracy": by["student (KD)"]["accuracy"],
                "teacher_accuracy": rows[0]["accuracy"],
                "members": {
                    r["model"]: r["accuracy"] for r in rows if r["model"].startswith("teacher ")
                },
                "seconds": seconds,
                "load_avg": load,
            }
            records.append(record)
            print(json.dumps(record), flush=True)
            if "baseline (no teacher)" in by:
                scratch = {
                    **record,
                    "arm": "no teacher",
                    "accuracy": by["baseline (no teacher)"]["accuracy"],
                }
                records.append(scratch)
                print(json.dumps(scratch), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "multi_teacher.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (args.out / "multi_teacher.md").write_text(table(records, args))


def table(records: list[dict[str, Any]], args: argparse.Namespace) -> str:
    arms_seen = list(dict.fromkeys(r["arm"] for r in records))
    lines = [
        "# Multi-teacher distillation on Fashion-MNIST",
        "",
        f"Student: 61k CNN, {args.epochs} epochs, seeds {args.seeds}; teachers trained "
        f"{args.teacher_epochs} epochs; {platform.node()}, 1 thread per run.",
        "",
        "| arm | teacher acc % | student acc % (mean ± sd) | per seed |",
        "|---|---:|---:|---|",
    ]
    for arm in arms_seen:
        rs = [r for r in records if r["arm"] == arm]
        accs = [100 * r["accuracy"] for r in rs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        teacher = "-" if arm == "no teacher" else f"{100 * rs[0]['teacher_accuracy']:.2f}"
        per_seed = ", ".join(f"{a:.2f}" for a in accs)
        lines.append(
            f"| {arm} | {teacher} | {statistics.fmean(accs):.2f} ± {sd:.2f} | {per_seed} |"
        )
    loads = [r["load_avg"] for r in records]
    lines += ["", f"Load average during the runs: {min(loads):.1f}-{max(loads):.1f}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
