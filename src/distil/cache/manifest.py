"""The cache manifest (``manifest.json``) and the fingerprints it carries.

A manifest says exactly what a cache holds and what it was computed from, so a training run
can refuse a cache that does not match it instead of silently learning from the wrong targets:

- ``teacher_fingerprint``: sha256 over the teacher's config and every weight tensor,
- ``tokenizer_fingerprint``: :func:`distil.models.vocab.tokenizer_fingerprint`,
- ``dataset_fingerprint``: sha256 over every example's id, token ids and labels, i.e. the data
  *as tokenised for training*, so another corpus, tokenizer, sequence length or masking differs,
- ``sequence_length``, ``vocab_size``, ``k``, ``kd_temperature`` (of the stored log-probs),
- ``dtypes`` of the stored tensors, and the shard list with sha256, size and example-id ranges.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from distil.cache.integrity import atomic_write_bytes
from distil.errors import DistilError

if TYPE_CHECKING:
    import datasets
    from torch import nn

FORMAT_NAME = "distil-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPEC = "cache-spec.json"  # the manifest minus shards, written first: a rerun must match it

# Fields a training run checks against its own values, in the order errors report them.
RUN_FIELDS = (
    "tokenizer_fingerprint",
    "dataset_fingerprint",
    "sequence_length",
    "kd_temperature",
    "vocab_size",
    "teacher_fingerprint",
)

_CONFIG_SKIP = ("transformers_version", "torch_dtype", "dtype", "_name_or_path", "architectures")


class CacheMismatchError(DistilError):
    """A cache that was computed for another teacher, tokenizer, dataset or temperature."""


def teacher_fingerprint(model: nn.Module) -> str:
    """sha256 over a model's config (if any) and every parameter and buffer, in name order.

    Hashes values, not file bytes, so the same weights loaded from another folder or format
    give the same fingerprint; the dtype is part of the hash (a bf16 copy is another teacher).
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        items = {k: v for k, v in config.to_dict().items() if k not in _CONFIG_SKIP}
        digest.update(json.dumps(items, sort_keys=True, default=str).encode())
    return tensors_fingerprint(model.state_dict(), digest)


def tensors_fingerprint(tensors: Mapping[str, torch.Tensor], digest: Any = None) -> str:
    """sha256 over named tensors in name order: each name, dtype, shape and value bytes (0-d too).

    Args:
        tensors: name → tensor.
        digest: a ``hashlib`` object to continue (e.g. one that already holds a config); new if None.
    """
    digest = hashlib.sha256() if digest is None else digest
    for name, tensor in sorted(tensors.items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return str(digest.hexdigest())


def example_hash(input_ids: Sequence[int] | np.ndarray | torch.Tensor) -> int:
    """A signed 64-bit hash of one example's (unpadded) token ids, to find it by content."""
    if isinstance(input_ids, torch.Tensor):
        arr = input_ids.detach().cpu().to(torch.int64).numpy()
    else:
        arr = np.asarray(input_ids, dtype=np.int64)
    raw = hashlib.blake2b(np.ascontiguousarray(arr).tobytes(), digest_size=8).digest()
    return int.from_bytes(raw, "little", signed=True)


def dataset_fingerprint(dataset: datasets.Dataset | Iterable[Mapping[str, Any]]) -> str:
    """sha256 over every example's ``example_id``, ``input_ids`` and ``labels``, in order."""
    digest = hashlib.sha256()
    rows: Iterable[Mapping[str, Any]]
    if hasattr(dataset, "iter"):
        rows = (
            {"example_id": e, "input_ids": i, "labels": lab}
            for batch in dataset.iter(batch_size=1024)
            for e, i, lab in zip(
                batch["example_id"], batch["input_ids"], batch["labels"], strict=True
            )
        )
    else:
        rows = dataset
    for row in rows:
        ids = np.asarray(row["input_ids"], dtype=np.int64)
        labels = np.asarray(row["labels"], dtype=np.int64)
        digest.update(np.asarray([int(row["example_id"]), ids.size], dtype=np.int64).tobytes())
        digest.update(ids.tobytes())
        digest.update(labels.tobytes())
    return digest.hexdigest()


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON (sorted keys, indented) atomically."""
    atomic_write_bytes(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


def read_manifest(folder: Path) -> dict[str, Any]:
    """Read and check ``folder/manifest.json``.

    Raises:
        DistilError: If the folder has no manifest (an unfinished or foreign folder), or one of
            another format or version.
    """
    if not Path(folder).is_dir():
        raise DistilError(f"cache folder {folder} does not exist (check the path)")
    path = Path(folder) / MANIFEST
    if not path.is_file():
        hint = (
            " (the writer has not finished: re-run `distil cache` with the same config to complete it)"
            if (Path(folder) / SPEC).is_file()
            else ""
        )
        raise DistilError(f"{folder} is not a distil teacher cache: no {MANIFEST}{hint}")
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DistilError(
            f"{path} is not valid JSON ({exc}); re-run `distil cache` to rewrite it"
        ) from exc
    if manifest.get("format") != FORMAT_NAME:
        raise DistilError(
            f"{path} is not a distil teacher-cache manifest (format={manifest.get('format')!r})"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DistilError(
            f"{path} has format_version {manifest.get('format_version')}, this distil reads "
            f"{FORMAT_VERSION}; rewrite the cache with this version of `distil cache`"
        )
    return manifest


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] + "…" if len(text) > 16 else text


# The data settings that most often make a run's dataset differ from a cache's, named first.
_DATASET_KEYS = (
    "data.source",
    "data.builtin",
    "data.corpus_max_bytes",
    "data.train_files",
    "data.eval_files",
    "data.eval_fraction",
    "data.format",
    "data.max_length",
    "data.train_limit",
)


def data_settings_hint(
    manifest: Mapping[str, Any], run_settings: Mapping[str, Any] | None = None
) -> str:
    """Which data settings to match, for a dataset fingerprint that differs.

    Args:
        manifest: The cache's manifest (``data_settings``: dotted key → value, recorded by the
            writer; absent in caches written before distil recorded them).
        run_settings: The run's data settings, by the same dotted keys (``data.train_limit``)
            or by field name (``train_limit``); None lists the cache's instead.

    Returns:
        A sentence naming the settings, or ``""`` when the cache recorded none.
    """
    recorded = manifest.get("data_settings")
    if not isinstance(recorded, Mapping) or not recorded:
        return ""
    if run_settings is not None:
        ours = {k if k.startswith("data.") else f"data.{k}": v for k, v in run_settings.items()}
        differ = [
            f"{key}: cache {value!r}, run {ours[key]!r}"
            for key, value in sorted(recorded.items())
            if key in ours and ours[key] != value
        ]
        if differ:
            return (
                f"The data settings differ: {'; '.join(differ)}; run with the cache's values "
                "(or write a cache with this run's)."
            )
    shown = [k for k in _DATASET_KEYS if recorded.get(k) is not None]
    listed = ", ".join(f"{k}={json.dumps(recorded[k])}" for k in shown)
    return (
        f"The cache was written with {listed} (all its data settings are in its manifest's "
        "data_settings): run with the same data settings."
    )


def check_matches(
    manifest: Mapping[str, Any],
    expected: Mapping[str, Any],
    *,
    source: str = "the cache",
    data_settings: Mapping[str, Any] | None = None,
) -> None:
    """Refuse a cache whose manifest differs from the run on any field given in ``expected``.

    Args:
        manifest: The cache's manifest.
        expected: The run's values for some of :data:`RUN_FIELDS` (others are ignored).
        source: How to name the cache in the message (its path).
        data_settings: The run's data settings, so that a different dataset fingerprint names
            the settings that differ (e.g. ``data.train_limit``).

    Raises:
        CacheMismatchError: Naming every differing field with both values, and the fix.
    """
    problems = []
    for field in RUN_FIELDS:
        if field not in expected:
            continue
        ours, theirs = expected[field], manifest.get(field)
        same = (
            theirs is not None and abs(float(ours) - float(theirs)) <= 1e-12
            if isinstance(ours, float)
            else ours == theirs
        )
        if not same:
            problems.append(f"{field}: cache {_short(theirs)}, run {_short(ours)}")
    if problems:
        hint = ""
        if any(p.startswith("dataset_fingerprint") for p in problems):
            hint = " " + data_settings_hint(manifest, data_settings)
        raise CacheMismatchError(
            f"{source} does not match this run ({'; '.join(problems)}); re-run `distil cache` with "
            "this run's teacher, tokenizer, data and kd_temperature, or point teacher.cache at a "
            f"matching cache.{hint}".rstrip()
        )
