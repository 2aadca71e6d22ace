"""Benchmark: the student trained from teacher-output caches of several k vs from the live teacher.

On the built-in LM teacher and corpus, the shipped ``lm_kd`` student and schedule (one epoch over
``--examples`` blocks of 256 tokens), it writes caches with ``distil cache`` (top-k at each
``--ks``, importance-sampled ids, and top-k caches that also store ids drawn from the teacher's
tail, ``--tails K:M``), trains the same student from each and from the live
teacher with ``distil run lm_kd``, and reports per run: bytes per token of the cache, the
student's held-out perplexity (and its gap to live-teacher distillation), held-out KL to the
teacher, and training throughput (tokens/s of the training loop, from ``student/summary.json``)
as a ratio to the live teacher. Every run is a fresh process with the same seed and batches.

    python bench/cache_training.py --teacher runs/lm-teacher --examples 800 --ks 1 8 32 128 --tails 8:4 8:6

Writes ``bench/results/cache_training.{md,jsonl}``; run folders under ``bench/artifacts/cache_training/``.
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


def rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def distil(args: list[str], threads: int) -> None:
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    print("$ distil " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "distil", *args], check=True, env=env, cwd=REPO)


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--teacher", type=Path, default=REPO / "runs" / "lm-teacher")
    ap.add_argument(
        "--examples", type=int, default=800, help="training blocks: one epoch of batch 8"
    )
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument(
        "--samples", type=int, default=8, help="ids per position of the sampled cache (0: none)"
    )
    ap.add_argument(
        "--tails",
        nargs="*",
        default=["8:4", "8:6"],
        help="top-k caches with sampled tail ids, as K:M (k exact ids + m ids drawn from the tail)",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=BENCH / "artifacts" / "cache_training")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    steps = a.examples // 8
    data = [
        f"teacher.model={{hf: {a.teacher}}}",
        f"data.train_limit={a.examples}",
        f"run.cpu_threads={a.threads}",
    ]
    train = [
        *data,
        f"train.max_steps={steps}",
        "eval.baseline=false",
        "run.log_with=[]",
        "eval.generation.prompts=1",
        f"train.checkpoint_every={steps}",
    ]
    caches: dict[str, list[str]] = {f"top-{k}": [f"teacher.cache.k={k}"] for k in a.ks}
    if a.samples:
        caches[f"sampled {a.samples}"] = [
            f"teacher.cache.k={a.samples}",
            "teacher.cache.targets=sampled",
            f"teacher.cache.num_samples={a.samples}",
        ]
    for spec in a.tails:
        k, m = (int(x) for x in spec.split(":"))
        caches[f"top-{k} + {m} tail samples"] = [
            f"teacher.cache.k={k}",
            f"teacher.cache.tail_samples={m}",
        ]
    runs: dict[str, tuple[Path, Path | None]] = {"live teacher": (a.work / "run-live", None)}
    for name, opts in caches.items():
        folder = a.work / f"cache-{name.replace(' ', '-')}"
        if (
            not (folder / "manifest.json").is_file()
            or "bytes_per_position" not in (folder / "manifest.json").read_text()
        ):
            distil(["cache", "lm_kd", *data, f"teacher.cache.path={folder}", *opts], a.threads)
        runs[name] = (a.work / f"run-{name.replace(' ', '-')}", folder)
    for run_dir, cache in runs.values():  # live first: the reference
        if not (run_dir / "report.json").is_file():
            extra = [] if cache is None else [f"teacher.cache.path={cache}"]
            distil(["run", "lm_kd", *train, *extra, "--run-dir", str(run_dir)], a.threads)
    records: list[dict[str, Any]] = []
    for name, (run_dir, cache) in runs.items():
        report = json.loads((run_dir / "report.json").read_text())
        row = next(r for r in report["table"]["rows"] if r["model"] == "student (KD)")
        summary = json.loads((run_dir / "student" / "summary.json").read_text())
        rec: dict[str, Any] = {
            "run": name,
            "run_dir": rel(run_dir),
            "perplexity": row["perplexity"],
            "kl_teacher_student": row["kl_teacher_student"],
            "agreement": row["agreement"],
            "train_tokens_per_s": summary["tokens_per_s"],
            "train_wall_s": summary["train_wall_s"],
        }
        if cache is not None:
            manifest = json.loads((cache / "manifest.json").read_text())
            rec |= {
                "cache": rel(cache),
                "bytes_per_token": manifest["bytes_per_position"],
                "kept_mass": manifest["topk_mass_mean"],
            }
        records.append(rec)
    live = records[0]
    for rec in records:
        rec["ppl_vs_live"] = rec["perplexity"] / live["perplexity"] - 1
        rec["speed_vs_live"] = rec["train_tokens_per_s"] / live["train_tokens_per_s"]
    results = BENCH / "results"
    results.mkdir(exist_ok=True)
    with (results / "cache_training.jsonl").open("w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    teacher_ppl = next(
        r
        for r in json.loads((runs["live teacher"][0] / "report.json").read_text())["table"]["rows"]
        if r["model"] == "teacher"
    )["perplexity"]
    lines = [
        "# Training from teacher-output caches vs the live teacher (`bench/cache_training.py`)",
        "",
        f"{time.strftime('%Y-%m-%d')}, CPU, {a.threads} thread(s) per process, 1-min load average {os.getloadavg()[0]:.1f} at the end, "
        f"{(time.time() - started) / 60:.0f} min in all. Teacher `{rel(a.teacher)}` (held-out ppl {teacher_ppl:.1f}); "
        f"the shipped `lm_kd` student and loss (0.1·CE + 0.9·forward KL, T = 1), {steps} steps of 8 × 256 tokens "
        f"(one epoch over {a.examples} blocks), the same seed and batches in every run; held-out: 64 blocks.",
        "",
        "| teacher signal | bytes/token | kept mass | student held-out ppl | vs live | KL(t‖s) | top-1 agree | train tok/s | speed vs live |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['run']} | {_num(r.get('bytes_per_token'), '.1f')} | {_num(r.get('kept_mass'), '.3f')} | "
            f"{r['perplexity']:.1f} | {100 * r['ppl_vs_live']:+.1f}% | {r['kl_teacher_student']:.3f} | {r['agreement']:.3f} | "
            f"{r['train_tokens_per_s']:,.0f} | {r['speed_vs_live']:.2f}x |"
        )
    lines += [
        "",
        "Train tok/s: the training loop's tokens per second (teacher forward or cache read, student forward and backward, optimiser).",
    ]
    (results / "cache_training.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
