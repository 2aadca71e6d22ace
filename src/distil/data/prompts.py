"""Prompt sets for ``distil generate``: a local JSONL file, or windows of the built-in corpus.

Every prompt has a stable id (the file's ``id`` field or line number; the window number in the
corpus), which names its completions and seeds their sampling, and a prompt set has a
fingerprint over every id and text, which a generated folder's manifest records.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from distil.config.base import StrictModel
from distil.data.corpus import build_stdlib_corpus, read_corpus_texts
from distil.errors import DistilError


class PromptsSection(StrictModel):
    """Where prompts come from: a JSONL file or windows cut from the built-in corpus."""

    file: str | None = Field(default=None, description="JSONL: a string `prompt` (+ `id`) a line")
    builtin: Literal["stdlib"] | None = Field(default=None, description="stdlib train split")
    dataset: str | None = Field(
        default=None,
        description="a Hugging Face dataset: a save_to_disk folder, or a name load_dataset finds offline",
    )
    dataset_split: str = Field(default="train", description="dataset: the split")
    prompt_field: str = Field(default="prompt", description="dataset: the prompt column")
    prompt_tokens: int = Field(default=64, ge=1, description="builtin: tokens per prompt")
    corpus_max_bytes: int | None = Field(default=None, ge=1, description="builtin: corpus size cap")
    limit: int | None = Field(default=None, ge=1, description="file: first N; builtin: N spread")

    @model_validator(mode="after")
    def _one_source(self) -> PromptsSection:
        if sum(x is not None for x in (self.file, self.builtin, self.dataset)) != 1:
            raise ValueError(
                "set exactly one of prompts.file (JSONL), prompts.builtin (stdlib) or "
                "prompts.dataset (Hugging Face)"
            )
        return self


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
        prompts = _dataset_prompts(section)[: section.limit]
    else:
        prompts = _stdlib_prompts(section, tokenizer)
    if not prompts:
        source = section.file or f"no stdlib document has {section.prompt_tokens} tokens"
        raise DistilError(f"the prompt set is empty ({source}); give at least one prompt")
    return prompts


def _file_prompts(path: Path) -> list[Prompt]:
    if not path.is_file():
        raise DistilError(f"prompts file {path} does not exist; set prompts.file to a JSONL file")
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


def _dataset_prompts(section: PromptsSection) -> list[Prompt]:
    """Prompts from a Hugging Face dataset: ``id`` column if any (else the row number), the
    ``prompt_field`` column, every other column as the prompt's fields."""
    import datasets

    assert section.dataset is not None
    path = Path(section.dataset)
    try:
        if path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json")):
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(section.dataset, split=section.dataset_split)
    except (FileNotFoundError, ValueError, ConnectionError) as exc:
        raise DistilError(
            f"prompts.dataset {section.dataset!r} cannot be loaded offline ({exc}); give a folder "
            "written by Dataset.save_to_disk, or use prompts.file"
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        if section.dataset_split not in loaded:
            raise DistilError(
                f"prompts.dataset has splits {sorted(loaded)}, not {section.dataset_split!r}; "
                "set prompts.dataset_split"
            )
        loaded = loaded[section.dataset_split]
    if section.prompt_field not in loaded.column_names:
        raise DistilError(
            f"prompts.dataset has no column {section.prompt_field!r} (it has "
            f"{loaded.column_names}); set prompts.prompt_field"
        )
    rows = list(loaded)
    ids = [row["id"] for row in rows] if "id" in loaded.column_names else list(range(len(rows)))
    if len(set(ids)) != len(ids):
        raise DistilError("prompts.dataset: the id column has duplicates")
    skip = {"id", section.prompt_field}
    return [
        Prompt(i, str(row[section.prompt_field]), {k: v for k, v in row.items() if k not in skip})
        for i, row in zip(ids, rows, strict=True)
    ]


def _stdlib_prompts(section: PromptsSection, tokenizer: Any) -> list[Prompt]:
    """Windows of ``prompt_tokens`` tokens cut from each train document; id = window number."""
    with tempfile.TemporaryDirectory(prefix="distil-corpus-") as tmp:
        # the same call as lm_kd's data.builtin=stdlib (lm_setup.data_files): the same train split
        build_stdlib_corpus(Path(tmp), max_total_bytes=section.corpus_max_bytes, test_fraction=0.0)
        texts = list(read_corpus_texts([Path(tmp) / "train.jsonl"]))
    n = section.prompt_tokens
    docs: list[np.ndarray] = []
    windows: list[tuple[int, int]] = []  # (document, start); int32 arrays keep the corpus small
    for start in range(0, len(texts), 256):
        for ids in tokenizer(texts[start : start + 256], add_special_tokens=False)["input_ids"]:
            windows.extend((len(docs), s) for s in range(0, len(ids) - n + 1, n))
            docs.append(np.asarray(ids, dtype=np.int32))
    count = min(section.limit or len(windows), len(windows))
    picks = sorted({k * len(windows) // count for k in range(count)}) if count else []
    spans = [(k, *windows[k]) for k in picks]
    return [Prompt(k, tokenizer.decode(docs[d][s : s + n].tolist())) for k, d, s in spans]


def prompts_fingerprint(prompts: list[Prompt]) -> str:
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(json.dumps([p.id, p.text], ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()
