"""A teacher cache across tokenizers: the teacher's merged group distributions, and the
alignment they were made for, stored per training example.

A student that reads text with another tokenizer than the teacher compares distributions over
aligned token groups (``distil.alignment``, ``distil.losses.cross_tokenizer``). What a group
needs from the teacher is one merged distribution over the teacher's vocabulary; the cache keeps
its top ``k`` entries (log-probabilities relative to the group's total mass, so float16 keeps
their precision), the total mass, and the groups themselves. Training from it needs neither the
teacher model nor its tokenizer: the student's own data and this folder suffice. The alignment
stored with each example must equal the run's, or the cache is refused (a hard error).

At training time each group's distribution is rebuilt densely: the ``k`` stored entries, and the
mass outside them spread evenly over the teacher's other entries (the same convention as the
same-tokenizer cache's chunked path). With ``k`` equal to the teacher's vocabulary the rebuild is
exact up to the storage precision.

On disk it is a per-example cache (``distil.cache.examples``: sharded safetensors, manifest with
fingerprints and per-shard sha256, resumable, byte-identical); every example holds
``max_groups`` rows (``-1`` past its own groups).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distil.alignment.groups import AlignedGroups, groups_from_padded
from distil.cache.examples import ExampleCache, write_example_cache
from distil.errors import DistilError
from distil.teachers.base import Batch, TeacherOutput

logger = logging.getLogger(__name__)

__all__ = [
    "CrossTokenizerCache",
    "group_targets",
    "paired_dataset_fingerprint",
    "write_cross_cache",
]

KIND_DETAIL = "cross_tokenizer_groups"


def paired_dataset_fingerprint(dataset: Any) -> str:
    """sha256 over every example's ids, labels, teacher ids, teacher labels and groups, in order."""
    digest = hashlib.sha256()
    columns = ("example_id", "input_ids", "labels", "teacher_input_ids", "teacher_labels", "groups")
    for batch in dataset.iter(batch_size=1024):
        for row in zip(*(batch[c] for c in columns), strict=True):
            digest.update(np.asarray([int(row[0])], dtype=np.int64).tobytes())
            for values in row[1:]:
                arr = np.asarray(values, dtype=np.int64)
                digest.update(np.asarray([arr.size], dtype=np.int64).tobytes())
                digest.update(arr.tobytes())
    return digest.hexdigest()


def group_targets(
    group_log_probs: Tensor, groups: AlignedGroups, *, k: int, max_groups: int, batch_size: int
) -> dict[str, Tensor]:
    """The stored form of a batch's merged teacher distributions, padded per example.

    Args:
        group_log_probs: ``(G, V_t)`` merged teacher log-probabilities of ``groups``.
        groups: the batch's groups (example by example, in order).
        k: entries kept per group (at most ``V_t``).
        max_groups: rows per example.
        batch_size: examples in the batch.

    Returns:
        ``topk_ids`` ``(B, max_groups, k)``, ``topk_log_probs`` (relative to the group's mass),
        ``log_mass`` ``(B, max_groups)``, ``groups`` ``(B, max_groups, 4)`` and ``num_groups``
        ``(B,)``; rows past an example's groups hold -1 (ids, groups) and 0 (values).
    """
    k = min(k, group_log_probs.shape[-1])
    log_mass = torch.logsumexp(group_log_probs, dim=-1)  # (G,)
    values, ids = group_log_probs.topk(k, dim=-1)  # (G, k)
    counts = torch.bincount(groups.example, minlength=batch_size)  # (B,)
    if counts.numel() and int(counts.max()) > max_groups:
        raise DistilError(f"an example has {int(counts.max())} groups, more than {max_groups}")
    offsets = torch.cumsum(counts, 0) - counts  # (B,)
    rank = torch.arange(groups.num_groups, device=counts.device) - offsets[groups.example]
    out = {
        "topk_ids": torch.full((batch_size, max_groups, k), -1, dtype=torch.int64),
        "topk_log_probs": torch.zeros(batch_size, max_groups, k),
        "log_mass": torch.zeros(batch_size, max_groups),
        "groups": torch.full((batch_size, max_groups, 4), -1, dtype=torch.int64),
        "num_groups": counts.cpu().to(torch.int64),
    }
    where = (groups.example.cpu(), rank.cpu())
    out["topk_ids"][where] = ids.cpu()
    out["topk_log_probs"][where] = (values - log_mass.unsqueeze(-1)).float().cpu()
    out["log_mass"][where] = log_mass.float().cpu()
    columns = (groups.student_first, groups.student_last, groups.teacher_first, groups.teacher_last)
    out["groups"][where] = torch.stack(columns, dim=-1).cpu()
    return out


def write_cross_cache(
    out: str | Path,
    *,
    example_ids: list[int],
    compute: Callable[[list[int]], Mapping[str, Tensor]],
    spec: Mapping[str, Any],
    value_dtype: torch.dtype,
    id_dtype: torch.dtype,
    examples_per_shard: int,
    batch_size: int,
) -> dict[str, Any]:
    """Write (or complete) a cross-tokenizer cache; ``compute(indices)`` returns
    :func:`group_targets` of those training examples.

    Returns:
        The manifest.
    """
    return write_example_cache(
        out,
        example_ids=example_ids,
        compute=compute,
        spec={"kind_detail": KIND_DETAIL, **spec},
        dtypes={
            "topk_ids": id_dtype,
            "topk_log_probs": value_dtype,
            "log_mass": torch.float32,
            "groups": torch.int32,
            "num_groups": torch.int32,
        },
        examples_per_shard=examples_per_shard,
        batch_size=batch_size,
    )


class CrossTokenizerCache:
    """The ``Teacher`` of a cross-tokenizer cache: answers a batch with its groups' merged
    distributions rebuilt over the teacher's vocabulary (``group_log_probs``).

    Args:
        path: the cache folder.
        expect: manifest fields the run requires (fingerprints, ``kd_temperature``, ``merge``,
            ``alignment``, ...); any difference is refused, naming the field.
        vocab_size: the teacher's vocabulary ``V_t`` (the rebuilt rows' width).
        output_device: where the answers go (the student's device).

    Raises:
        DistilError: if the folder is not a finished cross-tokenizer cache for this run.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        expect: Mapping[str, Any],
        vocab_size: int,
        output_device: torch.device,
    ) -> None:
        self.cache = ExampleCache(path, expect={"kind_detail": KIND_DETAIL, **expect})
        self.path = Path(path)
        self.vocab_size = vocab_size
        self.output_device = torch.device(output_device)
        self.k = int(self.cache.manifest["tensors"]["topk_ids"]["shape"][-1])

    def __call__(self, batch: Batch) -> TeacherOutput:
        """Rebuild the merged distributions of ``batch["aligned_groups"]`` (an
        :class:`~distil.alignment.AlignedGroups`) for the examples ``batch["example_id"]``.

        Raises:
            DistilError: if the groups stored for an example differ from the batch's.
        """
        groups: AlignedGroups = batch["aligned_groups"]
        stored = self.cache.get(batch["example_id"])
        cached = groups_from_padded(
            stored["groups"].long(), groups.student_targets, groups.teacher_targets
        )
        same = cached.num_groups == groups.num_groups and all(
            torch.equal(getattr(cached, f), getattr(groups, f))
            for f in ("example", "student_first", "student_last", "teacher_first", "teacher_last")
        )
        if not same:
            raise DistilError(
                f"the cross-tokenizer cache {self.path} was written for another alignment of "
                f"examples {batch['example_id'].tolist()} than this run's data (other tokenizers, "
                "byte offsets or alignment); rewrite it with this config"
            )
        present = stored["groups"][..., 0] >= 0  # (B, G_max)
        ids = stored["topk_ids"][present].long()  # (G, k)
        log_mass = stored["log_mass"][present].float()  # (G,)
        top = stored["topk_log_probs"][present].float() + log_mass.unsqueeze(-1)  # (G, k)
        rest = self.vocab_size - ids.shape[-1]
        if rest > 0:  # the mass outside the top k, spread evenly over the other entries
            tail = (log_mass.exp() - top.exp().sum(-1)).clamp_min(0.0)  # (G,)
            fill = (tail / rest).log()  # -inf where nothing is left
        else:
            fill = torch.full_like(log_mass, -math.inf)
        dense = fill.unsqueeze(-1).expand(-1, self.vocab_size).clone()  # (G, V_t)
        dense.scatter_(1, ids, top)
        return TeacherOutput(group_log_probs=dense.to(self.output_device))

    def describe(self) -> str:
        """One line for the mode report."""
        m = self.cache.manifest
        return (
            f"cross-tokenizer cache {self.path} ({m['num_examples']} examples, top-{self.k} of "
            f"each merged group distribution + tail mass, merge={m.get('merge')}, "
            f"alignment={m.get('alignment')}, kd_temperature={m.get('kd_temperature')})"
        )
