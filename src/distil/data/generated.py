"""The on-disk format of ``distil generate`` outputs, as training reads it: JSONL shards listed
with their sha256 in a ``manifest.json`` (the writer is :mod:`distil.generation`)."""

from __future__ import annotations

import json
from pathlib import Path

from distil.errors import DistilError
from distil.storage import sha256_file

FORMAT_NAME = "distil-generated-data"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def generated_shard_files(folder: Path) -> list[Path] | None:
    """The shards of a finished ``distil generate`` folder, each checked against its sha256;
    ``None`` when ``folder`` is not one (``distil.data.lm`` then reads it as a plain folder).

    Raises:
        DistilError: If the run is unfinished or a shard is missing or corrupt.
    """
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        return None
    fix = "re-run `distil generate` with the config that made it"
    if not manifest.get("complete"):
        raise DistilError(
            f"{folder} is an unfinished `distil generate` output; {fix} to complete it"
        )
    files = []
    for shard in manifest["shards"]:
        file = Path(folder) / shard["file"]
        if not file.is_file() or sha256_file(file) != shard["sha256"]:
            raise DistilError(
                f"generated shard {file} is missing or fails its sha256 in the manifest; {fix} to regenerate it"
            )
        files.append(file)
    return files
