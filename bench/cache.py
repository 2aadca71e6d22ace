"""Benchmark: teacher-output cache size, coverage and throughput on the built-in LM teacher.

For each ``k`` (and value precision) it writes a cache with ``distil.cache.writer.write_cache``
over the same training blocks of the built-in CPython-stdlib corpus, and reports:

- bytes per supervised token (shard files only; manifest and sidecars are a few KB),
- top-k probability mass coverage (mean over tokens of the teacher mass the k ids hold),
- cache-writing throughput vs the teacher's plain forward throughput over the same batches,
- reading throughput (``CachedTeacher.targets``, the sparse training view, from a fresh reader).

Peers: DistillKit's published compressed logits, ~300 B/token (recommended) and ~114 B/token
(budget), and dense fp32/bf16 logits at this vocabulary.

    python bench/cache.py --teacher bench/artifacts/teacher-step60 --examples 64

Without ``--teacher`` (or if the folder is missing) a random Llama teacher is built from a spec
(4 layers × 256, vocab 8192 from a BPE tokenizer trained on the corpus): sizes are the same,
coverage is then that of an untrained model. One JSON line per measurement on stdout; the
Markdown table and JSON lines go to ``bench/results/cache.{md,jsonl}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
DISTILLKIT = {"DistillKit recommended (published)": 300.0, "DistillKit budget (published)": 114.0}


def _teacher_section(teacher: Path | None, work: Path) -> tuple[dict[str, Any], str]:
    if teacher is not None and teacher.is_dir():
        return {"model": {"hf": str(teacher)}}, str(teacher)
    from distil.data.corpus import (
        build_stdlib_corpus,
        read_corpus_texts,
        train_bpe_tokenizer_from_texts,
    )

    corpus = work / "tok-corpus"
    build_stdlib_corpus(corpus, max_total_bytes=2_000_000, test_fraction=0.0)
    texts = list(read_corpus_texts([corpus / "train.jsonl"]))
    train_bpe_tokenizer_from_texts(texts, work / "tok", 8192)
    spec = {
        "num_layers": 4,
        "hidden_size": 256,
        "num_heads": 4,
        "intermediate_size": 1024,
        "max_context": 256,
    }
    return {"model": {"spec": spec}}, f"random spec {spec} (tokenizer {work / 'tok'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", type=Path, default=BENCH / "artifacts" / "teacher-step60")
    parser.add_argument("--examples", type=int, default=64, help="training blocks cached")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--ks", default="1,8,32,128")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    from distil.cache.writer import _OneProcess, write_cache
    from distil.config.lm import LMCacheJob
    from distil.data.lm import load_lm_data
    from distil.models.lm import load_lm, torch_dtype
    from distil.models.vocab import load_tokenizer_folder, tokenizer_vocab_size
    from distil.teachers import LiveLMTeacher, TeacherSignal
    from distil.teachers.cached import CachedTeacher

    work = Path(tempfile.mkdtemp(prefix="distil-bench-cache-"))
    teacher_section, teacher_desc = _teacher_section(args.teacher, work)
    base: dict[str, Any] = {
        "tokenizer": str(args.teacher) if "hf" in teacher_section["model"] else str(work / "tok"),
        "data": {
            "source": {"builtin": "stdlib"},
            "corpus_max_bytes": 2_000_000,
            "max_length": args.seq,
            "train_limit": args.examples,
        },
        "teacher": {**teacher_section, "device": "cpu"},
    }
    rows: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    # the teacher's plain forward over the same batches: the floor for writing
    cfg0 = LMCacheJob.model_validate(base)
    tok = load_tokenizer_folder(cfg0.tokenizer or "")
    model = load_lm(cfg0.teacher.model, tok, seed=cfg0.teacher_seed)
    vocab = tokenizer_vocab_size(tok)
    data = load_lm_data(cfg0.data, tok, work / "data", _OneProcess())
    live = LiveLMTeacher(
        model,
        vocab_size=vocab,
        device=torch.device("cpu"),
        dtype=torch_dtype(cfg0.teacher.dtype, model.dtype),
        output_device=torch.device("cpu"),
    )
    batches = [
        data.collate(data.train, list(range(i, min(i + 8, len(data.train)))))
        for i in range(0, len(data.train), 8)
    ]
    t0 = time.perf_counter()
    for b in batches:
        live(b)
    forward_s = time.perf_counter() - t0
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    supervised = int(data.targets_per_example.sum())
    emit(
        {
            "what": "teacher forward",
            "teacher": teacher_desc,
            "vocab": vocab,
            "tokens": tokens,
            "seconds": forward_s,
            "tokens_per_s": tokens / forward_s,
        }
    )
    for name, bpt in (
        ("dense fp32 logits", 4.0 * vocab),
        ("dense bf16 logits", 2.0 * vocab),
        *DISTILLKIT.items(),
    ):
        emit({"what": "reference", "name": name, "bytes_per_token": bpt})

    settings = [(int(k), "float16", "topk") for k in args.ks.split(",")] + [
        (8, "bfloat16", "topk"),
        (8, "float16", "sampled"),
    ]
    for k, value_dtype, targets in settings:
        out = work / f"k{k}-{value_dtype}-{targets}"
        cfg = LMCacheJob.model_validate(
            {
                **base,
                "teacher": {
                    **base["teacher"],
                    "cache": {
                        "path": str(out),
                        "k": k,
                        "value_dtype": value_dtype,
                        "targets": targets,
                        "num_samples": k,
                        "examples_per_shard": 16,
                        "batch_size": 8,
                        "device": "cpu",
                    },
                },
            }
        )
        t0 = time.perf_counter()
        result = write_cache(cfg)
        total_s = time.perf_counter() - t0
        manifest = json.loads((out / "manifest.json").read_text())
        reader = CachedTeacher(out)
        dense = None if targets == "sampled" else CachedTeacher(out, signal=TeacherSignal.LOGITS)
        t1 = time.perf_counter()
        read = reader.sampled_targets if targets == "sampled" else reader.targets
        for b in batches:
            read(b["input_ids"], b["attention_mask"], b["example_id"])
        read_s = time.perf_counter() - t1
        dense_s = None
        if targets == "topk":  # the dense (B, T, V) view lm_kd's logit losses read
            t2 = time.perf_counter()
            assert dense is not None
            for b in batches:
                dense(b)
            dense_s = time.perf_counter() - t2
        if (k, value_dtype, targets) == (8, "float16", "topk"):
            from distil.cache.reader import summarize

            shown = "\n".join(f"| {key} | {value} |" for key, value in summarize(out).items())
            (args.out / "cache-inspect.md").write_text(
                "# `distil cache inspect` of the top-8 fp16 benchmark cache\n\n| field | value |\n|---|---|\n"
                + shown
                + "\n"
            )
        emit(
            {
                "what": "cache",
                "k": k,
                "value_dtype": value_dtype,
                "targets": targets,
                "supervised_tokens": manifest["num_positions"],
                "bytes": manifest["total_bytes"],
                "bytes_per_token": manifest["bytes_per_position"],
                "topk_mass": manifest["topk_mass_mean"],
                "write_tokens_per_s": result.tokens_read / result.seconds,
                "write_vs_forward": (result.tokens_read / result.seconds) / (tokens / forward_s),
                "write_call_s": total_s,
                "read_tokens_per_s": supervised / read_s,
                "dense_read_tokens_per_s": None if dense_s is None else supervised / dense_s,
            }
        )

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cache.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fwd = rows[0]
    lines = [
        "# Teacher-output cache: size, coverage, throughput",
        "",
        f"Teacher: {fwd['teacher']}; vocabulary {vocab}; {args.examples} blocks of {args.seq} tokens from the built-in "
        f"corpus ({supervised:,} supervised tokens); CPU, {args.threads} thread(s); one run on a shared, loaded machine. "
        f"Teacher plain forward: {fwd['tokens_per_s']:,.0f} tok/s.",
        "",
        "| cache | bytes/token | kept mass | write tok/s | write / forward | read tok/s (sparse) | read tok/s (dense logits) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["what"] == "cache":
            name = f"sampled {r['k']} ids" if r["targets"] == "sampled" else f"top-{r['k']}"
            dense = (
                ""
                if r["dense_read_tokens_per_s"] is None
                else f"{r['dense_read_tokens_per_s']:,.0f}"
            )
            lines.append(
                f"| {name} {r['value_dtype']} | {r['bytes_per_token']:.1f} | {r['topk_mass']:.4f} | "
                f"{r['write_tokens_per_s']:,.0f} | {r['write_vs_forward']:.2f} | {r['read_tokens_per_s']:,.0f} | {dense} |"
            )
    for r in rows:
        if r["what"] == "reference":
            lines.append(f"| {r['name']} | {r['bytes_per_token']:,.0f} | | | | | |")
    lines += [
        "",
        "Bytes/token = shard bytes / supervised tokens: per token k·(2-byte value + 2-byte id) + 2-byte tail "
        "+ 2-byte position, plus 24 bytes per example (id, token hash, offset) and the safetensors header. "
        "Kept mass: mean teacher probability held by the top-k ids (sampled: by the distinct sampled ids). "
        "The teacher here is an early checkpoint (60 steps), so its distributions are flat and coverage is low; "
        "a converged teacher concentrates far more mass in its top-k. Write / forward compares cache writing "
        "with the teacher's plain forward over the same batches; values above 1 are machine noise.",
    ]
    (args.out / "cache.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
