"""Integrity of a cache on disk: sha256 of files, atomic writes, checksum verification.

Every file a cache writer produces goes through :func:`atomic_write_bytes` (temp file in the
same folder, fsync, rename, fsync of the folder), so a killed writer leaves either the complete
file or no file under the final name, never a torn one. Readers check each shard's sha256
against the manifest before trusting its bytes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from distil.errors import DistilError

_CHUNK = 1 << 20


class CacheIntegrityError(DistilError):
    """A shard whose bytes do not match the manifest (corrupt, truncated or replaced)."""


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks (bounded memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent or complete.

    The bytes go to ``.<name>.tmp-<pid>`` in the same folder, are fsynced and renamed over
    ``path``; the folder is fsynced so the rename survives a power cut. A leftover temp file
    from a killed writer is harmless and is removed by the next writer
    (:func:`remove_temp_files`).
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def remove_temp_files(folder: Path, names: Iterable[str]) -> int:
    """Delete temp files that killed writers left for the files ``names``; return how many.

    Only the named files' temps are touched, so a process never removes a temp file that
    another writer process (owning other shards) is writing right now.
    """
    count = 0
    for name in names:
        for p in folder.glob(f".{name}.tmp-*"):
            p.unlink(missing_ok=True)
            count += 1
    return count


def check_shard(path: Path, expected_sha256: str, expected_bytes: int | None = None) -> None:
    """Refuse a shard whose size or sha256 differs from the manifest.

    Raises:
        CacheIntegrityError: Naming the shard, what differs, and the fix.
    """
    if not path.is_file():
        raise CacheIntegrityError(
            f"cache shard {path} is missing; re-run `distil cache` with the same config to rewrite it"
        )
    size = path.stat().st_size
    if expected_bytes is not None and size != expected_bytes:
        raise CacheIntegrityError(
            f"cache shard {path} is {size} bytes, the manifest says {expected_bytes} (truncated or "
            "replaced); delete it and re-run `distil cache` with the same config to rewrite it"
        )
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise CacheIntegrityError(
            f"cache shard {path} fails its checksum (sha256 {actual[:12]}…, manifest {expected_sha256[:12]}…): "
            "the file is corrupt; delete it and re-run `distil cache` with the same config to rewrite it"
        )
