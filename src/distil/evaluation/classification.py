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


def chance_level_warning(accuracy: float, labels: torch.Tensor) -> str | None:
    """A warning when a teacher's accuracy is no better than always guessing the most frequent
    class, within sampling noise (three binomial standard deviations over ``len(labels)``).

    Distilling such a teacher teaches the student nothing, so it should be said before and in
    the report, not discovered from a weak student.

    Args:
        accuracy: The teacher's accuracy on ``labels``' examples.
        labels: ``(N,)`` true class ids.

    Returns:
        The warning text, or None when the teacher is clearly better than chance.
    """
    n = int(labels.numel())
    if n == 0:
        return None
    majority = float(torch.bincount(labels.long()).max()) / n
    noise = 3 * (majority * (1 - majority) / n) ** 0.5
    if accuracy > majority + noise:
        return None
    return (
        f"the teacher's accuracy {100 * accuracy:.1f} % is at chance level (always guessing the "
        f"most frequent class gives {100 * majority:.1f} % on these {n} examples): distilling it "
        "teaches the student nothing; train the teacher longer (teacher.training.epochs), check "
        "its checkpoint, or give a better teacher"
    )
