"""lm_kd with 2 CPU processes (torchrun, gloo) agrees with 1 process: each rank runs the teacher
on its own shard, the supervised-token normaliser spans all ranks, the data is covered once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import base_args, free_port, make_lm_fixture


@pytest.mark.distributed
def test_lm_kd_two_processes_match_one_process(tmp_path: Path) -> None:
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    lm = make_lm_fixture(tmp_path / "lm")
    # variable-length prompt/completion examples: the ranks hold different numbers of supervised tokens
    args = [
        *base_args(lm, "pc"),
        "data.format=prompt_completion",
        "eval.baseline=false",
        "train.max_steps=4",
        "train.device=cpu",
        "eval.generation.prompts=0",
        "kd.kd_weight=0.5",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    done = subprocess.run(
        [sys.executable, "-m", "distil", *args, "--run-dir", str(one)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    proc = subprocess.run(
        [
            "torchrun",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "-m",
            "distil",
            *args,
            "--run-dir",
            str(two),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((two / "env.json").read_text())["num_processes"] == 2
    assert "2 process(es)" in (two / "mode.txt").read_text()
    r0 = json.loads((two / "student" / "seen-epoch0-rank0.json").read_text())
    r1 = json.loads((two / "student" / "seen-epoch0-rank1.json").read_text())
    single = json.loads((one / "student" / "seen-epoch0-rank0.json").read_text())
    assert not set(r0) & set(r1) and sorted(r0 + r1) == sorted(single) and len(single) == 16
    a = load_file(str(one / "student" / "final" / "model.safetensors"))
    b = load_file(str(two / "student" / "final" / "model.safetensors"))
    for k in a:  # gradients all-reduced over ranks equal the one-process gradients up to float sums
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    rows = {r["model"]: r for r in json.loads((two / "report.json").read_text())["table"]["rows"]}
    assert rows["student (KD)"]["perplexity"] > 1


@pytest.mark.distributed
def test_lm_kd_across_tokenizers_two_processes_match_one_process(tmp_path: Path) -> None:
    """Across tokenizers the soft term is normalised by the window's aligned groups, counted
    over both ranks, and each rank runs the teacher on its own tokens."""
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    from distil.data.corpus import stdlib_root, train_unigram_tokenizer_from_texts

    lm = make_lm_fixture(tmp_path / "lm")
    texts = [p.read_text(encoding="utf-8")[:2500] for p in sorted(stdlib_root().glob("*.py"))[:14]]
    train_unigram_tokenizer_from_texts(texts, tmp_path / "stok", 500)
    args = [
        *[a for a in base_args(lm, "pc") if not a.startswith("student.model")],
        "student.model={spec: {num_layers: 1, hidden_size: 32, num_heads: 2, intermediate_size: 64, max_context: 64}}",
        f"student.tokenizer={tmp_path / 'stok'}",
        "data.format=prompt_completion",
        "eval.baseline=false",
        "train.max_steps=4",
        "train.device=cpu",
        "eval.generation.prompts=0",
        "kd.kd_weight=0.5",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    done = subprocess.run(
        [sys.executable, "-m", "distil", *args, "--run-dir", str(one)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    proc = subprocess.run(
        [
            "torchrun",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "-m",
            "distil",
            *args,
            "--run-dir",
            str(two),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "across tokenizers" in (two / "mode.txt").read_text()
    a = load_file(str(one / "student" / "final" / "model.safetensors"))
    b = load_file(str(two / "student" / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
