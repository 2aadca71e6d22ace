"""The ``Teacher`` protocol: given a batch, return what the loss needs."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol, runtime_checkable

from torch import Tensor


class TeacherSignal(str, Enum):
    """What a token-level loss asks the teacher for.

    ``logits`` gives ``(B, T, V)`` logits. ``hidden`` gives the final hidden states ``(B, T, H)``
    plus the output layer, so a chunked loss builds the teacher's logits chunk by chunk and never
    holds ``(B, T, V)`` (large vocabularies).
    """

    LOGITS = "logits"
    HIDDEN = "hidden"


@dataclass(frozen=True)
class TeacherOutput:
    """A teacher's answer for one batch, on the device the caller asked for.

    Attributes:
        logits: ``(B, T, V)`` sliced to the tokenizer's vocabulary, or None.
        hidden: ``(B, T, H)`` final (normalised) hidden states, or None.
        weight: ``(V, H)`` output-layer weight sliced to the vocabulary (with ``hidden``).
        bias: ``(V,)`` output-layer bias, or None.
    """

    logits: Tensor | None = None
    hidden: Tensor | None = None
    weight: Tensor | None = None
    bias: Tensor | None = None


@runtime_checkable
class Teacher(Protocol):
    """Anything that answers a batch of token ids with a ``TeacherOutput``.

    Implementations must be side-effect free on the caller's RNG and autograd state: no
    gradient, no dropout, the same answer for the same batch.
    """

    signal: TeacherSignal

    def __call__(self, input_ids: Tensor, attention_mask: Tensor) -> TeacherOutput:
        """Answer a batch.

        Args:
            input_ids: ``(B, T)`` int64 token ids.
            attention_mask: ``(B, T)`` 1 for real tokens, 0 for padding.

        Returns:
            The signal named by ``self.signal``, on the caller's device.
        """
        ...

    def describe(self) -> str:
        """One line for the start-of-run mode report: what, where, which precision."""
        ...
