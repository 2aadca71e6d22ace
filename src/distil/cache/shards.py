"""Decoded cache shards held in memory: least recently used first out, within a byte budget.

Both cache readers (:class:`distil.cache.reader.CacheReader` for token-level LM targets and
:class:`distil.cache.examples.ExampleCache` for per-example outputs) look shards up here. Each
shard's sha256 is checked against the manifest the first time this process loads it, so a corrupt
or truncated shard is named before any of its values reach a loss.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from torch import Tensor

from distil.cache.integrity import CacheIntegrityError, check_shard

DEFAULT_MAX_LOADED_BYTES = 1 << 30
"""1 GiB of decoded shards: a cache of ~30M tokens at k = 8 stays decoded; larger ones stream."""


class DecodedShards:
    """Random access to the decoded shards of one cache folder.

    Args:
        folder: The cache folder.
        shards: The manifest's shard entries (``file``, ``sha256``, ``bytes``).
        verify: Check each shard's sha256 when first loaded.
        max_loaded_shards: Decoded shards kept at once (None: only the byte budget).
        max_loaded_bytes: Budget of decoded bytes; the least recently used shards go first, the
            shard in use always stays. A budget that holds an epoch's shards avoids re-decoding
            them on every shuffled batch.
        fix: What to tell the user to do with an undecodable shard.
    """

    def __init__(
        self,
        folder: Path,
        shards: Sequence[Mapping[str, Any]],
        *,
        verify: bool,
        max_loaded_shards: int | None = None,
        max_loaded_bytes: int = DEFAULT_MAX_LOADED_BYTES,
        fix: str = "delete it and re-run `distil cache`",
    ) -> None:
        self.folder, self.shards, self.verify, self.fix = folder, shards, verify, fix
        self.max_loaded_shards = None if max_loaded_shards is None else max(1, max_loaded_shards)
        self.max_loaded_bytes = max_loaded_bytes
        self.loaded: OrderedDict[int, dict[str, Tensor]] = OrderedDict()
        self._bytes: dict[int, int] = {}
        self.verified: set[int] = set()

    def __len__(self) -> int:
        """Shards decoded right now."""
        return len(self.loaded)

    def __getitem__(self, s: int) -> dict[str, Tensor]:
        if s in self.loaded:
            self.loaded.move_to_end(s)
            return self.loaded[s]
        info = self.shards[s]
        file = self.folder / info["file"]
        if self.verify and s not in self.verified:
            check_shard(file, info["sha256"], info.get("bytes"))
            self.verified.add(s)
        try:
            tensors = safetensors_load(file.read_bytes())
        except (SafetensorError, OSError) as exc:
            raise CacheIntegrityError(
                f"cache shard {file} cannot be decoded ({exc}); {self.fix}"
            ) from exc
        self.loaded[s] = tensors
        self._bytes[s] = sum(t.nbytes for t in tensors.values())
        while len(self.loaded) > 1 and (
            sum(self._bytes.values()) > self.max_loaded_bytes
            or (self.max_loaded_shards is not None and len(self.loaded) > self.max_loaded_shards)
        ):
            old, _ = self.loaded.popitem(last=False)
            del self._bytes[old]
        return tensors

    def check_all(self) -> None:
        """Check every shard's size and sha256 now (each once per process), so a corrupt shard
        stops a run when the cache is opened instead of at the step that first reads it.

        Raises:
            CacheIntegrityError: Naming the first shard that fails.
        """
        for s, info in enumerate(self.shards):
            if s not in self.verified:
                check_shard(self.folder / info["file"], info["sha256"], info.get("bytes"))
                self.verified.add(s)

    def clear(self) -> None:
        """Drop every decoded shard (checksums already verified stay verified)."""
        self.loaded.clear()
        self._bytes.clear()
