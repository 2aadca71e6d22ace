"""Per-example teacher outputs (classifier logits, sentence embeddings, chosen hidden states).

The same on-disk contract as the causal-LM cache (sharded safetensors, ``manifest.json`` with
fingerprints and per-shard sha256, atomic shard writes, resume that completes only missing
shards, byte-identical output) for teachers whose answer is one fixed-shape tensor (or a few)
per example. The caller supplies ``compute(indices) -> {name: (b, ...) tensor}``, e.g. a frozen
classifier's logits, and the fingerprints that identify the teacher and the data.

    write_example_cache(out, example_ids=ids, compute=teacher_logits, spec={"teacher_fingerprint": ...,
                        "dataset_fingerprint": ...}, dtypes={"logits": torch.float16})
    cache = ExampleCache(out, expect={"dataset_fingerprint": ...})
    batch = cache.get(example_ids)  # {"logits": (B, C)} in the stored dtype
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor

from distil.cache.integrity import (
    atomic_write_bytes,
    remove_temp_files,
    sha256_file,
)
from distil.cache.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    SPEC,
    read_manifest,
    write_json_atomic,
)
from distil.cache.shards import DEFAULT_MAX_LOADED_BYTES, DecodedShards
from distil.errors import DistilError
from distil.progress import progress_bar

logger = logging.getLogger(__name__)

KIND = "examples"


def _sidecar(out: Path, index: int) -> Path:
    return out / f"shard-{index:05d}.json"


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def write_example_cache(
    out: str | Path,
    *,
    example_ids: Sequence[int],
    compute: Callable[[list[int]], Mapping[str, Tensor]],
    spec: Mapping[str, Any],
    dtypes: Mapping[str, torch.dtype] | None = None,
    examples_per_shard: int = 1024,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Write (or complete) a per-example cache and return its manifest.

    Args:
        out: The cache folder.
        example_ids: The id of each example, in dataset order (unique).
        compute: Given dataset indices, the teacher's outputs ``{name: (b, ...)}`` for them;
            must be deterministic (eval mode, no dropout) for resume to be byte-identical.
        spec: Fingerprints and settings recorded in the manifest (``teacher_fingerprint``,
            ``dataset_fingerprint``, ``kd_temperature``, ...); a rerun must give the same.
        dtypes: Storage dtype per output name (e.g. ``torch.float16``); default as computed.
        examples_per_shard: Examples per shard file.
        batch_size: Indices per ``compute`` call (shard-aligned, so shard bytes never depend
            on which shards were already written).

    Raises:
        DistilError: If ids repeat, or the folder holds a cache with another spec.
    """
    from distil.cache.writer import _check_spec

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = [int(e) for e in example_ids]
    if len(set(ids)) != len(ids):
        raise DistilError("example ids must be unique to key a cache; give each example its own id")
    full_spec = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "examples_per_shard": examples_per_shard,
        "batch_size": batch_size,
        "storage_dtypes": {
            k: str(v).removeprefix("torch.") for k, v in sorted((dtypes or {}).items())
        },
        **spec,
    }
    _check_spec(out, full_spec)
    num_shards = math.ceil(len(ids) / examples_per_shard)
    todo = [
        i
        for i in range(num_shards)
        if not (_sidecar(out, i).is_file() and (out / _shard_name(i)).is_file())
    ]
    remove_temp_files(
        out, [n for i in todo for n in (_shard_name(i), _sidecar(out, i).name)] + [SPEC, MANIFEST]
    )
    with progress_bar() as bar:
        task = bar.add_task(
            "cache", total=num_shards, completed=num_shards - len(todo), rate="", info=""
        )
        for i in todo:
            lo, hi = i * examples_per_shard, min((i + 1) * examples_per_shard, len(ids))
            parts: dict[str, list[Tensor]] = {}
            for start in range(lo, hi, batch_size):
                with torch.no_grad():
                    outputs = compute(list(range(start, min(start + batch_size, hi))))
                for name, value in outputs.items():
                    stored = value.detach().cpu()
                    if dtypes and name in dtypes:
                        stored = stored.to(dtypes[name])
                    parts.setdefault(name, []).append(stored)
            tensors = {
                name: torch.cat(p).contiguous() for name, p in parts.items()
            }  # (E, ...) each
            tensors["example_ids"] = torch.tensor(ids[lo:hi], dtype=torch.int64)  # (E,)
            path = out / _shard_name(i)
            atomic_write_bytes(path, safetensors_save(tensors, metadata={"format": FORMAT_NAME}))
            write_json_atomic(
                _sidecar(out, i),
                {
                    "index": i,
                    "file": path.name,
                    "sha256": sha256_file(path),
                    "bytes": path.stat().st_size,
                    "examples": hi - lo,
                    "first_index": lo,
                    "min_example_id": min(ids[lo:hi]),
                    "max_example_id": max(ids[lo:hi]),
                },
            )
            bar.update(task, advance=1, info=f"shard {i}")
    shards = [json.loads(_sidecar(out, i).read_text()) for i in range(num_shards)]
    first = safetensors_load((out / _shard_name(0)).read_bytes()) if num_shards else {}
    total = sum(s["bytes"] for s in shards)
    manifest = {
        **full_spec,
        "shards": shards,
        "tensors": {
            k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape[1:])}
            for k, v in sorted(first.items())
            if k != "example_ids"
        },
        "num_examples": len(ids),
        "total_bytes": total,
        "bytes_per_example": total / max(len(ids), 1),
    }
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


class ExampleCache:
    """Bounded-memory lookup of per-example teacher outputs by example id.

    Args:
        path: The cache folder.
        expect: Manifest fields the run requires (e.g. ``dataset_fingerprint``,
            ``teacher_fingerprint``, ``kd_temperature``); any difference names the field.
        verify: Check each shard's sha256 when first loaded.
        max_loaded_shards: Decoded shards held in memory at once (None: only the byte budget).
        max_loaded_bytes: Budget of decoded shard bytes held in memory.

    Raises:
        DistilError: If the folder is not a finished per-example cache, or does not match.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        expect: Mapping[str, Any] | None = None,
        verify: bool = True,
        max_loaded_shards: int | None = None,
        max_loaded_bytes: int = DEFAULT_MAX_LOADED_BYTES,
    ) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if self.manifest["kind"] != KIND:
            raise DistilError(f"{path} is a {self.manifest['kind']} cache, not a per-example cache")
        problems = [
            f"{k}: cache {self.manifest.get(k)!r}, run {v!r}"
            for k, v in (expect or {}).items()
            if self.manifest.get(k) != v
        ]
        if problems:
            raise DistilError(
                f"the teacher cache {path} does not match this run ({'; '.join(problems)}); re-run the cache "
                "writer with this run's teacher and data, or point at a matching cache"
            )
        self.verify = verify
        self.shards = DecodedShards(
            self.path,
            self.manifest["shards"],
            verify=verify,
            max_loaded_shards=max_loaded_shards,
            max_loaded_bytes=max_loaded_bytes,
            fix="delete it and rewrite the cache",
        )
        self._where: dict[int, tuple[int, int]] = {}
        for s in range(len(self.manifest["shards"])):  # reads each shard once (checksummed)
            for row, e in enumerate(self.shards[s]["example_ids"].tolist()):
                self._where[e] = (s, row)
            self.shards.clear()  # indexing must not hold every shard

    def __len__(self) -> int:
        return len(self._where)

    def get(self, example_ids: Sequence[int] | Tensor) -> dict[str, Tensor]:
        """The stored outputs of these examples, stacked: ``{name: (B, ...)}`` in storage dtype.

        Raises:
            DistilError: If an id is not in the cache.
        """
        ids = example_ids.tolist() if isinstance(example_ids, Tensor) else list(example_ids)
        missing = [e for e in ids if e not in self._where]
        if missing:
            raise DistilError(
                f"example ids {missing[:5]} are not in the cache {self.path}; the run's data differs from the cached data"
            )
        by_shard: dict[
            int, tuple[list[int], list[int]]
        ] = {}  # shard -> (positions in the batch, rows)
        for position, e in enumerate(ids):
            shard, row = self._where[int(e)]
            slots, rows = by_shard.setdefault(shard, ([], []))
            slots.append(position)
            rows.append(row)
        out: dict[str, Tensor] = {}
        for shard, (
            slots,
            rows,
        ) in by_shard.items():  # one gather per shard and tensor, not per example
            for name, tensor in self.shards[shard].items():
                if name == "example_ids":
                    continue
                if name not in out:
                    out[name] = tensor.new_empty((len(ids), *tensor.shape[1:]))
                out[name][slots] = tensor[rows]
        return out
