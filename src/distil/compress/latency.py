"""Size on disk and CPU latency of compressed models: batch 1 and 64, eager and ``torch.compile``d.

Latency is measured interleaved: every round calls each variant once, in turn, so a busy
shared machine slows all variants alike and their ratios stay meaningful. Each variant is
warmed up first (for a compiled one this includes compilation, reported separately), then the
median and the 10th/90th percentiles of the rounds are reported, with the load average.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distil.errors import DistilError
from distil.evaluation.cost import cpu_threads


@dataclass(frozen=True)
class Timing:
    """Wall time of repeated calls, in milliseconds.

    Attributes:
        median_ms: Median over the rounds.
        p10_ms: 10th percentile (nearest rank).
        p90_ms: 90th percentile (nearest rank).
        min_ms: Fastest round.
        repeats: Rounds timed.
        warmup_s: Seconds spent in the warm-up calls (compilation included).
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    repeats: int
    warmup_s: float

    @property
    def spread(self) -> float:
        """``(p90 - p10) / median``: how noisy the measurement was."""
        return (self.p90_ms - self.p10_ms) / self.median_ms if self.median_ms else 0.0


def _percentile(sorted_values: Sequence[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


def summarise(times_s: Sequence[float], warmup_s: float = 0.0) -> Timing:
    """Summarise call times given in seconds."""
    if not times_s:
        raise DistilError("no timings to summarise")
    ms = sorted(t * 1e3 for t in times_s)
    return Timing(
        median_ms=statistics.median(ms),
        p10_ms=_percentile(ms, 0.1),
        p90_ms=_percentile(ms, 0.9),
        min_ms=ms[0],
        repeats=len(ms),
        warmup_s=warmup_s,
    )


@torch.inference_mode()
def interleaved_latency(
    variants: Mapping[str, Callable[[], object]],
    *,
    warmup: int = 2,
    repeats: int = 10,
    threads: int = 1,
) -> dict[str, Timing]:
    """Time several callables in interleaved rounds.

    Args:
        variants: Name → a call to time (e.g. one forward pass at one batch size).
        warmup: Untimed calls of each variant before the rounds.
        repeats: Rounds; each calls every variant once.
        threads: Intra-op CPU threads during the measurement (1 compares best on a shared box).

    Returns:
        Name → :class:`Timing`.
    """
    if repeats < 1 or warmup < 0:
        raise DistilError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    times: dict[str, list[float]] = {name: [] for name in variants}
    warm: dict[str, float] = {}
    with cpu_threads(threads):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(warmup):
                fn()
            warm[name] = time.perf_counter() - start
        for _ in range(repeats):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: summarise(times[name], warm[name]) for name in variants}


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (zeros where the OS has none)."""
    try:
        return os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)


def latency_grid(
    models: Mapping[str, nn.Module],
    make_inputs: Callable[[int], Mapping[str, torch.Tensor]],
    *,
    batch_sizes: Sequence[int] = (1, 64),
    compiled: Sequence[bool] = (False, True),
    warmup: int = 2,
    repeats: int = 10,
    threads: int = 1,
) -> list[dict[str, Any]]:
    """Latency of every model at every batch size, eager and/or compiled, interleaved.

    Args:
        models: Variant name → model, already in eval mode (exported programs cannot switch).
        make_inputs: Batch size → keyword inputs of one forward pass.
        batch_sizes: Batch sizes to time.
        compiled: Which of eager (``False``) and ``torch.compile`` (``True``, static shapes)
            to time.
        warmup: Untimed calls per variant (the first compiled call compiles).
        repeats: Timed rounds.
        threads: Intra-op threads.

    Returns:
        One row per (model, batch size, mode): ``variant``, ``batch_size``, ``compiled``, the
        :class:`Timing` fields, ``spread`` and the ``load_average`` at the end.
    """
    calls: dict[str, Callable[[], object]] = {}
    keys: dict[str, tuple[str, int, bool]] = {}
    for name, model in models.items():
        runners: dict[bool, Callable[..., Any]] = {}
        for mode in compiled:
            # dynamic=False: one graph specialised per batch size, as a deployment would use
            runners[mode] = torch.compile(model, dynamic=False) if mode else model
        for batch in batch_sizes:
            inputs = dict(make_inputs(batch))
            for mode, runner in runners.items():
                key = f"{name}|{batch}|{'compiled' if mode else 'eager'}"

                def call(
                    runner: Callable[..., Any] = runner, inputs: dict[str, Any] = inputs
                ) -> object:
                    return runner(**inputs)

                calls[key] = call
                keys[key] = (name, batch, mode)
    # Every model and batch size is another compiled entry of the same forward code (Hugging
    # Face models share one wrapper function); past dynamo's recompile limit (8) it silently runs
    # eagerly, which would report eager times as compiled ones.
    limit = max(8, 2 * len(calls))
    with torch._dynamo.config.patch(recompile_limit=limit, accumulated_recompile_limit=4 * limit):
        timings = interleaved_latency(calls, warmup=warmup, repeats=repeats, threads=threads)
    load = load_average()
    rows = []
    for key, timing in timings.items():
        name, batch, mode = keys[key]
        rows.append(
            {
                "variant": name,
                "batch_size": batch,
                "compiled": mode,
                **asdict(timing),
                "spread": timing.spread,
                "threads": threads,
                "load_average": list(load),
            }
        )
    return rows


def folder_bytes(path: Path | str, *, suffixes: Sequence[str] | None = None) -> int:
    """Bytes of a file, or of every file under a folder (only ``suffixes`` when given)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        raise DistilError(f"{path} does not exist")
    return sum(
        f.stat().st_size
        for f in path.rglob("*")
        if f.is_file() and (suffixes is None or f.suffix in suffixes)
    )
