"""Benchmark: compression with distillation (``distil run compress``), the issue's two tables and
the LoRA row.

LM: the built-in teacher (``lm_pretrain`` as shipped: 8.39M parameters, 160 x 16 x 256 = 655k
tokens) pruned to about half its parameters, two ways: width (residual 256 -> 128) and depth +
width (4 -> 2 layers, residual 256 -> 176; embeddings and LM head are half the parameters, so
depth alone cannot halve the model). Each pruned model is distilled from the teacher with 32 x
8 x 256 = 65k tokens (10 % of the teacher's); the same shape trained from scratch on the same
tokens and the pruned model without distillation (as pruned, and fine-tuned with CE on the same
tokens) are the comparisons; then int8 weight-only post-training and QAT-int8 (8 more steps of
distillation through fake quantisation). LoRA-KD (r=8 on q/v/up/down) on the width-pruned model
with the same tokens gives the share of full KD's gain recovered. Optionally (#78) the pruned
model is distilled on the teacher's own continuations of stdlib prompts instead.

Vision: a Fashion-MNIST CNN teacher (``--vision-teacher`` weights, else trained here with
``classifier_kd-fashion-mnist``'s teacher settings) pruned by channels, distilled (--vision-epochs, default one),
quantised to static int8 (PT2E, x86 Inductor quantizer) and exported.

Latency: the final models of each table are timed together, interleaved round by round
(``distil.compress.latency``), at batch 1 and 64, eager and ``torch.compile``d; the pipeline
runs themselves measure size and quality only. Every run records its wall time, the CPU time of
its process and the load average.

    python bench/compress.py --teacher runs/lm-teacher --work runs/bench-compress

One JSON line per row on stdout; ``bench/results/compress.{jsonl,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import yaml

BENCH = Path(__file__).resolve().parent
TEACHER_TOKENS = 160 * 16 * 256  # lm_pretrain as shipped: steps x batch x tokens
FASHION_CHANNELS = [48, 96, 128]  # classifier_kd-fashion-mnist's teacher


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _load() -> float:
    return os.getloadavg()[0]


def run_config(name: str, config: dict[str, Any], work: Path, threads: int) -> dict[str, Any]:
    """``distil run`` one compress config in its own run folder (a finished one is read back);
    return its report with the run's wall time, CPU time and load average."""
    run_dir = work / "runs" / name
    done = run_dir / "report.json"
    timing_file = run_dir.parent / f"{name}.timing.json"
    if not done.is_file():
        shutil.rmtree(run_dir, ignore_errors=True)
        path = work / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        load0, cpu0, wall0 = _load(), _children_cpu(), time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "distil", "run", str(path), "--run-dir", str(run_dir)],
            check=True,
            env=env,
        )
        timing = {
            "wall_s": time.perf_counter() - wall0,
            "cpu_s": _children_cpu() - cpu0,
            "load_start": load0,
            "load_end": _load(),
        }
        timing_file.write_text(json.dumps(timing))
    report: dict[str, Any] = json.loads(done.read_text())
    report["timing"] = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    return report


def rows_of(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["model"]: row for row in report["table"]["rows"]}


def stage_of(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in report["details"]["stages"] if s["name"] == name)


# --------------------------------------------------------------------------------------------
# LM


def lm_config(
    args: argparse.Namespace, store: Path, stages: list[dict[str, Any]], *, baseline: bool
) -> dict[str, Any]:
    return {
        "recipe": "compress",
        "seed": 0,
        "source": {"kind": "causal_lm", "model": {"hf": str(args.teacher)}},
        "store": str(store),
        "stages": stages,
        "distillation": {
            "data": {
                "source": {"builtin": "stdlib"},
                "max_length": 256,
                "eval_limit": args.eval_limit,
            },
            "kd": {"kd_weight": 1.0, "kd_temperature": 1.0, "divergence": "forward_kl"},
        },
        "train": {
            "max_steps": args.kd_steps,
            "batch_size": 8,
            "lr": 1.0e-3,
            "scheduler": "linear",
            "warmup_steps": 4,
            "max_grad_norm": 1.0,
            "checkpoint_every": 8,
        },
        "measure": {"latency": False},
        "eval": {"baseline": baseline},
        "run": {"log_with": [], "cpu_threads": 1},
    }


PRUNES = {
    "width": {"hidden_size": 128},
    "depth+width": {"num_layers": 2, "hidden_size": 176},
}


def run_lm(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    store = work / "store-lm"
    calibration = {"num_examples": args.calibration_examples, "batch_size": 16}
    qat = {"train.max_steps": args.qat_steps, "train.lr": 2.0e-4, "train.warmup_steps": 0}
    out: dict[str, Any] = {"reports": {}}
    for variant, method in PRUNES.items():
        prune = {"stage": "prune", "method": method, "calibration": calibration}
        stages = [
            prune,
            {"stage": "distil"},
            {"stage": "quantise", "scheme": "int8_weight_only"},
            {"stage": "distil", "name": "qat", "overrides": qat},
            {"stage": "export"},
        ]
        name = f"lm-{variant.replace('+', '-')}"
        cfg = lm_config(args, store, stages, baseline=True)
        out["reports"][variant] = run_config(name, cfg, work, args.threads)
    width = {"stage": "prune", "method": PRUNES["width"], "calibration": calibration}
    extras: dict[str, list[dict[str, Any]]] = {
        "width CE fine-tune": [width, {"stage": "distil", "overrides": {"kd.kd_weight": 0.0}}],
        "width LoRA-KD": [
            width,
            {"stage": "distil", "lora": {"rank": 8, "alpha": 16, "keep_adapters": True}},
        ],
        # int8 activations too: post-training costs more, so QAT has something to recover
        "width int8 dynamic": [
            width,
            {"stage": "distil"},
            {"stage": "quantise", "scheme": "int8_dynamic"},
            {"stage": "distil", "name": "qat", "overrides": qat},
        ],
    }
    for label, stages in extras.items():
        cfg = lm_config(args, store, stages, baseline=False)
        if "LoRA" in label:
            cfg["train"]["lr"] = 5.0e-3  # adapters start at zero: LoRA's usual larger step
        out["reports"][label] = run_config(label.replace(" ", "-"), cfg, work, args.threads)
    if args.self_data:
        cfg = lm_config(args, store, [width, {"stage": "distil"}], baseline=False)
        cfg["distillation"]["self_data"] = {
            "prompts": {"source": {"builtin": "stdlib"}, "prompt_tokens": 64, "limit": 256},
            "generation": {"max_new_tokens": 64, "batch_size": 16},
        }
        out["reports"]["width KD on teacher generations"] = run_config(
            "width-self-data", cfg, work, args.threads
        )
    return out


def lm_rows(result: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The LM table, width rows first: what pruning alone, CE, KD and scratch give, then int8."""
    kd_tokens = args.kd_steps * 8 * 256
    qat_tokens = kd_tokens + args.qat_steps * 8 * 256
    reports = result["reports"]
    teacher = rows_of(reports["width"])["teacher (source)"]
    rows = [_lm_row("teacher", "-", teacher, teacher, TEACHER_TOKENS, "4 layers x 256")]
    for variant in PRUNES:
        report = reports[variant]
        r = rows_of(report)
        shape = stage_of(report, "prune")["details"]["shape"]
        entries: list[tuple[str, dict[str, Any], int]] = [
            ("pruned, no training", r["prune (prune)"], 0)
        ]
        if variant == "width":
            ce = rows_of(reports["width CE fine-tune"])["distil (distil)"]
            entries.append(("pruned + CE fine-tune (no teacher)", ce, kd_tokens))
        entries += [
            ("pruned + KD", r["distil (distil)"], kd_tokens),
            ("same shape from scratch", r["baseline (scratch, same shape)"], kd_tokens),
        ]
        if variant == "width" and "width KD on teacher generations" in reports:
            own = reports["width KD on teacher generations"]
            tokens = int(stage_of(own, "distil")["details"]["train_summary"].get("tokens", 0))
            label = "pruned + KD on the teacher's generations (#78)"
            entries.append((label, rows_of(own)["distil (distil)"], tokens))
        entries += [
            ("pruned + KD, int8 weight-only", r["quantise (quantise)"], kd_tokens),
            ("pruned + KD, QAT-int8 weight-only", r["qat (distil)"], qat_tokens),
        ]
        if variant == "width":
            dynamic = rows_of(reports["width int8 dynamic"])
            entries += [
                (
                    "pruned + KD, int8 dynamic (activations too)",
                    dynamic["quantise (quantise)"],
                    kd_tokens,
                ),
                ("pruned + KD, QAT-int8 dynamic", dynamic["qat (distil)"], qat_tokens),
            ]
        shape_text = f"{shape['num_layers']} layers x {shape['hidden_size']}"
        rows += [_lm_row(variant, what, row, teacher, n, shape_text) for what, row, n in entries]
    return rows


def _lm_row(
    variant: str, what: str, row: dict[str, Any], teacher: dict[str, Any], tokens: int, shape: str
) -> dict[str, Any]:
    return {
        "table": "lm",
        "variant": variant,
        "model": what,
        "shape": shape,
        "params": row["params"],
        "params_vs_teacher": row["params"] / teacher["params"],
        "tokens": tokens,
        "tokens_vs_teacher": tokens / TEACHER_TOKENS,
        "perplexity": row["perplexity"],
        "ppl_vs_teacher": row["perplexity"] / teacher["perplexity"],
        "ce": row["ce"],
        "weight_bytes": row["size_bytes"],
    }


def lora_row(result: dict[str, Any]) -> dict[str, Any]:
    reports = result["reports"]
    width = rows_of(reports["width"])
    pruned, full = width["prune (prune)"], width["distil (distil)"]
    lora_report = reports["width LoRA-KD"]
    lora = rows_of(lora_report)["distil (distil)"]
    details = stage_of(lora_report, "distil")["details"]
    gain_full = pruned["ce"] - full["ce"]
    gain_lora = pruned["ce"] - lora["ce"]
    return {
        "table": "lora",
        "model": "width-pruned + LoRA-KD (r=8, q/v/up/down)",
        "trainable_parameters": details["trainable_parameters"],
        "trainable_share": details["trainable_parameters"] / details["total_parameters"],
        "perplexity": lora["perplexity"],
        "full_kd_perplexity": full["perplexity"],
        "pruned_perplexity": pruned["perplexity"],
        "gain_share_ce": gain_lora / gain_full if gain_full else math.nan,
        "gain_share_ppl": (pruned["perplexity"] - lora["perplexity"])
        / (pruned["perplexity"] - full["perplexity"]),
    }


# --------------------------------------------------------------------------------------------
# Vision


def vision_teacher(args: argparse.Namespace, work: Path) -> tuple[Path, list[int], dict[str, Any]]:
    """The Fashion-MNIST teacher's weights: given, or trained once with the shipped settings."""
    if args.vision_teacher is not None:
        return args.vision_teacher, args.vision_channels, {"trained": "given"}
    run_dir = work / "vision-teacher"
    weights = run_dir / "teacher" / "final" / "model.safetensors"
    timing: dict[str, Any] = {"trained": str(run_dir)}
    if not weights.is_file():
        load0, cpu0, wall0 = _load(), _children_cpu(), time.perf_counter()
        command = [sys.executable, "-m", "distil", "run", "classifier_kd-fashion-mnist"]
        command += [
            f"teacher.training.epochs={args.vision_teacher_epochs}",
            "train.max_steps=1",
            "eval.baseline=false",
            "run.log_with=[]",
            "run.cpu_threads=1",
            f"--run-dir={run_dir}",
        ]
        if run_dir.is_dir():
            command.append("--resume")
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        timing |= {
            "wall_s": time.perf_counter() - wall0,
            "cpu_s": _children_cpu() - cpu0,
            "load_start": load0,
            "load_end": _load(),
        }
    return weights, FASHION_CHANNELS, timing


def vision_config(
    args: argparse.Namespace,
    weights: Path,
    channels: list[int],
    store: Path,
    prune: dict[str, Any],
) -> dict[str, Any]:
    return {
        "recipe": "compress",
        "seed": 0,
        "source": {
            "kind": "classifier",
            "model": {"zoo": "cnn", "kwargs": {"channels": channels}, "weights": str(weights)},
        },
        "store": str(store),
        "stages": [
            {"stage": "prune", "method": prune},
            {"stage": "distil"},
            {"stage": "quantise", "method": "static_pt2e", "calibration": {"num_examples": 512}},
            {"stage": "export"},
        ],
        "distillation": {
            "data": {"source": {"builtin": "fashion-mnist"}},
            "kd": {"kd_weight": 0.5, "kd_temperature": 2.0},
        },
        "train": {
            "epochs": args.vision_epochs,
            "max_steps": args.vision_max_steps,
            "batch_size": 128,
            "lr": 3.0e-3,
            "weight_decay": 0.01,
            "scheduler": "cosine",
            "checkpoint_every": 100,
        },
        "measure": {"latency": False},
        "eval": {"baseline": True},
        "run": {"log_with": [], "cpu_threads": 1},
    }


VISION_PRUNES = {"ratio 0.5": {"ratio": 0.5}, "ratio 0.75": {"ratio": 0.75}}


def pt2_weight_bytes(path: Path) -> int:
    """Bytes of the tensors inside a ``.pt2`` archive (the rest is the serialised program)."""
    with zipfile.ZipFile(path) as archive:
        return sum(i.file_size for i in archive.infolist() if "/data/weights/weight_" in i.filename)


def run_vision(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    weights, channels, teacher_timing = vision_teacher(args, work)
    store = work / "store-vision"
    reports, weight_storage = {}, {}
    for label, prune in VISION_PRUNES.items():
        name = f"vision-{label.replace(' ', '-')}"
        config = vision_config(args, weights, channels, store, prune)
        reports[label] = run_config(name, config, work, args.threads)
        # the same prune and distil stages (reused), int8 weight storage instead of PT2E
        config["stages"][2] = {"stage": "quantise", "method": "int8_weights"}
        config["eval"]["baseline"] = False
        weight_storage[label] = run_config(f"{name}-int8-weights", config, work, args.threads)
    return {
        "reports": reports,
        "int8_weights": weight_storage,
        "teacher": teacher_timing,
        "channels": channels,
        "epochs": args.vision_epochs,
    }


def vision_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for label, report in result["reports"].items():
        r = rows_of(report)
        teacher = r["teacher (source)"]
        if not rows:
            rows.append(_vision_row("-", "teacher", teacher, teacher, None))
        kwargs = stage_of(report, "prune")["details"]["zoo_kwargs"]
        quantised_dir = Path(stage_of(report, "quantise")["folder"]) / "model"
        n = result["epochs"]
        epochs = f"{n} epoch{'s' if n > 1 else ''}"
        entries = [
            ("pruned, no training", r["prune (prune)"], None),
            (f"pruned + KD ({epochs})", r["distil (distil)"], None),
            (f"same shape from scratch ({epochs})", r["baseline (scratch, same shape)"], None),
            (
                "pruned + KD, static int8 (PT2E)",
                r["quantise (quantise)"],
                quantised_dir / "model.pt2",
            ),
        ]
        storage = rows_of(result["int8_weights"][label])["quantise (quantise)"]
        entries.append(("pruned + KD, int8 weights (float compute)", storage, None))
        for what, row, pt2 in entries:
            out = _vision_row(label, what, row, teacher, pt2)
            out["channels"] = kwargs["channels"]
            rows.append(out)
    return rows


def _vision_row(
    variant: str, what: str, row: dict[str, Any], teacher: dict[str, Any], pt2: Path | None
) -> dict[str, Any]:
    out = {
        "table": "vision",
        "variant": variant,
        "model": what,
        "params": row["params"],
        "accuracy": row["accuracy"],
        "points_vs_teacher": 100 * (row["accuracy"] - teacher["accuracy"]),
        "file_bytes": row["size_bytes"],
        "file_ratio": teacher["size_bytes"] / row["size_bytes"],
    }
    if pt2 is not None:
        out["tensor_bytes"] = pt2_weight_bytes(pt2)
        out["tensor_ratio"] = teacher["size_bytes"] / out["tensor_bytes"]
    return out


# --------------------------------------------------------------------------------------------
# Latency: the final models of each table, timed together


def lm_latency(result: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    from distil.compress.artifacts import example_inputs, load_model
    from distil.compress.config import ModelKind
    from distil.compress.latency import latency_grid

    reports = result["reports"]
    folders = {"teacher float32": Path(reports["width"]["details"]["source"]["folder"])}
    for variant in PRUNES:
        report = reports[variant]
        folders[f"{variant} KD float32"] = Path(stage_of(report, "distil")["folder"]) / "model"
        folders[f"{variant} KD int8 weight-only"] = (
            Path(stage_of(report, "quantise")["folder"]) / "model"
        )
    dynamic = reports["width int8 dynamic"]
    folders["width KD int8 dynamic"] = Path(stage_of(dynamic, "quantise")["folder"]) / "model"
    loaded = {name: load_model(ModelKind.causal_lm, f) for name, f in folders.items()}
    some = next(iter(loaded.values()))
    rows = latency_grid(
        {name: m.module for name, m in loaded.items()},
        lambda batch: example_inputs(some, batch, args.latency_tokens),
        batch_sizes=args.latency_batches,
        compiled=(False, True),
        warmup=2,
        repeats=args.latency_repeats,
        threads=1,
    )
    return [{"table": "lm_latency", **row} for row in rows]


def vision_latency(result: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    from distil.compress.artifacts import example_inputs, load_model
    from distil.compress.config import ModelKind
    from distil.compress.latency import latency_grid
    from distil.compress.pipeline import _Positional

    report = result["reports"]["ratio 0.5"]
    folders = {
        "teacher float32": Path(report["details"]["source"]["folder"]),
        "pruned + KD float32": Path(stage_of(report, "distil")["folder"]) / "model",
        "pruned + KD static int8": Path(stage_of(report, "quantise")["folder"]) / "model",
    }
    loaded = {name: load_model(ModelKind.classifier, f) for name, f in folders.items()}
    some = next(iter(loaded.values()))
    rows = latency_grid(
        {name: _Positional(m.module) for name, m in loaded.items()},
        lambda batch: example_inputs(some, batch, 1),
        batch_sizes=args.latency_batches,
        compiled=(False, True),
        warmup=2,
        repeats=args.latency_repeats,
        threads=1,
    )
    return [{"table": "vision_latency", **row} for row in rows]


# --------------------------------------------------------------------------------------------
# Markdown


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown(rows: list[dict[str, Any]], runs: dict[str, Any], args: argparse.Namespace) -> str:
    lines = ["# Compression with distillation (`distil run compress`)", ""]
    command = " ".join(sys.argv[1:])
    for path, name in (
        (args.teacher, "runs/lm-teacher"),
        (args.work, "runs/bench-compress"),
        (args.out, "bench/results"),
        (args.vision_teacher, "FASHION_MNIST_TEACHER.safetensors"),
    ):
        if path is not None:  # the machine's paths say nothing to a reader
            command = command.replace(str(path), name)
    lines += [
        f"Command: `python bench/compress.py {command}`. CPU, 1 thread per run; the machine is "
        "shared (load average per run below).",
        "",
    ]
    lm = [r for r in rows if r["table"] == "lm"]
    if lm:
        teacher = lm[0]
        lines += [
            "## LM: the built-in teacher pruned to half, distilled, quantised",
            "",
            f"Teacher: `lm_pretrain` as shipped, {teacher['params']:,} parameters, "
            f"{TEACHER_TOKENS:,} pre-training tokens. Held-out: the first {args.eval_limit} "
            "examples of 256 tokens of the stdlib corpus's held-out split. KD: forward KL at T=1 "
            "(kd_weight 1), "
            f"{args.kd_steps} steps x 8 x 256 tokens; QAT: {args.qat_steps} more steps through "
            "int8 fake quantisation at lr 2e-4.",
            "",
            "| pruning | model | shape | params (vs teacher) | training tokens (vs teacher's) | "
            "held-out ppl | ppl / teacher | weights on disk |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in lm:
            lines.append(
                f"| {r['variant']} | {r['model']} | {r['shape']} | {r['params']:,} "
                f"({r['params_vs_teacher']:.2f}) | {r['tokens']:,} ({100 * r['tokens_vs_teacher']:.1f} %) | "
                f"{r['perplexity']:.1f} | **{r['ppl_vs_teacher']:.3f}** | {r['weight_bytes'] / 2**20:.2f} MiB |"
            )
        lines.append("")
    lat = [r for r in rows if r["table"] == "lm_latency"]
    if lat:
        title = f"LM latency (one forward pass of batch x {args.latency_tokens} tokens)"
        lines += _latency_table(lat, title)
    lora = [r for r in rows if r["table"] == "lora"]
    for r in lora:
        lines += [
            "## LoRA-KD",
            "",
            "| model | trainable params (share) | held-out ppl | full-KD ppl | pruned ppl | "
            "share of full KD's gain (CE) | (ppl) |",
            "|---|---:|---:|---:|---:|---:|---:|",
            f"| {r['model']} | {r['trainable_parameters']:,} ({100 * r['trainable_share']:.2f} %) | "
            f"{r['perplexity']:.1f} | {r['full_kd_perplexity']:.1f} | {r['pruned_perplexity']:.1f} | "
            f"**{100 * r['gain_share_ce']:.0f} %** | {100 * r['gain_share_ppl']:.0f} % |",
            "",
        ]
    vision = [r for r in rows if r["table"] == "vision"]
    if vision:
        lines += [
            "## Vision: Fashion-MNIST CNN pruned, distilled, quantised",
            "",
            "| pruning | model | channels | params | test acc | points vs teacher | file | "
            "file smaller by | int8 tensors in the file (smaller by) |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in vision:
            tensors = (
                f"{r['tensor_bytes'] / 1024:.1f} KiB ({r['tensor_ratio']:.1f}x)"
                if "tensor_bytes" in r
                else "-"
            )
            lines.append(
                f"| {r['variant']} | {r['model']} | {r.get('channels', '-')} | {r['params']:,} | "
                f"{100 * r['accuracy']:.2f} % | {r['points_vs_teacher']:+.2f} | "
                f"{r['file_bytes'] / 1024:.1f} KiB | **{r['file_ratio']:.1f}x** | {tensors} |"
            )
        lines.append("")
    vlat = [r for r in rows if r["table"] == "vision_latency"]
    if vlat:
        lines += _latency_table(vlat, "Vision latency (one forward pass of batch x 1 x 28 x 28)")
    lines += [
        "## Runs",
        "",
        "| run | wall s | CPU s | load avg start / end |",
        "|---|---:|---:|---|",
    ]
    for name, timing in runs.items():
        if timing.get("wall_s") is not None:
            lines.append(
                f"| {name} | {timing['wall_s']:.0f} | {timing['cpu_s']:.0f} | "
                f"{timing['load_start']:.1f} / {timing['load_end']:.1f} |"
            )
    lines.append("")
    return "\n".join(lines)


def _latency_table(rows: list[dict[str, Any]], title: str) -> list[str]:
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    batches = sorted({int(r["batch_size"]) for r in rows})
    cells = {(r["variant"], r["batch_size"], r["compiled"]): r for r in rows}
    base = variants[0]
    lines = [
        f"## {title}",
        "",
        "Median (p10-p90) ms over interleaved rounds, 1 thread; ratio to the teacher's time in "
        f"the same mode. Load average at the end: {rows[-1]['load_average'][0]:.1f}.",
        "",
        "| model | "
        + " | ".join(f"b{b} {m}" for m in ("eager", "compiled") for b in batches)
        + " |",
        "|---|" + "---:|" * (2 * len(batches)),
    ]
    for variant in variants:
        out = []
        for compiled in (False, True):
            for batch in batches:
                r, t = cells.get((variant, batch, compiled)), cells.get((base, batch, compiled))
                if r is None or t is None:
                    out.append("-")
                    continue
                out.append(
                    f"{r['median_ms']:.1f} ({r['p10_ms']:.1f}-{r['p90_ms']:.1f}), "
                    f"{r['median_ms'] / t['median_ms']:.2f}x"
                )
        lines.append(f"| {variant} | " + " | ".join(out) + " |")
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", type=Path, default=Path("runs/lm-teacher"))
    parser.add_argument("--work", type=Path, default=Path("runs/bench-compress"))
    parser.add_argument("--parts", default="lm,vision", help="comma list: lm, vision")
    parser.add_argument("--kd-steps", type=int, default=32)
    parser.add_argument("--qat-steps", type=int, default=8)
    parser.add_argument("--self-data", action="store_true", help="also the #78 self-data row")
    parser.add_argument("--vision-teacher", type=Path, default=None)
    parser.add_argument(
        "--vision-channels", type=lambda s: [int(c) for c in s.split(",")], default=FASHION_CHANNELS
    )
    parser.add_argument("--vision-teacher-epochs", type=int, default=3)
    parser.add_argument("--vision-epochs", type=int, default=1, help="distil and scratch epochs")
    parser.add_argument("--eval-limit", type=int, default=64, help="held-out LM examples")
    parser.add_argument("--calibration-examples", type=int, default=256)
    parser.add_argument("--vision-max-steps", type=int, default=None, help="smoke runs only")
    parser.add_argument("--latency-tokens", type=int, default=64)
    parser.add_argument(
        "--latency-batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 64]
    )
    parser.add_argument("--latency-repeats", type=int, default=5)
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    parts = set(args.parts.split(","))
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    runs: dict[str, Any] = {}
    if "lm" in parts:
        lm = run_lm(args, work)
        runs |= {f"lm {k}": r["timing"] for k, r in lm["reports"].items()}
        rows += lm_rows(lm, args)
        rows.append(lora_row(lm))
        if not args.no_latency:
            load0, wall0, cpu0 = _load(), time.perf_counter(), time.process_time()
            rows += lm_latency(lm, args)
            runs["lm latency"] = {
                "wall_s": time.perf_counter() - wall0,
                "cpu_s": time.process_time() - cpu0,
                "load_start": load0,
                "load_end": _load(),
            }
    if "vision" in parts:
        vision = run_vision(args, work)
        runs["vision teacher"] = vision["teacher"]
        runs |= {f"vision {k}": r["timing"] for k, r in vision["reports"].items()}
        runs |= {f"vision {k} int8 weights": r["timing"] for k, r in vision["int8_weights"].items()}
        rows += vision_rows(vision)
        if not args.no_latency:
            load0, wall0, cpu0 = _load(), time.perf_counter(), time.process_time()
            rows += vision_latency(vision, args)
            runs["vision latency"] = {
                "wall_s": time.perf_counter() - wall0,
                "cpu_s": time.process_time() - cpu0,
                "load_start": load0,
                "load_end": _load(),
            }
    for row in rows:
        print(json.dumps(row, default=str), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compress.jsonl").write_text(
        "".join(json.dumps(r, default=str) + "\n" for r in rows)
    )
    (args.out / "compress.md").write_text(markdown(rows, runs, args))


if __name__ == "__main__":
    main()
