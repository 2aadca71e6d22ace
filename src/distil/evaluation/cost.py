"""What a model costs: parameters, bytes on disk, CPU latency and throughput."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


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
