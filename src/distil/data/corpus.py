"""The built-in language-modelling corpus (CPython standard library source) and its BPE tokenizer.

The corpus is the ``.py`` source of the standard library of the interpreter that runs distil
(no download, PSF licence). ``build_stdlib_corpus`` lists the files in a fixed order, splits them
by file into train / validation / test with a seeded hash order, and writes one JSONL file per
split (``{"example_id", "path", "text"}`` per line) plus a ``corpus.json`` manifest.
``train_bpe_tokenizer`` trains a byte-level BPE tokenizer with the ``tokenizers`` library and
saves it as a ``transformers`` tokenizer folder (``AutoTokenizer.from_pretrained(folder)`` works)
with ``<|endoftext|>`` as EOS, an explicit pad-token policy and a small chat template.

Both are deterministic: the same interpreter, options and seed give byte-identical JSONL files and
a byte-identical ``tokenizer.json``. The corpus size depends on the interpreter build (CPython
3.11.7 without test directories: 734 files, about 12 MB), so the manifest records the Python
version and a content hash.

The file filters and the ordering are those of the peer benchmark
(``bench/peers/common.py``: no ``site-packages``/``dist-packages``/``__pycache__``, and no
``test``/``tests``/``idle_test`` directories unless ``include_tests``), and the tokenizer uses the
same trainer settings (byte-level alphabet, ``min_frequency=2``), so a model trained here reads
the same kind of token stream.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from distil.errors import DistilError
from distil.progress import is_main_process, phase_progress

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
DEDICATED_PAD_TOKEN = "<|pad|>"
CHAT_ROLES = ("system", "user", "assistant")
CHAT_ROLE_TOKENS = tuple(f"<|{role}|>" for role in CHAT_ROLES)

# One turn is "<|role|>\n{content}<|endoftext|>"; the generation prompt is "<|assistant|>\n".
# Assistant content sits inside {% generation %} so that transformers'
# `return_assistant_tokens_mask=True` works too; distil's own chat masking does not need it
# (see distil.data.lm.tokenize_chat). The newline follows a `}}` tag on purpose: transformers
# renders templates with trim_blocks=True, which would eat a newline after a `%}` tag.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('this chat template knows the roles system, user and assistant, not '"
    " + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' }}\n"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|endoftext|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] + '<|endoftext|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}\n{% endif %}"
)

SPLIT_NAMES = ("train", "validation", "test")
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
_MANIFEST_NAME = "corpus.json"
_MANIFEST_FORMAT_VERSION = 1


class PadTokenPolicy(str, Enum):
    """Which token pads batches.

    ``dedicated`` adds ``<|pad|>`` (unambiguous: a pad id never equals a real token).
    ``eos`` pads with ``<|endoftext|>`` like GPT-2; distil masks padding by position, never by
    token id, so EOS stays supervised either way.
    """

    DEDICATED = "dedicated"
    EOS = "eos"


@dataclass(frozen=True)
class CorpusSplit:
    """One split of a corpus written to disk."""

    name: str
    path: Path  # JSONL, one {"example_id", "path", "text"} object per line
    num_documents: int
    num_bytes: int  # UTF-8 bytes of the texts
    sha256: str  # of the JSONL file


@dataclass(frozen=True)
class CorpusInfo:
    """What ``build_stdlib_corpus`` wrote: the splits, their sizes and a content fingerprint."""

    out_dir: Path
    source_root: Path
    python_version: str
    splits: tuple[CorpusSplit, ...]
    fingerprint: str  # sha256 over the options and every split's sha256

    def split(self, name: str) -> CorpusSplit:
        """Return the split called ``name`` (``train``, ``validation`` or ``test``)."""
        for split in self.splits:
            if split.name == name:
                return split
        raise DistilError(f"corpus has no split {name!r}; it has {[s.name for s in self.splits]}")


def stdlib_root() -> Path:
    """The standard-library folder of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_stdlib_files(source_root: Path, *, include_tests: bool = False) -> list[Path]:
    """List the ``.py`` files under ``source_root`` in a fixed order.

    Args:
        source_root: The standard-library folder (or any source tree laid out like it).
        include_tests: Keep files under ``test``, ``tests`` and ``idle_test`` folders.

    Returns:
        Paths sorted by their POSIX path relative to ``source_root``; ``site-packages``,
        ``dist-packages`` and ``__pycache__`` are always left out.
    """
    skipped = _EXCLUDED_DIRS if include_tests else _EXCLUDED_DIRS | _TEST_DIRS
    files = [
        path
        for path in source_root.rglob("*.py")
        if path.is_file() and not (set(path.relative_to(source_root).parts[:-1]) & skipped)
    ]
    return sorted(files, key=lambda path: path.relative_to(source_root).as_posix())


def _hash_rank(relative_path: str, split_seed: int) -> str:
    """A seeded, platform-independent sort key: the file's place in the shuffled order."""
    return hashlib.sha256(f"{split_seed}\0{relative_path}".encode()).hexdigest()


def build_stdlib_corpus(
    out_dir: Path,
    *,
    source_root: Path | None = None,
    include_tests: bool = False,
    max_total_bytes: int | None = None,
    validation_fraction: float = 0.05,
    test_fraction: float = 0.05,
    split_seed: int = 0,
) -> CorpusInfo:
    """Write the standard-library corpus as train/validation/test JSONL files.

    Files are shuffled by a seeded hash of their relative path (the same on every platform and
    Python version). The size cap keeps files in that order while they fit, so a capped corpus
    is a uniform sample. The first ``round(n * validation_fraction)`` files of the shuffled
    order (at least one when the fraction is positive) go to validation, the next ones to test,
    the rest to train; each split is then written in sorted path order. Empty files are skipped.

    Args:
        out_dir: Folder to write ``train.jsonl``, ``validation.jsonl``, ``test.jsonl`` and
            ``corpus.json`` into (created if missing; existing files are replaced).
        source_root: Source tree to read; defaults to the running interpreter's stdlib.
        include_tests: Keep the standard library's test suites (about 2.6× more text).
        max_total_bytes: Cap on the source bytes kept over all splits; ``None`` keeps all.
        validation_fraction: Share of files held out for validation, in [0, 1).
        test_fraction: Share of files held out for test, in [0, 1).
        split_seed: Seed of the file shuffle that decides splits and the size cap.

    Returns:
        A ``CorpusInfo`` naming the written files, their sizes and a content fingerprint.

    Raises:
        DistilError: If the source folder has no usable file, the fractions leave no training
            file, or the cap keeps fewer files than the splits need.
    """
    root = stdlib_root() if source_root is None else Path(source_root)
    if not root.is_dir():
        raise DistilError(f"corpus source folder {root} does not exist")
    if not (0 <= validation_fraction < 1 and 0 <= test_fraction < 1):
        raise DistilError(
            f"validation_fraction={validation_fraction} and test_fraction={test_fraction} must be in [0, 1)"
        )
    if validation_fraction + test_fraction >= 1:
        raise DistilError("validation_fraction + test_fraction must leave files for training (< 1)")
    if max_total_bytes is not None and max_total_bytes <= 0:
        raise DistilError(f"max_total_bytes must be positive, got {max_total_bytes}")

    files = [
        path
        for path in list_stdlib_files(root, include_tests=include_tests)
        if path.stat().st_size > 0
    ]
    relative = {path: path.relative_to(root).as_posix() for path in files}
    shuffled = sorted(files, key=lambda path: _hash_rank(relative[path], split_seed))
    if max_total_bytes is not None:
        kept, used = [], 0
        for path in shuffled:
            size = path.stat().st_size
            if used + size <= max_total_bytes:
                kept.append(path)
                used += size
        shuffled = kept

    n_files = len(shuffled)
    n_validation = _held_out_count(n_files, validation_fraction)
    n_test = _held_out_count(n_files, test_fraction)
    if n_files - n_validation - n_test < 1:
        raise DistilError(
            f"corpus from {root} keeps {n_files} file(s) (max_total_bytes={max_total_bytes}), too few for "
            f"{n_validation} validation + {n_test} test + at least 1 training file; raise max_total_bytes"
        )
    assignment = {
        "validation": shuffled[:n_validation],
        "test": shuffled[n_validation : n_validation + n_test],
        "train": shuffled[n_validation + n_test :],
    }

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits: list[CorpusSplit] = []
    manifest_files: dict[str, list[str]] = {}
    for name in SPLIT_NAMES:
        ordered = sorted(assignment[name], key=lambda path: relative[path])
        split, names = _write_split(name, ordered, relative, out_dir / f"{name}.jsonl")
        splits.append(split)
        manifest_files[name] = names

    options = {
        "include_tests": include_tests,
        "max_total_bytes": max_total_bytes,
        "validation_fraction": validation_fraction,
        "test_fraction": test_fraction,
        "split_seed": split_seed,
    }
    fingerprint = hashlib.sha256(
        json.dumps(
            {"options": options, "splits": {s.name: s.sha256 for s in splits}}, sort_keys=True
        ).encode()
    ).hexdigest()
    python_version = sys.version.split()[0]
    manifest = {
        "format_version": _MANIFEST_FORMAT_VERSION,
        "source": "cpython-stdlib",
        "python_version": python_version,
        "options": options,
        "fingerprint": fingerprint,
        "splits": {
            s.name: {"documents": s.num_documents, "bytes": s.num_bytes, "sha256": s.sha256}
            for s in splits
        },
        "files": manifest_files,
    }
    (out_dir / _MANIFEST_NAME).write_text(
        json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8"
    )
    logger.info(
        "stdlib corpus from %s (Python %s): %s",
        root,
        python_version,
        ", ".join(f"{s.name} {s.num_documents} files / {s.num_bytes / 1e6:.2f} MB" for s in splits),
    )
    return CorpusInfo(
        out_dir=out_dir,
        source_root=root,
        python_version=python_version,
        splits=tuple(splits),
        fingerprint=fingerprint,
    )


def _held_out_count(n_files: int, fraction: float) -> int:
    """Files to hold out: ``round(n * fraction)``, at least one when the fraction is positive."""
    return 0 if fraction == 0 else max(1, round(n_files * fraction))


def _write_split(
    name: str, files: Sequence[Path], relative: dict[Path, str], out_path: Path
) -> tuple[CorpusSplit, list[str]]:
    """Write one split as JSONL; return its description and the relative paths written."""
    digest = hashlib.sha256()
    n_bytes = 0
    names: list[str] = []
    with out_path.open("wb") as handle:
        for example_id, path in enumerate(files):
            # errors="replace": a stray non-UTF-8 byte must not stop the build; universal newlines
            # turn \r\n into \n so the corpus is the same on every platform.
            text = path.read_text(encoding="utf-8", errors="replace")
            record = {"example_id": example_id, "path": relative[path], "text": text}
            line = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
            handle.write(line)
            digest.update(line)
            n_bytes += len(text.encode("utf-8"))
            names.append(relative[path])
    return CorpusSplit(name, out_path, len(files), n_bytes, digest.hexdigest()), names


def read_corpus_texts(paths: Sequence[Path], *, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of text files, one per file, or of JSONL files, one per line.

    Args:
        paths: ``.jsonl`` files (each line an object with ``text_field``) or plain text files
            (each file is one document).
        text_field: The JSONL key holding the text.

    Yields:
        Document texts, in the order of ``paths`` and of lines within a file.

    Raises:
        DistilError: If a file is missing or a JSONL line has no ``text_field`` string.
    """
    for path in map(Path, paths):
        if not path.is_file():
            raise DistilError(f"corpus file {path} does not exist")
        if path.suffix != ".jsonl":
            yield path.read_text(encoding="utf-8", errors="replace")
            continue
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                record = json.loads(line)
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise DistilError(
                        f"{path}:{line_number}: no string field {text_field!r} in this JSONL line"
                    )
                yield text


def train_bpe_tokenizer(
    files: Sequence[Path],
    out_dir: Path,
    vocab_size: int,
    *,
    min_frequency: int = 2,
    pad_policy: PadTokenPolicy = PadTokenPolicy.DEDICATED,
    chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
    model_max_length: int | None = None,
    text_field: str = "text",
) -> Path:
    """Train a byte-level BPE tokenizer on corpus files and save it as a transformers folder.

    Args:
        files: Training documents: corpus JSONL files (e.g. ``info.split("train").path``) or
            plain text files; see ``read_corpus_texts``.
        out_dir: Folder for ``tokenizer.json``, ``tokenizer_config.json`` and the chat template.
        vocab_size: Total vocabulary size, special tokens included (e.g. 8192).
        min_frequency: A pair must occur this often to be merged.
        pad_policy: ``dedicated`` adds ``<|pad|>``; ``eos`` pads with ``<|endoftext|>``.
        chat_template: Jinja chat template stored with the tokenizer; ``None`` stores none.
            The default adds ``<|system|>``, ``<|user|>`` and ``<|assistant|>`` special tokens.
        model_max_length: Context length recorded in the tokenizer config, if known.
        text_field: The JSONL key holding the text.

    Returns:
        ``out_dir``, loadable with ``AutoTokenizer.from_pretrained(out_dir)``.

    Raises:
        DistilError: If ``vocab_size`` cannot hold the byte alphabet and special tokens, or the
            files hold no text.
    """
    texts = list(read_corpus_texts(files, text_field=text_field))
    return train_bpe_tokenizer_from_texts(
        texts,
        out_dir,
        vocab_size,
        min_frequency=min_frequency,
        pad_policy=pad_policy,
        chat_template=chat_template,
        model_max_length=model_max_length,
    )


def train_bpe_tokenizer_from_texts(
    texts: Iterable[str],
    out_dir: Path,
    vocab_size: int,
    *,
    min_frequency: int = 2,
    pad_policy: PadTokenPolicy = PadTokenPolicy.DEDICATED,
    chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
    model_max_length: int | None = None,
) -> Path:
    """Train a byte-level BPE tokenizer on in-memory documents; see ``train_bpe_tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    pad_policy = PadTokenPolicy(pad_policy)
    special_tokens = _special_tokens(pad_policy, chat_template)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special_tokens):
        raise DistilError(
            f"vocab_size={vocab_size} cannot hold the {len(alphabet)}-symbol byte alphabet plus "
            f"{len(special_tokens)} special tokens; use at least {len(alphabet) + len(special_tokens)}"
        )
    documents = [text for text in texts if text]
    if not documents:
        raise DistilError("no text to train the tokenizer on")

    # Special tokens first, so their ids are small and fixed: <|endoftext|> is 0, <|pad|> is 1.
    # The byte alphabet is sorted before it is added, so ids do not depend on hash order.
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=sorted(alphabet),
        # tokenizers' own bars (counting pairs, computing merges) in a terminal
        show_progress=sys.stderr.isatty() and is_main_process(),
    )
    description = f"training a {vocab_size}-id BPE tokenizer on {len(documents):,} documents"
    with phase_progress(description, len(documents), unit="docs") as done:

        def feed() -> Iterator[str]:
            for document in documents:
                yield document
                done(1)

        backend.train_from_iterator(feed(), trainer, length=len(documents))

    _save_tokenizer(backend, out_dir, pad_policy, chat_template, model_max_length)
    logger.info(
        "trained byte-level BPE tokenizer: %d tokens (asked %d) on %d documents, pad policy %s, chat template %s -> %s",
        backend.get_vocab_size(),
        vocab_size,
        len(documents),
        pad_policy.value,
        _template_name(chat_template),
        out_dir,
    )
    return Path(out_dir)


def _template_name(chat_template: str | None) -> str:
    if chat_template == DEFAULT_CHAT_TEMPLATE:
        return "default"
    return "custom" if chat_template else "none"


def _special_tokens(pad_policy: PadTokenPolicy, chat_template: str | None) -> list[str]:
    """EOS first (id 0), then the dedicated pad token (id 1) and the chat role tokens."""
    special_tokens = [EOS_TOKEN]
    if pad_policy is PadTokenPolicy.DEDICATED:
        special_tokens.append(DEDICATED_PAD_TOKEN)
    if chat_template is not None:
        special_tokens.extend(CHAT_ROLE_TOKENS)
    return special_tokens


def _save_tokenizer(
    backend: Any,
    out_dir: Path,
    pad_policy: PadTokenPolicy,
    chat_template: str | None,
    model_max_length: int | None,
) -> None:
    """Wrap a trained ``tokenizers.Tokenizer`` as a transformers tokenizer folder."""
    from transformers import PreTrainedTokenizerFast

    pad_token = DEDICATED_PAD_TOKEN if pad_policy is PadTokenPolicy.DEDICATED else EOS_TOKEN
    tokenizer_kwargs: dict[str, object] = {"eos_token": EOS_TOKEN, "pad_token": pad_token}
    if model_max_length is not None:
        tokenizer_kwargs["model_max_length"] = model_max_length
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_kwargs)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))


UNK_TOKEN = "<unk>"
_BYTE_FALLBACK_SCORE = -1e6  # far below any learned piece: a byte piece never matches text
_SCORE_DECIMALS = 6


def _canonical_pieces(pieces: list[tuple[str, float]]) -> list[list[object]]:
    """The trained pieces in an order that is the same on every run.

    The Unigram trainer's scores differ between runs in the last bits (hash-map summation
    order), and the characters it keeps only because they occur get descending scores
    (``min − 0.0001·k``) in hash-set order. Scores are rounded and pieces sorted by score; that
    tail of single characters is sorted by character and given the same descending scores.
    """
    rounded = [(piece, round(score, _SCORE_DECIMALS)) for piece, score in pieces]
    multi = [score for piece, score in rounded if len(piece) > 1]
    floor = min(multi) if multi else float("inf")
    tail = [(p, s) for p, s in rounded if len(p) == 1 and s < floor]
    head = sorted(set(rounded) - set(tail), key=lambda entry: (-entry[1], entry[0]))
    tail_scores = sorted((s for _, s in tail), reverse=True)
    tail_pieces = sorted(p for p, _ in tail)
    return [[p, s] for p, s in head] + [
        [p, s] for p, s in zip(tail_pieces, tail_scores, strict=True)
    ]


def train_unigram_tokenizer(
    files: Sequence[Path],
    out_dir: Path,
    vocab_size: int,
    *,
    max_piece_length: int = 16,
    pad_policy: PadTokenPolicy = PadTokenPolicy.DEDICATED,
    chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
    model_max_length: int | None = None,
    text_field: str = "text",
) -> Path:
    """Train a Unigram tokenizer with Metaspace pre-tokenisation and byte fallback.

    A tokenizer that splits text very differently from the byte-level BPE of
    ``train_bpe_tokenizer`` (spaces become ``"▁"`` and start a new piece, so indentation runs
    become one token per space), for cross-tokenizer distillation. It is lossless: characters
    the pieces do not cover fall back to 256 ``<0xHH>`` byte pieces, there is no normaliser, and
    no ``"▁"`` is prepended, so ``decode(encode(text)) == text`` for every text.

    Args:
        files: Training documents (corpus JSONL or text files); see ``read_corpus_texts``.
        out_dir: Folder for the transformers tokenizer files.
        vocab_size: Total vocabulary size: special tokens, ``<unk>``, 256 byte pieces and the
            learned pieces (e.g. 4096).
        max_piece_length: Longest learned piece, in characters.
        pad_policy: ``dedicated`` adds ``<|pad|>``; ``eos`` pads with ``<|endoftext|>``.
        chat_template: Jinja chat template stored with the tokenizer; ``None`` stores none.
        model_max_length: Context length recorded in the tokenizer config, if known.
        text_field: The JSONL key holding the text.

    Returns:
        ``out_dir``, loadable with ``AutoTokenizer.from_pretrained(out_dir)``.

    Raises:
        DistilError: If ``vocab_size`` cannot hold the special and byte tokens plus some
            pieces, or the files hold no text.
    """
    texts = list(read_corpus_texts(files, text_field=text_field))
    return train_unigram_tokenizer_from_texts(
        texts,
        out_dir,
        vocab_size,
        max_piece_length=max_piece_length,
        pad_policy=pad_policy,
        chat_template=chat_template,
        model_max_length=model_max_length,
    )


def train_unigram_tokenizer_from_texts(
    texts: Iterable[str],
    out_dir: Path,
    vocab_size: int,
    *,
    max_piece_length: int = 16,
    pad_policy: PadTokenPolicy = PadTokenPolicy.DEDICATED,
    chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
    model_max_length: int | None = None,
) -> Path:
    """Train a Metaspace Unigram tokenizer on in-memory documents; see
    ``train_unigram_tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    pad_policy = PadTokenPolicy(pad_policy)
    special_tokens = [*_special_tokens(pad_policy, chat_template), UNK_TOKEN]
    reserved = len(special_tokens) + 256
    if vocab_size <= reserved:
        raise DistilError(
            f"vocab_size={vocab_size} cannot hold {len(special_tokens)} special tokens, 256 byte "
            f"pieces and any learned piece; use more than {reserved}"
        )
    documents = [text for text in texts if text]
    if not documents:
        raise DistilError("no text to train the tokenizer on")

    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size - 256,
        special_tokens=special_tokens,
        unk_token=UNK_TOKEN,
        max_piece_length=max_piece_length,
        # Every printable ASCII character is a piece, so text such as a literal "<0x41>" always
        # has a path through learned pieces and is never read as a byte piece.
        initial_alphabet=[chr(c) for c in range(33, 127)] + ["\t", "\n", "▁"],
        show_progress=False,
    )
    backend.train_from_iterator(documents, trainer, length=len(documents))

    # Insert the byte pieces after the special tokens (fixed ids) and switch byte fallback on.
    spec = json.loads(backend.to_str())
    vocab = spec["model"]["vocab"]
    n_special = len(special_tokens)
    byte_pieces = [[f"<0x{b:02X}>", _BYTE_FALLBACK_SCORE] for b in range(256)]
    byte_names = {piece for piece, _ in byte_pieces}
    learned = _canonical_pieces([(p, s) for p, s in vocab[n_special:] if p not in byte_names])
    spec["model"]["vocab"] = vocab[:n_special] + byte_pieces + learned
    spec["model"]["unk_id"] = special_tokens.index(UNK_TOKEN)
    spec["model"]["byte_fallback"] = True
    backend = Tokenizer.from_str(json.dumps(spec))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    _save_tokenizer(backend, out_dir, pad_policy, chat_template, model_max_length)
    logger.info(
        "trained Metaspace Unigram tokenizer: %d tokens (asked %d: %d special, 256 bytes, %d "
        "learned) on %d documents, pad policy %s, chat template %s -> %s",
        backend.get_vocab_size(),
        vocab_size,
        n_special,
        len(learned),
        len(documents),
        pad_policy.value,
        _template_name(chat_template),
        out_dir,
    )
    return Path(out_dir)
