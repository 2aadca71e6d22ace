"""Fully sharded data parallel training (PyTorch FSDP2, ``fully_shard``) for the phase loop.

With ``train.sharding: fsdp`` each process holds a 1/N shard of the trained model's parameters,
gradients and optimiser state instead of a full replica (DDP): the parameters of one block are
all-gathered just for its forward and backward, and gradients are reduce-scattered (averaged,
as DDP does). It runs on the gloo backend, so it is tested on CPU with two processes.

Checkpoints of a sharded phase hold the *full* (unsharded) model and optimiser state, gathered to
the main process: the same files as an unsharded run, so a run resumes with another number of
processes (2 -> 1 is tested). The model state is safetensors by parameter name, the optimiser state
is keyed by parameter name too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def ensure_process_group() -> None:
    """FSDP needs a process group even for one process (a run resumed alone): start a one-rank
    gloo group on a free loopback port when none exists."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def shard(model: nn.Module, blocks: Iterable[nn.Module]) -> nn.Module:
    """Shard each block (a unit of all-gather: a transformer layer), then the root module (the
    parameters in no block: embeddings, final norm, output layer). Returns ``model``, changed
    in place (its parameters become sharded ``DTensor``s)."""
    from torch.distributed.fsdp import fully_shard

    ensure_process_group()
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict on the main process (CPU tensors); empty elsewhere. Collective: every
    process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state: dict[str, torch.Tensor] = get_model_state_dict(model, options=options)  # type: ignore[assignment]
    return state


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimiser state keyed by parameter name, on the main process. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


class GatheredState:
    """A state dict gathered already (by every process, collectively), handed to the checkpoint
    writer on the main process in place of the module or optimiser it came from."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state


class ShardedState:
    """What a checkpoint reads and writes of a sharded phase: ``state_dict()`` gathers the full
    state (collective), ``load_state_dict()`` scatters a full one into the shards. Stands in for
    the model and the optimiser in :mod:`distil.training.checkpoint`, whose files are then the
    same as an unsharded run's.

    Args:
        model: The sharded module (its root was passed to :func:`shard`).
        optimizer: The optimiser over its parameters, for the optimiser's view; None for the
            model's view.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return full_model_state(self.model)
        return full_optimizer_state(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        if self.optimizer is None:
            set_model_state_dict(self.model, state, options=options)
        else:
            set_optimizer_state_dict(self.model, self.optimizer, state, options=options)


def total_norm(grads: list[torch.Tensor]) -> float:
    """The 2-norm of all gradients, sharded (``DTensor``) or not."""
    if not grads:
        return float("nan")
    norm = torch.nn.utils.get_total_norm(grads)
    full = getattr(norm, "full_tensor", None)
    return float(full() if callable(full) else norm)
