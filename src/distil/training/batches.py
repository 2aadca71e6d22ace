"""Deterministic, resumable data order: a permutation per epoch from (seed, epoch), cut into
global batches, each rank taking its contiguous slice of every global batch.

Because the order is a pure function of (seed, epoch), resuming needs only the data position
(epoch, batch in epoch), and every rank can check that together they cover the dataset once.
"""

from __future__ import annotations

import torch


def epoch_permutation(
    num_examples: int, *, seed: int, epoch: int, shuffle: bool = True
) -> torch.Tensor:
    if not shuffle:
        return torch.arange(num_examples)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=g)


def global_batches(
    num_examples: int,
    *,
    global_batch_size: int,
    seed: int,
    epoch: int,
    drop_last: bool,
    shuffle: bool = True,
) -> list[torch.Tensor]:
    """The epoch's batches of example indices, each of ``global_batch_size`` (the last may be short)."""
    perm = epoch_permutation(num_examples, seed=seed, epoch=epoch, shuffle=shuffle)
    batches = list(perm.split(global_batch_size))
    if drop_last and batches and len(batches[-1]) < global_batch_size:
        batches.pop()
    return batches


def rank_slice(batch: torch.Tensor, *, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous share of a global batch (sizes differ by at most one)."""
    return batch.tensor_split(world_size)[rank]
