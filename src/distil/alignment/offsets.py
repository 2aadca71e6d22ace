"""Per-token UTF-8 byte spans for any Hugging Face tokenizer.

Two tokenizations of one text can only be compared through the text itself, so every token gets
the span of source bytes it covers. Spans live in a shared **unit coordinate**: every UTF-8 byte
of a text segment is one unit, a special token between segments (EOS) is one unit of its own, and
a BOS is zero units wide (one tokenizer may add it and the other not: trl#5885). Spans of one
sequence partition its coordinate range: ``starts[i] == ends[i - 1]``.

How spans are found is chosen explicitly (:class:`ByteOffsetMethod`):

* ``offsets`` (default): the character offsets a fast (Rust) tokenizer reports, turned into byte
  offsets with an O(n) table. The tokenizer's post-processor is left out, so offsets are never
  trimmed (GPT-2's ``trim_offsets`` would cut the space off ``"Ġdef"``). Tokens that report the
  same span (byte tokens of one multi-byte character, byte-fallback pieces of an unknown
  character) are split by their surfaces' byte lengths when those add up, and otherwise share the
  span's end. A token whose span overlaps the next one (a Metaspace ``"▁"`` prepended to a text
  that did not start with a space) is glued to it: a boundary is only claimed where the text
  really splits.
* ``decode``: for tokenizers without offsets (trl#6388): an incremental detokenizer decodes a
  short window per token (linear in the sequence, not the quadratic string buffer of trl#4392)
  and must reproduce the text exactly; tokens inside a multi-byte character share its end.

Nothing falls back silently: ``offsets`` on a tokenizer without them raises :class:`DistilError`
naming ``decode`` as the fix, and ``decode`` raises where decoding does not give the text back.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np

from distil.alignment.vocab import token_surfaces
from distil.errors import DistilError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

__all__ = [
    "ByteOffsetMethod",
    "ByteSpanEncoder",
    "Special",
    "TokenSpans",
    "char_to_byte_table",
]

_MAX_PENDING_TOKENS = 64  # tokens decoding may wait for before the text must reappear
_REPLACEMENT_CHAR = "\ufffd"


class ByteOffsetMethod(str, Enum):
    """Where per-token byte spans come from.

    Attributes:
        OFFSETS: the fast tokenizer's character offsets (exact; needs a Rust tokenizer).
        DECODE: incremental decoding (any tokenizer whose decode gives the text back).
    """

    OFFSETS = "offsets"
    DECODE = "decode"


class Special(str, Enum):
    """Special tokens placed between text segments.

    Attributes:
        EOS: the tokenizer's end-of-sequence token, one unit wide (both tokenizers predict it).
        BOS: the tokenizer's beginning-of-sequence token, zero units wide (may be one-sided).
    """

    EOS = "eos"
    BOS = "bos"


@dataclass(frozen=True)
class TokenSpans:
    """Token ids and the unit spans they cover.

    Attributes:
        ids: ``(T,)`` int64 token ids.
        starts: ``(T,)`` int64, inclusive start of each token's span.
        ends: ``(T,)`` int64, exclusive end; ``starts[i] == ends[i - 1]`` and ``ends`` never
            decreases. Zero-width tokens have ``starts[i] == ends[i]``.
    """

    ids: np.ndarray
    starts: np.ndarray
    ends: np.ndarray

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, index: slice) -> TokenSpans:
        return TokenSpans(self.ids[index], self.starts[index], self.ends[index])

    @staticmethod
    def concatenate(parts: Sequence[TokenSpans]) -> TokenSpans:
        """Join consecutive spans (each part must start where the previous one ended)."""
        if not parts:
            empty = np.zeros(0, dtype=np.int64)
            return TokenSpans(empty, empty.copy(), empty.copy())
        return TokenSpans(
            np.concatenate([p.ids for p in parts]),
            np.concatenate([p.starts for p in parts]),
            np.concatenate([p.ends for p in parts]),
        )


def char_to_byte_table(text: str) -> np.ndarray:
    """``table[c]`` = UTF-8 byte offset of character ``c``; ``table[len(text)]`` = byte length.

    Built from the UTF-8 bytes in O(n): a character starts at every byte that is not a
    continuation byte (``0b10xxxxxx``).
    """
    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    starts = np.flatnonzero((raw & 0xC0) != 0x80)
    return np.concatenate([starts, [raw.shape[0]]]).astype(np.int64)


def _glue_overlaps(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Non-decreasing ends where a token that overlaps its successor shares its successor's end."""
    ends = np.maximum.accumulate(ends)
    n = ends.shape[0]
    closes = np.ones(n, dtype=bool)
    closes[:-1] = ends[:-1] <= starts[1:]
    # For every token, the first closing token at or after it (the last token always closes).
    idx = np.where(closes, np.arange(n), n)
    next_close = np.minimum.accumulate(idx[::-1])[::-1]
    return ends[next_close]


class ByteSpanEncoder:
    """Encodes text with one tokenizer and returns the byte span of every token.

    Made once per tokenizer (it copies the Rust backend and reads the vocabulary's surfaces).

    Args:
        tokenizer: any Hugging Face tokenizer.
        method: ``offsets`` (fast tokenizers) or ``decode`` (explicit fallback).

    Raises:
        DistilError: ``offsets`` for a tokenizer that has no Rust backend.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        method: ByteOffsetMethod | str = ByteOffsetMethod.OFFSETS,
    ) -> None:
        self.tokenizer = tokenizer
        self.method = ByteOffsetMethod(method)
        self._backend: Any = None
        self._surface_lengths: np.ndarray | None = None
        if self.method is ByteOffsetMethod.OFFSETS:
            backend = getattr(tokenizer, "backend_tokenizer", None)
            if backend is None or not getattr(tokenizer, "is_fast", False):
                raise DistilError(
                    f"tokenizer {type(tokenizer).__name__} reports no character offsets (it has no "
                    "fast Rust backend), so byte alignment cannot use them; choose the decode-based "
                    "fallback (byte_offsets: decode) or a positional alignment (ULD)"
                )
            from tokenizers import Tokenizer

            # A private copy without the post-processor: it only adds special tokens (which
            # segments place themselves) and trims offsets (which would open gaps).
            self._backend = Tokenizer.from_str(backend.to_str())
            self._backend.post_processor = None
            lengths = [-1 if s is None else len(s) for s in token_surfaces(tokenizer)]
            self._surface_lengths = np.asarray(lengths, dtype=np.int64)

    def special_id(self, special: Special) -> int:
        """The id of a special token.

        Raises:
            DistilError: if the tokenizer has no such token.
        """
        token_id = getattr(self.tokenizer, f"{Special(special).value}_token_id", None)
        if token_id is None:
            raise DistilError(
                f"tokenizer {type(self.tokenizer).__name__} has no {special.value} token; "
                "give it one (tokenizer.add_special_tokens) or leave it out of the segments"
            )
        return int(token_id)

    def encode_text(self, text: str, *, origin: int = 0) -> TokenSpans:
        """Tokenize ``text`` (no special tokens added) with spans starting at ``origin``.

        Returns:
            Spans covering ``[origin, origin + len(text.encode())]`` exactly.

        Raises:
            DistilError: if the tokenizer produces no token for a non-empty text, or (decode
                method) its decode does not reproduce the text.
        """
        if not text:
            empty = np.zeros(0, dtype=np.int64)
            return TokenSpans(empty, empty.copy(), empty.copy())
        if self.method is ByteOffsetMethod.OFFSETS:
            ids, ends = self._offset_ends(text)
        else:
            ids, ends = self._decode_ends(text)
        if ids.shape[0] == 0:
            raise DistilError(f"tokenizer produced no token for the text {text[:40]!r}")
        starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        return TokenSpans(ids, starts + origin, ends + origin)

    def encode_segments(self, segments: Sequence[str | Special], *, origin: int = 0) -> TokenSpans:
        """Tokenize text segments and special tokens in order, in one unit coordinate.

        Each text segment is tokenized on its own (as the data pipeline does with documents and
        completions); ``Special.EOS`` takes one unit, ``Special.BOS`` none.

        Args:
            segments: e.g. ``[Special.BOS, prompt, completion, Special.EOS]``.
            origin: unit where the first segment starts.

        Returns:
            The spans of the whole sequence.
        """
        parts: list[TokenSpans] = []
        cursor = origin
        for segment in segments:
            if isinstance(segment, Special):
                width = 1 if segment is Special.EOS else 0
                parts.append(
                    TokenSpans(
                        np.array([self.special_id(segment)], dtype=np.int64),
                        np.array([cursor], dtype=np.int64),
                        np.array([cursor + width], dtype=np.int64),
                    )
                )
                cursor += width
            else:
                part = self.encode_text(segment, origin=cursor)
                parts.append(part)
                cursor += len(segment.encode("utf-8"))
        return TokenSpans.concatenate(parts)

    # ----------------------------------------------------------------------------------------

    def _offset_ends(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        encoding = self._backend.encode(text, add_special_tokens=False)
        ids = np.asarray(encoding.ids, dtype=np.int64)
        if ids.shape[0] == 0:
            return ids, np.zeros(0, dtype=np.int64)
        chars = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        table = char_to_byte_table(text)
        starts, ends = table[chars[:, 0]], table[chars[:, 1]]
        starts, ends = self._split_shared_spans(ids, starts, ends)
        ends = _glue_overlaps(starts, ends)
        total = int(table[-1])
        if ends[-1] < total:  # bytes the tokenizer dropped at the end belong to the last token
            ends[-1] = total
        return ids, ends

    def _split_shared_spans(
        self, ids: np.ndarray, starts: np.ndarray, ends: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Split runs of tokens reporting one identical span by their surfaces' byte lengths."""
        assert self._surface_lengths is not None
        same = (starts[1:] == starts[:-1]) & (ends[1:] == ends[:-1])
        if not same.any():
            return starts, ends
        starts, ends = starts.copy(), ends.copy()
        in_vocab = ids < self._surface_lengths.shape[0]
        lengths = np.where(in_vocab, self._surface_lengths[np.where(in_vocab, ids, 0)], -1)
        run_start = np.flatnonzero(np.concatenate([[True], ~same]))
        run_stop = np.concatenate([run_start[1:], [ids.shape[0]]])
        shared = (run_stop - run_start) >= 2
        for a, b in zip(run_start[shared].tolist(), run_stop[shared].tolist(), strict=True):
            piece = lengths[a:b]
            if (piece >= 0).all() and int(piece.sum()) == int(ends[a] - starts[a]):
                cut = starts[a] + np.cumsum(piece)
                starts[a:b] = np.concatenate([[starts[a]], cut[:-1]])
                ends[a:b] = cut
        return starts, ends

    def segments_of_ids(
        self, ids: Sequence[int], *, origin: int = 0
    ) -> tuple[list[str | Special], TokenSpans]:
        """The segments (text runs and special tokens) that ids stand for, and their spans.

        What another tokenizer needs to read the same text as token ids that were sampled, not
        encoded: runs of ordinary ids are decoded (:meth:`decode_spans`), EOS is one unit and
        BOS none, as in :meth:`encode_segments`.

        Raises:
            DistilError: on another special token (a chat role, padding) inside ``ids``.
        """
        special = {
            tid: kind
            for kind in (Special.BOS, Special.EOS)  # EOS wins where a tokenizer shares the id
            if (tid := getattr(self.tokenizer, f"{kind.value}_token_id", None)) is not None
        }
        segments: list[str | Special] = []
        parts: list[TokenSpans] = []
        cursor, run = origin, []
        others = set(getattr(self.tokenizer, "all_special_ids", [])) - set(special)
        for token in [*map(int, ids), None]:
            if token is not None and token not in special:
                if token in others:
                    raise DistilError(
                        f"special token id {token} ({self.tokenizer.convert_ids_to_tokens(token)}) "
                        "has no counterpart in another tokenizer; only EOS and BOS can be aligned"
                    )
                run.append(token)
                continue
            if run:
                text, spans = self.decode_spans(run, origin=cursor)
                segments.append(text)
                parts.append(spans)
                cursor, run = cursor + len(text.encode("utf-8")), []
            if token is not None:
                kind = special[token]
                width = 1 if kind is Special.EOS else 0
                segments.append(kind)
                parts.append(
                    TokenSpans(
                        np.array([token], dtype=np.int64),
                        np.array([cursor], dtype=np.int64),
                        np.array([cursor + width], dtype=np.int64),
                    )
                )
                cursor += width
        return segments, TokenSpans.concatenate(parts)

    def _decode(self, ids: Sequence[int]) -> str:
        return str(
            self.tokenizer.decode(
                list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
        )

    def _decode_ends(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        ids = [int(i) for i in self.tokenizer.encode(text, add_special_tokens=False)]
        _, ends = self._incremental_decode(ids, text)
        return np.asarray(ids, dtype=np.int64), ends

    def decode_spans(self, ids: Sequence[int], *, origin: int = 0) -> tuple[str, TokenSpans]:
        """The text that token ids stand for and each token's span in it (decode-based).

        For ids that come from sampling rather than from encoding a text (the student's own
        completions on-policy): any tokenizer, whatever ``method`` the encoder was made with.

        Args:
            ids: token ids without special tokens.
            origin: unit where the first token starts.

        Returns:
            The decoded text and the spans of ``ids`` over its UTF-8 bytes.

        Raises:
            DistilError: if decoding is not prefix-stable (the spans would be meaningless).
        """
        ids = [int(i) for i in ids]
        text, ends = self._incremental_decode(ids, None)
        starts = np.concatenate([[0], ends[:-1]]).astype(np.int64) if len(ids) else ends
        return text, TokenSpans(np.asarray(ids, dtype=np.int64), starts + origin, ends + origin)

    def _incremental_decode(self, ids: list[int], text: str | None) -> tuple[str, np.ndarray]:
        """Decode ``ids`` piece by piece; with ``text``, every piece must reproduce it.

        Returns:
            The decoded text and the byte end of every token (tokens that complete nothing,
            inside a multi-byte character, share the next piece's end).
        """
        n = len(ids)
        emitted_at: list[int] = []  # token index that completed each emitted piece
        emitted_end: list[int] = []  # byte end after that piece
        pieces: list[str] = []
        prefix, read, chars, total = 0, 0, 0, 0
        for i in range(n):
            # Decode a short window (the previously emitted piece as context, then the pending
            # tokens): linear in the sequence, and context-dependent decoders (a Metaspace decoder
            # drops the space of the first token it sees) see the same context in both calls.
            prefix_text = self._decode(ids[prefix:read]) if read > prefix else ""
            new_text = self._decode(ids[prefix : i + 1])
            delta = new_text[len(prefix_text) :] if new_text.startswith(prefix_text) else ""
            if text is None:
                ok = bool(delta) and not delta.endswith(_REPLACEMENT_CHAR)
            else:
                ok = bool(delta) and text.startswith(delta, chars)
            if ok:
                pieces.append(delta)
                chars += len(delta)
                total += len(delta.encode("utf-8"))
                emitted_at.append(i)
                emitted_end.append(total)
                prefix, read = read, i + 1
            elif i + 1 - read > _MAX_PENDING_TOKENS:
                raise DistilError(
                    f"decoding the tokens of {type(self.tokenizer).__name__} does not reproduce "
                    f"the text after {''.join(pieces)[-20:]!r} ({_MAX_PENDING_TOKENS} tokens give "
                    f"{new_text[-20:]!r}): the tokenizer normalises the text or its decode is "
                    "lossy, so decode-based byte offsets are impossible; use byte_offsets: "
                    "offsets with a fast tokenizer, or a positional alignment (ULD)"
                )
            # else: the pending tokens end inside a multi-byte character; wait for the rest.
        if text is None and read < n:  # a trailing partial character: whatever decoding gives
            rest = self._decode(ids[prefix:])[len(self._decode(ids[prefix:read])) :]
            pieces.append(rest)
            total += len(rest.encode("utf-8"))
            emitted_at.append(n - 1)
            emitted_end.append(total)
            chars += len(rest)
        if text is not None and chars != len(text):
            raise DistilError(
                f"decoding the tokens of {type(self.tokenizer).__name__} does not give the text "
                f"back ({text[chars : chars + 20]!r} is left over: the tokenizer normalises the "
                "text or its decode is lossy), so decode-based byte offsets are impossible; use "
                "byte_offsets: offsets with a fast tokenizer, or a positional alignment (ULD)"
            )
        if not n:
            return "", np.zeros(0, dtype=np.int64)
        # Tokens that emitted nothing (inside a multi-byte character) share the next emission's end.
        which = np.searchsorted(np.asarray(emitted_at), np.arange(n), side="left")
        ends = np.asarray(emitted_end, dtype=np.int64)[which]
        return "".join(pieces), ends
