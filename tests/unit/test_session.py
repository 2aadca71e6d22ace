"""Process-group checks of the run session (item 1 of issue 13)."""

from __future__ import annotations

import pytest

from distil.errors import DistilError
from distil.training.session import check_process_group, launched_world_size, use_cpu


def test_a_torchrun_launch_that_runs_alone_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched_world_size() == 2
    with pytest.raises(DistilError, match="2 processes but each one runs alone"):
        check_process_group(1)
    check_process_group(2)


def test_without_a_launcher_one_process_is_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert launched_world_size() == 1
    check_process_group(1)


def test_auto_device_means_cpu_without_an_accelerator() -> None:
    import torch

    assert use_cpu("cpu")
    assert not use_cpu("cuda")
    assert use_cpu("auto") == (not torch.accelerator.is_available())
