"""Reading a teacher cache: bounded-memory shard access by example id, checksums, summaries.

:class:`CacheReader` keeps only an index in memory (example id → shard and row, plus a token
hash → example id map, 24 bytes per example) and decoded shards within a byte budget
(least recently used first out). Every shard's size and sha256 is checked against the manifest
when the cache is opened, so a corrupt or truncated shard is named before step 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import safe_open
from torch import Tensor

from distil.cache.integrity import CacheIntegrityError, check_shard
from distil.cache.manifest import read_manifest
from distil.cache.shards import DEFAULT_MAX_LOADED_BYTES, DecodedShards
from distil.errors import DistilError

logger = logging.getLogger(__name__)

_INDEX_TENSORS = ("example_ids", "example_hashes", "offsets")


@dataclass(frozen=True)
class ExampleTargets:
    """The cached targets of one example (``n`` supervised positions).

    Attributes:
        positions: ``(n,)`` int64 logits-row indices ``t`` (their target is token ``t + 1``).
        log_probs: ``(n, k)`` teacher log-probs at ``ids``, at the manifest's ``kd_temperature``
            (stored dtype): the top-k, or the sampled ids' of a sampled cache.
        ids: ``(n, k)`` int64 token ids (top-k, or sampled with replacement).
        tail_log_prob: ``(n,)`` log of the mass outside the top-k (stored dtype); None when sampled.
        example_hash: hash of the example's token ids (see ``manifest.example_hash``).
        proposal_log_probs: ``(n, k)`` proposal log-probs of a sampled cache with a proposal
            temperature; None otherwise (the proposal is the teacher).
        tail_sample_ids: ``(n, m)`` int64 ids drawn from the teacher's tail (a top-k cache
            written with ``cache.tail_samples``); None otherwise.
        tail_sample_log_probs: ``(n, m)`` the teacher's log-probs at them (stored dtype).
    """

    positions: Tensor
    log_probs: Tensor
    ids: Tensor
    tail_log_prob: Tensor | None
    example_hash: int
    proposal_log_probs: Tensor | None = None
    tail_sample_ids: Tensor | None = None
    tail_sample_log_probs: Tensor | None = None


class CacheReader:
    """Random access by example id to a cache folder written by ``distil cache``.

    Args:
        path: The cache folder (holding ``manifest.json``).
        verify: Check every shard's size and sha256 when the cache is opened (recommended;
            costs one read of the cache).
        max_loaded_shards: Decoded shards kept in memory at once (None: no count limit).
        max_loaded_bytes: Budget of decoded shard bytes kept in memory (least recently used go
            first; the shard in use always stays).

    Raises:
        DistilError: If the folder is not a finished cache, or a shard cannot be indexed.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        verify: bool = True,
        max_loaded_shards: int | None = None,
        max_loaded_bytes: int = DEFAULT_MAX_LOADED_BYTES,
    ) -> None:
        self.path = Path(path)
        self.manifest: dict[str, Any] = read_manifest(self.path)
        self.verify = verify
        self.shards = DecodedShards(
            self.path,
            self.manifest["shards"],
            verify=verify,
            max_loaded_shards=max_loaded_shards,
            max_loaded_bytes=max_loaded_bytes,
        )
        if verify:
            self.shards.check_all()
        self._where: dict[int, tuple[int, int]] = {}  # example id -> (shard, row)
        self._by_hash: dict[int, int] = {}  # token hash -> example id
        for s, shard in enumerate(self.manifest["shards"]):
            file = self.path / shard["file"]
            if not file.is_file():
                raise CacheIntegrityError(
                    f"cache shard {file} is missing; re-run `distil cache` with the same config to rewrite it"
                )
            try:
                with safe_open(
                    str(file), framework="pt"
                ) as f:  # header + index only: memory-mapped
                    ids, hashes = (
                        f.get_tensor("example_ids").tolist(),
                        f.get_tensor("example_hashes").tolist(),
                    )
            except (SafetensorError, OSError, KeyError) as exc:
                raise CacheIntegrityError(
                    f"cache shard {file} cannot be read ({exc}); it is corrupt or truncated: delete it and "
                    "re-run `distil cache` with the same config"
                ) from exc
            for row, (e, h) in enumerate(zip(ids, hashes, strict=True)):
                self._where[e] = (s, row)
                self._by_hash.setdefault(h, e)

    @property
    def k(self) -> int:
        """Log-probs stored per position."""
        return int(self.manifest["k"])

    @property
    def sampled(self) -> bool:
        """Whether the cache holds importance-sampled ids instead of top-k."""
        return self.manifest["kind"] == "lm_sampled"

    @property
    def kd_temperature(self) -> float:
        """Temperature the stored log-probs were computed at."""
        return float(self.manifest["kd_temperature"])

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size the ids index into."""
        return int(self.manifest["vocab_size"])

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, example_id: int) -> bool:
        return example_id in self._where

    def example_id_for_hash(self, token_hash: int) -> int | None:
        """The example id whose token ids have this hash, or None."""
        return self._by_hash.get(token_hash)

    def get(self, example_id: int) -> ExampleTargets:
        """The cached targets of one example.

        Raises:
            DistilError: If the cache has no such example (another dataset or split).
        """
        if example_id not in self._where:
            raise DistilError(
                f"example_id {example_id} is not in the cache {self.path} (it holds {len(self)} examples); "
                "the run's data differs from the cached data: re-run `distil cache` with this run's data section"
            )
        s, row = self._where[example_id]
        t = self.shards[s]
        lo, hi = int(t["offsets"][row]), int(t["offsets"][row + 1])
        if "sample_ids" in t:
            proposal = t.get("proposal_log_probs")
            return ExampleTargets(
                positions=t["positions"][lo:hi].long(),
                log_probs=t["sample_log_probs"][lo:hi],
                ids=t["sample_ids"][lo:hi].long(),
                tail_log_prob=None,
                example_hash=int(t["example_hashes"][row]),
                proposal_log_probs=None if proposal is None else proposal[lo:hi],
            )
        return ExampleTargets(
            positions=t["positions"][lo:hi].long(),
            log_probs=t["topk_log_probs"][lo:hi],
            ids=t["topk_ids"][lo:hi].long(),
            tail_log_prob=t["tail_log_prob"][lo:hi],
            example_hash=int(t["example_hashes"][row]),
            tail_sample_ids=t["tail_sample_ids"][lo:hi].long() if "tail_sample_ids" in t else None,
            tail_sample_log_probs=t["tail_sample_log_probs"][lo:hi]
            if "tail_sample_log_probs" in t
            else None,
        )

    def verify_all(self) -> list[str]:
        """Re-check every shard's size and sha256; return the problems (empty when all is well)."""
        problems = []
        for s, info in enumerate(self.manifest["shards"]):
            try:
                check_shard(self.path / info["file"], info["sha256"], info.get("bytes"))
                self.shards.verified.add(s)
            except CacheIntegrityError as exc:
                problems.append(str(exc))
        return problems


def summarize(path: str | Path) -> dict[str, Any]:
    """The numbers ``distil cache inspect`` shows: tokens, bytes per token, k, coverage, fingerprints."""
    manifest = read_manifest(Path(path))
    if manifest["kind"] == "examples":  # per-example outputs (classifier logits, embeddings)
        return {
            "path": str(path),
            "format_version": manifest["format_version"],
            "kind": manifest["kind"],
            "examples": manifest["num_examples"],
            "shards": len(manifest["shards"]),
            "bytes": manifest["total_bytes"],
            "bytes per example": manifest["bytes_per_example"],
            "tensors": ", ".join(
                f"{k}={v['dtype']}{v['shape']}" for k, v in manifest["tensors"].items()
            ),
            **{
                k: manifest[k]
                for k in ("teacher_fingerprint", "dataset_fingerprint", "kd_temperature")
                if k in manifest
            },
        }
    positions = int(manifest["num_positions"])
    return {
        "path": str(path),
        "format_version": manifest["format_version"],
        "kind": manifest["kind"],
        "examples": manifest["num_examples"],
        "tokens (supervised positions)": positions,
        "shards": len(manifest["shards"]),
        "bytes": manifest["total_bytes"],
        "bytes per token": manifest["total_bytes"] / max(positions, 1),
        "k": manifest["k"],
        **(
            {"tail samples per token": manifest["tail_samples"]}
            if manifest.get("tail_samples")
            else {}
        ),
        "vocab_size": manifest["vocab_size"],
        (
            "sampled ids' mass coverage"
            if manifest["kind"] == "lm_sampled"
            else "top-k mass coverage"
        ): manifest["topk_mass_mean"],
        "kd_temperature": manifest["kd_temperature"],
        "sequence_length": manifest["sequence_length"],
        "dtypes": ", ".join(f"{k}={v}" for k, v in manifest["dtypes"].items()),
        "teacher_dtype": manifest["teacher_dtype"],
        "teacher_fingerprint": manifest["teacher_fingerprint"],
        "tokenizer_fingerprint": manifest["tokenizer_fingerprint"],
        "dataset_fingerprint": manifest["dataset_fingerprint"],
    }


def verify_cache(path: str | Path) -> list[str]:
    """Re-check every shard of a cache against the manifest's size and sha256.

    Reads only the manifest and the shard bytes (not the index), so even shards too damaged to
    open are reported. Returns one message per bad shard, naming it; empty when all is well.
    """
    folder = Path(path)
    problems = []
    for info in read_manifest(folder)["shards"]:
        try:
            check_shard(folder / info["file"], info["sha256"], info.get("bytes"))
        except CacheIntegrityError as exc:
            problems.append(str(exc))
    return problems
