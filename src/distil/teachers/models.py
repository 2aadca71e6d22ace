"""Live classifier and sentence-encoder teachers, and a teacher read from a per-example cache.

Each satisfies the :class:`~distil.teachers.base.Teacher` protocol: frozen, eval mode, run under
``torch.no_grad()``; the same batch always gets the same answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distil.cache.examples import ExampleCache
from distil.data.mixing import apply_mix
from distil.models.classifier import Inputs, logits_of
from distil.models.encoder import Encoder, mean_pool
from distil.models.features import capture_features
from distil.teachers.base import Batch, TeacherOutput

FEATURE_PREFIX = "feature:"  # cached feature maps are stored as feature:<module name>


class LiveClassifierTeacher:
    """A classifier in this process, answering for rows of its own encoded training inputs.

    Args:
        module: The classifier (any ``nn.Module`` that ``logits_of`` can call).
        inputs: The teacher's encoding of the training split (``{"x": (N, ...)}`` or token
            tensors); ``batch["example_id"]`` picks rows, ``batch["mix"]`` mixes them.
        device: Where the teacher runs (its outputs stay there).
        feature_names: Submodules whose outputs are returned in ``features`` (feature KD).
        source: How the teacher was made, for the mode line.
    """

    def __init__(
        self,
        module: nn.Module,
        inputs: Inputs,
        *,
        device: torch.device,
        feature_names: Sequence[str] = (),
        source: str = "",
    ) -> None:
        self.module = module.to(device).eval().requires_grad_(False)
        self.inputs = inputs
        self.device = device
        self.feature_names = list(feature_names)
        self.source = source

    def __call__(self, batch: Batch) -> TeacherOutput:
        ids = batch["example_id"]
        x = {k: v[ids].to(self.device) for k, v in self.inputs.items()}
        plan = batch.get("mix")
        if plan is not None:  # the teacher sees the image the student sees
            x = {k: apply_mix(v, plan) for k, v in x.items()}
        with torch.no_grad(), capture_features(self.module, self.feature_names, detach=True) as f:
            logits = logits_of(self.module, x)  # (B, C)
        return TeacherOutput(logits=logits, features=dict(f))

    def describe(self) -> str:
        n = sum(p.numel() for p in self.module.parameters())
        return f"live {self.source or type(self.module).__name__} ({n:,} params) on {self.device}"


class LiveEncoderTeacher:
    """A sentence encoder in this process: pooled embeddings, optionally named block outputs
    and attention probabilities, of a batch tokenized with its (shared) tokenizer."""

    def __init__(
        self,
        encoder: Encoder,
        *,
        device: torch.device,
        feature_names: Sequence[str] = (),
        attentions: bool = False,
    ) -> None:
        encoder.model.to(device).eval().requires_grad_(False)
        self.encoder = encoder
        self.device = device
        self.feature_names = list(feature_names)
        self.attentions = attentions

    def __call__(self, batch: Batch) -> TeacherOutput:
        tokens = {k: v for k, v in batch.items() if k not in ("example_id", "labels")}
        model = self.encoder.model
        with torch.no_grad(), capture_features(model, self.feature_names, detach=True) as f:
            out = model(**tokens, output_attentions=self.attentions)
        embedding = mean_pool(out.last_hidden_state, tokens["attention_mask"])  # (B, D)
        return TeacherOutput(embedding=embedding, features=dict(f), attentions=out.attentions)

    def describe(self) -> str:
        n = sum(p.numel() for p in self.encoder.model.parameters())
        return f"live encoder {self.encoder.source} ({n:,} params) on {self.device}"


class CachedExampleTeacher:
    """A teacher read from a per-example cache (class logits, or pooled embeddings, and the
    feature maps feature KD reads), looked up by ``batch["example_id"]``.

    Args:
        cache: The opened cache (fingerprints already checked by the caller).
        device: Where the outputs go (the student's device).
        feature_names: Feature maps to return (stored as ``feature:<name>``).
    """

    def __init__(
        self, cache: ExampleCache, *, device: torch.device, feature_names: Sequence[str] = ()
    ) -> None:
        self.cache = cache
        self.device = device
        self.feature_names = list(feature_names)

    @property
    def path(self) -> Path:
        return self.cache.path

    def __call__(self, batch: Batch) -> TeacherOutput:
        got = self.cache.get(batch["example_id"])
        logits = got["logits"].to(self.device) if "logits" in got else None
        embedding = got["embedding"].to(self.device).float() if "embedding" in got else None
        features = {n: got[FEATURE_PREFIX + n].to(self.device) for n in self.feature_names}
        return TeacherOutput(logits=logits, embedding=embedding, features=features)

    def describe(self) -> str:
        per = self.cache.manifest.get("bytes_per_example", 0.0)
        return f"cached {self.cache.path} ({len(self.cache):,} examples, {per:.0f} bytes each)"


def teacher_outputs(teacher: Any, batch: Batch) -> dict[str, Tensor]:
    """The dense per-example outputs of a teacher, as a cache stores them: ``logits`` or
    ``embedding`` and ``feature:<name>`` maps."""
    out = teacher(batch)
    stored: dict[str, Tensor] = {}
    if out.logits is not None:
        stored["logits"] = out.logits.float()
    if out.embedding is not None:
        stored["embedding"] = out.embedding.float()
    stored |= {FEATURE_PREFIX + n: v for n, v in out.features.items()}
    return stored
