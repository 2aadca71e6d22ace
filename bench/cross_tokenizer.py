"""Benchmark (issue 18): distillation across tokenizers, in held-out bits per byte.

The built-in teacher (``lm_pretrain``: Llama 4 x 256, byte-level BPE of 8,192) is distilled into
the same student (Llama 2 x 128, 2 heads, MLP 512, tied embeddings: ``lm_kd``'s shipped student)
with the same budget (``--steps`` optimiser steps of 8 blocks of 256 of the student's own tokens,
lr 1e-3, linear decay, 10 warm-up steps, kd_weight 0.9 unless ``--kd-weight``, T = 1, seed 0),
on two tokenizer pairs:

* **hard**: the student reads a Unigram of 4,096 with Metaspace pre-tokenisation (about half of
  the aligned groups one-to-one);
* **easy**: the student reads a BPE of 2,048 of the teacher's family (nested vocabulary).

Arms per pair: no teacher (the run's baseline phase); sequence-level KD (cross-entropy on
teacher samples: ``distil generate`` at temperature 1, each prompt + continuation a document);
ULD (positional pairs, Boizard et al.); GOLD's byte-span ULD; GOLD's hybrid (forward KL on the
shared vocabulary entries + ULD on the rest); MinED (forward KL after FuseLLM's edit-distance
map); the first-token map (forward KL after carrying each teacher entry to the first token of
the student's encoding of its text: the teacher's probability of the student's next token).
Upper reference: the same student on the teacher's own tokenizer with token-level forward KL
(and its own no-teacher baseline). Finally the hybrid on the hard pair trained from a
cross-tokenizer teacher cache, against the same run with the live teacher.

Every final model (and the teacher) is then scored with ``distil.evaluation.bits_per_byte`` on
the same held-out text: the built-in corpus's validation split (capped by ``--eval-bytes``).
Each arm is ``distil run lm_kd`` in a fresh process (one thread), resumable: an arm whose
``report.json`` exists is not run again.

    python bench/cross_tokenizer.py --teacher runs/lm-teacher \\
        --hard-tokenizer toks/unigram-4096 --easy-tokenizer toks/bpe-2048 --work runs/xt-bench

Writes ``bench/results/cross_tokenizer.jsonl`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STUDENT = (
    "student.model={spec: {num_layers: 2, hidden_size: 128, num_heads: 2, "
    "intermediate_size: 512, max_context: 256, tie_word_embeddings: true}}"
)
METHODS = {
    "uld": ["kd.cross_tokenizer.loss=uld", "kd.cross_tokenizer.alignment=positional"],
    "byte_span_uld": ["kd.cross_tokenizer.loss=uld"],
    "hybrid": ["kd.cross_tokenizer.loss=hybrid"],
    "min_ed": ["kd.cross_tokenizer.loss=min_ed"],
    "first_token": ["kd.cross_tokenizer.loss=first_token"],
}
LABELS = {
    "baseline": "no teacher",
    "seqkd": "sequence-level KD (teacher samples)",
    "uld": "ULD (positional)",
    "byte_span_uld": "ULD on byte-span groups (GOLD)",
    "hybrid": "byte-span + hybrid (GOLD)",
    "min_ed": "MinED (FuseLLM)",
    "first_token": "byte-span + first-token map (ours)",
    "hybrid_cache": "byte-span + hybrid, from a teacher cache",
    "same_tokenizer_kd": "same-tokenizer KD (upper reference)",
    "same_tokenizer_baseline": "no teacher, teacher's tokenizer",
    "teacher": "teacher",
}


def common(args: argparse.Namespace) -> list[str]:
    out = [
        f"teacher.model={{hf: {args.teacher}}}",
        STUDENT,
        f"train.max_steps={args.steps}",
        "train.batch_size=8",
        "train.lr=1e-3",
        "train.scheduler=linear",
        "train.warmup_steps=10",
        "train.max_grad_norm=1.0",
        f"train.checkpoint_every={args.steps}",
        f"data.max_length={args.max_length}",
        f"data.train_limit={8 * args.steps}",  # one epoch: every arm reads the same blocks
        "data.eval_limit=16",
        f"kd.kd_weight={args.kd_weight}",
        "kd.kd_temperature=1.0",
        "kd.divergence=forward_kl",
        "eval.generation.prompts=0",
        "run.log_with=[]",
        "run.cpu_threads=1",
    ]
    if args.corpus_max_bytes:
        out.append(f"data.corpus_max_bytes={args.corpus_max_bytes}")
    return out


def arms(args: argparse.Namespace, seqkd_data: Path) -> list[tuple[str, str, list[str]]]:
    """(pair, arm, overrides) of every run, in the order they run."""
    runs: list[tuple[str, str, list[str]]] = [
        ("same", "same_tokenizer_kd", ["eval.baseline=true"]),
    ]
    for pair, tok in (("hard", args.hard_tokenizer), ("easy", args.easy_tokenizer)):
        if tok is None:
            continue
        student_tok = [f"student.tokenizer={tok}"]
        for i, (method, overrides) in enumerate(METHODS.items()):
            baseline = "eval.baseline=true" if i == 0 else "eval.baseline=false"
            runs.append((pair, method, [*student_tok, *overrides, baseline]))
        runs.append(
            (
                pair,
                "seqkd",
                [
                    *student_tok,
                    "kd.kd_weight=0",
                    f"data.source={{train: [{seqkd_data}]}}",
                    "eval.baseline=false",
                ],
            )
        )
    if args.hard_tokenizer is not None:
        cache = args.work / "cache-hybrid-hard"
        runs.append(
            (
                "hard",
                "hybrid_cache",
                [
                    f"student.tokenizer={args.hard_tokenizer}",
                    *METHODS["hybrid"],
                    f"teacher.cache={{path: {cache}, k: {args.cache_k}}}",
                    "eval.baseline=false",
                ],
            )
        )
    return runs


def run(cmd: list[str], log: Path) -> dict[str, float]:
    """Run a command (stdout+stderr to ``log``); return wall and child CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    with log.open("w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({code}); see {log}")
    return {
        "wall_s": time.perf_counter() - started,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
    }


def seqkd_texts(args: argparse.Namespace) -> Path:
    """Teacher samples as documents (prompt + continuation), made once."""
    out = args.work / "seqkd.jsonl"
    if out.is_file():
        return out
    generated = args.work / "generated"
    cmd = [
        sys.executable,
        "-m",
        "distil",
        "generate",
        "generate",
        f"teacher.model={{hf: {args.teacher}}}",
        f"prompts.limit={args.seqkd_prompts}",
        "prompts.prompt_tokens=32",
        f"generation.max_new_tokens={args.max_length - 32}",
        "generation.sampling_temperature=1.0",
        "generation.batch_size=16",
        f"output={generated}",
    ]
    timing = run(cmd, args.work / "generate.log")
    rows = []
    for shard in sorted(generated.glob("shard-*.jsonl")):
        for line in shard.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            rows.append(json.dumps({"text": record["prompt"] + record["completion"]}))
    out.write_text("\n".join(rows) + "\n", encoding="utf-8")
    print(json.dumps({"measure": "seqkd_generation", "documents": len(rows), **timing}), flush=True)
    return out


def held_out_texts(limit_bytes: int) -> list[str]:
    """The built-in corpus's validation split, document by document, up to ``limit_bytes``."""
    import tempfile

    sys.path.insert(0, str(ROOT / "src"))
    from distil.data.corpus import build_stdlib_corpus, read_corpus_texts

    corpus = build_stdlib_corpus(Path(tempfile.mkdtemp()), test_fraction=0.0)
    texts, used = [], 0
    for text in read_corpus_texts([corpus.split("validation").path]):
        if used >= limit_bytes:
            break
        text = text[: max(0, limit_bytes - used)]
        texts.append(text)
        used += len(text.encode("utf-8"))
    return texts


def evaluate(
    folders: dict[str, Path], texts: list[str], max_length: int
) -> dict[str, dict[str, float]]:
    """Bits per byte of every model folder on the same texts."""
    import torch

    from distil.evaluation.bits_per_byte import bits_per_byte
    from distil.models.lm import load_causal_lm
    from distil.models.vocab import load_tokenizer_folder

    torch.set_num_threads(1)
    out = {}
    for name, folder in folders.items():
        started = time.perf_counter()
        model = load_causal_lm(folder, dtype=torch.float32)
        result = bits_per_byte(model, load_tokenizer_folder(folder), texts, max_length=max_length)
        out[name] = {**result.as_dict(), "eval_s": time.perf_counter() - started}
        print(json.dumps({"measure": "bits_per_byte", "model": name, **out[name]}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--hard-tokenizer", type=Path)
    ap.add_argument("--easy-tokenizer", type=Path)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seqkd-prompts", type=int, default=1024)
    ap.add_argument("--cache-k", type=int, default=32)
    ap.add_argument("--kd-weight", type=float, default=0.9, help="kd.kd_weight of every KD arm")
    ap.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="PAIR-ARM",
        help="run these arms only, e.g. hard-hybrid",
    )
    ap.add_argument("--eval-bytes", type=int, default=200_000)
    ap.add_argument("--max-length", type=int, default=256, help="tokens per block")
    ap.add_argument("--corpus-max-bytes", type=int, default=None, help="smoke tests only")
    ap.add_argument(
        "--results", type=Path, default=ROOT / "bench" / "results" / "cross_tokenizer.jsonl"
    )
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    seqkd = seqkd_texts(args)
    lines: list[dict[str, Any]] = []
    for pair, arm, overrides in arms(args, seqkd):
        if args.only and f"{pair}-{arm}" not in args.only:
            continue
        run_dir = args.work / "runs" / f"{pair}-{arm}"
        timing_file = run_dir / "bench-timing.json"
        if not (run_dir / "report.json").is_file():
            load = os.getloadavg()[0]
            cmd = [sys.executable, "-m", "distil", "run", "lm_kd", *common(args), *overrides]
            timing = run([*cmd, "--run-dir", str(run_dir)], args.work / f"{pair}-{arm}.log")
            timing |= {"load_avg_1m_before": load, "load_avg_1m_after": os.getloadavg()[0]}
            timing_file.write_text(json.dumps(timing))
        timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
        line = {"measure": "run", "pair": pair, "arm": arm, "overrides": overrides, **timing}
        print(json.dumps(line), flush=True)
        lines.append(line)
    folders = {"teacher": args.teacher}
    for line in lines:
        run_dir = args.work / "runs" / f"{line['pair']}-{line['arm']}"
        key = f"{line['pair']}-{line['arm']}"
        folders[key] = run_dir / "student" / "final"
        if (run_dir / "baseline" / "final").is_dir():
            name = (
                "same-same_tokenizer_baseline"
                if line["pair"] == "same"
                else f"{line['pair']}-baseline"
            )
            folders[name] = run_dir / "baseline" / "final"
    scores = evaluate(folders, held_out_texts(args.eval_bytes), args.max_length)
    for name, score in scores.items():
        lines.append({"measure": "bits_per_byte", "model": name, **score})
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    write_table(args.results.with_suffix(".md"), lines, scores, args)


def write_table(
    path: Path,
    lines: list[dict[str, Any]],
    scores: dict[str, dict[str, float]],
    args: argparse.Namespace,
) -> None:
    def bpb(name: str) -> float | None:
        return scores[name]["bits_per_byte"] if name in scores else None

    same_base, same_kd = bpb("same-same_tokenizer_baseline"), bpb("same-same_tokenizer_kd")
    same_gain = None if same_base is None or same_kd is None else same_base - same_kd
    runs = {(line["pair"], line["arm"]): line for line in lines if line["measure"] == "run"}
    out = [
        "# Distillation across tokenizers (issue 18)",
        "",
        f"Held-out bits per byte on {int(scores['teacher']['bytes']):,} bytes of the built-in "
        f"corpus's validation split; student Llama 2x128 trained {args.steps} steps of 8 x 256 of "
        "its own tokens (one epoch over the same training blocks) from the same initialisation, "
        f"kd_weight {args.kd_weight:g}; "
        "teacher bits per byte "
        f'{scores["teacher"]["bits_per_byte"]:.4f}. "share of same-tokenizer gain" = '
        "(no teacher − method) / (no teacher − same-tokenizer KD), each against the no-teacher "
        "student of its own tokenizer.",
        "",
        "| pair | method | bits/byte | vs no teacher | share of same-tokenizer gain | train wall (s) | load |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    order = ["baseline", "seqkd", *METHODS, "hybrid_cache"]
    rows = [("same", "same_tokenizer_baseline"), ("same", "same_tokenizer_kd")]
    for pair in ("hard", "easy"):
        rows += [(pair, arm) for arm in order]
    for pair, arm in rows:
        name = f"{pair}-{arm}"
        value = bpb(name)
        if value is None:
            continue
        base = bpb("same-same_tokenizer_baseline" if pair == "same" else f"{pair}-baseline")
        delta = "" if base is None else f"{value - base:+.4f}"
        share = ""
        if base is not None and same_gain and arm not in ("baseline", "same_tokenizer_baseline"):
            share = f"{(base - value) / same_gain:.2f}"
        timing = runs.get((pair, arm), {})
        wall = f"{timing['wall_s']:.0f}" if "wall_s" in timing else ""
        load = f"{timing.get('load_avg_1m_before', 0):.1f}" if timing else ""
        out.append(
            f"| {pair} | {LABELS[arm]} | {value:.4f} | {delta} | {share} | {wall} | {load} |"
        )
    live, cached = bpb("hard-hybrid"), bpb("hard-hybrid_cache")
    if live is not None and cached is not None:
        out += [
            "",
            f"Cache vs live (hybrid, hard pair, top-{args.cache_k} of each merged group "
            f"distribution): {cached:.4f} vs {live:.4f} bits/byte "
            f"({100 * (cached / live - 1):+.2f}%).",
        ]
    path.write_text("\n".join(out) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
