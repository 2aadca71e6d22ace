"""Vocabulary correspondences between two tokenizers: surfaces, shared entries, MinED/first-token maps.

A token's **surface** is the UTF-8 byte string it stands for in running text: ``"Ġdef"`` of a
byte-level BPE and ``"▁def"`` of a Metaspace Unigram both stand for ``b" def"``. Surfaces are what
makes vocabulary entries of two tokenizers comparable:

* :func:`shared_vocabulary` pairs the entries both tokenizers have (the exact part of the hybrid
  loss). ``match="surface"`` (the default) pairs entries with the same surface; ``match="raw"``
  pairs entries whose vocabulary strings are identical, as TRL's GOLD does with the intersection
  of ``get_vocab()`` (which misses every space-prefixed entry between a ``Ġ`` and a ``▁``
  tokenizer). Special tokens pair by their content (``<|endoftext|>`` with ``<|endoftext|>``).
* :func:`min_edit_distance_map` maps every teacher entry to the student entry with the smallest
  Levenshtein distance between surfaces (FuseLLM's MinED vocabulary mapping).
* :func:`first_token_map` maps every teacher entry to the student token its text starts with
  (the first token of the student's encoding of it), so the teacher's next-token probabilities
  carried through it are its probabilities of the student's next token.
* Where several entries share a surface (a Unigram's ``"▁"`` and its byte piece ``<0x20>``),
  every correspondence here uses the one the tokenizer itself writes
  (:func:`canonical_surface_ids`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

__all__ = [
    "SharedVocabulary",
    "VocabMatch",
    "byte_level_decoder_table",
    "canonical_surface_ids",
    "first_token_map",
    "is_byte_level",
    "levenshtein_bit_parallel",
    "levenshtein_block",
    "min_edit_distance_map",
    "shared_vocabulary",
    "special_token_ids",
    "token_surfaces",
]

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_ANCHOR_TEXTS = ("a", "x", "0", "e")
# Levenshtein matrices are built in blocks of at most this many int16 cells (about 32 MB).
_EDIT_BLOCK_CELLS = 1 << 24


class VocabMatch(str, Enum):
    """How entries of two vocabularies are paired.

    Attributes:
        SURFACE: same byte string in running text (``"Ġdef"`` pairs with ``"▁def"``).
        RAW: identical vocabulary strings (TRL GOLD's ``get_vocab()`` intersection).
    """

    SURFACE = "surface"
    RAW = "raw"


@dataclass(frozen=True)
class SharedVocabulary:
    """Entries both tokenizers have, one-to-one.

    Attributes:
        teacher_ids: ``(M,)`` int64 teacher vocabulary ids.
        student_ids: ``(M,)`` int64 student ids; ``student_ids[k]`` is the entry of
            ``teacher_ids[k]``.
        teacher_vocab_size: entries of the teacher tokenizer.
        student_vocab_size: entries of the student tokenizer.
        match: how the entries were paired.
    """

    teacher_ids: Tensor
    student_ids: Tensor
    teacher_vocab_size: int
    student_vocab_size: int
    match: VocabMatch

    def __len__(self) -> int:
        return int(self.teacher_ids.numel())

    def to(self, device: torch.device | str) -> SharedVocabulary:
        """The same pairs with index tensors on ``device``."""
        return SharedVocabulary(
            self.teacher_ids.to(device),
            self.student_ids.to(device),
            self.teacher_vocab_size,
            self.student_vocab_size,
            self.match,
        )


def byte_level_decoder_table() -> dict[str, int]:
    """The inverse of GPT-2's byte → printable-character table used by byte-level BPE.

    Bytes that are printable Latin-1 characters (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand
    for themselves; the other 68 bytes, in increasing order, are shifted to ``chr(256 + n)``
    (so the space byte 0x20 is ``Ġ`` and the newline 0x0A is ``Ċ``).
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def _tokenizer_json(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return "" if backend is None else str(backend.to_str())


def is_byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer is a byte-level BPE (pieces are GPT-2 byte characters)."""
    import json

    text = _tokenizer_json(tokenizer)
    if not text:
        return False
    spec = json.loads(text)
    return "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(
        spec.get("decoder")
    )


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[int, str]:
    """Ids of special tokens (EOS, pad, chat role tokens, ...) → their content string."""
    out = {
        int(i): str(t)
        for i, t in zip(tokenizer.all_special_ids, tokenizer.all_special_tokens, strict=True)
    }
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    for token_id, added in decoder.items():
        if getattr(added, "special", False):
            out[int(token_id)] = str(added.content)
    return out


def _anchor_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """A token that decodes to a fixed non-space text, to decode single tokens in context."""
    for text in _ANCHOR_TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 1 and tokenizer.decode(ids, clean_up_tokenization_spaces=False) == text:
            return int(ids[0])
    return None


def token_surfaces(tokenizer: PreTrainedTokenizerBase) -> list[bytes | None]:
    """The byte string every vocabulary entry stands for in running text.

    Byte-level BPE pieces are mapped through the GPT-2 byte table (exact, also for pieces that
    hold part of a multi-byte character); byte-fallback pieces ``<0xHH>`` are one byte; every
    other entry is decoded after an anchor token (``decode([anchor, id])`` minus
    ``decode([anchor])``), so that decoders which drop a leading space at the start of a text
    (Metaspace, SentencePiece) keep it here.

    Args:
        tokenizer: any Hugging Face tokenizer.

    Returns:
        One entry per id ``0 .. len(tokenizer) - 1``: the surface, or None for special tokens
        and for entries whose bytes cannot be recovered (a piece of a multi-byte character in a
        tokenizer without byte-level pieces).
    """
    n = len(tokenizer)
    ids = list(range(n))
    pieces = tokenizer.convert_ids_to_tokens(ids)
    specials = special_token_ids(tokenizer)
    surfaces: list[bytes | None] = [None] * n
    todo: list[int] = []
    table = byte_level_decoder_table() if is_byte_level(tokenizer) else None
    for i, piece in enumerate(pieces):
        if i in specials or piece is None:
            continue
        byte_piece = _BYTE_PIECE.match(piece)
        if byte_piece is not None:
            surfaces[i] = bytes([int(byte_piece.group(1), 16)])
        elif table is not None and all(ch in table for ch in piece):
            surfaces[i] = bytes(table[ch] for ch in piece)
        else:
            todo.append(i)
    if todo:
        anchor = _anchor_id(tokenizer)
        if anchor is None:
            texts: list[str] = [tokenizer.convert_tokens_to_string([pieces[i]]) for i in todo]
            prefix = ""
        else:
            prefix = str(tokenizer.decode([anchor], clean_up_tokenization_spaces=False))
            texts = tokenizer.batch_decode(
                [[anchor, i] for i in todo],
                skip_special_tokens=False,
                clean_up_tokenization_spaces=False,
            )
        for i, text in zip(todo, texts, strict=True):
            if text.startswith(prefix) and "\ufffd" not in text[len(prefix) :]:
                surfaces[i] = text[len(prefix) :].encode("utf-8")
    return surfaces


def _match_keys(tokenizer: PreTrainedTokenizerBase, match: VocabMatch) -> list[object]:
    """A hashable key per id; None for entries that never match (by surface: also every
    duplicate of a surface but the one the tokenizer writes)."""
    specials = special_token_ids(tokenizer)
    if match is VocabMatch.RAW:
        return list(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
    surfaces = token_surfaces(tokenizer)
    canonical = canonical_surface_ids(tokenizer, surfaces)
    keys: list[object] = []
    for i, surface in enumerate(surfaces):
        if i in specials:
            keys.append(("special", specials[i]))
        elif surface is None or canonical.get(surface, i) != i:
            keys.append(None)
        else:
            keys.append(("text", surface))
    return keys


def shared_vocabulary(
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
    *,
    match: VocabMatch | str = VocabMatch.SURFACE,
) -> SharedVocabulary:
    """Pair the vocabulary entries both tokenizers share.

    Args:
        teacher_tokenizer: the teacher's tokenizer.
        student_tokenizer: the student's tokenizer.
        match: ``"surface"`` (same bytes in running text) or ``"raw"`` (identical vocabulary
            strings, TRL GOLD's rule).

    Returns:
        One-to-one pairs sorted by teacher id. Where several entries of one side share a
        surface, the one the tokenizer writes is used (:func:`canonical_surface_ids`); with
        ``"raw"`` keys, the lowest id.
    """
    match = VocabMatch(match)
    student_index: dict[object, int] = {}
    for i, key in enumerate(_match_keys(student_tokenizer, match)):
        if key is not None and key not in student_index:
            student_index[key] = i
    teacher_ids: list[int] = []
    student_ids: list[int] = []
    taken: set[int] = set()
    for i, key in enumerate(_match_keys(teacher_tokenizer, match)):
        j = student_index.get(key) if key is not None else None
        if j is not None and j not in taken:
            teacher_ids.append(i)
            student_ids.append(j)
            taken.add(j)
    shared = SharedVocabulary(
        torch.tensor(teacher_ids, dtype=torch.long),
        torch.tensor(student_ids, dtype=torch.long),
        len(teacher_tokenizer),
        len(student_tokenizer),
        match,
    )
    logger.info(
        "shared vocabulary (%s): %d entries (%.1f%% of the teacher's %d, %.1f%% of the student's %d)",
        match.value,
        len(shared),
        100 * len(shared) / max(len(teacher_tokenizer), 1),
        len(teacher_tokenizer),
        100 * len(shared) / max(len(student_tokenizer), 1),
        len(student_tokenizer),
    )
    return shared


def _edit_keys(
    tokenizer: PreTrainedTokenizerBase, surfaces: Sequence[bytes | None] | None = None
) -> list[bytes]:
    """Byte strings compared by MinED: the surface, or the special token's / piece's text
    (``surfaces``: the tokenizer's :func:`token_surfaces`, when the caller has them)."""
    specials = special_token_ids(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    out = []
    for i, surface in enumerate(token_surfaces(tokenizer) if surfaces is None else surfaces):
        if surface is not None:
            out.append(surface)
        else:
            out.append(str(specials.get(i, pieces[i] or "")).encode("utf-8"))
    return out


def levenshtein_block(a: Tensor, b: Tensor) -> Tensor:
    """Levenshtein distances between every row of ``a`` and every row of ``b``.

    Row ``i`` of the dynamic programme is computed for all pairs at once; the left-to-right
    dependency inside a row, ``D[i, j] = min(tmp[j], D[i, j-1] + 1)``, is solved in closed form
    as ``D[i, j] = j + cummin_k(tmp[k] - k)``, so each row costs a handful of tensor operations.

    Args:
        a: ``(n_a, L_a)`` integer symbols, every row of length exactly ``L_a`` (``L_a >= 1``).
        b: ``(n_b, L_b)`` integer symbols, every row of length exactly ``L_b`` (``L_b >= 0``).

    Returns:
        ``(n_a, n_b)`` int32 distances.
    """
    n_a, len_a = a.shape
    n_b, len_b = b.shape
    steps = torch.arange(len_b + 1, dtype=torch.int32)  # (L_b + 1,)
    row = steps.expand(n_a, n_b, len_b + 1).clone()  # D[0, j] = j
    for i in range(1, len_a + 1):
        cost = (a[:, i - 1, None, None] != b[None, :, :]).to(torch.int32)  # (n_a, n_b, L_b)
        tmp = torch.minimum(row[..., :-1] + cost, row[..., 1:] + 1)  # diagonal, up
        first = torch.full((n_a, n_b, 1), i, dtype=torch.int32)
        full = torch.cat([first, tmp], dim=-1) - steps  # (n_a, n_b, L_b + 1)
        row = torch.cummin(full, dim=-1).values + steps
    return row[..., len_b]


def min_edit_distance_map(
    teacher_tokenizer: PreTrainedTokenizerBase, student_tokenizer: PreTrainedTokenizerBase
) -> Tensor:
    """FuseLLM's MinED vocabulary mapping: each teacher entry → the closest student entry.

    Distance is the Levenshtein distance between surfaces (UTF-8 bytes, so ``" def"`` and
    ``"def"`` differ by one; FuseLLM strips the space markers instead, which makes them equal).
    Special tokens compare by their content. Ties go to the lowest student id, except that of
    several entries with one surface the one the student tokenizer writes is used
    (:func:`canonical_surface_ids`).

    Args:
        teacher_tokenizer: the teacher's tokenizer (``V_t`` entries).
        student_tokenizer: the student's tokenizer (``V_s`` entries).

    Returns:
        ``(V_t,)`` int64 student ids.
    """
    surfaces = token_surfaces(student_tokenizer)
    mapping = min_edit_distance_map_from_keys(
        _edit_keys(teacher_tokenizer), _edit_keys(student_tokenizer, surfaces)
    )
    # An entry and its duplicates (same surface) are at the same distance from everything:
    # the tie goes to the one the student tokenizer writes.
    canonical = canonical_surface_ids(student_tokenizer, surfaces)
    return torch.tensor(
        [canonical.get(surfaces[j] or b"", j) for j in mapping.tolist()], dtype=torch.long
    )


def _as_matrix(keys: Sequence[bytes]) -> Tensor:
    width = len(keys[0]) if keys else 0
    flat = np.frombuffer(b"".join(keys), dtype=np.uint8).astype(np.int32)
    return torch.from_numpy(flat.reshape(len(keys), width))


def levenshtein_bit_parallel(a: Tensor, b: Tensor) -> Tensor:
    """Levenshtein distances between every row of ``a`` and every row of ``b``.

    Myers' bit-vector algorithm (J. ACM 1999) in Hyyrö's form for the global distance: each
    string of ``a`` is a bit mask per symbol, and each column of ``b`` updates the vertical
    deltas of all ``len(a) × n_b`` pairs with a dozen integer operations, so the cost is
    ``O(L_b)`` vector steps instead of the ``O(L_a · L_b)`` of the dynamic programme.

    Args:
        a: ``(n_a, m)`` symbols in ``0 .. 255``, ``1 <= m <= 62``.
        b: ``(n_b, L_b)`` symbols in ``0 .. 255``.

    Returns:
        ``(n_a, n_b)`` int64 distances.
    """
    return _bit_parallel(_symbol_masks(a), a.shape[1], b)


def _symbol_masks(a: Tensor) -> Tensor:
    """``(n_a, 256)`` int64: bit ``i`` of entry ``[r, c]`` is set where ``a[r, i] == c``."""
    n_a, m = a.shape
    if not 1 <= m <= 62:
        raise ValueError(f"bit-parallel Levenshtein needs strings of 1 to 62 symbols, got {m}")
    peq = torch.zeros(n_a, 256, dtype=torch.int64)
    rows = torch.arange(n_a)
    for i in range(m):
        peq[rows, a[:, i].long()] |= 1 << i  # one symbol per row: no duplicate index
    return peq


def _bit_parallel(peq: Tensor, m: int, b: Tensor) -> Tensor:
    """The bit-vector recurrence of :func:`levenshtein_bit_parallel` from symbol masks."""
    n_a = peq.shape[0]
    mask, high = (1 << m) - 1, 1 << (m - 1)
    n_b = b.shape[0]
    pv = torch.full((n_a, n_b), mask, dtype=torch.int64)  # column 0 is 0, 1, .., m: all +1
    mv = torch.zeros_like(pv)
    score = torch.full((n_a, n_b), m, dtype=torch.int64)
    for j in range(b.shape[1]):
        eq = peq[:, b[:, j].long()]  # (n_a, n_b)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = mv | ~(xh | pv)
        mh = pv & xh
        score += (ph & high != 0).long() - (mh & high != 0).long()
        ph = (ph << 1) | 1  # row 0 grows by one per column: a global, not a substring, distance
        mh = mh << 1
        pv = (mh | ~(xv | ph)) & mask
        mv = ph & xv & mask
    return score


def canonical_surface_ids(
    tokenizer: PreTrainedTokenizerBase, surfaces: Sequence[bytes | None] | None = None
) -> dict[bytes, int]:
    """Surface → the one entry that stands for it in this tokenizer's own output.

    Several entries can share a surface: a Unigram with byte fallback has the piece ``"!"`` and
    the byte piece ``<0x21>``, the piece ``"▁"`` and ``<0x20>``. The tokenizer only ever writes
    one of them (the byte pieces score far below any learned piece), so a correspondence that
    picks the other (the lowest id, say) sends the teacher's probability of a space or a
    punctuation mark to an entry the student never sees as a target. The canonical entry is
    the one the tokenizer produces when it encodes that text alone; failing that, an entry that
    is not a ``<0xHH>`` byte piece; failing that, the lowest id.

    Args:
        tokenizer: any Hugging Face tokenizer.
        surfaces: its :func:`token_surfaces`, when the caller has them (computed otherwise).

    Returns:
        One id per distinct surface (special tokens have none).
    """
    by_surface: dict[bytes, list[int]] = {}
    for i, surface in enumerate(token_surfaces(tokenizer) if surfaces is None else surfaces):
        if surface:
            by_surface.setdefault(surface, []).append(i)
    out = {surface: ids[0] for surface, ids in by_surface.items()}
    repeated = {surface: ids for surface, ids in by_surface.items() if len(ids) > 1}
    if not repeated:
        return out

    def is_byte_piece(i: int) -> bool:
        return _BYTE_PIECE.match(str(tokenizer.convert_ids_to_tokens(i) or "")) is not None

    texts: dict[bytes, str] = {}
    for surface in repeated:
        try:
            texts[surface] = surface.decode("utf-8")
        except UnicodeDecodeError:
            continue
    encoded = (
        tokenizer(list(texts.values()), add_special_tokens=False)["input_ids"] if texts else []
    )
    produced = {surface: ids for surface, ids in zip(texts, encoded, strict=True)}
    for surface, ids in repeated.items():
        written = produced.get(surface, [])
        if len(written) == 1 and written[0] in ids:
            out[surface] = int(written[0])
        else:
            out[surface] = next((i for i in ids if not is_byte_piece(i)), ids[0])
    return out


def first_token_map(
    teacher_tokenizer: PreTrainedTokenizerBase, student_tokenizer: PreTrainedTokenizerBase
) -> Tensor:
    """Each teacher entry → the student token that the same bytes start with.

    At a position where both tokenizations start a token at the same byte (the start of every
    byte-span group), the teacher's next token ``v`` and the student's next token ``u`` begin
    the same text, and ``u`` is the first token of the student's own tokenization of that text.
    Adding up the teacher's probabilities of every ``v`` mapped to ``u`` gives the teacher's
    probability that the student's next token is ``u``: a marginal on the student's
    vocabulary, where MinED's map sends ``v`` to a similar-looking entry that may spell other
    text. ``u`` is read from the student tokenizer's encoding of ``v``'s text alone, so BPE
    merge order and Unigram's best segmentation are respected (in running text the bytes after
    ``v`` can still change the split: an approximation). This is our own first-token form of
    byte-level likelihood matching between tokenizers, not a seed paper's method.

    Special tokens map to the student special with the same content. An entry whose text the
    student does not start with one of its tokens (a piece of a multi-byte character) maps to
    the longest student surface it starts with; an entry with neither falls back to its MinED
    match.

    Args:
        teacher_tokenizer: the teacher's tokenizer (``V_t`` entries).
        student_tokenizer: the student's tokenizer (``V_s`` entries).

    Returns:
        ``(V_t,)`` int64 student ids.
    """
    student_specials = {text: i for i, text in special_token_ids(student_tokenizer).items()}
    student_surfaces = token_surfaces(student_tokenizer)
    canonical = canonical_surface_ids(student_tokenizer, student_surfaces)
    longest = max((len(k) for k in canonical), default=0)
    teacher_specials = special_token_ids(teacher_tokenizer)
    teacher_surfaces = token_surfaces(teacher_tokenizer)
    out = np.full(len(teacher_tokenizer), -1, dtype=np.int64)
    texts: dict[int, str] = {}
    for i, surface in enumerate(teacher_surfaces):
        if i in teacher_specials:
            out[i] = student_specials.get(teacher_specials[i], -1)
        elif surface:
            try:
                texts[i] = surface.decode("utf-8")
            except UnicodeDecodeError:
                continue
    encoded = (
        student_tokenizer(list(texts.values()), add_special_tokens=False)["input_ids"]
        if texts
        else []
    )
    for i, ids in zip(texts, encoded, strict=True):
        first = student_surfaces[ids[0]] if ids else None
        surface = teacher_surfaces[i]
        if first and surface and surface.startswith(first):
            out[i] = canonical.get(first, ids[0])
    for k in np.flatnonzero(out < 0).tolist():
        surface = teacher_surfaces[k]
        if k in teacher_specials or not surface:
            continue
        for n in range(min(len(surface), longest), 0, -1):
            match = canonical.get(surface[:n])
            if match is not None:
                out[k] = match
                break
    missing = np.flatnonzero(out < 0)
    if missing.size:
        keys_t = _edit_keys(teacher_tokenizer, teacher_surfaces)
        keys_s = _edit_keys(student_tokenizer, student_surfaces)
        fallback = min_edit_distance_map_from_keys([keys_t[i] for i in missing], keys_s)
        out[missing] = fallback.numpy()
        logger.info("first-token map: %d teacher entries fell back to MinED", missing.size)
    return torch.from_numpy(out)


def min_edit_distance_map_from_keys(
    teacher_keys: Sequence[bytes], student_keys: Sequence[bytes]
) -> Tensor:
    """:func:`min_edit_distance_map` on explicit byte strings (one per id)."""
    if not student_keys:
        raise ValueError("the student vocabulary is empty")
    best = np.full(len(teacher_keys), np.iinfo(np.int32).max, dtype=np.int64)
    best_id = np.zeros(len(teacher_keys), dtype=np.int64)
    exact: dict[bytes, int] = {}
    for j, key in enumerate(student_keys):
        exact.setdefault(key, j)
    pending: dict[int, list[int]] = {}
    for i, key in enumerate(teacher_keys):
        match = exact.get(key)
        if match is not None:
            best[i], best_id[i] = 0, match
        else:
            pending.setdefault(len(key), []).append(i)
    student_by_len: dict[int, list[int]] = {}
    for j, key in enumerate(student_keys):
        student_by_len.setdefault(len(key), []).append(j)
    student_mats = {
        n: _as_matrix([student_keys[j] for j in cols]) for n, cols in student_by_len.items()
    }
    for len_a, all_rows in pending.items():
        # Nearest lengths first: |len_a - len_b| bounds the distance from below, so a bucket is
        # skipped for every row whose best so far is already smaller (ties need the bound too).
        for len_b in sorted(student_by_len, key=lambda n: (abs(n - len_a), n)):
            bound = abs(len_b - len_a)
            rows = [i for i in all_rows if best[i] >= bound]
            if not rows:
                break
            cols = student_by_len[len_b]
            if len_a == 0 or len_b == 0:
                dist = torch.full((len(rows), len(cols)), max(len_a, len_b))
                _keep_best(best, best_id, rows, cols, dist)
                continue
            a = _as_matrix([teacher_keys[i] for i in rows])
            peq = _symbol_masks(a) if len_a <= 62 else None
            cells = len(cols) if peq is not None else len(cols) * (len_b + 1)
            block = max(1, _EDIT_BLOCK_CELLS // max(1, cells))
            for start in range(0, len(rows), block):
                stop = start + block
                if peq is not None:
                    dist = _bit_parallel(peq[start:stop], len_a, student_mats[len_b])
                else:
                    dist = levenshtein_block(a[start:stop], student_mats[len_b])
                _keep_best(best, best_id, rows[start:stop], cols, dist)
    return torch.from_numpy(best_id)


def _keep_best(
    best: np.ndarray, best_id: np.ndarray, rows: list[int], cols: list[int], dist: Tensor
) -> None:
    """Fold one block of distances into the running minimum (ties → lowest student id)."""
    matrix = dist.numpy()
    where = matrix.argmin(axis=1)  # the first minimum = the lowest id: cols are increasing
    values_np = matrix[np.arange(matrix.shape[0]), where].astype(np.int64)
    ids_np = np.asarray(cols)[where]
    rows_np = np.asarray(rows)
    better = (values_np < best[rows_np]) | (
        (values_np == best[rows_np]) & (ids_np < best_id[rows_np])
    )
    best[rows_np[better]] = values_np[better]
    best_id[rows_np[better]] = ids_np[better]
