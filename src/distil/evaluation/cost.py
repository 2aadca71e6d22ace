"""What a model costs: parameters, bytes on disk, CPU latency and throughput."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


@torch.inference_mode()
def cpu_latency_ms(fn: Callable[[], object], *, repeats: int = 30, warmup: int = 5, min_seconds: float = 0.3) -> float:
    """Median wall time of ``fn()`` in milliseconds, after warm-up; at least ``repeats`` runs and
    ``min_seconds`` in total so that very fast models are timed over many calls."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) > 10_000:
            break
    return statistics.median(times) * 1e3
