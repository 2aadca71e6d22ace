"""``distil cache`` end to end: kill -9 and resume gives byte-identical shards, two writer ranks,
``inspect`` with ``--verify``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from distil.cli import app
from tests.helpers import CACHE_SPEC as SPEC
from tests.helpers import write_fixture

runner = CliRunner()

# Runs `distil cache` but SIGKILLs itself halfway through writing shard 2's temp file, i.e. the
# worst moment: two shards finished, a torn temp file on disk, no manifest.
DYING = """
import os, signal, sys
import distil.cache.writer as w
real = w.atomic_write_bytes
def dying(path, data):
    if path.name == "shard-00002.safetensors":
        path.with_name(f".{path.name}.tmp-{os.getpid()}").write_bytes(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, data)
w.atomic_write_bytes = dying
from distil.cli import app
app(sys.argv[1:])
"""


def _env() -> dict[str, str]:
    root = Path(__file__).parents[2]  # this checkout's distil and its tests package
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root}"}


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cache-cli")
    write_fixture(root)
    cfg = {
        "recipe": "lm_kd",  # the training config itself: `distil cache` writes its teacher.cache
        "tokenizer": str(root / "tok"),
        "data": {
            "source": {"train": [str(root / "text.jsonl")]},
            "max_length": 24,
            "train_limit": 60,
        },
        "teacher": {
            "model": {"spec": SPEC},
            "cache": {
                "path": str(root / "unused"),
                "k": 6,
                "examples_per_shard": 10,
                "batch_size": 4,
                "device": "cpu",
            },
        },
        "student": {"model": {"from_teacher": {"num_layers": 1}}},
        "kd": {"kd_temperature": 1.5},
    }
    path = root / "cache.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_killed_writer_resumes_to_byte_identical_cache(config: Path) -> None:
    root = config.parent
    whole = runner.invoke(app, ["cache", str(config), f"teacher.cache.path={root / 'whole'}"])
    assert whole.exit_code == 0, whole.output
    assert "wrote 6 shard(s)" in " ".join(whole.output.split()) and "kd_temperature" in whole.output
    assert "60/60" in whole.output  # the bar counts examples, moving per teacher batch
    # and it says how to train from it: the same config and overrides
    assert f"distil run {config} teacher.cache.path={root / 'whole'}" in "".join(
        whole.output.split("\n")
    )

    out = root / "killed"
    cmd = [sys.executable, "-c", DYING, "cache", str(config), f"teacher.cache.path={out}"]
    died = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    assert sorted(p.name for p in out.glob("shard-*.safetensors")) == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    assert list(out.glob(".shard-00002*")) and not (out / "manifest.json").exists()

    resumed = runner.invoke(app, ["cache", str(config), f"teacher.cache.path={out}"])
    assert resumed.exit_code == 0, resumed.output
    assert "wrote 4 shard(s), 2 already complete" in " ".join(resumed.output.split())
    assert not list(out.glob(".*tmp*"))
    assert _files(out) == _files(root / "whole")  # shards, sidecars, spec and manifest


def test_two_writer_ranks_merge_one_identical_manifest(config: Path) -> None:
    root = config.parent
    out = root / "ranks"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "distil", "cache", str(config), f"teacher.cache.path={out}"],
            env={**_env(), "RANK": str(r), "WORLD_SIZE": "2"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for r in (0, 1)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    if not (root / "whole").exists():
        assert (
            runner.invoke(
                app, ["cache", str(config), f"teacher.cache.path={root / 'whole'}"]
            ).exit_code
            == 0
        )
    assert _files(out) == _files(root / "whole")


def test_inspect_summarises_and_verify_names_a_corrupt_shard(config: Path) -> None:
    out = config.parent / "inspect"
    assert (
        runner.invoke(
            app, ["cache", str(config), f"teacher.cache.path={out}", "teacher.cache.k=3"]
        ).exit_code
        == 0
    )
    shown = runner.invoke(app, ["cache", "inspect", str(out), "--verify"])
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.output.split())
    for line in (
        "bytes per token",
        "top-k mass coverage",
        "tokenizer_fingerprint",
        "every shard matches",
    ):
        assert line in text
    shard = out / "shard-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-7])  # truncated
    bad = runner.invoke(app, ["cache", "inspect", str(out), "--verify"])
    assert bad.exit_code == 1 and "shard-00003.safetensors" in "".join(bad.output.split())
    other = runner.invoke(
        app, ["cache", str(config), f"teacher.cache.path={out}", "teacher.cache.k=4"]
    )
    assert other.exit_code == 2 and "k differ" in " ".join(other.output.split())
