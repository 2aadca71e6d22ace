"""A live Hugging Face causal-LM teacher: frozen, eval mode, no_grad, its own dtype and device."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from distil.errors import DistilError
from distil.models.lm import final_hidden
from distil.teachers.base import Batch, TeacherOutput, TeacherSignal

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


def head_of(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The output layer's ``(V, H)`` weight and ``(V,)`` bias (or None).

    Raises:
        DistilError: If the output layer is not a plain ``nn.Linear``.
    """
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if not isinstance(head, nn.Linear):
        raise DistilError(
            f"{type(model).__name__} has no plain linear output layer (got {type(head).__name__}); "
            "set kd.chunked=false"
        )
    return head.weight, head.bias


def hidden_path_matches(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> bool:
    """Whether ``logits == final_hidden @ W.T + b`` for this model (no logit soft-capping or scaling).

    Checked numerically on a real batch, so architectures that post-process logits are detected
    without a list of config names.
    """
    try:
        weight, bias = head_of(model)
    except DistilError:
        return False
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        rebuilt = final_hidden(model, input_ids, attention_mask) @ weight.T  # (B, T, V)
        if bias is not None:
            rebuilt = rebuilt + bias
    scale = float(logits.float().abs().max().clamp_min(1.0))
    return bool(torch.allclose(rebuilt.float(), logits.float(), rtol=1e-3, atol=1e-3 * scale))


class LiveLMTeacher:
    """A causal LM held in this process that satisfies the ``Teacher`` protocol.

    The model is moved to ``device`` in ``dtype``, put in eval mode and frozen once; every call
    runs under ``torch.no_grad()`` with autocast disabled, so the student's mixed-precision
    setting never changes the teacher's precision. Outputs are sliced to the tokenizer's
    vocabulary (padded rows are never scored) and moved to ``output_device``.

    Args:
        model: A Hugging Face causal LM.
        vocab_size: The tokenizer's vocabulary; logits/weights are sliced to it.
        device: Where the teacher runs (may differ from the student's device).
        dtype: The teacher's parameter dtype (e.g. ``torch.bfloat16``).
        output_device: Where the outputs go (the student's device).
        signal: ``logits`` or ``hidden`` (final hidden states plus the output layer).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        vocab_size: int,
        device: torch.device,
        dtype: torch.dtype,
        output_device: torch.device,
        signal: TeacherSignal = TeacherSignal.LOGITS,
    ) -> None:
        # transformers wraps PreTrainedModel.to in a decorator that mypy reads as unbound.
        model.to(device=device, dtype=dtype)  # type: ignore[call-arg]
        model.eval().requires_grad_(False)
        self.model = model
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.output_device = torch.device(output_device)
        self.signal = TeacherSignal(signal)
        self._weight: Tensor | None = None
        self._bias: Tensor | None = None
        if self.signal is TeacherSignal.HIDDEN:
            weight, bias = head_of(model)
            # A frozen copy on the student's device, made once instead of once per step.
            self._weight = weight[:vocab_size].detach().to(self.output_device)  # (V, H)
            self._bias = None if bias is None else bias[:vocab_size].detach().to(self.output_device)

    def __call__(self, batch: Batch) -> TeacherOutput:
        """Run the teacher on ``batch["input_ids"]`` and ``batch["attention_mask"]``."""
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            if self.signal is TeacherSignal.HIDDEN:
                hidden = final_hidden(self.model, ids, mask).to(self.output_device)  # (B, T, H)
                return TeacherOutput(hidden=hidden, weight=self._weight, bias=self._bias)
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            return TeacherOutput(logits=logits[..., : self.vocab_size].to(self.output_device))

    def check_deterministic(self, batch: Batch) -> None:
        """Refuse a teacher whose two answers to the same batch differ (dropout left on, F9).

        Raises:
            DistilError: If the two outputs are not identical.
        """
        first, second = self(batch), self(batch)
        a = first.logits if first.logits is not None else first.hidden
        b = second.logits if second.logits is not None else second.hidden
        if a is None or b is None or not torch.equal(a, b):
            raise DistilError(
                "the teacher gave two different answers to the same batch; it must be deterministic "
                "(eval mode, no dropout, no sampling)"
            )

    def describe(self) -> str:
        """One line for the mode report."""
        n = sum(p.numel() for p in self.model.parameters())
        return (
            f"live {type(self.model).__name__} ({n:,} params) on {self.device} in "
            f"{str(self.dtype).removeprefix('torch.')}, frozen, eval, no_grad; signal={self.signal.value}"
        )
