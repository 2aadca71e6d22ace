"""classifier_kd with 2 CPU processes (torchrun, gloo, Accelerate MULTI_CPU) agrees with 1 process."""

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

from tests.helpers import free_port

ARGS = [
    "run",
    "classifier_kd",
    "data.source={builtin: digits}",
    "teacher.train=false",
    "teacher.model.kwargs.channels=[32,64,64]",
    "student.model.kwargs.hidden=[32]",
    "train.epochs=2",
    "train.batch_size=64",
    "train.checkpoint_every=1000",
    "eval.baseline=false",
    "run.log_with=[]",
    "train.device=cpu",
]


@pytest.mark.distributed
def test_two_processes_cover_the_data_once_and_match_one_process(tmp_path: Path) -> None:
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    # a fixed teacher checkpoint so both runs distil the very same teacher
    ckpt = tmp_path / "teacher.safetensors"
    subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "import torch; from safetensors.torch import save_file;"
                "from distil.recipes.classifier_kd import Config;"
                "from distil.data.classification import load_data;"
                "from distil.models.classifier import build_classifier;"
                "torch.manual_seed(1); cfg = Config();"
                "b = build_classifier(cfg.teacher.model, load_data(cfg.data));"
                f"save_file({{k: v.contiguous() for k, v in b.module.state_dict().items()}}, {str(ckpt)!r})"
            ),
        ],
        check=True,
    )
    args = [*ARGS, f"teacher.model.weights={ckpt}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one"
    subprocess.run(
        [sys.executable, "-m", "distil", *args, "--run-dir", str(one)],
        check=True,
        env=env,
        capture_output=True,
    )
    two = tmp_path / "two"
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
    env_json = json.loads((two / "env.json").read_text())
    assert env_json["num_processes"] == 2
    # together the ranks consumed every example of the epoch exactly once, with no overlap
    r0 = json.loads((two / "student" / "seen-epoch0-rank0.json").read_text())
    r1 = json.loads((two / "student" / "seen-epoch0-rank1.json").read_text())
    single = json.loads((one / "student" / "seen-epoch0-rank0.json").read_text())
    assert not set(r0) & set(r1)
    assert sorted(r0 + r1) == sorted(single)
    assert len(single) == len(set(single))
    # gradients are all-reduced: the 2-process student equals the 1-process one up to float sums
    a = load_file(str(one / "student" / "final" / "model.safetensors"))
    b = load_file(str(two / "student" / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    rows = {r["model"]: r for r in json.loads((two / "report.json").read_text())["table"]["rows"]}
    assert rows["student (KD)"]["accuracy"] > 0.5
