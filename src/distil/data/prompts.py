"""Prompt sets for ``distil generate``: a local JSONL file, a Hugging Face dataset, or windows of
the built-in corpus.

Every prompt has a stable id (the file's or dataset's ``id`` field, else its line or row number;
the window number in the corpus), which names its completions and seeds their sampling, and a prompt set has a
fingerprint over every id and text, which a generated folder's manifest records.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import Discriminator, Field, Tag, model_validator

from distil.config.base import StrictModel
from distil.config.sources import BuiltinData, FileData, require_builtin
from distil.data.corpus import build_stdlib_corpus, read_corpus_texts
from distil.errors import DistilError
from distil.progress import phase_progress


class DatasetPrompts(StrictModel):
    """A Hugging Face dataset of prompts: a ``save_to_disk`` folder, or a name ``load_dataset``
    finds offline. Its ``id`` column (else the row number) is the id; every other column is a
    field the verifiers see."""

    dataset: str = Field(description="a save_to_disk folder, or a name load_dataset finds offline")
    split: str = Field(default="train", description="the split, for a dataset with several")
    prompt_field: str = Field(default="prompt", description="the column holding the prompt")


def _prompt_kind(value: Any) -> str | None:
    kinds = ("builtin", "train", "dataset")
    if isinstance(value, dict):
        named = [k for k in kinds if value.get(k) is not None]
        return named[0] if len(named) == 1 else None
    return next((k for k in kinds if getattr(value, k, None) is not None), None)


# The data sources every recipe knows, plus a Hugging Face dataset (prompt sets often ship as
# one; training data does not need it, so it lives here rather than in DataSource).
PromptSource = Annotated[
    Annotated[BuiltinData, Tag("builtin")]
    | Annotated[FileData, Tag("train")]
    | Annotated[DatasetPrompts, Tag("dataset")],
    Discriminator(
        _prompt_kind,
        custom_error_type="prompt_source_kind",
        custom_error_message=(
            "prompts.source is {builtin: stdlib}, {train: [FILE.jsonl]} or "
            "{dataset: FOLDER, split: train, prompt_field: prompt}"
        ),
    ),
]


class PromptsSection(StrictModel):
    """Where prompts come from: a JSONL file (a string ``prompt``, optional ``id``, a line),
    windows cut from the built-in corpus, or a Hugging Face dataset."""

    source: PromptSource = Field(
        default_factory=lambda: BuiltinData(builtin="stdlib"),
        description=(
            "{builtin: stdlib} (its train split), {train: [FILE.jsonl]} or "
            "{dataset: FOLDER, split, prompt_field}"
        ),
    )
    prompt_tokens: int = Field(default=64, ge=1, description="builtin: tokens per prompt")
    corpus_max_bytes: int | None = Field(default=None, ge=1, description="builtin: corpus size cap")
    limit: int | None = Field(
        default=None, ge=1, description="file, dataset: first N; builtin: N spread"
    )

    @model_validator(mode="after")
    def _one_file(self) -> PromptsSection:
        require_builtin(self.source, ["stdlib"], "prompts.source.builtin")
        if isinstance(self.source, FileData) and len(self.source.train) != 1:
            raise ValueError("prompts.source.train: give one JSONL file of prompts")
        if isinstance(self.source, FileData) and self.source.eval is not None:
            raise ValueError("prompts.source.eval: a prompt set has no held-out files; drop it")
        return self

    @property
    def builtin(self) -> str | None:
        return self.source.builtin if isinstance(self.source, BuiltinData) else None

    @property
    def file(self) -> str | None:
        return self.source.train[0] if isinstance(self.source, FileData) else None

    @property
    def dataset(self) -> DatasetPrompts | None:
        return self.source if isinstance(self.source, DatasetPrompts) else None


@dataclass(frozen=True)
class Prompt:
    id: int | str
    text: str
    fields: Mapping[str, Any] = field(
        default_factory=dict
    )  # a file line's other fields (answers, tests)


def load_prompts(section: PromptsSection, tokenizer: Any) -> list[Prompt]:
    """The prompt set, in order; raises DistilError for a missing, malformed or empty one."""
    if section.file is not None:
        prompts = _file_prompts(Path(section.file))[: section.limit]
    elif section.dataset is not None:
        prompts = _dataset_prompts(section.dataset)[: section.limit]
    else:
        prompts = _stdlib_prompts(section, tokenizer)
    if not prompts:
        named = section.dataset.dataset if section.dataset is not None else section.file
        source = named or f"no stdlib document has {section.prompt_tokens} tokens"
        raise DistilError(f"the prompt set is empty ({source}); give at least one prompt")
    return prompts


def _file_prompts(path: Path) -> list[Prompt]:
    if not path.is_file():
        raise DistilError(
            f"prompts file {path} does not exist; set prompts.source.train to a JSONL file"
        )
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DistilError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise DistilError(f"{path}:{number}: every line needs a string field 'prompt'")
        rows.append((number, row))
    with_id = [n for n, row in rows if "id" in row]
    if with_id and len(with_id) != len(rows):
        raise DistilError(f"{path}: give an 'id' on every line or none (line {with_id[0]} has)")
    ids = [row["id"] if with_id else i for i, (_, row) in enumerate(rows)]
    if {type(i) for i in ids} - {int, str} or len({type(i) for i in ids}) > 1:
        raise DistilError(f"{path}: ids must be all integers or all strings")
    if len(set(ids)) != len(ids):
        raise DistilError(f"{path}: ids must be unique (they seed sampling and name completions)")
    return [
        Prompt(i, row["prompt"], {k: v for k, v in row.items() if k not in ("id", "prompt")})
        for i, (_, row) in zip(ids, rows, strict=True)
    ]


def _dataset_prompts(source: DatasetPrompts) -> list[Prompt]:
    """Prompts from a Hugging Face dataset: ``id`` column if any (else the row number), the
    ``prompt_field`` column, every other column as the prompt's fields."""
    import datasets

    path = Path(source.dataset)
    try:
        if path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json")):
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(source.dataset, split=source.split)
    except (FileNotFoundError, ValueError, ConnectionError) as exc:
        raise DistilError(
            f"prompts.source.dataset {source.dataset!r} cannot be loaded offline ({exc}); give a "
            "folder written by Dataset.save_to_disk, or a JSONL file: prompts.source={train: [F]}"
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        if source.split not in loaded:
            raise DistilError(
                f"prompts.source.dataset has splits {sorted(loaded)}, not {source.split!r}; "
                "set prompts.source.split"
            )
        loaded = loaded[source.split]
    if source.prompt_field not in loaded.column_names:
        raise DistilError(
            f"prompts.source.dataset has no column {source.prompt_field!r} (it has "
            f"{loaded.column_names}); set prompts.source.prompt_field"
        )
    rows = list(loaded)
    ids = [row["id"] for row in rows] if "id" in loaded.column_names else list(range(len(rows)))
    if len(set(ids)) != len(ids):
        raise DistilError("prompts.source.dataset: the id column has duplicates")
    skip = {"id", source.prompt_field}
    return [
        Prompt(i, str(row[source.prompt_field]), {k: v for k, v in row.items() if k not in skip})
        for i, row in zip(ids, rows, strict=True)
    ]


def _stdlib_prompts(section: PromptsSection, tokenizer: Any) -> list[Prompt]:
    """Windows of ``prompt_tokens`` tokens cut from each train document; id = window number."""
    with tempfile.TemporaryDirectory(prefix="distil-corpus-") as tmp:
        # the same call as lm_kd's data.source.builtin=stdlib (data.lm.data_files): the same train split
        build_stdlib_corpus(Path(tmp), max_total_bytes=section.corpus_max_bytes, test_fraction=0.0)
        texts = list(read_corpus_texts([Path(tmp) / "train.jsonl"]))
    n = section.prompt_tokens
    docs: list[np.ndarray] = []
    windows: list[tuple[int, int]] = []  # (document, start); int32 arrays keep the corpus small
    with phase_progress(
        f"cutting prompts from {len(texts):,} documents", len(texts), unit="docs"
    ) as done:
        for start in range(0, len(texts), 256):
            batch = texts[start : start + 256]
            # verbose=False: long documents are expected, they are cut into windows here
            for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
                windows.extend((len(docs), s) for s in range(0, len(ids) - n + 1, n))
                docs.append(np.asarray(ids, dtype=np.int32))
            done(len(batch))
    count = min(section.limit or len(windows), len(windows))
    picks = sorted({k * len(windows) // count for k in range(count)}) if count else []
    spans = [(k, *windows[k]) for k in picks]
    return [Prompt(k, tokenizer.decode(docs[d][s : s + n].tolist())) for k, d, s in spans]


def prompts_fingerprint(prompts: list[Prompt]) -> str:
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(json.dumps([p.id, p.text], ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()
