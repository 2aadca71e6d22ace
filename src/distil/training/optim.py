"""Optimiser and learning-rate schedule from the train config."""

from __future__ import annotations

import math
from typing import Any

import torch


def build_optimizer(
    params: Any, *, name: str, lr: float, weight_decay: float, momentum: float = 0.9
) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True
        )
    raise ValueError(f"unknown optimizer {name!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, name: str, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then constant, linear decay or cosine decay to zero at ``total_steps``."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if name == "linear":
            return 1.0 - progress
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"unknown scheduler {name!r}")

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
