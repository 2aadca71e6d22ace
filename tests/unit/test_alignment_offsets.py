"""Per-token byte spans: fast offsets, the decode-based fallback, special tokens, clear errors."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from transformers import PreTrainedTokenizer, PreTrainedTokenizerFast

from distil.alignment import (
    ByteOffsetMethod,
    ByteSpanEncoder,
    Special,
    TokenSpans,
    char_to_byte_table,
    token_surfaces,
)
from distil.errors import DistilError
from tests.helpers import TRICKY_TEXTS


class CharTokenizer(PreTrainedTokenizer):
    """A pure-Python (no offsets) character tokenizer: what a tokenizer without a fast backend
    looks like to distil."""

    def __init__(self, alphabet: str, **kwargs: Any) -> None:
        self._vocab = {"<eos>": 0}
        for ch in alphabet:
            self._vocab.setdefault(ch, len(self._vocab))
        self._inverse = {i: t for t, i in self._vocab.items()}
        super().__init__(eos_token="<eos>", **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return list(text)

    def _convert_token_to_id(self, token: str) -> int:
        return self._vocab[token]

    def _convert_id_to_token(self, index: int) -> str:
        return self._inverse[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens)


def _check_partition(spans: TokenSpans, text: str, origin: int = 0) -> None:
    assert spans.starts[0] == origin
    assert (spans.starts[1:] == spans.ends[:-1]).all()
    assert (np.diff(spans.ends) >= 0).all()
    assert spans.ends[-1] == origin + len(text.encode("utf-8"))


def test_char_to_byte_table_counts_utf8_bytes() -> None:
    assert char_to_byte_table("aé日😀").tolist() == [0, 1, 3, 6, 10]
    assert char_to_byte_table("").tolist() == [0]


@pytest.mark.parametrize("name", ["bpe500", "uni600"])
@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_offsets_partition_the_text_and_match_the_surfaces(
    tokenizer_pair: dict[str, Any], name: str, text: str
) -> None:
    tokenizer = tokenizer_pair[name]
    spans = ByteSpanEncoder(tokenizer).encode_text(text, origin=7)
    _check_partition(spans, text, origin=7)
    assert spans.ids.tolist() == tokenizer.encode(text, add_special_tokens=False)
    # Each token covers exactly the bytes it stands for: multi-byte characters split into byte
    # tokens get one byte each, not the whole character.
    raw = text.encode("utf-8")
    surfaces = token_surfaces(tokenizer)
    for token_id, start, end in zip(spans.ids, spans.starts - 7, spans.ends - 7, strict=True):
        assert raw[start:end] == surfaces[token_id]


@pytest.mark.parametrize("name", ["bpe500", "uni600"])
@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_decode_fallback_agrees_with_offsets_up_to_character_boundaries(
    tokenizer_pair: dict[str, Any], name: str, text: str
) -> None:
    tokenizer = tokenizer_pair[name]
    fast = ByteSpanEncoder(tokenizer).encode_text(text)
    slow = ByteSpanEncoder(tokenizer, ByteOffsetMethod.DECODE).encode_text(text)
    _check_partition(slow, text)
    assert slow.ids.tolist() == fast.ids.tolist()
    # Decoding cannot split a character, so byte tokens inside one share its end; every
    # boundary it reports is a real one, and on character boundaries both agree.
    char_ends = set(char_to_byte_table(text).tolist())
    assert set(slow.ends.tolist()) <= set(fast.ends.tolist())
    assert {e for e in fast.ends.tolist() if e in char_ends} == set(slow.ends.tolist())


def test_tokenizer_without_offsets_needs_the_explicit_fallback() -> None:
    text = "a é日😀 b"
    tokenizer = CharTokenizer(text)
    with pytest.raises(DistilError, match="decode"):
        ByteSpanEncoder(tokenizer)
    spans = ByteSpanEncoder(tokenizer, "decode").encode_text(text)
    _check_partition(spans, text)
    assert np.diff(np.concatenate([[0], spans.ends])).tolist() == [
        len(c.encode("utf-8")) for c in text
    ]


def _lowercasing_tokenizer(base: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer

    spec = json.loads(base.backend_tokenizer.to_str())
    spec["normalizer"] = {"type": "Lowercase"}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|endoftext|>"
    )


def test_decode_fallback_refuses_a_normalising_tokenizer_and_offsets_still_work(
    tokenizer_pair: dict[str, Any],
) -> None:
    tokenizer = _lowercasing_tokenizer(tokenizer_pair["bpe500"])
    text = "Class Foo:\n    PASS"
    with pytest.raises(DistilError, match="normalises"):
        ByteSpanEncoder(tokenizer, "decode").encode_text(text)
    _check_partition(ByteSpanEncoder(tokenizer).encode_text(text), text)


def test_trimmed_offsets_of_a_gpt2_style_post_processor_are_not_used(
    tokenizer_pair: dict[str, Any],
) -> None:
    """GPT-2's ByteLevel post-processor trims spaces off offsets ("Ġdef" → "def"); the encoder
    uses the tokenizer without it, so the space still belongs to its token."""
    from tokenizers import Tokenizer

    base = tokenizer_pair["bpe500"]
    spec = json.loads(base.backend_tokenizer.to_str())
    spec["post_processor"] = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": True,
    }
    trimmed = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|endoftext|>"
    )
    text = "a   b = return  x"
    assert ByteSpanEncoder(trimmed).encode_text(text).ends.tolist() == (
        ByteSpanEncoder(base).encode_text(text).ends.tolist()
    )


def test_prepended_metaspace_token_is_glued_not_given_a_false_boundary() -> None:
    """A Metaspace tokenizer that prepends "▁" reports it with the span of the next character
    ("▁" and "d" both claim byte 0..1); the two share their end instead of a boundary being
    claimed between them."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = [("<unk>", 0.0), ("▁", -1.0), ("d", -2.0), ("ef", -2.0), ("▁x", -1.0), ("x", -3.0)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=0))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    spans = ByteSpanEncoder(tokenizer).encode_text("def x")
    assert tokenizer.convert_ids_to_tokens(spans.ids.tolist()) == ["▁", "d", "ef", "▁x"]
    assert spans.ends.tolist() == [1, 1, 3, 5]
    _check_partition(spans, "def x")


def test_segments_put_eos_on_one_unit_and_bos_on_none(tokenizer_pair: dict[str, Any]) -> None:
    tokenizer = tokenizer_pair["uni600"]
    encoder = ByteSpanEncoder(tokenizer)
    spans = encoder.encode_segments(["ab c", Special.EOS, "é", Special.EOS])
    eos = tokenizer.eos_token_id
    positions = np.flatnonzero(spans.ids == eos)
    assert spans.ends[positions].tolist() == [5, 8]
    assert (spans.ends[positions] - spans.starts[positions]).tolist() == [1, 1]
    assert spans.ends[-1] == len("ab c") + 1 + len("é".encode()) + 1
    with pytest.raises(DistilError, match="no bos token"):
        encoder.encode_segments([Special.BOS, "x"])


def test_empty_text_has_no_tokens(tokenizer_pair: dict[str, Any]) -> None:
    assert len(ByteSpanEncoder(tokenizer_pair["bpe500"]).encode_text("")) == 0


@pytest.mark.parametrize("name", ["bpe500", "uni600"])
def test_segments_of_sampled_ids_give_back_the_text_and_the_special_tokens(
    tokenizer_pair: dict[str, Any], name: str
) -> None:
    """On-policy: ids the student sampled are read back as segments another tokenizer can
    encode; EOS stays one unit, and the spans are the ones encoding gives."""
    tokenizer = tokenizer_pair[name]
    encoder = ByteSpanEncoder(tokenizer)
    segments = [TRICKY_TEXTS[0], Special.EOS, TRICKY_TEXTS[3]]
    encoded = encoder.encode_segments(segments)
    back, spans = encoder.segments_of_ids(encoded.ids.tolist(), origin=0)
    assert back == segments
    assert spans.ids.tolist() == encoded.ids.tolist()
    assert set(spans.ends.tolist()) <= set(encoded.ends.tolist())
    assert spans.ends[-1] == encoded.ends[-1]
    with pytest.raises(DistilError, match="only EOS and BOS"):
        encoder.segments_of_ids([tokenizer.pad_token_id])
    text, decoded = encoder.decode_spans([])
    assert text == "" and len(decoded) == 0
