"""The on-disk format of ``distil generate`` outputs, as training reads it: JSONL shards listed
with their sha256 in a ``manifest.json`` (the writer is :mod:`distil.generation`).

A local teacher's records also hold its token ids (``prompt_ids``, ``completion_ids``), and the
manifest names those fields under ``token_ids`` next to the ``tokenizer_fingerprint`` that made
them. Folders written before that, and endpoint folders (an API returns text), have neither:
their text is re-tokenised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distil.errors import DistilError
from distil.storage import sha256_file

FORMAT_NAME = "distil-generated-data"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKEN_IDS = "token_ids"  # manifest key: the record fields that hold the teacher's token ids
PROMPT_IDS = "prompt_ids"  # record field: the prompt's ids as the teacher was given them
COMPLETION_IDS = "completion_ids"  # record field: the ids the teacher wrote, EOS excluded


@dataclass(frozen=True)
class StoredTokenIds:
    """What a generated folder says about the token ids in its records.

    Attributes:
        folder: The ``distil generate`` output folder.
        fields: Record fields holding token ids; empty when the records hold text only.
        tokenizer_fingerprint: Fingerprint of the tokenizer that made them
            (:func:`distil.data.tokenizer_identity.tokenizer_fingerprint`); ``None`` if unknown.
    """

    folder: Path
    fields: tuple[str, ...]
    tokenizer_fingerprint: str | None


def _generated_manifest(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        return None
    return manifest


def generated_shard_files(folder: Path) -> list[Path] | None:
    """The shards of a finished ``distil generate`` folder, each checked against its sha256;
    ``None`` when ``folder`` is not one (``distil.data.lm`` then reads it as a plain folder).

    Raises:
        DistilError: If the run is unfinished or a shard is missing or corrupt.
    """
    manifest = _generated_manifest(folder)
    if manifest is None:
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


def generated_token_ids(folder: Path) -> StoredTokenIds | None:
    """The token ids a ``distil generate`` folder stores, or ``None`` when it is not one."""
    manifest = _generated_manifest(folder)
    if manifest is None:
        return None
    fields = manifest.get(TOKEN_IDS) or []
    fingerprint = manifest.get("tokenizer_fingerprint")
    return StoredTokenIds(
        Path(folder),
        tuple(str(f) for f in fields),
        fingerprint if isinstance(fingerprint, str) else None,
    )
