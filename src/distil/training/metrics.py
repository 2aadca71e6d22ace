"""Metrics: one JSON object a line in ``metrics.jsonl``, mirrored to Accelerate's trackers
(TensorBoard by default; W&B or MLflow when the config asks)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch


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
