"""Held-out bits per byte: every byte scored once, tokenizer-independent for a perfect model."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerFast

from distil.errors import DistilError
from distil.evaluation.bits_per_byte import bits_per_byte, scoring_windows

# A source that emits one of three characters (1, 2 and 3 UTF-8 bytes) independently.
CHAR_PROBS = {"a": 0.5, "é": 0.3, "日": 0.2}


def _tokenizer(vocab: list[str], pattern: str) -> PreTrainedTokenizerFast:
    """A fast tokenizer with a fixed vocabulary that splits text by ``pattern``."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


class UnigramLM(nn.Module):
    """A context-free LM: the same next-token log-probabilities at every position."""

    def __init__(self, log_probs: Tensor) -> None:
        super().__init__()
        self.register_buffer("table", log_probs)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, use_cache: bool = False) -> Any:
        return SimpleNamespace(logits=self.table.expand(*input_ids.shape, -1).clone())


def _perfect_models() -> tuple[tuple[Any, UnigramLM], tuple[Any, UnigramLM]]:
    """A character tokenizer and a pair tokenizer, each with the model that knows the source:
    p(pair xy) = p(x)·p(y), so both give every text the same probability."""
    chars = list(CHAR_PROBS)
    char_tok = _tokenizer(["<eos>", *chars], ".")
    char_lm = UnigramLM(torch.tensor([-math.inf, *(math.log(CHAR_PROBS[c]) for c in chars)]))
    pairs = [x + y for x in chars for y in chars]
    pair_tok = _tokenizer(["<eos>", *pairs], "..")
    pair_lm = UnigramLM(
        torch.tensor([-math.inf, *(math.log(CHAR_PROBS[p[0]] * CHAR_PROBS[p[1]]) for p in pairs)])
    )
    return (char_tok, char_lm), (pair_tok, pair_lm)


def _texts(n: int, length: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    chars = list(CHAR_PROBS)
    probs = torch.tensor(list(CHAR_PROBS.values()))
    return [
        "".join(chars[i] for i in torch.multinomial(probs, length, True, generator=g))
        for _ in range(n)
    ]


@pytest.mark.parametrize(
    ("length", "max_length", "stride"), [(1, 2, 1), (9, 4, 3), (10, 4, 2), (30, 8, 7), (5, 64, 63)]
)
def test_scoring_windows_score_every_position_once(
    length: int, max_length: int, stride: int
) -> None:
    scored: list[int] = []
    for begin, end, score_from in scoring_windows(length, max_length, stride):
        assert end - begin <= max_length and begin < score_from <= end
        scored += range(score_from, end)
    assert scored == list(range(1, length))
    with pytest.raises(ValueError):
        scoring_windows(10, 4, 4)


def test_two_tokenizations_of_a_perfect_model_give_the_same_bits_per_byte() -> None:
    (char_tok, char_lm), (pair_tok, pair_lm) = _perfect_models()
    texts = _texts(5, 40, seed=0)  # even lengths: the pair tokenizer needs no single characters
    by_char = bits_per_byte(char_lm, char_tok, texts, max_length=7, batch_size=3)
    by_pair = bits_per_byte(pair_lm, pair_tok, texts, max_length=5, batch_size=2)
    assert by_char.tokens == 2 * by_pair.tokens
    assert by_char.bytes == by_pair.bytes == sum(len(t.encode()) for t in texts)
    expected = -sum(math.log(CHAR_PROBS[c]) for t in texts for c in t) / (
        by_char.bytes * math.log(2)
    )
    assert by_char.bits_per_byte == pytest.approx(expected, rel=1e-6)
    assert by_pair.bits_per_byte == pytest.approx(expected, rel=1e-6)
    # Per token the two disagree (a pair carries twice the information): the reason for bpb.
    assert by_pair.ce_nats_per_token == pytest.approx(2 * by_char.ce_nats_per_token, rel=1e-6)


def _tiny_lm(vocab_size: int) -> nn.Module:
    from distil.models.lm import CausalLMSpec, build_causal_lm

    spec = CausalLMSpec(
        num_layers=1,
        hidden_size=16,
        num_heads=2,
        intermediate_size=32,
        vocab_size=vocab_size,
        max_context=32,
    )
    return build_causal_lm(spec, seed=0)


def test_bits_per_byte_is_total_cross_entropy_over_bytes(tokenizer_pair: dict[str, Any]) -> None:
    tokenizer = tokenizer_pair["uni600"]
    model = _tiny_lm(len(tokenizer))
    texts = ["def f(x):\n    return x  # é", "class A:\n    pass\n", "x = 1"]
    result = bits_per_byte(model, tokenizer, texts, max_length=32, batch_size=2)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor(
                [[tokenizer.eos_token_id, *tokenizer.encode(text, add_special_tokens=False)]]
            )
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            nll += float(
                torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            )
            tokens += ids.shape[1] - 1
    n_bytes = sum(len(t.encode()) for t in texts)
    assert result.tokens == tokens and result.bytes == n_bytes
    assert result.nll_nats == pytest.approx(nll, rel=1e-5)
    assert result.bits_per_byte == pytest.approx(
        result.ce_nats_per_token * tokens / (n_bytes * math.log(2))
    )
    assert result.as_dict()["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    again = bits_per_byte(model, tokenizer, texts, max_length=32, batch_size=1)
    assert again.nll_nats == pytest.approx(result.nll_nats, rel=1e-6)
    assert model.training  # returned to its previous mode


def test_padded_vocabulary_rows_are_sliced_off(tokenizer_pair: dict[str, Any]) -> None:
    tokenizer = tokenizer_pair["bpe320"]
    model = _tiny_lm(len(tokenizer) + 8)
    texts = ["import os\nprint(os.sep)"]
    plain = bits_per_byte(model, tokenizer, texts, max_length=16)
    with torch.no_grad():
        model.lm_head.weight[len(tokenizer) :] = 50.0  # padded rows that would take all the mass
    assert bits_per_byte(model, tokenizer, texts, max_length=16).nll_nats == pytest.approx(
        plain.nll_nats, rel=1e-5
    )


def test_a_tokenizer_without_start_token_needs_one_given() -> None:
    (char_tok, char_lm), _ = _perfect_models()
    char_tok.eos_token = None
    with pytest.raises(DistilError, match="start_token_id"):
        bits_per_byte(char_lm, char_tok, ["aé"], max_length=4)
    assert bits_per_byte(char_lm, char_tok, ["aé"], max_length=4, start_token_id=0).bytes == 3
