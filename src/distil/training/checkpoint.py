"""Checkpoints: safetensors weights, optimiser, scheduler, RNG states and data position.

A checkpoint is written into a temporary folder, every file fsynced, the size and sha256 of
every file recorded in ``checksums.json``, a ``COMPLETE`` marker written last, and only then
renamed to ``step-N``: a process killed during a save leaves a ``.tmp-*`` folder that is ignored
(and cleaned) instead of a ``step-N`` that loads wrong. A checkpoint damaged afterwards (a
truncated copy, a full disk, bit rot) fails its checksums: resuming skips it for the newest
intact one and says so.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from distil.errors import DistilError
from distil.storage import fsync_dir, fsync_file, sha256_file

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
CHECKSUMS = "checksums.json"
_STEP_RE = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class TrainState:
    """Where training stands: global optimiser step and data position (epoch, batch in epoch)."""

    step: int
    epoch: int
    batch_in_epoch: int
    extra: dict[str, Any]


def _digest(path: Path) -> dict[str, Any]:
    """Size and sha256 of a file, read back from disk (what a resume will read)."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def checkpoint_problems(path: Path) -> list[str]:
    """What is wrong with the checkpoint folder ``path``; empty when it is intact.

    Every file recorded in ``checksums.json`` must be there with its size and sha256. A
    checkpoint written before distil recorded checksums has only its marker checked.
    """
    if not (path / MARKER).is_file():
        return [f"no {MARKER} marker (the save did not finish)"]
    sums = path / CHECKSUMS
    if not sums.is_file():
        return []
    try:
        recorded = json.loads(sums.read_text())["files"]
        expected = {str(name): (int(v["bytes"]), str(v["sha256"])) for name, v in recorded.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return [f"{CHECKSUMS} is unreadable"]
    problems = []
    for name, (size, sha) in sorted(expected.items()):
        f = path / name
        if not f.is_file():
            problems.append(f"{name} is missing")
        elif f.stat().st_size != size:
            problems.append(f"{name} has {f.stat().st_size} bytes where {size} were written")
        elif _digest(f)["sha256"] != sha:
            problems.append(f"{name} does not match its sha256")
    return problems


def save_rng_state(folder: Path) -> None:
    """Torch RNG as safetensors, numpy and python RNG as JSON: nothing here needs unpickling."""
    save_file({"torch": torch.get_rng_state()}, str(folder / "rng.safetensors"))
    np_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    py_state = random.getstate()
    payload = {
        "numpy": [np_state[0], np_state[1].tolist(), *map(_plain, np_state[2:])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    (folder / "rng.json").write_text(json.dumps(payload))


def _plain(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x


def load_rng_state(folder: Path) -> None:
    torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["torch"])
    payload = json.loads((folder / "rng.json").read_text())
    n = payload["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = payload["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def save_checkpoint(
    folder: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
    keep: int = 2,
) -> Path:
    """Atomically write ``folder/step-N`` and keep only the newest ``keep`` checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{state.step}"
    tmp = folder / f".tmp-step-{state.step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    weights = {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict() if scheduler is not None else {}, tmp / "scheduler.pt")
    save_rng_state(tmp)
    (tmp / "state.json").write_text(
        json.dumps(
            {
                "step": state.step,
                "epoch": state.epoch,
                "batch_in_epoch": state.batch_in_epoch,
                "extra": state.extra,
            },
            indent=1,
        )
    )
    for f in tmp.iterdir():
        fsync_file(f)
    files = {f.name: _digest(f) for f in sorted(tmp.iterdir())}
    (tmp / CHECKSUMS).write_text(json.dumps({"files": files}, indent=1))
    fsync_file(tmp / CHECKSUMS)
    (tmp / MARKER).write_text("ok\n")
    fsync_file(tmp / MARKER)
    fsync_dir(tmp)
    if final.exists():  # a rerun of the same step: replace atomically via a second rename
        trash = folder / f".old-step-{state.step}-{os.getpid()}"
        final.rename(trash)
        tmp.rename(final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(final)
    fsync_dir(folder)
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints under ``folder``, oldest first; temporary or unmarked ones are skipped."""
    if not folder.is_dir():
        return []
    found: list[tuple[int, Path]] = []
    for child in folder.iterdir():
        m = _STEP_RE.match(child.name)
        if m and (child / MARKER).is_file():
            found.append((int(m.group(1)), child))
        elif child.name.startswith(".tmp-"):
            logger.warning("ignoring an incomplete checkpoint %s (a save was interrupted)", child)
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest intact checkpoint under ``folder``, or ``None`` if none was saved.

    Newer checkpoints that fail their checksums are skipped with a warning naming them, what is
    wrong, and the step training resumes from instead.

    Raises:
        DistilError: If checkpoints exist but every one is damaged (starting the phase over
            silently would throw the run's progress away).
    """
    damaged: list[str] = []
    for ckpt in reversed(list_checkpoints(folder)):
        problems = checkpoint_problems(ckpt)
        if not problems:
            if damaged:
                logger.warning(
                    "resuming from %s instead of the newer damaged checkpoint(s): %s",
                    ckpt.name,
                    "; ".join(damaged),
                )
            return ckpt
        damaged.append(f"{ckpt.name} ({', '.join(problems)})")
    if damaged:
        raise DistilError(
            f"every checkpoint under {folder} is damaged: {'; '.join(damaged)}. Restore them, or "
            f"delete {folder} to train this phase again from step 0"
        )
    return None


def load_checkpoint(
    path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> TrainState:
    """Restore model, optimiser, scheduler and RNG from ``path``; return the train state."""
    problems = checkpoint_problems(path)
    if problems:
        raise DistilError(
            f"{path} is damaged: {', '.join(problems)}; resume from an earlier checkpoint "
            "(latest_checkpoint picks the newest intact one)"
        )
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    load_rng_state(path)
    raw = json.loads((path / "state.json").read_text())
    return TrainState(raw["step"], raw["epoch"], raw["batch_in_epoch"], raw.get("extra", {}))
