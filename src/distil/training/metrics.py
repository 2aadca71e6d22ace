"""Metrics: one JSON object a line in ``metrics.jsonl``, mirrored to Accelerate's trackers
(TensorBoard by default; W&B or MLflow when the config asks)."""

from __future__ import annotations

import contextlib
import json
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak: CUDA's allocator statistics, and on Linux the process's ``VmHWM``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """``peak_rss_mb`` (``VmHWM`` on Linux, else ``ru_maxrss``; since the last
    :func:`reset_peak_memory`), ``rss_mb`` now, and ``peak_cuda_mb`` on CUDA."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith(("VmHWM:", "VmRSS:")):
                out["peak_rss_mb" if line.startswith("VmHWM") else "rss_mb"] = (
                    int(line.split()[1]) / 1024
                )
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


class MetricsLog:
    """Appends metrics to ``metrics.jsonl`` (main process only) and to the accelerator's trackers."""

    def __init__(self, path: Path, accelerator: Any, enabled: bool) -> None:
        self.path = path
        self.accelerator = accelerator
        self.enabled = enabled
        self._start = time.time()

    def log(self, values: dict[str, Any], *, step: int, phase: str) -> None:
        if not self.enabled:
            return
        plain = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in values.items()}
        row = {"phase": phase, "step": step, "time_s": round(time.time() - self._start, 3), **plain}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        numeric = {
            f"{phase}/{k}": float(v)
            for k, v in plain.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
        }
        if numeric and self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log(numeric, step=step)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All rows of a ``metrics.jsonl`` (a torn last line from a kill is skipped)."""
    rows: list[dict[str, Any]] = []
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
