"""A run session: the Accelerator, the run folder, resume state and the console.

Created once per ``distil run`` by ``open_session``; recipes receive it and never build their
own Accelerator, so device placement and multi-process execution are configured in one place.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from distil.errors import DistilError
from distil.storage import atomic_write_json
from distil.training.run_dir import environment, write_env

logger = logging.getLogger(__name__)


@dataclass
class Session:
    accelerator: Any  # accelerate.Accelerator (imported lazily: it is heavy)
    run_dir: Path
    resume: bool
    console: Console = field(default_factory=Console)

    def announce(self, text: str) -> None:
        """Log the effective mode of the run: printed at start and kept in ``mode.txt``."""
        logger.info("%s", text)
        if self.accelerator.is_main_process:
            self.console.print(f"[bold green]distil[/bold green] {escape(text)}")
            with open(self.run_dir / "mode.txt", "a", encoding="utf-8") as f:
                f.write(text + "\n")

    def write_json(self, path: Path, payload: Any) -> None:
        """Write ``payload`` as JSON, atomically (a kill leaves the old file or the new one)."""
        atomic_write_json(path, payload)


def use_cpu(device: str) -> bool:
    """Whether Accelerate must be told ``cpu=True``: asked for, or ``auto`` with no accelerator.

    Under torchrun, ``Accelerator(cpu=False)`` on a machine without an accelerator does not join
    the process group (Accelerate only picks gloo when told ``cpu=True``), so every process
    would run the whole job alone.
    """
    import torch

    if device == "cpu":
        return True
    if device != "auto":
        return False
    accel = getattr(torch, "accelerator", None)
    if accel is not None:
        return not bool(accel.is_available())
    return not torch.cuda.is_available()


def launched_world_size() -> int:
    """The number of processes a launcher (torchrun, accelerate launch, MPI) started; 1 if none."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 1


def check_process_group(num_processes: int) -> None:
    """Refuse a launch of several processes that became independent 1-process runs."""
    launched = launched_world_size()
    if launched > 1 and num_processes != launched:
        raise DistilError(
            f"the launcher started {launched} processes but each one runs alone "
            f"({num_processes} process(es) in the group): the run would be done {launched} "
            "times over. Use train.device=cpu on a machine without an accelerator, or check "
            "that the launcher's devices match train.device"
        )


def open_session(
    choose_run_dir: Callable[[], Path],
    *,
    resume: bool,
    device: str,
    mixed_precision: str,
    log_with: list[str],
    project: str,
    on_run_dir: Callable[[Path], None] | None = None,
    cpu_threads: int | None = None,
) -> Session:
    """Create the Accelerator, agree on one run folder across processes (the main process
    chooses it), start the trackers there and record the environment."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, broadcast_object_list

    if cpu_threads is not None:
        import torch

        torch.set_num_threads(cpu_threads)
    accelerator = Accelerator(cpu=use_cpu(device), mixed_precision=mixed_precision)
    check_process_group(accelerator.num_processes)
    chosen = [str(choose_run_dir()) if accelerator.is_main_process else ""]
    if accelerator.num_processes > 1:
        chosen = broadcast_object_list(chosen, from_process=0)
    run_dir = Path(chosen[0])
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if on_run_dir is not None:
            on_run_dir(run_dir)
    accelerator.wait_for_everyone()
    if (
        log_with
    ):  # the run folder is known only now, so the trackers are attached after construction
        from accelerate.tracking import filter_trackers

        accelerator.project_configuration = ProjectConfiguration(
            project_dir=str(run_dir), logging_dir=str(run_dir)
        )
        accelerator.log_with = filter_trackers(log_with, str(run_dir))
    if log_with:
        accelerator.init_trackers(project)  # TensorBoard events land in run_dir/<project>/
    if accelerator.is_main_process:
        write_env(run_dir, environment([str(accelerator.device)], accelerator.num_processes))
    return Session(accelerator=accelerator, run_dir=run_dir, resume=resume)
