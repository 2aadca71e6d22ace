"""What a model costs: parameters, bytes on disk, CPU latency and throughput.

Speed comparisons between models (the report's speed-ups) are measured *interleaved*: in each
round every model runs, in an order that rotates from round to round, so a change of machine load
hits all models of a round alike. The speed-up of a model is then the median of its per-round
ratios to the reference (the teacher), reported with their spread; a spread too wide, or one
that straddles 1, is said to be too noisy to call instead of printed as a headline.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch

# A speed-up whose per-round ratios spread wider than this factor between the quartiles
# (q3 / q1) is reported as too noisy to call: one run of the same model pair gave 14.7x and
# 29.6x on a loaded machine when models were timed one after the other.
NOISY_SPREAD = 1.5


@torch.inference_mode()
def cpu_latency_ms(
    fn: Callable[[], object], *, repeats: int = 30, warmup: int = 5, min_seconds: float = 0.3
) -> float:
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


@dataclass(frozen=True)
class Spread:
    """The median of repeated measurements with their quartiles and extremes.

    Attributes:
        median: The middle value.
        q1: First quartile (25 %).
        q3: Third quartile (75 %).
        low: Smallest value.
        high: Largest value.
        n: Number of measurements.
    """

    median: float
    q1: float
    q3: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        """The spread of ``values`` (at least one)."""
        if not values:
            raise ValueError("Spread.of needs at least one value")
        ordered = sorted(float(v) for v in values)
        if len(ordered) == 1:
            q1 = q3 = ordered[0]
        else:
            q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
        return cls(statistics.median(ordered), q1, q3, ordered[0], ordered[-1], len(ordered))

    def scaled(self, factor: float) -> Spread:
        """Every value times a positive ``factor`` (e.g. seconds to milliseconds)."""
        return Spread(
            self.median * factor,
            self.q1 * factor,
            self.q3 * factor,
            self.low * factor,
            self.high * factor,
            self.n,
        )

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


@torch.inference_mode()
def interleaved_seconds(
    fns: Mapping[str, Callable[[], object]],
    *,
    rounds: int = 15,
    warmup: int = 3,
    min_round_seconds: float = 0.02,
    max_calls: int = 10_000,
) -> dict[str, list[float]]:
    """Seconds per call of each function, measured in interleaved rounds.

    After ``warmup`` calls each, every function gets a number of calls per round so that its
    calls last at least ``min_round_seconds`` (fast models are timed over many calls, slow ones
    once). Each round runs every function's calls back to back, starting with a different
    function each round, and records the median time of its calls (robust to the odd call the
    scheduler interrupts; the interleaving handles load that changes between rounds).

    Args:
        fns: The calls to time, by name (e.g. one forward pass of each model).
        rounds: Measurements per function.
        warmup: Untimed calls before the first round.
        min_round_seconds: The least time one function's calls of a round take.
        max_calls: The most calls of one function per round.

    Returns:
        ``{name: [median seconds per call, one per round]}``, rounds in order.
    """
    names = list(fns)
    calls: dict[str, int] = {}
    for name in names:
        for _ in range(warmup):
            fns[name]()
        start = time.perf_counter()
        fns[name]()
        once = time.perf_counter() - start
        calls[name] = max(1, min(max_calls, math.ceil(min_round_seconds / max(once, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            fn, times = fns[name], []
            for _ in range(calls[name]):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            # the median call: a call the scheduler interrupted does not move it
            samples[name].append(statistics.median(times))
    return samples


def speedup_spread(reference: Sequence[float], other: Sequence[float]) -> Spread:
    """How many times faster ``other`` is than ``reference``, round by round.

    Args:
        reference: Seconds per call of the reference (the teacher), one per round.
        other: Seconds per call of the model compared, from the same rounds.

    Returns:
        The spread of ``reference[r] / other[r]`` over the rounds: paired ratios, so load that
        changes between rounds cancels.
    """
    if len(reference) != len(other):
        raise ValueError("speedup_spread needs measurements from the same rounds")
    return Spread.of([r / o for r, o in zip(reference, other, strict=True) if o > 0])


def is_noisy(spread: Spread) -> bool:
    """Whether a speed-up's quartiles straddle 1 or lie more than ``NOISY_SPREAD`` apart."""
    return spread.q1 <= 1.0 <= spread.q3 or spread.q3 > NOISY_SPREAD * spread.q1


def times_text(ratio: float) -> str:
    """``8.2x`` (two significant digits below 10, whole numbers above)."""
    return f"{ratio:.1f}x" if ratio < 9.95 else f"{ratio:.0f}x"


def speedup_verdict(spread: Spread, *, at: str = "at batch 1") -> str:
    """One sentence for a report: the speed-up with its spread, or that it is too noisy to call.

    ``"8.2x faster at batch 1 (quartiles 7.9-8.6x over 15 interleaved rounds)"``,
    ``"2.0x slower ..."``, or ``"no clear speed difference at batch 1: ..."``.
    """
    span = (
        f"quartiles {spread.q1:.2g}-{spread.q3:.2g}x over {spread.n} interleaved "
        f"round{'s' if spread.n != 1 else ''}"
    )
    if is_noisy(spread):
        return (
            f"speed {at} too noisy to call: median {spread.median:.2g}x the teacher's ({span}); "
            "measure on a quiet machine"
        )
    if spread.median >= 1:
        return f"{times_text(spread.median)} faster {at} ({span})"
    return f"{times_text(1 / spread.median)} slower {at} ({span})"


def speed_columns(
    seconds: Mapping[str, Sequence[float]],
    reference: str,
    *,
    time_key: str = "latency_b1_ms",
    speedup_key: str = "speedup",
    at: str = "at batch 1",
) -> dict[str, dict[str, Any]]:
    """Report-row values for interleaved timings of several models.

    Args:
        seconds: :func:`interleaved_seconds` output.
        reference: The name speed-ups are relative to (the teacher).
        time_key: Key of the median milliseconds per call; ``_q1``/``_q3`` keys hold quartiles.
        speedup_key: Key of the median speed-up over ``reference``; ``_q1``/``_q3`` hold its
            quartiles, ``_rounds`` the number of rounds, ``_noisy`` whether it is too noisy to
            call (:func:`is_noisy`) and ``_verdict`` the sentence of :func:`speedup_verdict`
            (``None`` for the reference itself).
        at: What the speed-up is measured at, for the sentence.

    Returns:
        ``{name: {key: value}}`` to merge into each model's row.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, values in seconds.items():
        ms = Spread.of(values).scaled(1e3)
        ratio = speedup_spread(seconds[reference], values)
        out[name] = {
            time_key: ms.median,
            f"{time_key}_q1": ms.q1,
            f"{time_key}_q3": ms.q3,
            speedup_key: ratio.median,
            f"{speedup_key}_q1": ratio.q1,
            f"{speedup_key}_q3": ratio.q3,
            f"{speedup_key}_rounds": ratio.n,
            f"{speedup_key}_noisy": is_noisy(ratio),
            f"{speedup_key}_verdict": None if name == reference else speedup_verdict(ratio, at=at),
        }
    return out


def interleaved_speeds(
    batch1: Mapping[str, Callable[[], object]],
    batched: Mapping[str, Callable[[], object]] | None = None,
    *,
    reference: str,
    batch_size: int = 1,
    rounds: int = 15,
    threads: int = 1,
) -> dict[str, dict[str, Any]]:
    """Batch-1 latency and batched throughput of several models, timed interleaved at
    ``threads`` CPU threads, with each model's speed-up over ``reference`` and its spread.

    Args:
        batch1: One batch-1 forward pass per model, by report name.
        batched: One forward pass of ``batch_size`` examples per model (same names), or None.
        reference: The name speed-ups are relative to (the teacher).
        batch_size: Examples per ``batched`` call.
        rounds: Interleaved rounds at batch 1 (half as many, at least 5, batched).
        threads: Intra-op threads while timing (see :func:`cpu_threads`).

    Returns:
        Per name, the keys of :func:`speed_columns` (``latency_b1_ms``, ``speedup``, their
        quartiles, ``speedup_verdict``...) and, with ``batched``, ``latency_bN_ms``,
        ``speedup_bN`` (and theirs) and ``throughput_per_s``.
    """
    with cpu_threads(threads):
        out = speed_columns(interleaved_seconds(batch1, rounds=rounds), reference)
        if batched:
            many = speed_columns(
                interleaved_seconds(batched, rounds=max(5, rounds // 2)),
                reference,
                time_key=f"latency_b{batch_size}_ms",
                speedup_key=f"speedup_b{batch_size}",
                at=f"at batch {batch_size}",
            )
            for name, cols in many.items():
                ms = cols[f"latency_b{batch_size}_ms"]
                out[name] |= cols | {"throughput_per_s": batch_size / (ms / 1e3)}
    return out


@contextmanager
def cpu_threads(n: int = 1) -> Iterator[None]:
    """Run the block with ``n`` intra-op CPU threads, then restore the previous count.

    Reports time models with one thread: on a shared or busy machine, several threads waiting
    on each other turn a 0.3 ms forward pass into 200 ms (measured on 2 busy cores), so
    single-thread numbers are the ones that can be compared between runs and machines.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (shared tensors once)."""
    seen: dict[int, int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


@torch.inference_mode()
def peak_forward_memory_bytes(fn: Callable[[], object], module: torch.nn.Module) -> int:
    """Peak memory of one call of ``fn`` (a forward pass of ``module``): the weights plus the
    largest total of tensors alive at once during the call.

    On CUDA this is ``torch.cuda.max_memory_allocated`` over the call. On CPU, where PyTorch
    keeps no allocator statistics, every tensor an operator returns is counted from its creation
    until it is freed (a ``TorchDispatchMode`` sees each operator; storages shared by views
    count once). Scratch buffers inside a kernel are not seen, so this is a lower bound that
    tracks activation memory, the part that changes between teacher and student.
    """
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    weights = weight_bytes(module)
    device = next(module.parameters(), torch.empty(0)).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return weights + torch.cuda.max_memory_allocated(device) - before

    live: dict[int, list[int]] = {}  # storage address -> [bytes, live tensors using it]
    for t in [*module.parameters(), *module.buffers()]:  # views of weights are not new memory
        live[t.untyped_storage().data_ptr()] = [0, 1 << 40]
    state = {"current": 0, "peak": 0}

    def release(key: int) -> None:
        entry = live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            state["current"] -= entry[0]
            del live[key]

    class _Track(TorchDispatchMode):
        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                    continue
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key == 0:
                    continue
                if key in live:
                    live[key][1] += 1
                else:
                    live[key] = [storage.nbytes(), 1]
                    state["current"] += storage.nbytes()
                    state["peak"] = max(state["peak"], state["current"])
                weakref.finalize(t, release, key)
            return out

    with _Track():
        result = fn()
    del result
    return weights + state["peak"]
