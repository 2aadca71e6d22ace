"""Benchmark (issue 18): the cost of one cross-tokenizer distillation step vs a same-tokenizer one.

The target: a cross-tokenizer step costs at most 2x a same-tokenizer step at ``lm_kd``'s shipped
sizes. One training step (student forward, teacher forward under ``no_grad``, loss, backward,
AdamW) is timed for:

* ``ce_only``: the student on its own tokenizer, no teacher (the floor);
* ``same_tokenizer_kd``: the student on the teacher's tokenizer (BPE-8192), ``token_objective``
  with forward KL, the teacher on the same tokens (what ``lm_kd`` does today);
* ``cross_uld`` / ``cross_hybrid`` / ``cross_min_ed``: the student on its own tokenizer, the
  teacher on its own tokenization of the same text, ``cross_tokenizer_objective`` over the
  byte-span groups (``collate_groups`` inside the step: the per-batch hot path), merge
  ``observed``.

Shapes are ``lm_kd``'s shipped ones: teacher Llama 4 x 256 (vocab 8192, context 256), student
Llama 2 x 128, 2 heads, MLP 512, tied embeddings; a batch of 8 blocks of 256 student tokens of
packed validation text; kd_weight 0.9, T = 1; one intra-op thread. Weights are random (the cost
of a step does not depend on them). Variants run interleaved, round after round, in one process;
the table reports medians, the ratio to ``same_tokenizer_kd``, process CPU time per step and the
load average. The per-example preparation (tokenize both sides, cut blocks, align), which happens
once per example off-policy, is timed separately.

    python bench/cross_tokenizer_step.py --teacher-tokenizer T --student-tokenizer S [--easy-tokenizer E]
    python bench/cross_tokenizer_step.py --make-tokenizers DIR   # Unigram-4096 and BPE-2048, ~15 min

Writes ``bench/results/cross_tokenizer_step.jsonl`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from distil.alignment import (  # noqa: E402
    ByteSpanEncoder,
    Special,
    collate_groups,
    cut_aligned_blocks,
    min_edit_distance_map,
    shared_vocabulary,
)
from distil.data.corpus import read_corpus_texts  # noqa: E402
from distil.data.lm import shift_for_next_token  # noqa: E402
from distil.losses.objective import cross_tokenizer_objective, token_objective  # noqa: E402
from distil.models.lm import CausalLMSpec, build_causal_lm  # noqa: E402
from distil.models.vocab import load_tokenizer_folder  # noqa: E402

BATCH, SEQ, KD_WEIGHT = 8, 256, 0.9
TEACHER = {"num_layers": 4, "hidden_size": 256, "num_heads": 4, "intermediate_size": 1024}
STUDENT = {
    "num_layers": 2,
    "hidden_size": 128,
    "num_heads": 2,
    "intermediate_size": 512,
    "tie_word_embeddings": True,
}


def _model(shape: dict[str, Any], vocab: int, seed: int) -> torch.nn.Module:
    return build_causal_lm(CausalLMSpec(vocab_size=vocab, max_context=SEQ, **shape), seed=seed)


def _pad(rows: list[np.ndarray], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row)
    return out


def prepare(
    texts: list[str], teacher_tok: Any, student_tok: Any
) -> tuple[dict[str, torch.Tensor], list[np.ndarray], float, float]:
    """Pack texts, cut ``BATCH`` aligned blocks; return the batch, groups, ms per block, coverage."""
    segments: list[str | Special] = []
    for text in texts:
        segments += [text, Special.EOS]
    start = time.perf_counter()
    student = ByteSpanEncoder(student_tok).encode_segments(segments)
    teacher = ByteSpanEncoder(teacher_tok).encode_segments(segments)
    blocks = cut_aligned_blocks(student, teacher, SEQ, teacher_max_length=SEQ)
    ms_per_block = 1000 * (time.perf_counter() - start) / max(len(blocks), 1)
    blocks = blocks[:BATCH]
    if len(blocks) < BATCH:
        raise SystemExit(f"only {len(blocks)} blocks of {SEQ} tokens in the texts; give more")
    s_ids = _pad([b.student.ids for b in blocks], 0)
    t_rows = [b.teacher.ids for b in blocks]
    t_ids = _pad(t_rows, 0)
    t_mask = _pad([np.ones(len(r), dtype=np.int64) for r in t_rows], 0)
    t_labels = torch.where(t_mask.bool(), t_ids, -100)
    coverage = sum(b.alignment.covered_units for b in blocks) / sum(
        b.alignment.student_units for b in blocks
    )
    batch = {
        "student_ids": s_ids,
        "student_targets": shift_for_next_token(s_ids),
        "teacher_ids": t_ids,
        "teacher_mask": t_mask,
        "teacher_targets": shift_for_next_token(t_labels),
    }
    return batch, [b.alignment.groups for b in blocks], ms_per_block, coverage


def same_tokenizer_batch(texts: list[str], teacher_tok: Any) -> torch.Tensor:
    ids: list[int] = []
    for text in texts:
        ids += [*teacher_tok.encode(text, add_special_tokens=False), teacher_tok.eos_token_id]
    return torch.tensor(ids[: BATCH * SEQ]).reshape(BATCH, SEQ)


def step_fn(
    kind: str, models: dict[str, torch.nn.Module], data: dict[str, Any]
) -> Callable[[], float]:
    """A closure that runs one training step of ``kind`` and returns its loss."""
    teacher = models["teacher"]
    if kind == "same_tokenizer_kd":
        student = models["student_same"]
        ids = data["same_ids"]
        targets = shift_for_next_token(ids)
        ones = torch.ones_like(ids)
    else:
        student = models[f"student_{data['pair']}"]
        batch = data["batch"]
        ids, targets = batch["student_ids"], batch["student_targets"]
        ones = torch.ones_like(ids)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)

    def run() -> float:
        optimizer.zero_grad(set_to_none=True)
        logits = student(input_ids=ids, attention_mask=ones, use_cache=False).logits
        if kind == "ce_only":
            mask = targets != -100
            loss = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
        elif kind == "same_tokenizer_kd":
            with torch.no_grad():
                t_logits = teacher(input_ids=ids, attention_mask=ones, use_cache=False).logits
            loss = token_objective(
                logits, t_logits, targets, kd_weight=KD_WEIGHT, kd_temperature=1.0
            ).loss
        else:
            with torch.no_grad():
                t_logits = teacher(
                    input_ids=batch["teacher_ids"],
                    attention_mask=batch["teacher_mask"],
                    use_cache=False,
                ).logits
            groups = collate_groups(data["groups"], targets, batch["teacher_targets"])
            name = kind.removeprefix("cross_")
            params: dict[str, Any] = {}
            if name == "hybrid":
                params["shared_vocabulary"] = data["shared"]
            if name == "min_ed":
                params["vocab_map"] = data["vocab_map"]
            loss = cross_tokenizer_objective(
                logits,
                t_logits,
                groups,
                kd_weight=KD_WEIGHT,
                kd_temperature=1.0,
                loss=name,
                **params,
            ).loss
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return run


def make_tokenizers(out: Path) -> None:
    import tempfile

    from distil.data.corpus import build_stdlib_corpus, train_bpe_tokenizer, train_unigram_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        corpus = build_stdlib_corpus(Path(tmp))
        train = [corpus.split("train").path]
        train_unigram_tokenizer(train, out / "unigram-4096", 4096)
        train_bpe_tokenizer(train, out / "bpe-2048", 2048)
        train_bpe_tokenizer(train, out / "bpe-8192", 8192)
    print(f"tokenizers in {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher-tokenizer", type=Path)
    ap.add_argument("--student-tokenizer", type=Path, help="the hard pair's student (Unigram-4096)")
    ap.add_argument("--easy-tokenizer", type=Path, help="the easy pair's student (BPE-2048)")
    ap.add_argument(
        "--corpus", type=Path, help="JSONL texts (default: the built-in validation split)"
    )
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--make-tokenizers", type=Path)
    ap.add_argument(
        "--results", type=Path, default=ROOT / "bench" / "results" / "cross_tokenizer_step.jsonl"
    )
    args = ap.parse_args()
    if args.make_tokenizers:
        return make_tokenizers(args.make_tokenizers)
    if args.teacher_tokenizer is None or args.student_tokenizer is None:
        ap.error("--teacher-tokenizer and --student-tokenizer are required")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.corpus is None:
        import tempfile

        from distil.data.corpus import build_stdlib_corpus

        corpus = build_stdlib_corpus(Path(tempfile.mkdtemp())).split("validation").path
    else:
        corpus = args.corpus
    texts = list(read_corpus_texts([corpus]))[:40]
    teacher_tok = load_tokenizer_folder(args.teacher_tokenizer)
    pairs = {"hard": load_tokenizer_folder(args.student_tokenizer)}
    if args.easy_tokenizer:
        pairs["easy"] = load_tokenizer_folder(args.easy_tokenizer)

    models: dict[str, torch.nn.Module] = {
        "teacher": _model(TEACHER, len(teacher_tok), 0).eval(),
        "student_same": _model(STUDENT, len(teacher_tok), 1),
    }
    data: dict[str, dict[str, Any]] = {
        "same": {"same_ids": same_tokenizer_batch(texts, teacher_tok)}
    }
    lines: list[dict[str, Any]] = []
    for pair, tok in pairs.items():
        models[f"student_{pair}"] = _model(STUDENT, len(tok), 1)
        batch, groups, ms_block, coverage = prepare(texts, teacher_tok, tok)
        start = time.perf_counter()
        shared = shared_vocabulary(teacher_tok, tok)
        vocab_map = min_edit_distance_map(teacher_tok, tok)
        vocab_s = time.perf_counter() - start
        data[pair] = {
            "pair": pair,
            "batch": batch,
            "groups": groups,
            "shared": shared,
            "vocab_map": vocab_map,
        }
        line = {
            "measure": "prepare",
            "pair": pair,
            "student_vocab": len(tok),
            "prepare_ms_per_block": round(ms_block, 2),
            "coverage": round(coverage, 4),
            "groups_per_batch": int(sum(g.shape[0] for g in groups)),
            "teacher_tokens_per_block": round(float(batch["teacher_mask"].sum()) / BATCH, 1),
            "vocabulary_maps_s": round(vocab_s, 1),
        }
        print(json.dumps(line), flush=True)
        lines.append(line)

    variants: list[tuple[str, str]] = [("same", "same_tokenizer_kd")]
    for pair in pairs:
        variants += [
            (pair, "ce_only"),
            (pair, "cross_uld"),
            (pair, "cross_hybrid"),
            (pair, "cross_min_ed"),
        ]
    steps = {v: step_fn(v[1], models, data[v[0]]) for v in variants}
    wall: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
    cpu: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
    load_before = os.getloadavg()[0]
    for round_ in range(args.warmup + args.rounds):
        for v in variants:
            w0, c0 = time.perf_counter(), time.process_time()
            steps[v]()
            if round_ >= args.warmup:
                wall[v].append(time.perf_counter() - w0)
                cpu[v].append(time.process_time() - c0)
    load_after = os.getloadavg()[0]
    reference = statistics.median(wall[("same", "same_tokenizer_kd")])
    rows = []
    for v in variants:
        line = {
            "measure": "step",
            "pair": v[0],
            "variant": v[1],
            "median_s": round(statistics.median(wall[v]), 4),
            "min_s": round(min(wall[v]), 4),
            "max_s": round(max(wall[v]), 4),
            "cpu_s": round(statistics.median(cpu[v]), 4),
            "ratio_to_same_tokenizer_kd": round(statistics.median(wall[v]) / reference, 3),
            "rounds": args.rounds,
            "threads": args.threads,
            "load_avg_1m_before": round(load_before, 2),
            "load_avg_1m_after": round(load_after, 2),
        }
        print(json.dumps(line), flush=True)
        lines.append(line)
        rows.append(line)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    write_table(args.results.with_suffix(".md"), lines, rows)


def write_table(path: Path, lines: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    prep = [line for line in lines if line["measure"] == "prepare"]
    out = [
        "# Cross-tokenizer step cost (issue 18)",
        "",
        f"Batch {BATCH} x {SEQ} student tokens, teacher Llama 4x256 (V 8192), student Llama 2x128,"
        f" {rows[0]['threads']} thread(s), {rows[0]['rounds']} interleaved rounds; load average"
        f" {rows[0]['load_avg_1m_before']} -> {rows[0]['load_avg_1m_after']} on a shared 2-core CPU.",
        "",
        "| pair | variant | median step (s) | min (s) | CPU (s) | vs same-tokenizer KD |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['pair']} | {r['variant']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['cpu_s']:.3f} | {r['ratio_to_same_tokenizer_kd']:.2f}x |"
        )
    out += [
        "",
        "Preparation, once per example (tokenize both sides, cut blocks, align), and the vocabulary maps, once per tokenizer pair:",
        "",
        "| pair | student vocab | ms per block | coverage | groups per batch | teacher tokens per block | shared + MinED maps (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in prep:
        out.append(
            f"| {p['pair']} | {p['student_vocab']} | {p['prepare_ms_per_block']} | {p['coverage']} | {p['groups_per_batch']} | {p['teacher_tokens_per_block']} | {p['vocabulary_maps_s']} |"
        )
    path.write_text("\n".join(out) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
