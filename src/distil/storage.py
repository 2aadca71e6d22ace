"""Files that survive a kill: atomic writes (temp file, fsync, rename, fsync of the folder),
checksums, and the cleanup of temp files a killed writer left. Caches, checkpoints, generated
data and run folders all write through here."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks (bounded memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
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
    fsync_dir(path.parent)


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


def fsync_file(path: Path) -> None:
    """Flush a written file's bytes to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write_json(path: Path, payload: Any, *, indent: int | None = None) -> None:
    """:func:`atomic_write_bytes` of ``payload`` as JSON (the parent folder is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(payload, indent=indent).encode("utf-8"))
