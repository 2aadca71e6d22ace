"""lm_kd with the student sharded over 2 CPU processes (FSDP2 on gloo): the same student as one
unsharded process, and a checkpoint written by 2 processes resumes in 1 (full-state format)."""

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


def _torchrun(args: list[str], run_dir: Path, env: dict[str, str], resume: bool = False) -> None:
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "distil"]
    extra = ["--resume"] if resume else []
    done = subprocess.run(
        [*cmd, *args, "--run-dir", str(run_dir), *extra], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.distributed
def test_fsdp_student_matches_one_process_and_resumes_with_another_process_count(
    tmp_path: Path,
) -> None:
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    lm = make_lm_fixture(tmp_path / "lm")
    args = [
        *base_args(lm, "pc"),
        "data.format=prompt_completion",
        "eval.baseline=false",
        "train.max_steps=4",
        "train.checkpoint_every=2",
        "eval.generation.prompts=0",
        "kd.kd_weight=0.5",
        "kd.chunked=false",
        "train.device=cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    plain = subprocess.run(
        [sys.executable, "-m", "distil", *args, "--run-dir", str(one)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    _torchrun([*args, "train.sharding=fsdp"], two, env)
    assert json.loads((two / "env.json").read_text())["num_processes"] == 2
    a = load_file(str(one / "student" / "final" / "model.safetensors"))
    b = load_file(str(two / "student" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # reduce-scattered gradients average the ranks as DDP's all-reduce does
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    ckpt = two / "student" / "checkpoints" / "step-2" / "model.safetensors"
    assert all(not t.is_meta for t in load_file(str(ckpt)).values())  # full, unsharded tensors

    # killed after step 2 (final and the step-4 checkpoint gone), resumed by ONE process
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "student" / "final")
    shutil.rmtree(resumed / "student" / "checkpoints" / "step-4")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "distil",
            *args,
            "train.sharding=fsdp",
            "--run-dir",
            str(resumed),
            "--resume",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    c = load_file(str(resumed / "student" / "final" / "model.safetensors"))
    for k in b:  # the same run, finished by another number of processes
        torch.testing.assert_close(c[k], b[k], rtol=1e-4, atol=1e-5)
