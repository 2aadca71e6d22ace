"""The record store of an endpoint job: an fsynced journal, then sealed shards and a manifest.

Layout of an output folder::

    journal.jsonl          # one line per finished call: {"call": …, "records": […], "failures": […]}
    shard-G-NNNNN.jsonl    # the training records, in plan order, sealed at the end of a run
    rejected-G.jsonl       # samples that rejection sampling kept apart (with their verdicts)
    superseded.jsonl       # records of requests the current config no longer makes (reusable)
    ledger.jsonl           # every call's usage and cost
    failures.jsonl         # requests that failed for good (400, content filter), not re-sent
    quarantine.jsonl       # malformed bodies with the reason (the request was retried)
    manifest.json          # format, settings, shards with sha256, counts, ledger totals

While a job runs, each call's outcome is **one** journal line, written with ``write`` + ``flush``
+ ``fsync``: the records of a call and its usage are durable together or not at all, so a
``kill -9`` loses only what was in flight (a torn last line is dropped on load, and the file is
cut back to its last full line before anything is appended). When the run ends (finished,
stopped by the budget, or aborted), :meth:`RecordStore.compact` writes a new generation ``G`` of
shards, each atomically (temp file, fsync, rename), then the other files, then the manifest, and
only then deletes the previous generation and empties the journal; a run killed at any point of
that sequence finds every record at least once on the next load, and duplicates collapse by key.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from distil.cache.manifest import write_json_atomic
from distil.errors import DistilError
from distil.storage import atomic_write_bytes, remove_temp_files, sha256_file

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
JOURNAL = "journal.jsonl"
LEDGER = "ledger.jsonl"
SUPERSEDED = "superseded.jsonl"
FAILURES = "failures.jsonl"
QUARANTINE = "quarantine.jsonl"


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: equal values give equal strings (and hashes)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _jsonl(rows: Iterable[Mapping[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The complete JSON lines of a file and how many bytes of it they cover.

    A last line without its newline (a write cut by a kill) is not returned; nor is a line that
    does not parse (only possible as that last line, since the file is append-only).
    """
    if not path.is_file():
        return [], 0
    data = path.read_bytes()
    rows: list[dict[str, Any]] = []
    good = 0
    for line in data.split(b"\n")[:-1]:  # the part after the last newline is torn or empty
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if isinstance(row, dict):
            rows.append(row)
        good += len(line) + 1
    return rows, good


@dataclass
class StoreState:
    """Everything a folder holds, merged across files (later copies of a key win).

    Attributes:
        records: Record by key (training, rejected, superseded and journal records alike).
        calls: Ledger entry by call id.
        failures: Permanent failure by key.
        manifest: The manifest, or None in a new folder.
        torn_bytes: Bytes of a cut-off journal line that were dropped.
    """

    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: dict[str, dict[str, Any]] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None
    torn_bytes: int = 0


class RecordStore:
    """Reads and writes one endpoint job's output folder (see the module docstring).

    Args:
        folder: The output folder (created if missing).
        format_name: The ``format`` every manifest here must carry.
    """

    def __init__(self, folder: Path, *, format_name: str) -> None:
        self.folder = Path(folder)
        self.format_name = format_name
        self._journal: BinaryIO | None = None

    def load(self) -> StoreState:
        """Read the folder; cut a torn journal tail so appends start on a line boundary.

        Raises:
            DistilError: If the manifest is of another format or a sealed shard fails its sha256.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        state = StoreState()
        manifest_path = self.folder / MANIFEST
        if manifest_path.is_file():
            try:
                manifest = json.loads(manifest_path.read_text())
            except json.JSONDecodeError as exc:
                raise DistilError(
                    f"{manifest_path} is not valid JSON; delete {self.folder} to start over"
                ) from exc
            if manifest.get("format") != self.format_name or manifest.get("mode") != "endpoint":
                raise DistilError(
                    f"{self.folder} holds output of another kind (format {manifest.get('format')!r}, "
                    f"mode {manifest.get('mode', 'local')!r}); choose another output folder"
                )
            state.manifest = manifest
            for entry in [*manifest.get("shards", []), *manifest.get("rejected", [])]:
                path = self.folder / entry["file"]
                if not path.is_file() or sha256_file(path) != entry["sha256"]:
                    raise DistilError(
                        f"{path} is missing or fails its sha256 in the manifest; the records in it "
                        f"are lost unless you restore it; delete {manifest_path} to keep what the "
                        "other files hold and re-send the rest"
                    )
                for row in read_jsonl(path)[0]:
                    state.records[row["key"]] = row
        for row in read_jsonl(self.folder / SUPERSEDED)[0]:
            state.records.setdefault(row["key"], row)
        for row in read_jsonl(self.folder / LEDGER)[0]:
            state.calls[row["call"]] = row
        for row in read_jsonl(self.folder / FAILURES)[0]:
            state.failures[row["key"]] = row
        journal = self.folder / JOURNAL
        rows, good = read_jsonl(journal)
        for row in rows:
            call = row.get("call")
            if isinstance(call, dict) and "call" in call:
                state.calls[call["call"]] = call
            for record in row.get("records", []):
                state.records[record["key"]] = record
            for failure in row.get("failures", []):
                state.failures[failure["key"]] = failure
        if journal.is_file() and journal.stat().st_size > good:
            state.torn_bytes = journal.stat().st_size - good
            logger.warning(
                "%s ends in a cut-off line (%d bytes, a write interrupted by a kill): dropped; "
                "that call's request is sent again",
                journal,
                state.torn_bytes,
            )
            with open(journal, "r+b") as f:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())
        return state

    def append(
        self,
        call: Mapping[str, Any] | None,
        records: Sequence[Mapping[str, Any]],
        failures: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        """Append one call's outcome to the journal as one line, durably (fsync)."""
        if self._journal is None:
            self._journal = open(self.folder / JOURNAL, "ab")  # noqa: SIM115 - kept open for the run
        line = {"call": call, "records": list(records), "failures": list(failures)}
        self._journal.write((json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8"))
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def quarantine(self, entry: Mapping[str, Any]) -> None:
        """Keep a malformed answer and the reason, durably, for inspection."""
        with open(self.folder / QUARANTINE, "ab") as f:
            f.write((json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        """Close the journal."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def compact(
        self,
        *,
        kept: Sequence[Mapping[str, Any]],
        rejected: Sequence[Mapping[str, Any]],
        superseded: Sequence[Mapping[str, Any]],
        calls: Sequence[Mapping[str, Any]],
        failures: Sequence[Mapping[str, Any]],
        manifest: Mapping[str, Any],
        shard_size: int,
        previous: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        """Seal the folder: new shards of ``kept`` in the given order, the other files, then the
        manifest (with each shard's sha256), then remove the old generation and empty the journal.

        Returns:
            The manifest written.
        """
        self.close()
        generation = int((previous or {}).get("generation", 0)) + 1
        shards = []
        for index, start in enumerate(range(0, len(kept), shard_size)):
            rows = kept[start : start + shard_size]
            name = f"shard-{generation:03d}-{index:05d}.jsonl"
            data = _jsonl(rows)
            atomic_write_bytes(self.folder / name, data)
            shards.append(
                {
                    "index": index,
                    "file": name,
                    "sha256": sha256_file(self.folder / name),
                    "bytes": len(data),
                    "records": len(rows),
                    "first_id": rows[0].get("id"),
                    "last_id": rows[-1].get("id"),
                }
            )
        rejected_entries = []
        if rejected:
            name = f"rejected-{generation:03d}.jsonl"
            data = _jsonl(rejected)
            atomic_write_bytes(self.folder / name, data)
            rejected_entries.append(
                {
                    "file": name,
                    "sha256": sha256_file(self.folder / name),
                    "bytes": len(data),
                    "records": len(rejected),
                }
            )
        atomic_write_bytes(self.folder / SUPERSEDED, _jsonl(superseded))
        atomic_write_bytes(self.folder / LEDGER, _jsonl(calls))
        atomic_write_bytes(self.folder / FAILURES, _jsonl(failures))
        out = {**manifest, "generation": generation, "shards": shards, "rejected": rejected_entries}
        write_json_atomic(self.folder / MANIFEST, out)
        keep = {s["file"] for s in shards} | {r["file"] for r in rejected_entries}
        for path in self._sealed_files():
            if path.name not in keep:
                path.unlink()
        atomic_write_bytes(self.folder / JOURNAL, b"")
        return out

    def _sealed_files(self) -> Iterator[Path]:
        yield from sorted(self.folder.glob("shard-*.jsonl"))
        yield from sorted(self.folder.glob("rejected-*.jsonl"))

    def remove_temp_files(self) -> int:
        """Delete temp files a killed compaction left behind."""
        names = [p.name for p in self._sealed_files()] + [
            MANIFEST,
            JOURNAL,
            LEDGER,
            SUPERSEDED,
            FAILURES,
        ]
        count = remove_temp_files(self.folder, names)
        # temp files of shards whose final name was never written
        for p in self.folder.glob(".shard-*.tmp-*"):
            p.unlink(missing_ok=True)
            count += 1
        for p in self.folder.glob(".rejected-*.tmp-*"):
            p.unlink(missing_ok=True)
            count += 1
        return count
