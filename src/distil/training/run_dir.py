"""The run folder: resolved config, environment, metrics, checkpoints, report."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import platform
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from distil.errors import DistilError

_PACKAGES = (
    "distil",
    "torch",
    "transformers",
    "accelerate",
    "safetensors",
    "pydantic",
    "numpy",
    "datasets",
    "tokenizers",
)


def git_sha() -> str | None:
    """The git commit of the working directory's repository, with ``-dirty`` if it has changes."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, check=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def environment(devices: list[str], num_processes: int) -> dict[str, Any]:
    """Versions, git sha, devices: what is needed to know how a run was made."""
    import torch

    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "git_sha": git_sha(),
        "devices": devices,
        "num_processes": num_processes,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
    }


def new_run_dir(output_dir: str, name: str) -> Path:
    """A fresh folder ``output_dir/name-YYYYmmdd-HHMMSS`` (suffixed if that exists)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(output_dir) / f"{name}-{stamp}"
    path, i = base, 1
    while path.exists():
        path = base.with_name(f"{base.name}-{i}")
        i += 1
    return path


def latest_run_dir(output_dir: str, name: str) -> Path:
    """The newest run folder of ``name`` under ``output_dir``, for ``--resume`` without a path."""
    root = Path(output_dir)
    candidates = sorted(
        (p for p in root.glob(f"{name}-*") if (p / "config.resolved.yaml").is_file()),
        key=lambda p: p.stat().st_mtime,
    )
    if not candidates:
        raise DistilError(
            f"--resume: no earlier run named {name!r} under {root}; start one without --resume"
        )
    # a start that failed before its first checkpoint left a folder with nothing to resume:
    # the newest run that made progress is the one to continue
    progressed = [p for p in candidates if made_progress(p)]
    return (progressed or candidates)[-1]


def made_progress(run_dir: Path) -> bool:
    """Whether a run folder holds a checkpoint or a finished phase of some phase."""
    return any(run_dir.glob("*/checkpoints/step-*")) or any(run_dir.glob("*/final/COMPLETE"))


def choose_run_dir(run_dir: Path | None, *, resume: bool, output_dir: str, name: str) -> Path:
    """The run folder of ``distil run``: ``--run-dir`` as given, else the newest run of ``name``
    (``--resume``) or a fresh one.

    Raises:
        DistilError: If ``--run-dir`` is a file; if ``--resume --run-dir`` names a folder that
            does not exist or is not a run (resuming must never start a fresh run silently); if
            a fresh run would land in a folder that already holds one.
    """
    if run_dir is None:
        return latest_run_dir(output_dir, name) if resume else new_run_dir(output_dir, name)
    if run_dir.exists() and not run_dir.is_dir():
        raise DistilError(f"--run-dir {run_dir} is a file, not a folder; give a folder path")
    if resume:
        if not run_dir.is_dir():
            raise DistilError(
                f"--resume --run-dir {run_dir}: the folder does not exist, so there is nothing to "
                "resume; check the path, or drop --resume to start a new run there"
            )
        if not (run_dir / "config.resolved.yaml").is_file():
            raise DistilError(
                f"--resume --run-dir {run_dir}: not a distil run folder (no config.resolved.yaml); "
                "check the path, or drop --resume and pick a new --run-dir"
            )
        return run_dir
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise DistilError(
            f"{run_dir} already holds a run; add --resume to continue it, or pick a new --run-dir"
        )
    return run_dir


def write_resolved_config(run_dir: Path, config: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.resolved.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def check_resume_config(
    run_dir: Path,
    config: dict[str, Any],
    normalize: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> None:
    """Refuse to resume a run with a config that changed anything but the run section.

    ``normalize`` re-validates the saved config with today's schema, so that a field added to
    distil after the run started (with its default) does not count as a change.
    """
    path = run_dir / "config.resolved.yaml"
    if not path.is_file():
        raise DistilError(
            f"--resume: {run_dir} has no config.resolved.yaml; is it a distil run folder?"
        )
    old = yaml.safe_load(path.read_text())
    if normalize is not None:
        with contextlib.suppress(ValueError):  # today's schema rejects it: compare it as written
            old = normalize(old)
    differing = sorted(
        k for k in set(old) | set(config) if k != "run" and old.get(k) != config.get(k)
    )
    if differing:
        raise DistilError(
            f"--resume: the config differs from the one {run_dir} was started with in {differing}; "
            "resume with the same config, or start a new run"
        )


def write_env(run_dir: Path, env: dict[str, Any]) -> None:
    (run_dir / "env.json").write_text(json.dumps(env, indent=1))
