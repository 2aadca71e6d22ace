"""The README's 2-process command, run as printed, is one run of 2 processes (not two 1-process
runs): with the default ``train.device: auto`` on a machine without an accelerator, Accelerate
must still join the torchrun group (gloo on CPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import free_port

README = Path(__file__).resolve().parents[2] / "README.md"
COMMAND = "torchrun --nproc_per_node 2 -m distil run classifier_kd"
# only overrides that shorten the job: no device, no run folder, no process settings
SHORTEN = [
    "teacher.training.epochs=1",
    "train.epochs=1",
    "data.train_limit=256",
    "run.log_with=[]",
]


@pytest.mark.distributed
def test_readme_torchrun_command_is_one_run_of_two_processes(tmp_path: Path) -> None:
    assert COMMAND in README.read_text(encoding="utf-8")
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    # the rendezvous port through torchrun's own environment variable, so the command line
    # stays exactly the README's
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PET_MASTER_PORT": str(free_port())}
    proc = subprocess.run(
        [*COMMAND.split(), *SHORTEN], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 1, f"expected one run folder, got {[p.name for p in runs]}"
    assert json.loads((runs[0] / "env.json").read_text())["num_processes"] == 2
    assert "2 process(es)" in (runs[0] / "mode.txt").read_text()
