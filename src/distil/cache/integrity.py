"""Integrity of a cache on disk: sha256 of files, atomic writes, checksum verification.

Every file a cache writer produces goes through :func:`atomic_write_bytes` (temp file in the
same folder, fsync, rename, fsync of the folder), so a killed writer leaves either the complete
file or no file under the final name, never a torn one. Readers check each shard's sha256
against the manifest before trusting its bytes.
"""

from __future__ import annotations

from pathlib import Path

from distil.errors import DistilError
from distil.storage import atomic_write_bytes, remove_temp_files, sha256_file

__all__ = [
    "CacheIntegrityError",
    "atomic_write_bytes",
    "check_shard",
    "remove_temp_files",
    "sha256_file",
]


class CacheIntegrityError(DistilError):
    """A shard whose bytes do not match the manifest (corrupt, truncated or replaced)."""


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
