"""The ``Teacher`` protocol: given a batch, return what the loss needs.

One protocol for every recipe and every place a teacher can live: a model in this process, a
cache of its outputs on disk, an ensemble of several teachers (and, through a cache made from
its answers, a model behind an API). A recipe builds its batch, calls ``teacher(batch)`` and
reads the fields its loss uses; it never asks where the teacher lives.

Batch keys, by model family (every batch carries ``example_id``):

- classifiers: ``example_id`` (the rows of the teacher's own encoded training inputs), ``mix``
  (a :class:`distil.data.mixing.MixPlan` or None: the teacher sees the student's mixed image),
  ``labels`` (for confidence-weighted ensembles);
- causal LMs: ``input_ids``, ``attention_mask`` (``(B, T)``), ``example_id``, and ``targets``
  (``(B, T)`` next-token targets, for confidence-weighted ensembles);
- sentence encoders: the tokenized batch (``input_ids``, ``attention_mask``, ...) and
  ``example_id``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from distil.losses.sparse import SampledTargets, TopKTargets

Batch = Mapping[str, Any]


class TeacherSignal(str, Enum):
    """What a token-level loss asks an LM teacher for.

    ``logits`` gives ``(B, T, V)`` logits. ``hidden`` gives the final hidden states ``(B, T, H)``
    plus the output layer, so a chunked loss builds the teacher's logits chunk by chunk and never
    holds ``(B, T, V)`` (large vocabularies). ``sparse`` gives a cache's top-k or sampled
    targets, for the losses that never need the full distribution.
    """

    LOGITS = "logits"
    HIDDEN = "hidden"
    SPARSE = "sparse"


@dataclass(frozen=True)
class TeacherOutput:
    """A teacher's answer for one batch, on the device the caller asked for. Each teacher fills
    the fields it has; the rest stay None/empty.

    Attributes:
        logits: Class logits ``(B, C)``, or token logits ``(B, T, V)`` sliced to the tokenizer.
        hidden: ``(B, T, H)`` final (normalised) hidden states (LM, chunked losses).
        weight: ``(V, H)`` output-layer weight sliced to the vocabulary (with ``hidden``).
        bias: ``(V,)`` output-layer bias, or None.
        sparse: A cache's top-k or sampled next-token targets ``(B, T, k)``.
        sparse_mask: ``(B, T)`` True where ``sparse`` holds a target.
        embedding: ``(B, D)`` pooled sentence embeddings (encoders).
        features: Named intermediate outputs (feature KD), e.g. ``{"stages.1": (B, C, H, W)}``.
        attentions: Per-layer attention probabilities ``(B, heads, T, T)`` (encoders).
        group_log_probs: ``(G, V_t)`` merged log-probabilities of a batch's aligned token
            groups (a cross-tokenizer cache; ``distil.losses.cross_tokenizer``).
    """

    logits: Tensor | None = None
    hidden: Tensor | None = None
    weight: Tensor | None = None
    bias: Tensor | None = None
    sparse: TopKTargets | SampledTargets | None = None
    sparse_mask: Tensor | None = None
    embedding: Tensor | None = None
    features: dict[str, Tensor] = field(default_factory=dict)
    attentions: tuple[Tensor, ...] | None = None
    group_log_probs: Tensor | None = None


@runtime_checkable
class Teacher(Protocol):
    """Anything that answers a batch with a :class:`TeacherOutput`.

    Implementations are side-effect free on the caller's RNG and autograd state: no gradient,
    no dropout, the same answer for the same batch.
    """

    def __call__(self, batch: Batch) -> TeacherOutput:
        """Answer a batch (keys by model family: see the module docstring)."""
        ...

    def describe(self) -> str:
        """One line for the start-of-run mode report: what, where, which precision."""
        ...
