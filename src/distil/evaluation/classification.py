"""Metrics for classifiers: accuracy, teacher-student agreement, per-class accuracy."""

from __future__ import annotations

import torch
from torch import nn

from distil.models.classifier import Inputs, logits_of


@torch.inference_mode()
def predict_logits(module: nn.Module, inputs: Inputs, batch_size: int = 512) -> torch.Tensor:
    """Logits (N, C) over a whole split, in eval mode, batched; the mode is restored after."""
    was_training = module.training
    module.eval()
    n = next(iter(inputs.values())).shape[0]
    device = next(module.parameters()).device
    outs = []
    for start in range(0, n, batch_size):
        batch = {k: v[start : start + batch_size].to(device) for k, v in inputs.items()}
        outs.append(logits_of(module, batch).float().cpu())
    module.train(was_training)
    return torch.cat(outs)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Fraction of examples where student and teacher predict the same class."""
    return float((student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean())


def per_class_accuracy(
    logits: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> list[float | None]:
    pred = logits.argmax(-1)
    out: list[float | None] = []
    for c in range(num_classes):
        sel = labels == c
        out.append(float((pred[sel] == c).float().mean()) if sel.any() else None)
    return out
