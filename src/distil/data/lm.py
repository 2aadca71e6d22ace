"""Causal-LM distillation data: local files through Hugging Face ``datasets``, masking, packing, collate.

Three source formats, each turned into examples ``{"example_id", "input_ids", "labels"}``:

- ``text``: raw documents, tokenized, joined with EOS after every document and cut into
  fixed blocks of ``max_length`` tokens (packing); every token is supervised.
- ``prompt_completion``: prompt tokens are masked; the completion gets EOS appended, and that
  EOS stays supervised (also when the tokenizer pads with EOS). From a ``distil generate``
  folder whose tokenizer fingerprint is this tokenizer's, the teacher's stored token ids are
  used instead of re-tokenising its text (:func:`token_id_source` decides, and says so).
- ``chat``: a list of ``{"role", "content"}`` messages rendered by the tokenizer's chat template;
  only the assistant turns (with their end-of-turn token) are supervised.

Label convention (the one place it is decided): ``labels`` are aligned with ``input_ids`` like in
Hugging Face (``labels[t]`` is token ``t`` itself, or ``IGNORE_INDEX``), so ``model(input_ids,
labels=labels).loss`` is the right cross-entropy. Distillation losses must not slice logits; they
call ``shift_for_next_token(labels)`` exactly once, which returns ``next_token_targets`` of the
same ``[B, T]`` shape, where ``next_token_targets[:, t]`` is the token that ``logits[:, t]``
predicts. Shifting the small integer tensor instead of the ``[B, T, V]`` logits avoids a copy of
the largest tensor in the step.

Padding is masked by position (``attention_mask`` 0, label ``IGNORE_INDEX``), never by comparing
token ids with the pad id, which is what drops EOS when ``pad == eos``.

Every example carries a stable integer ``example_id``: the source's ``example_id`` column if it
has one, otherwise the row number (the block number for packed text). It keys teacher-output
caches, so the same files, tokenizer and options always give the same ids.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from distil.config.lm import LMDataFormat, LMDataSection, OverlengthPolicy
from distil.config.sources import FileData
from distil.data.corpus import build_stdlib_corpus
from distil.data.generated import (
    COMPLETION_IDS,
    PROMPT_IDS,
    generated_shard_files,
    generated_token_ids,
)
from distil.data.tokenizer_identity import tokenizer_fingerprint
from distil.errors import DistilError
from distil.progress import phase_progress

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
EXAMPLE_COLUMNS = ("example_id", "input_ids", "labels")
_SUFFIX_TO_BUILDER = {
    ".txt": "text",
    ".text": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}
_TOKENIZE_BATCH = 512
_MAX_LISTED = 5  # offending example ids listed in an error message


@dataclass(frozen=True)
class LMDataOptions:
    """Options for turning local files into causal-LM examples (a config maps onto these).

    Attributes:
        data_format: ``text`` (packed), ``prompt_completion`` or ``chat``.
        max_length: Longest example in tokens, at most the model context (checked by
            ``distil.models.lm.check_fits_context``); the block size for packed text.
        overlength: ``error`` (default) or ``truncate`` for examples over ``max_length``.
        drop_unsupervised: Drop examples left with no supervised token (logged) instead of
            raising. A whole dataset with none is always an error.
        text_field: Column with raw text (``text`` format).
        prompt_field: Column with the prompt (``prompt_completion`` format).
        completion_field: Column with the completion (``prompt_completion`` format).
        messages_field: Column with the chat messages (``chat`` format).
        example_id_field: Column with caller-given integer ids; row numbers when absent.
        stored_token_ids: ``prompt_completion`` only: take a row's ids from its ``prompt_ids``
            and ``completion_ids`` columns where they hold a list, instead of tokenizing its
            text. Set it only when those ids come from this very tokenizer
            (:func:`token_id_source`).
    """

    data_format: LMDataFormat
    max_length: int
    overlength: OverlengthPolicy = OverlengthPolicy.ERROR
    drop_unsupervised: bool = False
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    example_id_field: str = "example_id"
    stored_token_ids: bool = False


def load_local_records(
    paths: Path | str | Sequence[Path | str], *, cache_dir: Path | None = None
) -> datasets.Dataset:
    """Load local text, JSONL or Parquet files as one ``datasets.Dataset`` (no network).

    Args:
        paths: Files, or folders whose supported files are taken in sorted order. All files
            must have the same kind: ``.txt``/``.text`` (one document per file, column
            ``text``), ``.jsonl``/``.json`` (one record per line) or ``.parquet``.
        cache_dir: ``datasets`` cache folder; its default cache when ``None``.

    Returns:
        The records in file order, then row order.

    Raises:
        DistilError: If a path is missing, a suffix is unsupported or the kinds are mixed.
    """
    import datasets

    files = _expand_data_paths(paths)
    builders = {_SUFFIX_TO_BUILDER.get(path.suffix) for path in files}
    if None in builders:
        unsupported = sorted(
            {path.suffix for path in files if path.suffix not in _SUFFIX_TO_BUILDER}
        )
        raise DistilError(
            f"unsupported data file type(s) {unsupported}; use one of {sorted(_SUFFIX_TO_BUILDER)}"
        )
    if len(builders) != 1:
        raise DistilError(
            f"data files mix kinds {sorted(str(b) for b in builders)}; give files of one kind"
        )
    builder = str(builders.pop())
    extra: dict[str, Any] = {"sample_by": "document"} if builder == "text" else {}
    return datasets.load_dataset(
        builder,
        data_files=[str(path) for path in files],
        split="train",
        cache_dir=None if cache_dir is None else str(cache_dir),
        **extra,
    )


def _expand_data_paths(paths: Path | str | Sequence[Path | str]) -> list[Path]:
    """Files named by ``paths``; a folder contributes its supported files in sorted order, and a
    ``distil generate`` output folder its shards (checked against its manifest)."""
    given = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
    files: list[Path] = []
    for path in given:
        shards = generated_shard_files(path) if path.is_dir() else None
        if shards is not None:
            files.extend(shards)
        elif path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix in _SUFFIX_TO_BUILDER
            )
            if not found:
                raise DistilError(f"data folder {path} has no {sorted(_SUFFIX_TO_BUILDER)} files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DistilError(f"data path {path} does not exist")
    if not files:
        raise DistilError("no data files given")
    return files


def build_lm_dataset(
    records: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, options: LMDataOptions
) -> datasets.Dataset:
    """Tokenize and mask ``records`` according to ``options.data_format``.

    Args:
        records: Source records, e.g. from ``load_local_records``.
        tokenizer: A fast Hugging Face tokenizer (offsets are needed for chat masking).
        options: Format, length and column options.

    Returns:
        A dataset with columns ``example_id``, ``input_ids`` and ``labels`` (labels aligned
        with input ids, ``IGNORE_INDEX`` where not supervised).

    Raises:
        DistilError: On missing columns, over-long examples (unless truncating), examples or a
            dataset with no supervised token, or a chat dataset without a chat template.
    """
    builder = _FORMAT_BUILDERS[LMDataFormat(options.data_format)]
    return builder(records, tokenizer, options)


def tokenize_packed_text(
    records: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, options: LMDataOptions
) -> datasets.Dataset:
    """Pack raw documents into blocks of ``options.max_length`` tokens, EOS after each document.

    The stream is ``[bos] doc_0 eos [bos] doc_1 eos ...`` (BOS only when the tokenizer has one
    that differs from EOS). The final partial block is dropped (logged). Block ``i`` has
    ``example_id == i``. Attention is not blocked across documents inside a block.
    """
    _require_columns(records, [options.text_field])
    block_size = _positive_length(options.max_length)
    eos_id = _eos_token_id(tokenizer)
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id not in (None, eos_id) else None
    stream: list[int] = []
    with phase_progress(
        f"tokenizing {len(records):,} documents", len(records), unit="docs"
    ) as done:
        for texts in _column_batches(records, options.text_field):
            # verbose=False: documents longer than the model are expected here (packing cuts
            # them into blocks), so transformers' "indexing errors" warning would be wrong
            encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
            for ids in encoded:
                if bos_id is not None:
                    stream.append(bos_id)
                stream.extend(ids)
                stream.append(eos_id)
            done(len(texts))
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise DistilError(
            f"the text data has {len(stream)} tokens, fewer than one block of max_length={block_size}; "
            "add text or lower max_length"
        )
    dropped = len(stream) - n_blocks * block_size
    logger.info(
        "packed %d documents into %d blocks of %d tokens (EOS between documents); dropped the last %d tokens",
        len(records),
        n_blocks,
        block_size,
        dropped,
    )
    blocks = [stream[i * block_size : (i + 1) * block_size] for i in range(n_blocks)]
    return _examples_dataset(list(range(n_blocks)), blocks, blocks)


def tokenize_prompt_completion(
    records: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, options: LMDataOptions
) -> datasets.Dataset:
    """Tokenize prompt/completion pairs: prompt masked, completion plus EOS supervised.

    Prompt and completion are tokenized separately (prompt with the tokenizer's special tokens,
    e.g. BOS; completion without), which is how the model sees them at generation time. EOS is
    appended unless the completion already ends with it. With ``options.stored_token_ids``, a
    row's ``prompt_ids``/``completion_ids`` (the ids a ``distil generate`` teacher was given and
    wrote) replace the tokenized prompt/completion where present; masking, EOS and the length
    policy are the same for both.
    """
    _require_columns(records, [options.prompt_field, options.completion_field])
    eos_id = _eos_token_id(tokenizer)
    example_ids = _example_ids(records, options.example_id_field)
    stored_prompts = _stored_ids(records, PROMPT_IDS, options.stored_token_ids)
    stored_completions = _stored_ids(records, COMPLETION_IDS, options.stored_token_ids)
    input_ids: list[list[int]] = []
    labels: list[list[int]] = []
    row = 0
    progress = phase_progress(f"tokenizing {len(records):,} examples", len(records), unit="ex")
    with progress as done:
        for prompts, completions in zip(
            _column_batches(records, options.prompt_field),
            _column_batches(records, options.completion_field),
            strict=True,
        ):
            rows = slice(row, row + len(prompts))
            prompt_ids = _ids_or_encode(tokenizer, prompts, stored_prompts[rows], special=True)
            completion_ids = _ids_or_encode(
                tokenizer, completions, stored_completions[rows], special=False
            )
            for prompt, completion in zip(prompt_ids, completion_ids, strict=True):
                completion = list(completion)
                if not completion or completion[-1] != eos_id:
                    completion.append(eos_id)
                input_ids.append(list(prompt) + completion)
                labels.append([IGNORE_INDEX] * len(prompt) + completion)
            row += len(prompts)
            done(len(prompts))
    if options.stored_token_ids:
        used = sum(ids is not None for ids in stored_completions)
        logger.info(
            "prompt/completion: %d of %d examples take the teacher's stored token ids, "
            "%d are tokenized from their text (no stored ids)",
            used,
            len(records),
            len(records) - used,
        )
    return _finish_examples(example_ids, input_ids, labels, options, source="prompt/completion")


def _stored_ids(records: datasets.Dataset, column: str, wanted: bool) -> list[list[int] | None]:
    """Each row's stored ids from ``column`` (``None`` where it has none, or when not wanted)."""
    if not wanted or column not in records.column_names:
        return [None] * len(records)
    values: list[list[int] | None] = list(records[column])
    for index, ids in enumerate(values):
        if ids is not None and not all(isinstance(t, int) and t >= 0 for t in ids):
            raise DistilError(
                f"row {index}: column {column!r} must hold a list of token ids (integers >= 0)"
            )
    return values


def _ids_or_encode(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    stored: list[list[int] | None],
    *,
    special: bool,
) -> list[list[int]]:
    """``stored[i]`` where given, else ``texts[i]`` tokenized (one tokenizer call for those)."""
    missing = [i for i, ids in enumerate(stored) if ids is None]
    # verbose=False: over-long examples are handled by options.overlength
    encoded = (
        tokenizer([texts[i] for i in missing], add_special_tokens=special, verbose=False)[
            "input_ids"
        ]
        if missing
        else []
    )
    out: list[list[int]] = [list(ids) if ids is not None else [] for ids in stored]
    for i, ids in zip(missing, encoded, strict=True):
        out[i] = list(ids)
    return out


@dataclass(frozen=True)
class TokenIdSource:
    """Where a prompt/completion split's token ids come from.

    Attributes:
        stored: Use the teacher's ids stored in the records (same tokenizer), not the text.
        note: What was chosen and why, for the log and the mode line; empty when no data path
            is a ``distil generate`` folder (there is no choice to report then).
    """

    stored: bool
    note: str


def token_id_source(
    paths: Sequence[Path | str], tokenizer: PreTrainedTokenizerBase
) -> TokenIdSource:
    """Decide whether the ``distil generate`` folders among ``paths`` give their token ids.

    Re-tokenising a teacher's decoded text can merge its tokens into others (16 ``.`` tokens
    come back as 8 ``..``), so the ids it wrote are used whenever they are valid for
    ``tokenizer``: only if every generated folder stores ids, made by a tokenizer with this
    tokenizer's fingerprint. Otherwise all text is re-tokenised and the note names the folder
    that forced it.
    """
    found = [
        stored
        for path in paths
        if Path(path).is_dir() and (stored := generated_token_ids(Path(path))) is not None
    ]
    if not found:
        return TokenIdSource(False, "")
    text_only = [g for g in found if COMPLETION_IDS not in g.fields]
    if text_only:
        return TokenIdSource(
            False,
            f"text re-tokenised: {text_only[0].folder} stores no token ids (made by an endpoint, "
            "or before `distil generate` stored them)",
        )
    mine = tokenizer_fingerprint(tokenizer)
    other = [g for g in found if g.tokenizer_fingerprint != mine]
    if other:
        theirs = other[0].tokenizer_fingerprint or "none"
        return TokenIdSource(
            False,
            f"text re-tokenised: the token ids in {other[0].folder} come from another tokenizer "
            f"(fingerprint {theirs[:12]}…, this run's {mine[:12]}…)",
        )
    return TokenIdSource(True, "the teacher's stored token ids (same tokenizer fingerprint)")


def tokenize_chat(
    records: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, options: LMDataOptions
) -> datasets.Dataset:
    """Render chats with the tokenizer's chat template; supervise only assistant turns.

    Works with any chat template whose rendering of a conversation extends the rendering of its
    prefixes: for each assistant turn ``i``, the supervised characters are those between
    ``render(messages[:i], add_generation_prompt=True)`` and ``render(messages[:i + 1])``, i.e.
    the reply and the template's end-of-turn text (so the model learns to stop). A token is
    supervised when its character span overlaps an assistant span (token offsets from the
    fast tokenizer).

    Raises:
        DistilError: If the tokenizer has no chat template or is not a fast tokenizer, a
            message lacks ``role``/``content``, or the template is not prefix-consistent.
    """
    _require_columns(records, [options.messages_field])
    if not getattr(tokenizer, "chat_template", None):
        raise DistilError(
            f"chat data (column {options.messages_field!r}) needs a tokenizer with a chat template, and "
            f"{getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} has none; set "
            "tokenizer.chat_template (distil.data.corpus.DEFAULT_CHAT_TEMPLATE is a simple one) and save "
            "the tokenizer, or convert the data to prompt/completion format"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise DistilError(
            "chat masking needs a fast tokenizer (token offsets); load it with use_fast=True"
        )
    example_ids = _example_ids(records, options.example_id_field)
    input_ids: list[list[int]] = []
    labels: list[list[int]] = []
    progress = phase_progress(f"tokenizing {len(records):,} chats", len(records), unit="chats")
    with progress as done:
        for example_id, messages in zip(example_ids, records[options.messages_field], strict=True):
            text, spans = _render_with_assistant_spans(tokenizer, messages, example_id)
            # verbose=False: over-long chats are handled by options.overlength
            encoded = tokenizer(
                text, add_special_tokens=False, return_offsets_mapping=True, verbose=False
            )
            ids = list(encoded["input_ids"])
            supervised = [
                any(start < span_end and end > span_start for span_start, span_end in spans)
                for start, end in encoded["offset_mapping"]
            ]
            input_ids.append(ids)
            labels.append(
                [
                    token if keep else IGNORE_INDEX
                    for token, keep in zip(ids, supervised, strict=True)
                ]
            )
            done(1)
    return _finish_examples(example_ids, input_ids, labels, options, source="chat")


def _render_with_assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, Any]], example_id: int
) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and return the character spans of its assistant turns."""
    for message in messages:
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise DistilError(
                f"example {example_id}: every chat message needs 'role' and 'content', got {message!r}"
            )
    conversation = [dict(message) for message in messages]

    def render(turns: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        if not turns and not add_generation_prompt:
            return ""
        rendered = tokenizer.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return str(rendered)

    full_text = render(conversation, False)
    spans: list[tuple[int, int]] = []
    for index, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        before = render(conversation[:index], True)
        through = render(conversation[: index + 1], False)
        if not (through.startswith(before) and full_text.startswith(through)):
            raise DistilError(
                f"example {example_id}: the chat template does not render a conversation as an extension of "
                "its prefixes (needed to find assistant turns); use a template without history-dependent "
                "rewriting, or convert the data to prompt/completion format"
            )
        spans.append((len(before), len(through)))
    return full_text, spans


def _finish_examples(
    example_ids: list[int],
    input_ids: list[list[int]],
    labels: list[list[int]],
    options: LMDataOptions,
    *,
    source: str,
) -> datasets.Dataset:
    """Apply the length policy and the supervision checks, then build the dataset."""
    max_length = _positive_length(options.max_length)
    too_long = [i for i, ids in enumerate(input_ids) if len(ids) > max_length]
    if too_long and OverlengthPolicy(options.overlength) is OverlengthPolicy.ERROR:
        listed = ", ".join(
            f"{example_ids[i]} ({len(input_ids[i])} tokens)" for i in too_long[:_MAX_LISTED]
        )
        raise DistilError(
            f"{len(too_long)} {source} example(s) are longer than max_length={max_length} tokens (the model "
            f"context or less): example_id {listed}; shorten or filter them, raise max_length up to the model "
            "context, or set overlength='truncate' to keep the first max_length tokens"
        )
    if too_long:
        logger.warning(
            "truncated %d of %d %s examples to max_length=%d tokens (overlength='truncate')",
            len(too_long),
            len(input_ids),
            source,
            max_length,
        )
        input_ids = [ids[:max_length] for ids in input_ids]
        labels = [row[:max_length] for row in labels]

    # Position 0 is never a target (nothing precedes it), so count supervision after the shift.
    unsupervised = [
        i for i, row in enumerate(labels) if all(label == IGNORE_INDEX for label in row[1:])
    ]
    if len(unsupervised) == len(labels):
        raise DistilError(
            f"none of the {len(labels)} {source} examples has a supervised token, so the loss would be "
            "exactly zero; check the columns (empty completions? no assistant turns?) and the truncation"
        )
    if unsupervised and not options.drop_unsupervised:
        listed = ", ".join(str(example_ids[i]) for i in unsupervised[:_MAX_LISTED])
        raise DistilError(
            f"{len(unsupervised)} {source} example(s) have no supervised token (example_id {listed}); "
            "fix or remove them, or set drop_unsupervised=True to drop them"
        )
    if unsupervised:
        logger.warning(
            "dropped %d of %d %s examples with no supervised token (drop_unsupervised=True)",
            len(unsupervised),
            len(labels),
            source,
        )
        keep = sorted(set(range(len(labels))) - set(unsupervised))
        example_ids = [example_ids[i] for i in keep]
        input_ids = [input_ids[i] for i in keep]
        labels = [labels[i] for i in keep]
    return _examples_dataset(example_ids, input_ids, labels)


def _examples_dataset(
    example_ids: list[int], input_ids: list[list[int]], labels: list[list[int]]
) -> datasets.Dataset:
    import datasets

    features = datasets.Features(
        {
            "example_id": datasets.Value("int64"),
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "labels": datasets.Sequence(datasets.Value("int32")),
        }
    )
    return datasets.Dataset.from_dict(
        {"example_id": example_ids, "input_ids": input_ids, "labels": labels}, features=features
    )


def _require_columns(records: datasets.Dataset, columns: Sequence[str]) -> None:
    missing = [column for column in columns if column not in records.column_names]
    if missing:
        raise DistilError(
            f"data records lack column(s) {missing}; they have {records.column_names} "
            "(set the *_field options to the right column names)"
        )


def _column_batches(records: datasets.Dataset, column: str) -> Iterator[list[str]]:
    for start in range(0, len(records), _TOKENIZE_BATCH):
        values = records[start : start + _TOKENIZE_BATCH][column]
        for offset, value in enumerate(values):
            if not isinstance(value, str):
                raise DistilError(
                    f"row {start + offset}: column {column!r} must be a string, got {type(value).__name__}"
                )
        yield values


def _example_ids(records: datasets.Dataset, id_field: str) -> list[int]:
    """The caller's integer ids when the column exists (checked unique), else row numbers."""
    if id_field not in records.column_names:
        return list(range(len(records)))
    ids = records[id_field]
    if not all(isinstance(value, int) and not isinstance(value, bool) for value in ids):
        raise DistilError(f"column {id_field!r} must hold integers to be used as example ids")
    if len(set(ids)) != len(ids):
        raise DistilError(f"column {id_field!r} has duplicate ids; example ids must be unique")
    return [int(value) for value in ids]


def _eos_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DistilError(
            "the tokenizer has no eos_token; set one (e.g. tokenizer.eos_token = '<|endoftext|>')"
        )
    return int(eos_id)


def _positive_length(max_length: int) -> int:
    if max_length < 2:
        raise DistilError(f"max_length must be at least 2 tokens, got {max_length}")
    return max_length


def pad_token_id_for(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id used to fill padded positions: the pad token, else EOS (logged).

    The value only has to be a valid embedding index: padded positions are masked by position
    (``attention_mask`` 0 and label ``IGNORE_INDEX``), so padding with EOS masks no real EOS.
    """
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    eos_id = _eos_token_id(tokenizer)
    logger.info(
        "tokenizer has no pad token; padding with the EOS id %d (padding is masked by position)",
        eos_id,
    )
    return eos_id


def collate_lm_batch(
    examples: Sequence[Mapping[str, Any]],
    *,
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad examples into a batch; refuse a batch with no supervised target.

    Args:
        examples: Rows with ``example_id``, ``input_ids`` and ``labels`` (same length).
        pad_token_id: Id written into padded ``input_ids`` (see ``pad_token_id_for``).
        pad_to_multiple_of: Round the padded length up to a multiple of this.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels`` of shape ``[B, T]`` and ``example_id``
        of shape ``[B]``, all int64. Pass the model only ``input_ids`` and ``attention_mask``.

    Raises:
        DistilError: If the batch is empty, an example is malformed, or no position of the
            batch has a next-token target (the loss would silently be zero).
    """
    if not examples:
        raise DistilError("cannot collate an empty batch")
    for example in examples:
        missing = [column for column in EXAMPLE_COLUMNS if column not in example]
        if missing:
            raise DistilError(
                f"an example lacks {missing}; build examples with distil.data.lm.build_lm_dataset"
            )
        if len(example["input_ids"]) != len(example["labels"]):
            raise DistilError(
                f"example {example['example_id']}: input_ids and labels differ in length"
            )
    length = max(len(example["input_ids"]) for example in examples)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    batch_size = len(examples)
    input_ids = torch.full((batch_size, length), pad_token_id, dtype=torch.int64)  # [B, T]
    labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.int64)  # [B, T]
    attention_mask = torch.zeros((batch_size, length), dtype=torch.int64)  # [B, T]
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.as_tensor(example["input_ids"], dtype=torch.int64)
        labels[row, :n] = torch.as_tensor(example["labels"], dtype=torch.int64)
        attention_mask[row, :n] = 1
    example_ids = torch.as_tensor(
        [int(example["example_id"]) for example in examples], dtype=torch.int64
    )  # [B]
    if not bool((labels[:, 1:] != IGNORE_INDEX).any()):
        raise DistilError(
            f"batch of example_id {example_ids.tolist()} has no supervised token, so its loss would be "
            "exactly zero; the data has prompt-only or fully masked examples"
        )
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "example_id": example_ids,
    }


def shift_for_next_token(labels: torch.Tensor) -> torch.Tensor:
    """Turn input-aligned labels into next-token targets aligned with the logits.

    This is the only place distil shifts. ``labels[..., t]`` is token ``t`` (or
    ``IGNORE_INDEX``); the result ``next_token_targets[..., t] == labels[..., t + 1]`` is the
    token that ``logits[..., t, :]`` predicts, and the last position gets ``IGNORE_INDEX``. The
    shape is kept, so student logits, teacher logits and targets line up without slicing the
    ``[B, T, V]`` logits; the supervised mask is ``next_token_targets != IGNORE_INDEX``.

    Args:
        labels: ``[..., T]`` integer labels aligned with ``input_ids``.

    Returns:
        ``[..., T]`` next-token targets, a new tensor.
    """
    next_token_targets = torch.full_like(labels, IGNORE_INDEX)  # [..., T]
    next_token_targets[..., :-1] = labels[..., 1:]
    return next_token_targets


_FORMAT_BUILDERS: dict[
    LMDataFormat,
    Callable[[datasets.Dataset, PreTrainedTokenizerBase, LMDataOptions], datasets.Dataset],
] = {
    LMDataFormat.TEXT: tokenize_packed_text,
    LMDataFormat.PROMPT_COMPLETION: tokenize_prompt_completion,
    LMDataFormat.CHAT: tokenize_chat,
}


def options_from(section: LMDataSection) -> LMDataOptions:
    """The loading options a data section sets."""
    return LMDataOptions(
        data_format=section.format,
        max_length=section.max_length,
        overlength=section.overlength,
        drop_unsupervised=section.drop_unsupervised,
        text_field=section.text_field,
        prompt_field=section.prompt_field,
        completion_field=section.completion_field,
        messages_field=section.messages_field,
    )


@dataclass
class LMData:
    """Tokenized, masked splits plus what the loop needs from them."""

    train: datasets.Dataset
    eval: datasets.Dataset
    targets_per_example: np.ndarray  # supervised next-token targets of each training example
    pad_token_id: int
    token_ids: str = ""  # where prompt/completion ids came from (``TokenIdSource.note``)

    def collate(self, split: datasets.Dataset, indices: list[int]) -> dict[str, torch.Tensor]:
        """Collate the examples at ``indices`` (int64 tensors, right-padded)."""
        cols = split[indices]
        rows = [
            {"example_id": e, "input_ids": i, "labels": lab}
            for e, i, lab in zip(cols["example_id"], cols["input_ids"], cols["labels"], strict=True)
        ]
        return collate_lm_batch(rows, pad_token_id=self.pad_token_id)

    def eval_batches(self, batch_size: int) -> list[dict[str, torch.Tensor]]:
        n = len(self.eval)
        return [
            self.collate(self.eval, list(range(i, min(i + batch_size, n))))
            for i in range(0, n, batch_size)
        ]


def data_files(
    section: LMDataSection, work_dir: Path, accelerator: Any
) -> tuple[list[str], list[str] | None]:
    """The train and held-out files; the built-in corpus is written into ``work_dir`` first."""
    if section.builtin is None:
        files: FileData = section.source  # type: ignore[assignment]
        return files.train, files.eval
    corpus_dir = work_dir / "stdlib-corpus"
    if (
        accelerator.is_main_process
    ):  # deterministic, a second or two; one writer, then everyone reads
        build_stdlib_corpus(corpus_dir, max_total_bytes=section.corpus_max_bytes, test_fraction=0.0)
    accelerator.wait_for_everyone()
    return [str(corpus_dir / "train.jsonl")], [str(corpus_dir / "validation.jsonl")]


def load_lm_data(
    section: LMDataSection, tokenizer: PreTrainedTokenizerBase, work_dir: Path, accelerator: Any
) -> LMData:
    """Load, tokenize and mask the data (every process does the same, deterministically).

    Raises:
        DistilError: From ``distil.data.lm`` on bad data, or if a split ends up empty.
    """
    train_files, eval_files = data_files(section, work_dir, accelerator)
    options = options_from(section)
    ids = TokenIdSource(False, "")
    if LMDataFormat(options.data_format) is LMDataFormat.PROMPT_COMPLETION:
        ids = token_id_source([*train_files, *(eval_files or [])], tokenizer)
        options = dataclasses.replace(options, stored_token_ids=ids.stored)
        if ids.note:
            logger.info("data: token ids: %s", ids.note)
    train = build_lm_dataset(load_local_records(train_files), tokenizer, options)
    if eval_files is not None:
        held_out = build_lm_dataset(load_local_records(eval_files), tokenizer, options)
    else:
        n_eval = max(1, round(len(train) * section.eval_fraction))
        if len(train) - n_eval < 1:
            raise DistilError(
                f"{len(train)} example(s) cannot be split into train and held-out; add data or set data.eval_files"
            )
        held_out = train.select(range(len(train) - n_eval, len(train)))
        train = train.select(range(len(train) - n_eval))
    if section.train_limit is not None:
        train = train.select(range(min(section.train_limit, len(train))))
    if section.eval_limit is not None:
        held_out = held_out.select(range(min(section.eval_limit, len(held_out))))
    counts = [
        sum(1 for t in row[1:] if t != IGNORE_INDEX)
        for batch in train.iter(batch_size=1024)
        for row in batch["labels"]
    ]
    logger.info(
        "data: %d training and %d held-out examples of up to %d tokens",
        len(train),
        len(held_out),
        section.max_length,
    )
    _release_freed_memory()
    return LMData(
        train,
        held_out,
        np.asarray(counts, dtype=np.int64),
        pad_token_id_for(tokenizer),
        token_ids=ids.note,
    )


def _release_freed_memory() -> None:
    """Give the heap freed by tokenization back to the OS (glibc keeps it otherwise).

    Packing builds Python lists of every token of the corpus; after they are freed the process
    still holds the pages (measured: 807 MB resident after loading the built-in corpus, 512 MB
    after ``malloc_trim``), which would count against the training run's memory.
    """
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
