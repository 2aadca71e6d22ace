"""Checkpoints: round trip, atomicity, and what an interrupted save leaves behind."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from distil.errors import DistilError
from distil.training.checkpoint import (
    TrainState,
    checkpoint_problems,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from distil.training.optim import build_scheduler


def _setup() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = build_scheduler(opt, name="cosine", total_steps=10, warmup_steps=2)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def test_round_trip_restores_everything(tmp_path: Path) -> None:
    model, opt, sched = _setup()
    save_checkpoint(
        tmp_path, model=model, optimizer=opt, scheduler=sched, state=TrainState(7, 1, 3, {"k": 1})
    )
    expected_torch = torch.rand(3)
    expected_np = np.random.rand()
    expected_py = random.random()
    model2, opt2, sched2 = _setup()
    with torch.no_grad():
        model2.weight.add_(1.0)
    state = load_checkpoint(tmp_path / "step-7", model=model2, optimizer=opt2, scheduler=sched2)
    assert state == TrainState(7, 1, 3, {"k": 1})
    assert torch.equal(model.weight, model2.weight)
    assert torch.equal(
        opt.state_dict()["state"][0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"]
    )
    assert sched2.last_epoch == sched.last_epoch
    assert torch.equal(torch.rand(3), expected_torch)
    assert np.random.rand() == expected_np
    assert random.random() == expected_py


def test_interrupted_save_is_ignored_and_old_ones_pruned(tmp_path: Path) -> None:
    model, opt, sched = _setup()
    for step in (1, 2, 3):
        save_checkpoint(
            tmp_path,
            model=model,
            optimizer=opt,
            scheduler=sched,
            state=TrainState(step, 0, step, {}),
            keep=2,
        )
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-2", "step-3"]
    # a save killed before its rename: a temp folder with files but no marker
    half = tmp_path / ".tmp-step-4-999"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\x00garbage")
    # a folder named like a checkpoint but without the marker (e.g. copied by hand, half done)
    (tmp_path / "step-5").mkdir()
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step-3"


def _save_steps(folder: Path, steps: tuple[int, ...]) -> None:
    model, opt, sched = _setup()
    for step in steps:
        save_checkpoint(
            folder,
            model=model,
            optimizer=opt,
            scheduler=sched,
            state=TrainState(step, 0, step, {}),
            keep=3,
        )


def test_a_truncated_checkpoint_falls_back_to_the_newest_intact_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _save_steps(tmp_path, (1, 2))
    weights = tmp_path / "step-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # cut short, COMPLETE marker still there
    with caplog.at_level(logging.WARNING):
        latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step-1"
    assert "step-2" in caplog.text and "model.safetensors" in caplog.text
    assert "step-1" in caplog.text  # says where it resumes from
    model, opt, sched = _setup()
    with pytest.raises(DistilError, match="model.safetensors"):
        load_checkpoint(tmp_path / "step-2", model=model, optimizer=opt, scheduler=sched)
    assert load_checkpoint(latest, model=model, optimizer=opt, scheduler=sched).step == 1


def test_same_size_corruption_is_found_by_the_sha256(tmp_path: Path) -> None:
    _save_steps(tmp_path, (1, 2))
    state = tmp_path / "step-2" / "optimizer.pt"
    raw = bytearray(state.read_bytes())
    raw[-3] ^= 0xFF
    state.write_bytes(bytes(raw))
    assert checkpoint_problems(tmp_path / "step-2") == ["optimizer.pt does not match its sha256"]
    assert checkpoint_problems(tmp_path / "step-1") == []
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step-1"


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    _save_steps(tmp_path, (1,))
    (tmp_path / "step-1" / "rng.json").unlink()
    with pytest.raises(DistilError, match="rng.json is missing"):
        latest_checkpoint(tmp_path)
