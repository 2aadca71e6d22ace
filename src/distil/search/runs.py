"""One ``distil run`` in a subprocess: started (or resumed) in its own run folder, watched while
it trains, stopped when it is pruned.

A subprocess per run, rather than the recipe called in the worker's process, because a run is
then exactly what a user would run by hand (its folder resumes with ``distil run --resume``), a
run that crashes or leaks memory cannot take the worker with it, stopping a pruned trial is a
signal, and on Linux the run is killed with its worker (``PR_SET_PDEATHSIG``) so a killed worker
never leaves an orphan writing into a folder that its retry is about to resume. The price is the
start-up of a Python process with torch per run (2-3 s here), small next to a trial.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from distil.search.objectives import intermediate_points
from distil.training.metrics import read_metrics

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5


@dataclass(frozen=True)
class RunSpec:
    """A ``distil run CONFIG OVERRIDES --run-dir RUN_DIR`` with its log file."""

    config: Path
    overrides: list[str]
    run_dir: Path
    label: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.run_dir.with_name(self.run_dir.name + ".log")


def is_finished(run_dir: Path) -> bool:
    """Whether the run wrote its report (it ran to the end)."""
    return (run_dir / "report.json").is_file()


def is_started(run_dir: Path) -> bool:
    """Whether the run got as far as writing its resolved config (it can be resumed)."""
    return (run_dir / "config.resolved.yaml").is_file()


def command(spec: RunSpec) -> tuple[list[str], bool]:
    """The command line for ``spec`` and whether it resumes a started run.

    A folder that exists without ``config.resolved.yaml`` (killed within its first moments)
    holds nothing to resume, so it is cleared and the run starts afresh.
    """
    resume = is_started(spec.run_dir)
    if spec.run_dir.exists() and not resume:
        shutil.rmtree(spec.run_dir)
    argv = [
        sys.executable,
        "-m",
        "distil",
        "run",
        str(spec.config),
        *spec.overrides,
        "--run-dir",
        str(spec.run_dir),
    ]
    return ([*argv, "--resume"] if resume else argv), resume


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the kernel kills us when the worker dies


def start(spec: RunSpec) -> tuple[subprocess.Popen[bytes], bool]:
    """Start (or resume) the run; its output goes to ``spec.log`` (appended across resumes)."""
    argv, resume = command(spec)
    spec.run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(spec.log, "ab") as log:
        log.write(f"\n$ {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **spec.extra_env},
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )
    logger.info("%s %s (pid %d)", "resumed" if resume else "started", spec.run_dir, proc.pid)
    return proc, resume


def stop(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``; waits for the process to end."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass(frozen=True)
class Watch:
    """Which ``metrics.jsonl`` series to follow while a run trains."""

    series: str
    phase: str | None
    step_key: str


def watch(
    proc: subprocess.Popen[bytes],
    run_dir: Path,
    follow: Watch | None,
    on_points: Callable[[Sequence[tuple[int, float]]], bool] | None,
    poll_s: float = POLL_SECONDS,
) -> tuple[int, bool]:
    """Wait for the run to end, passing the followed series to ``on_points`` as it grows.

    Args:
        proc: The running ``distil run``.
        run_dir: Its folder (``metrics.jsonl`` is read from there).
        follow: The series to read; ``None`` only waits.
        on_points: Called with every point so far whenever new ones appear; returning True
            stops the run (a pruned trial).
        poll_s: Seconds between reads.

    Returns:
        ``(return code, stopped)``; ``stopped`` is True when ``on_points`` asked to stop.
    """
    seen = 0
    metrics = run_dir / "metrics.jsonl"
    while True:
        code = proc.poll()
        if follow is not None and on_points is not None and metrics.is_file():
            points = intermediate_points(
                read_metrics(metrics), follow.series, phase=follow.phase, step_key=follow.step_key
            )
            if len(points) > seen:
                seen = len(points)
                if on_points(points):
                    stop(proc)
                    return proc.returncode, True
        if code is not None:
            return code, False
        time.sleep(poll_s)


def tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log (for an error message)."""
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_all(specs: Sequence[RunSpec], parallel: int) -> dict[Path, int]:
    """Run every spec that has not finished, ``parallel`` at a time, resuming started ones.

    Returns:
        The return code of each run that was started here (finished ones are skipped).
    """
    pending = [s for s in specs if not is_finished(s.run_dir)]
    running: list[tuple[RunSpec, subprocess.Popen[bytes]]] = []
    codes: dict[Path, int] = {}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                spec = pending.pop(0)
                running.append((spec, start(spec)[0]))
            time.sleep(POLL_SECONDS)
            for item in list(running):
                spec, proc = item
                if proc.poll() is not None:
                    codes[spec.run_dir] = proc.returncode
                    running.remove(item)
                    if proc.returncode != 0:
                        logger.warning(
                            "%s failed (exit %d):\n%s",
                            spec.run_dir,
                            proc.returncode,
                            tail(spec.log),
                        )
    finally:
        for _, proc in running:
            stop(proc)
    return codes
