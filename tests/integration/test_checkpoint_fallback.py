"""``--resume`` with a damaged newest checkpoint resumes from the newest intact one, says so, and
ends with the weights of the uninterrupted run (issue 13 item 10)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ARGS = [
    "run",
    "classifier_kd",
    "data.source={builtin: digits}",
    "teacher.train=true",
    "teacher.training.epochs=1",
    "teacher.model.kwargs.channels=[8,16,16]",
    "student.model.kwargs.hidden=[16]",
    "train.epochs=1",
    "train.checkpoint_every=5",
    "train.keep_checkpoints=3",
    "eval.baseline=false",
    "run.log_with=[]",
]


def _distil(*extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "distil", *ARGS, *extra], env=env, capture_output=True, text=True
    )


def test_resume_skips_a_truncated_checkpoint_and_ends_with_the_same_weights(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    done = _distil("--run-dir", str(run))
    assert done.returncode == 0, done.stderr[-3000:]
    student = run / "student"
    expected = load_file(str(student / "final" / "model.safetensors"))
    steps = sorted(student.glob("checkpoints/step-*"), key=lambda p: int(p.name.split("-")[1]))
    newest, intact = steps[-1], steps[-2]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])  # a truncated copy, COMPLETE marker intact
    shutil.rmtree(student / "final")  # as if killed after the last checkpoint
    resumed = _distil("--run-dir", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = " ".join(resumed.stderr.split())
    assert f"resuming from {intact.name}" in said and newest.name in said
    got = load_file(str(student / "final" / "model.safetensors"))
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
