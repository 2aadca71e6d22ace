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

plus ``pretrained`` (the shared starting point, fewer steps). Training is ``distil run lm_kd``
through the CLI (no training loop here)::

    flock /work/heavy.lock nice -n 5 env OMP_NUM_THREADS=1 \\
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
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
PRETRAIN_STEPS, FURTHER_STEPS, BATCH, SEQ = 150, 100, 8, 256
DRAFT_SPEC = [
    "student.spec.num_layers=2",
    "student.spec.hidden_size=128",
    "student.spec.num_heads=2",
    "student.spec.intermediate_size=512",
    "student.spec.max_context=256",
    "student.spec.tie_word_embeddings=true",
]
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
    "seqkd": ["kd.kd_weight=0", "data.builtin=null", "data.format=prompt_completion"],
}
GENERATED_PROMPTS = 1024


def _common(target: Path, steps: int) -> list[str]:
    return [
        f"teacher.hf={target}",
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
        args = ["run", "lm_kd", *_common(target, PRETRAIN_STEPS), "student.init=scratch"]
        args += [*DRAFT_SPEC, "kd.kd_weight=0", "--run-dir", str(pre)]
        timings["pretrained"] = {"seconds": _run(args, log), "load_before": load}
    generated = work / "generated"
    if not (generated / "manifest.json").is_file():
        load = os.getloadavg()
        args = [
            "generate",
            f"teacher={target}",
            f"output={generated}",
            "generation.sampling_temperature=1.0",
            "generation.max_new_tokens=64",
            f"prompts.limit={GENERATED_PROMPTS}",
        ]
        timings["generate"] = {"seconds": _run(args, log), "load_before": load}
    for name, extra in DRAFTS.items():
        run_dir = work / name
        if (run_dir / "student" / "final").is_dir():
            continue
        load = os.getloadavg()
        args = ["run", "lm_kd", *_common(target, FURTHER_STEPS), "student.init=checkpoint"]
        args += [f"student.hf={pre / 'student' / 'final'}", "student.spec=null", *extra]
        if name == "seqkd":
            args += [f"data.train_files=[{generated}]"]
        timings[name] = {
            "seconds": _run([*args, "--run-dir", str(run_dir)], log),
            "load_before": load,
        }
    with (work / "train_timings.jsonl").open("a") as out:
        out.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), **timings}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["train", "eval"])
    parser.add_argument("--target", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args()
    if args.phase == "train":
        train(args.target, args.work)
    else:
        raise SystemExit("eval: not written yet")
    print(json.dumps({"phase": args.phase, "platform": platform.platform()}))


if __name__ == "__main__":
    main()
