"""Benchmark: how stable the report's speed-up headlines are, before and after interleaving.

Loads the teacher, KD student and baseline of a finished ``classifier_kd`` run (the default job)
and times their batch-1 forward pass several times over, two ways, trials alternating:

- ``separate`` (what reports did before): each model's median latency measured alone, one model
  after the other (``cpu_latency_ms``), speed-up = teacher median / model median;
- ``interleaved`` (what reports do now): ``interleaved_speeds``, every model in every round in a
  rotating order, speed-up = median of the per-round ratios, with quartiles and a "too noisy to
  call" verdict.

The KD student and the baseline are the same architecture, so their speed-ups should agree; how
far apart they land, and how much a trial's headline moves between trials, is the noise.

    python bench/latency_spread.py --run runs/classifier_kd-... --trials 6

Prints one JSON line per trial and method (with the load average and process CPU time) and writes
a Markdown table to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml

BENCH = Path(__file__).resolve().parent
ROLES = (("teacher", "teacher"), ("student (KD)", "student"), ("baseline (no teacher)", "baseline"))


def load_models(run: Path) -> tuple[dict[str, torch.nn.Module], dict[str, Any]]:
    """The run's three models (final weights) and their batch-1 test inputs."""
    from distil.models.classifier import build_classifier, load_weights
    from distil.recipes.classifier_kd import Config, load_data

    cfg = Config.model_validate(yaml.safe_load((run / "config.resolved.yaml").read_text()))
    data = load_data(cfg)
    modules, inputs = {}, {}
    for role, folder in ROLES:
        spec = cfg.teacher.model if folder == "teacher" else cfg.student.model
        built = build_classifier(**spec.model_dump(), data=data)
        load_weights(built.module, run / folder / "final" / "model.safetensors")
        modules[role] = built.module.eval()
        inputs[role] = {k: v[:1] for k, v in built.encoder(data.test).items()}
    return modules, inputs


def separate(modules: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    from distil.evaluation.cost import cpu_latency_ms, cpu_threads
    from distil.models.classifier import logits_of

    with cpu_threads(1):
        ms = {r: cpu_latency_ms(lambda r=r: logits_of(modules[r], inputs[r])) for r in modules}
    return {r: {"speedup": ms["teacher"] / ms[r], "latency_b1_ms": ms[r]} for r in modules}


def interleaved(modules: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    from distil.evaluation.cost import interleaved_speeds
    from distil.models.classifier import logits_of

    calls = {r: (lambda r=r: logits_of(modules[r], inputs[r])) for r in modules}
    return interleaved_speeds(calls, reference="teacher")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished classifier_kd run")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--tag", default="latency_spread")
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    parser.add_argument(
        "--burst",
        type=float,
        default=0.0,
        help="also run a CPU burner that is busy and idle in turns of this many seconds: load "
        "that changes while models are timed, as on a shared machine",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    modules, inputs = load_models(args.run)
    burner = None
    if args.burst > 0:
        import subprocess
        import sys

        busy = (
            f"import time\nwhile True:\n    end = time.perf_counter() + {args.burst}\n"
            f"    while time.perf_counter() < end: pass\n    time.sleep({args.burst})\n"
        )
        burner = subprocess.Popen([sys.executable, "-c", busy])
    lines: list[dict[str, Any]] = []
    for trial in range(args.trials):
        methods = (separate, interleaved) if trial % 2 == 0 else (interleaved, separate)
        for method in methods:
            wall, cpu = time.perf_counter(), time.process_time()
            rows = method(modules, inputs)
            line = {
                "trial": trial,
                "method": method.__name__,
                "load1": os.getloadavg()[0],
                "burst_s": args.burst,
                "wall_s": time.perf_counter() - wall,
                "cpu_s": time.process_time() - cpu,
                **{
                    f"{role.split(' ')[0]}_{k}": v
                    for role, row in rows.items()
                    if role != "teacher"
                    for k, v in row.items()
                    if k.startswith("speedup") and not k.endswith("rounds")
                },
            }
            print(json.dumps(line), flush=True)
            lines.append(line)
    if burner is not None:
        burner.kill()
        burner.wait()
    out = args.results / args.tag
    out.with_suffix(".jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    table = [
        "| trial | method | load | KD student speed-up | baseline speed-up | student / baseline | verdict (student) |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for x in lines:
        quart = (
            f" ({x['student_speedup_q1']:.3g}-{x['student_speedup_q3']:.3g})"
            if "student_speedup_q1" in x
            else ""
        )
        bquart = (
            f" ({x['baseline_speedup_q1']:.3g}-{x['baseline_speedup_q3']:.3g})"
            if "baseline_speedup_q1" in x
            else ""
        )
        table.append(
            f"| {x['trial']} | {x['method']} | {x['load1']:.1f} | {x['student_speedup']:.3g}{quart} "
            f"| {x['baseline_speedup']:.3g}{bquart} | {x['student_speedup'] / x['baseline_speedup']:.3f} "
            f"| {x.get('student_speedup_verdict') or '-'} |"
        )
    table += [
        "",
        "| method | student speed-up across trials (min-max) | student/baseline (min-max) |",
    ]
    table.append("|---|---|---|")
    for name in ("separate", "interleaved"):
        mine = [x for x in lines if x["method"] == name]
        s = [x["student_speedup"] for x in mine]
        r = [x["student_speedup"] / x["baseline_speedup"] for x in mine]
        table.append(
            f"| {name} | {min(s):.3g}-{max(s):.3g} (median {statistics.median(s):.3g}) "
            f"| {min(r):.3f}-{max(r):.3f} |"
        )
    out.with_suffix(".md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
