"""Causal-LM data read by two tokenizers: the student's examples, the teacher's tokens of the
same text, and the groups that align them (``docs/cross-tokenizer.md``).

Every example is built once, deterministically, from the text:

- ``text`` (packed): documents become the stream ``[bos] doc eos [bos] doc eos ...`` in each
  tokenizer (BOS only for a tokenizer that has one different from EOS, as in
  ``distil.data.lm.tokenize_packed_text``); the student's stream is cut into blocks of
  ``max_length`` tokens (the same blocks ``tokenize_packed_text`` makes) and the teacher's
  example is every teacher token inside the block's text. Every token is supervised.
- ``prompt_completion``: ``[bos] prompt`` then ``completion eos`` in each tokenizer, the
  completion and EOS supervised on both sides; the completion starts a segment, so its first
  byte is a boundary of both and every completion byte is aligned.

Chat data is refused: the two tokenizers' chat templates render different text around the turns.
Each example stores the student's ``input_ids``/``labels`` (the columns of ``distil.data.lm``),
the teacher's ``teacher_input_ids``/``teacher_labels``, its ``groups`` (``(G, 4)`` flattened)
and its ``texts`` (the text pieces between special tokens, for bits per byte).
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from distil.alignment.groups import SpanAlignment, align_spans, alignment_stats
from distil.alignment.offsets import ByteOffsetMethod, ByteSpanEncoder, Special, TokenSpans
from distil.alignment.packing import cut_aligned_blocks
from distil.config.lm import LMDataFormat, LMDataSection
from distil.data.lm import (
    IGNORE_INDEX,
    _column_batches,
    _example_ids,
    _require_columns,
    collate_lm_batch,
    data_files,
    load_local_records,
    pad_token_id_for,
)
from distil.errors import DistilError

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

__all__ = ["PairedLMData", "build_paired_examples", "load_paired_lm_data"]

_COLUMNS = ("example_id", "input_ids", "labels", "teacher_input_ids", "teacher_labels", "groups")


@dataclass
class PairedLMData:
    """Tokenized splits for both tokenizers plus what the loop needs from them (the interface
    of ``distil.data.lm.LMData``, with the teacher's columns and the groups added)."""

    train: datasets.Dataset
    eval: datasets.Dataset
    targets_per_example: np.ndarray  # the student's supervised next-token targets per example
    teacher_targets_per_example: np.ndarray  # the same in the teacher's tokens
    groups_per_example: np.ndarray  # aligned groups per example (the cross-tokenizer positions)
    pad_token_id: int
    teacher_pad_token_id: int
    alignment: dict[str, float]  # alignment_stats of the training examples

    def collate(self, split: datasets.Dataset, indices: list[int]) -> dict[str, torch.Tensor]:
        """The student's batch (``input_ids``, ``attention_mask``, ``labels``, ``example_id``),
        the teacher's (``teacher_input_ids``, ``teacher_attention_mask``, ``teacher_labels``)
        and ``groups`` ``(B, G_max, 4)`` padded with -1."""
        cols = split[indices]
        student = collate_lm_batch(
            [
                {"example_id": e, "input_ids": i, "labels": lab}
                for e, i, lab in zip(
                    cols["example_id"], cols["input_ids"], cols["labels"], strict=True
                )
            ],
            pad_token_id=self.pad_token_id,
        )
        teacher = collate_lm_batch(
            [
                {"example_id": e, "input_ids": i, "labels": lab}
                for e, i, lab in zip(
                    cols["example_id"],
                    cols["teacher_input_ids"],
                    cols["teacher_labels"],
                    strict=True,
                )
            ],
            pad_token_id=self.teacher_pad_token_id,
        )
        flat = [np.asarray(g, dtype=np.int64).reshape(-1, 4) for g in cols["groups"]]
        width = max(1, max(g.shape[0] for g in flat))
        groups = torch.full((len(flat), width, 4), -1, dtype=torch.int64)  # (B, G_max, 4)
        for row, g in enumerate(flat):
            groups[row, : g.shape[0]] = torch.from_numpy(g)
        return {
            **student,
            "teacher_input_ids": teacher["input_ids"],
            "teacher_attention_mask": teacher["attention_mask"],
            "teacher_labels": teacher["labels"],
            "groups": groups,
        }

    def eval_batches(self, batch_size: int) -> list[dict[str, torch.Tensor]]:
        n = len(self.eval)
        return [
            self.collate(self.eval, list(range(i, min(i + batch_size, n))))
            for i in range(0, n, batch_size)
        ]

    def eval_texts(self) -> list[str]:
        """The held-out text, as the pieces between special tokens of every held-out example."""
        return [t for pieces in self.eval["texts"] for t in pieces if t]


def _segments(text: str, tokenizer: Any, *, bos: bool) -> list[str | Special]:
    return [Special.BOS, text] if bos and _has_bos(tokenizer) else [text]


def _has_bos(tokenizer: Any) -> bool:
    return tokenizer.bos_token_id is not None and tokenizer.bos_token_id != tokenizer.eos_token_id


def _pieces(starts: list[int], segment_bytes: list[bytes], lo: int, hi: int) -> list[str]:
    """The text pieces of the units ``[lo, hi)`` (special-token units left out)."""
    out: list[str] = []
    k = max(0, bisect.bisect_right(starts, lo) - 1)
    while k < len(starts) and starts[k] < hi:
        a, raw = starts[k], segment_bytes[k]
        piece = raw[max(lo - a, 0) : max(0, min(hi - a, len(raw)))]
        if piece:  # a block edge may cut a multi-byte character: that fragment is left out
            out.append(piece.decode("utf-8", errors="ignore"))
        k += 1
    return out


def _packed(
    texts: list[str],
    student: ByteSpanEncoder,
    teacher: ByteSpanEncoder,
    block_size: int,
    teacher_max_length: int,
) -> list[dict[str, Any]]:
    s_segments: list[str | Special] = []
    t_segments: list[str | Special] = []
    starts: list[int] = []
    raws: list[bytes] = []
    cursor = 0
    for text in texts:
        raw = text.encode("utf-8")
        s_segments += [*_segments(text, student.tokenizer, bos=True), Special.EOS]
        t_segments += [*_segments(text, teacher.tokenizer, bos=True), Special.EOS]
        starts.append(cursor)
        raws.append(raw)
        cursor += len(raw) + 1  # the EOS unit
    blocks = cut_aligned_blocks(
        student.encode_segments(s_segments),
        teacher.encode_segments(t_segments),
        block_size,
        teacher_max_length=teacher_max_length,
    )
    return [
        _row(
            i,
            b.student,
            None,
            b.teacher,
            None,
            b.alignment,
            _pieces(starts, raws, int(b.student.starts[0]), int(b.student.ends[-1])),
        )
        for i, b in enumerate(blocks)
    ]


def _prompt_completion(
    records: datasets.Dataset,
    prompt_field: str,
    completion_field: str,
    example_id_field: str,
    student: ByteSpanEncoder,
    teacher: ByteSpanEncoder,
    max_length: int,
    teacher_max_length: int,
) -> list[dict[str, Any]]:
    _require_columns(records, [prompt_field, completion_field])
    ids = _example_ids(records, example_id_field)
    rows: list[dict[str, Any]] = []
    pairs = zip(
        (p for batch in _column_batches(records, prompt_field) for p in batch),
        (c for batch in _column_batches(records, completion_field) for c in batch),
        strict=True,
    )
    for example_id, (prompt, completion) in zip(ids, pairs, strict=True):
        sides = []
        for enc, limit, role in (
            (student, max_length, "student"),
            (teacher, teacher_max_length, "teacher"),
        ):
            head = enc.encode_segments(_segments(prompt, enc.tokenizer, bos=True))
            tail = enc.encode_segments([completion, Special.EOS], origin=len(prompt.encode()))
            spans = TokenSpans.concatenate([head, tail])
            if len(spans) > limit:
                raise DistilError(
                    f"example {example_id} is {len(spans)} {role} tokens long, more than "
                    f"{'data.max_length' if role == 'student' else 'the teacher context'}="
                    f"{limit}; shorten or filter it (truncation is not supported across tokenizers)"
                )
            supervised = np.arange(len(spans)) >= len(head)
            sides.append((spans, supervised))
        (s_spans, s_sup), (t_spans, t_sup) = sides
        alignment = align_spans(
            s_spans, t_spans, student_supervised=s_sup, teacher_supervised=t_sup
        )
        rows.append(
            _row(example_id, s_spans, s_sup, t_spans, t_sup, alignment, [prompt + completion])
        )
    return rows


def _row(
    example_id: int,
    student: TokenSpans,
    student_supervised: np.ndarray | None,
    teacher: TokenSpans,
    teacher_supervised: np.ndarray | None,
    alignment: SpanAlignment,
    texts: list[str],
) -> dict[str, Any]:
    def labels(spans: TokenSpans, supervised: np.ndarray | None) -> list[int]:
        if supervised is None:
            return spans.ids.tolist()
        return np.where(supervised, spans.ids, IGNORE_INDEX).tolist()

    return {
        "example_id": example_id,
        "input_ids": student.ids.tolist(),
        "labels": labels(student, student_supervised),
        "teacher_input_ids": teacher.ids.tolist(),
        "teacher_labels": labels(teacher, teacher_supervised),
        "groups": alignment.groups.reshape(-1).tolist(),
        "texts": texts,
        "_alignment": alignment,
    }


def build_paired_examples(
    records: datasets.Dataset,
    section: LMDataSection,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase,
    *,
    byte_offsets: ByteOffsetMethod | str = ByteOffsetMethod.OFFSETS,
    teacher_max_length: int | None = None,
) -> tuple[datasets.Dataset, dict[str, float]]:
    """Tokenize ``records`` with both tokenizers and align every example.

    Args:
        records: source records (``load_local_records``).
        section: the data section (format, columns, ``max_length``).
        student_tokenizer: the student's tokenizer.
        teacher_tokenizer: the teacher's tokenizer.
        byte_offsets: how token byte spans are found (``offsets`` or ``decode``).
        teacher_max_length: the teacher's context (default ``section.max_length``).

    Returns:
        The examples and their alignment statistics.

    Raises:
        DistilError: on chat data, examples that do not fit, a tokenizer without offsets when
            ``offsets`` is asked for, or text one of the tokenizers cannot reproduce.
    """
    import datasets

    fmt = LMDataFormat(section.format)
    if fmt is LMDataFormat.CHAT:
        raise DistilError(
            "data.format=chat is not supported across tokenizers (the two chat templates render "
            "different text around the turns): use text or prompt_completion data"
        )
    student = ByteSpanEncoder(student_tokenizer, byte_offsets)
    teacher = ByteSpanEncoder(teacher_tokenizer, byte_offsets)
    limit = section.max_length if teacher_max_length is None else teacher_max_length
    if fmt is LMDataFormat.TEXT:
        _require_columns(records, [section.text_field])
        texts = [t for batch in _column_batches(records, section.text_field) for t in batch]
        rows = _packed(texts, student, teacher, section.max_length, limit)
        if not rows:
            raise DistilError(
                f"the text data holds fewer than max_length={section.max_length} student tokens; "
                "add text or lower max_length"
            )
    else:
        rows = _prompt_completion(
            records,
            section.prompt_field,
            section.completion_field,
            "example_id",
            student,
            teacher,
            section.max_length,
            limit,
        )
    stats = alignment_stats([r.pop("_alignment") for r in rows])
    empty = [r["example_id"] for r in rows if not r["groups"]]
    if empty:
        raise DistilError(
            f"{len(empty)} example(s) have no aligned group (example_id {empty[:5]}): the two "
            "tokenizations share no token boundary in their supervised text"
        )
    features = datasets.Features(
        {
            "example_id": datasets.Value("int64"),
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "labels": datasets.Sequence(datasets.Value("int32")),
            "teacher_input_ids": datasets.Sequence(datasets.Value("int32")),
            "teacher_labels": datasets.Sequence(datasets.Value("int32")),
            "groups": datasets.Sequence(datasets.Value("int32")),
            "texts": datasets.Sequence(datasets.Value("string")),
        }
    )
    columns = {name: [r[name] for r in rows] for name in [*_COLUMNS, "texts"]}
    return datasets.Dataset.from_dict(columns, features=features), stats


def load_paired_lm_data(
    section: LMDataSection,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase,
    work_dir: Path,
    accelerator: Any,
    *,
    byte_offsets: ByteOffsetMethod | str = ByteOffsetMethod.OFFSETS,
    teacher_max_length: int | None = None,
) -> PairedLMData:
    """Load, tokenize with both tokenizers, align (every process does the same, deterministically).

    Held-out examples come from the eval files, or the last ``eval_fraction`` of the training
    examples; ``train_limit`` and ``eval_limit`` apply as in ``distil.data.lm.load_lm_data``.
    """
    train_files, eval_files = data_files(section, work_dir, accelerator)
    kwargs: dict[str, Any] = {
        "byte_offsets": byte_offsets,
        "teacher_max_length": teacher_max_length,
    }
    train, stats = build_paired_examples(
        load_local_records(train_files), section, student_tokenizer, teacher_tokenizer, **kwargs
    )
    if eval_files is not None:
        held_out, _ = build_paired_examples(
            load_local_records(eval_files), section, student_tokenizer, teacher_tokenizer, **kwargs
        )
    else:
        n_eval = max(1, round(len(train) * section.eval_fraction))
        if len(train) - n_eval < 1:
            raise DistilError(
                f"{len(train)} example(s) cannot be split into train and held-out; add data"
            )
        held_out = train.select(range(len(train) - n_eval, len(train)))
        train = train.select(range(len(train) - n_eval))
    if section.train_limit is not None:
        train = train.select(range(min(section.train_limit, len(train))))
    if section.eval_limit is not None:
        held_out = held_out.select(range(min(section.eval_limit, len(held_out))))

    def supervised(column: str) -> np.ndarray:
        counts = [
            sum(1 for t in row[1:] if t != IGNORE_INDEX)
            for batch in train.iter(batch_size=1024)
            for row in batch[column]
        ]
        return np.asarray(counts, dtype=np.int64)

    groups = [len(g) // 4 for batch in train.iter(batch_size=1024) for g in batch["groups"]]
    logger.info(
        "paired data: %d training and %d held-out examples; alignment %s",
        len(train),
        len(held_out),
        {k: round(v, 4) for k, v in stats.items()},
    )
    return PairedLMData(
        train,
        held_out,
        supervised("labels"),
        supervised("teacher_labels"),
        np.asarray(groups, dtype=np.int64),
        pad_token_id_for(student_tokenizer),
        pad_token_id_for(teacher_tokenizer),
        stats,
    )
