"""A teacher read from a ``distil cache`` folder, satisfying the ``Teacher`` protocol.

Targets are found by example id when the caller passes ``example_ids`` (collate gives them),
else by a hash of each row's unpadded token ids; either way a shuffled or resumed run gets the
targets of the examples it actually holds, and a row whose tokens differ from the cached
example is a hard error.

Three views of the same cached values:

- :meth:`CachedTeacher.targets` gives top-k log-probs, ids and tail mass aligned with the
  batch, for :func:`distil.losses.sparse.topk_divergence` (exact bucket loss, no ``(B, T, V)``).
- :meth:`CachedTeacher.sampled_targets` gives the ids of a sampled cache (``cache.targets:
  sampled``) with teacher and proposal log-probs, for
  :func:`distil.losses.sparse.sampled_divergence` (unbiased estimate of the full divergence).
- Calling the teacher gives, with ``signal=sparse`` (the default), the targets of one of those two
  views in ``TeacherOutput.sparse`` (and where they are in ``sparse_mask``); with
  ``signal=logits`` (top-k caches), ``TeacherOutput(logits=...)`` for the dense losses: the log-probs
  scaled by the cache's ``kd_temperature`` (so ``log_softmax(logits / T)`` gives them back) with
  the tail mass spread evenly over the tokens outside the top-k. With ``k = V`` this is the
  teacher's distribution to fp16/bf16 rounding; with ``k < V`` it is an approximation that
  keeps the top-k and the tail mass exact. It builds ``(B, T, V)``, so large vocabularies should
  use ``targets``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from distil.cache.manifest import (
    check_matches,
    dataset_fingerprint,
    example_hash,
    read_manifest,
    teacher_fingerprint,
)
from distil.cache.reader import CacheReader
from distil.cache.shards import DEFAULT_MAX_LOADED_BYTES
from distil.errors import DistilError
from distil.losses.sparse import SampledTargets, TopKTargets
from distil.models.vocab import tokenizer_fingerprint
from distil.teachers.base import Batch, TeacherOutput, TeacherSignal

if TYPE_CHECKING:
    import datasets
    from torch import nn
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedTargets:
    """Cached top-k targets aligned with a batch.

    Attributes:
        topk: ``log_probs (B, T, k)`` fp32, ``ids (B, T, k)`` int64, ``tail_log_prob (B, T)`` fp32;
            positions without a cached target hold a harmless placeholder (uniform over ids 0..k-1).
        mask: ``(B, T)`` bool, True where the cache has a target (the supervised positions).
    """

    topk: TopKTargets
    mask: Tensor


@dataclass(frozen=True)
class CachedSamples:
    """Cached importance samples aligned with a batch.

    Attributes:
        samples: ``ids (B, T, n)`` int64, ``teacher_log_probs (B, T, n)`` and
            ``proposal_log_probs (B, T, n)`` fp32 (equal to the teacher's when the proposal is
            the teacher); positions without a target hold placeholders.
        mask: ``(B, T)`` bool, True where the cache has samples.
    """

    samples: SampledTargets
    mask: Tensor


class CachedTeacher:
    """The ``Teacher`` protocol over a cache folder.

    Args:
        path: The cache folder.
        expect: The run's values for fields of ``distil.cache.manifest.RUN_FIELDS``
            (``tokenizer_fingerprint``, ``dataset_fingerprint``, ``sequence_length``,
            ``kd_temperature``, ``vocab_size``, ``teacher_fingerprint``); any difference is a
            :class:`~distil.cache.manifest.CacheMismatchError` naming the field.
        output_device: Where the outputs go.
        verify: Check every shard's size and sha256 when the cache is opened.
        max_loaded_shards: Decoded shards held in memory at once (None: only the byte budget).
        max_loaded_bytes: Budget of decoded shard bytes held in memory (1 GiB: a cache for
            ~30M tokens at k = 8 stays decoded; larger ones stream, least recently used first).
        data_settings: The run's data settings (``cfg.data.model_dump()``), so that a dataset
            that differs from the cache's names the settings to match.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        signal: TeacherSignal = TeacherSignal.SPARSE,
        expect: Mapping[str, Any] | None = None,
        output_device: torch.device | str = "cpu",
        verify: bool = True,
        max_loaded_shards: int | None = None,
        max_loaded_bytes: int = DEFAULT_MAX_LOADED_BYTES,
        data_settings: Mapping[str, Any] | None = None,
    ) -> None:
        # the cheap fingerprint check first, then the checksums of every shard
        check_matches(
            read_manifest(Path(path)),
            expect or {},
            source=f"the teacher cache {path}",
            data_settings=data_settings,
        )
        self.reader = CacheReader(
            path,
            verify=verify,
            max_loaded_shards=max_loaded_shards,
            max_loaded_bytes=max_loaded_bytes,
        )
        self.path = Path(path)
        self.output_device = torch.device(output_device)
        if signal is TeacherSignal.HIDDEN:
            raise DistilError(
                "a teacher cache holds log-probs, not hidden states; use the live teacher"
            )
        if signal is TeacherSignal.LOGITS and self.reader.sampled:
            raise DistilError(
                f"{self.path} holds sampled ids, from which no dense distribution can be rebuilt; "
                "train with the sparse losses (kd.chunked=false) or write a top-k cache"
            )
        self.signal = signal

    @property
    def k(self) -> int:
        """Log-probs stored per position."""
        return self.reader.k

    @property
    def kd_temperature(self) -> float:
        """Temperature the cached log-probs were computed at."""
        return self.reader.kd_temperature

    @property
    def vocab_size(self) -> int:
        """Vocabulary the ids index into."""
        return self.reader.vocab_size

    def _resolve_ids(
        self, input_ids: Tensor, attention_mask: Tensor, example_ids: Tensor | None
    ) -> list[int]:
        lengths = attention_mask.sum(dim=1).tolist()
        hashes = [example_hash(input_ids[b, : int(n)]) for b, n in enumerate(lengths)]
        if example_ids is None:
            found = [self.reader.example_id_for_hash(h) for h in hashes]
            missing = [b for b, e in enumerate(found) if e is None]
            if missing:
                raise DistilError(
                    f"batch rows {missing} are not in the teacher cache {self.path} (no cached example has their "
                    "tokens); the run's data or tokenizer differs from the cached one: re-run `distil cache`"
                )
            return [int(e) for e in found if e is not None]
        ids = [int(e) for e in example_ids.tolist()]
        for b, (e, h) in enumerate(zip(ids, hashes, strict=True)):
            if self.reader.get(e).example_hash != h:
                raise DistilError(
                    f"example_id {e} (batch row {b}) has other tokens than the cached example {e} in {self.path}; "
                    "the run's data differs from the cached data: re-run `distil cache` with this run's data section"
                )
        return ids

    def targets(
        self, input_ids: Tensor, attention_mask: Tensor, example_ids: Tensor | None = None
    ) -> CachedTargets:
        """The cached top-k targets for a batch, on ``output_device``.

        Args:
            input_ids: ``(B, T)`` token ids (right-padded).
            attention_mask: ``(B, T)`` 1 for real tokens.
            example_ids: ``(B,)`` example ids from collate, or None to find rows by their tokens.

        Raises:
            DistilError: If a row is not in the cache or its tokens differ from the cached example.
        """
        if self.reader.sampled:
            raise DistilError(
                f"{self.path} holds importance-sampled targets, not top-k; use CachedTeacher.sampled_targets "
                "with distil.losses.sparse.sampled_divergence, or write a top-k cache (cache.targets=topk)"
            )
        bsz, length = input_ids.shape
        ids = self._resolve_ids(input_ids.cpu(), attention_mask.cpu(), example_ids)
        k = self.k
        log_probs = torch.full((bsz, length, k), -math.log(k))  # (B, T, k) placeholder: uniform
        top_ids = torch.arange(k).expand(bsz, length, k).clone()  # (B, T, k)
        tail = torch.full((bsz, length), float("-inf"))  # (B, T)
        mask = torch.zeros(bsz, length, dtype=torch.bool)  # (B, T)
        m = int(self.reader.manifest.get("tail_samples", 0))
        tail_ids = (
            torch.zeros(bsz, length, m, dtype=torch.int64) if m else None
        )  # (B, T, m) placeholder: id 0
        tail_lp = torch.zeros(bsz, length, m) if m else None  # (B, T, m)
        for b, e in enumerate(ids):
            ex = self.reader.get(e)
            if ex.positions.numel() and int(ex.positions.max()) >= length:
                raise DistilError(
                    f"example_id {e} has cached positions up to {int(ex.positions.max())} but the batch is {length} "
                    "long; the run's sequence length differs from the cache's"
                )
            log_probs[b, ex.positions] = ex.log_probs.float()
            top_ids[b, ex.positions] = ex.ids
            assert ex.tail_log_prob is not None
            tail[b, ex.positions] = ex.tail_log_prob.float()
            if tail_ids is not None and tail_lp is not None:
                assert ex.tail_sample_ids is not None and ex.tail_sample_log_probs is not None
                tail_ids[b, ex.positions] = ex.tail_sample_ids
                tail_lp[b, ex.positions] = ex.tail_sample_log_probs.float()
            mask[b, ex.positions] = True
        dev = self.output_device
        top = TopKTargets(
            log_probs.to(dev),
            top_ids.to(dev),
            tail.to(dev),
            None if tail_ids is None else tail_ids.to(dev),
            None if tail_lp is None else tail_lp.to(dev),
        )
        return CachedTargets(top, mask.to(dev))

    def sampled_targets(
        self, input_ids: Tensor, attention_mask: Tensor, example_ids: Tensor | None = None
    ) -> CachedSamples:
        """The cached importance samples for a batch, for ``sampled_divergence``.

        Args:
            input_ids: ``(B, T)`` token ids (right-padded).
            attention_mask: ``(B, T)`` 1 for real tokens.
            example_ids: ``(B,)`` example ids from collate, or None to find rows by their tokens.

        Raises:
            DistilError: If the cache holds top-k targets, a row is not in the cache, or its
                tokens differ from the cached example.
        """
        if not self.reader.sampled:
            raise DistilError(f"{self.path} holds top-k targets; use CachedTeacher.targets")
        bsz, length = input_ids.shape
        rows = self._resolve_ids(input_ids.cpu(), attention_mask.cpu(), example_ids)
        n = self.k
        ids = torch.zeros(bsz, length, n, dtype=torch.int64)  # (B, T, n) placeholder: id 0
        teacher_lp = torch.zeros(bsz, length, n)  # (B, T, n)
        proposal_lp = torch.zeros(bsz, length, n)  # (B, T, n)
        mask = torch.zeros(bsz, length, dtype=torch.bool)  # (B, T)
        for b, e in enumerate(rows):
            ex = self.reader.get(e)
            ids[b, ex.positions] = ex.ids
            teacher_lp[b, ex.positions] = ex.log_probs.float()
            proposal = ex.log_probs if ex.proposal_log_probs is None else ex.proposal_log_probs
            proposal_lp[b, ex.positions] = proposal.float()
            mask[b, ex.positions] = True
        dev = self.output_device
        samples = SampledTargets(ids.to(dev), teacher_lp.to(dev), proposal_lp.to(dev))
        return CachedSamples(samples, mask.to(dev))

    def __call__(self, batch: Batch) -> TeacherOutput:
        """The cached targets of ``batch`` (``input_ids``, ``attention_mask``, and
        ``example_id`` when known): sparse, or dense logits rebuilt from them (see the module
        docstring)."""
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        example_ids = batch.get("example_id")
        if self.signal is TeacherSignal.SPARSE:
            if self.reader.sampled:
                got = self.sampled_targets(input_ids, attention_mask, example_ids)
                return TeacherOutput(sparse=got.samples, sparse_mask=got.mask)
            head = self.targets(input_ids, attention_mask, example_ids)
            return TeacherOutput(sparse=head.topk, sparse_mask=head.mask)
        cached = self.targets(input_ids, attention_mask, example_ids)
        top = cached.topk
        vocab, k, temp = self.vocab_size, self.k, self.kd_temperature
        if k < vocab:
            fill = top.tail_log_prob - math.log(
                vocab - k
            )  # (B, T) log-prob of each non-top-k token
        else:
            fill = torch.zeros_like(
                top.tail_log_prob
            )  # every token is in the top-k: overwritten below
        log_p = fill.unsqueeze(-1).expand(*fill.shape, vocab).clone()  # (B, T, V)
        log_p.scatter_(-1, top.ids, top.log_probs)
        log_p = torch.where(
            cached.mask.unsqueeze(-1), log_p, 0.0
        )  # no target: uniform, masked by the loss
        return TeacherOutput(logits=log_p * temp)  # log_softmax(logits / temp) == log_p

    def describe(self) -> str:
        """One line for the mode report."""
        m = self.reader.manifest
        return (
            f"cached {self.path} ({m['num_positions']:,} positions, "
            f"{'sampled ' + str(m['k']) + ' ids' if self.reader.sampled else 'top-' + str(m['k'])}"
            f"{' + ' + str(m['tail_samples']) + ' sampled tail ids' if m.get('tail_samples') else ''} {m['dtypes'].get('topk_log_probs', m['dtypes'].get('sample_log_probs'))} "
            f"at kd_temperature={m['kd_temperature']:g}, kept mass {m['topk_mass_mean']:.4f}, "
            f"{m['bytes_per_position']:.1f} bytes/token)"
        )


def open_lm_cache(
    path: str | Path,
    *,
    tokenizer: PreTrainedTokenizerBase,
    dataset: datasets.Dataset,
    sequence_length: int,
    kd_temperature: float,
    vocab_size: int,
    teacher_model: nn.Module | None = None,
    output_device: torch.device | str = "cpu",
    signal: TeacherSignal = TeacherSignal.SPARSE,
    data_settings: Mapping[str, Any] | None = None,
) -> CachedTeacher:
    """Open a causal-LM cache for a training run, refusing it unless it was made for this run.

    Args:
        path: The cache folder (``teacher.cache``).
        tokenizer: The run's tokenizer.
        dataset: The run's tokenised training split (``LMData.train``).
        sequence_length: ``data.max_length``.
        kd_temperature: ``kd.kd_temperature``; the cache must store log-probs at it.
        vocab_size: The tokenizer's vocabulary size.
        teacher_model: The teacher as the run would use it (after its dtype cast), to check the
            weights too; None skips that check (a cache of a teacher you no longer have).
        output_device: The student's device.
        signal: ``sparse`` targets, or dense ``logits`` rebuilt from them (chunked losses).
        data_settings: The run's data settings (``cfg.data.model_dump()``): a dataset that
            differs from the cache's then names the settings that differ.

    Raises:
        CacheMismatchError: Naming each field that differs.
    """
    expect: dict[str, Any] = {
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "dataset_fingerprint": dataset_fingerprint(dataset),
        "sequence_length": sequence_length,
        "kd_temperature": float(kd_temperature),
        "vocab_size": vocab_size,
    }
    if teacher_model is not None:
        expect["teacher_fingerprint"] = teacher_fingerprint(teacher_model)
    teacher = CachedTeacher(
        path,
        expect=expect,
        output_device=output_device,
        signal=signal,
        data_settings=data_settings,
    )
    logger.info("teacher: %s", teacher.describe())
    return teacher
