"""``distil cache from-api`` pieces: the tail mass, token strings to ids, and the alignment of an
API's per-token log-probs with the tokens ``lm_kd`` reads (positions, EOS target, cuts)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from distil.remote.api_cache import TokenTable, _tail, longest_retokenisable_prefix, record_example
from tests.helpers import write_fixture


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from distil.models.vocab import load_tokenizer_folder

    root = tmp_path_factory.mktemp("tok")
    write_fixture(root)
    return load_tokenizer_folder(root / "tok")


def test_tail_is_the_mass_outside_the_top_k_in_float64() -> None:
    top = torch.log(torch.tensor([[0.5, 0.25], [0.9, 0.1], [0.3, 0.2]]))
    tail = _tail(top)
    assert torch.allclose(
        tail.exp(), torch.tensor([0.25, 0.0, 0.5], dtype=torch.float64), atol=1e-7
    )
    assert tail[1] < -15  # the top-k hold everything, up to the fp32 rounding of log(0.5)
    assert _tail(torch.tensor([[0.0]]))[0] == -math.inf
    tiny = _tail(torch.tensor([[math.log1p(-1e-9)]]))
    assert tiny.exp().item() == pytest.approx(1e-9, rel=1e-3)  # no cancellation near mass 1


def test_token_strings_map_to_ids_exactly_or_not_at_all(tok: Any) -> None:
    from distil.models.vocab import tokenizer_vocab_size

    vocab = tokenizer_vocab_size(tok)
    table = TokenTable(tok, vocab)
    assert table.id_of("token_id:7") == 7
    assert table.id_of(f"token_id:{vocab}") is None and table.id_of("token_id:x") is None
    word = tok("return", add_special_tokens=False)["input_ids"]
    if len(word) == 1:
        assert table.id_of("return") == word[0]
    ambiguous = [t for t, i in table.by_text.items() if i is None]
    for text in ambiguous:
        assert table.id_of(text) is None  # several ids decode to it: refused, never guessed


def test_longest_retokenisable_prefix(tok: Any) -> None:
    def round_trips(ids: list[int]) -> bool:
        return list(tok(tok.decode(ids), add_special_tokens=False)["input_ids"]) == ids

    ids = tok("def f(x):\n    return x", add_special_tokens=False)["input_ids"]
    assert longest_retokenisable_prefix(tok, ids) == ids  # canonical text: kept whole
    spelled = [*ids, *tok.convert_tokens_to_ids(list("return"))]  # a word spelled letter by letter
    assert not round_trips(spelled)
    cut = longest_retokenisable_prefix(tok, spelled)
    assert cut == spelled[: len(cut)] and round_trips(cut) and len(cut) >= len(ids)
    assert not any(round_trips(spelled[:m]) for m in range(len(cut) + 1, len(spelled) + 1))


def _record(tok: Any, prompt: str, completion_ids: list[int], k: int, eos: bool) -> dict[str, Any]:
    tokens = [*completion_ids, *([tok.eos_token_id] if eos else [])]
    top = [
        [
            {"token": f"token_id:{(t + j) % 200}", "logprob": math.log(0.5 / (j + 1))}
            for j in range(k)
        ]
        for t in tokens
    ]
    prompt_tokens = len(tok(prompt, add_special_tokens=True)["input_ids"])
    return {
        "logprobs": {
            "tokens": [f"token_id:{t}" for t in tokens],
            "logprobs": [-1.0] * len(tokens),
            "top": top,
        },
        "usage": {"prompt_tokens": prompt_tokens},
    }


@pytest.mark.parametrize("eos", [True, False])
def test_alignment_puts_the_last_distribution_on_the_eos(tok: Any, eos: bool) -> None:
    from distil.models.vocab import tokenizer_vocab_size

    table = TokenTable(tok, tokenizer_vocab_size(tok))
    prompt = "import os\n"
    completion = tok("def main():\n    pass", add_special_tokens=False)["input_ids"]
    record = _record(tok, prompt, completion, k=3, eos=eos)
    made = record_example(record, prompt, tokenizer=tok, table=table, k=3, max_length=64)
    assert not isinstance(made, str), made
    prompt_ids, completion_ids, targets = made
    returned = len(record["logprobs"]["tokens"])
    # the completion is every returned token but the last; all returned distributions are targets
    assert completion_ids == (completion if eos else completion[:-1])
    assert targets.positions.tolist() == list(
        range(len(prompt_ids) - 1, len(prompt_ids) - 1 + returned)
    )
    assert targets.ids.shape == (returned, 3)
    assert targets.ids[-1].tolist() == [int(t["token"][9:]) for t in record["logprobs"]["top"][-1]]


def test_records_that_cannot_be_aligned_say_why(tok: Any) -> None:
    from distil.models.vocab import tokenizer_vocab_size

    table = TokenTable(tok, tokenizer_vocab_size(tok))
    ids = tok("x = 1", add_special_tokens=False)["input_ids"]
    good = _record(tok, "a", ids, k=2, eos=True)
    assert (
        record_example(
            {**good, "logprobs": None}, "a", tokenizer=tok, table=table, k=2, max_length=64
        )
        == "no logprobs"
    )
    short = record_example(good, "a", tokenizer=tok, table=table, k=3, max_length=64)
    assert short == "fewer than k=3 alternatives at a position"
    counted = {**good, "usage": {"prompt_tokens": 99}}
    assert "server counted" in str(
        record_example(counted, "a", tokenizer=tok, table=table, k=2, max_length=64)
    )
    assert "max_length" in str(
        record_example(good, "a", tokenizer=tok, table=table, k=2, max_length=3)
    )
    unknown = {
        **good,
        "logprobs": {
            **good["logprobs"],
            "tokens": ["token_id:99999", *good["logprobs"]["tokens"][1:]],
        },
    }
    assert "vocabulary" in str(
        record_example(unknown, "a", tokenizer=tok, table=table, k=2, max_length=64)
    )


def test_from_api_refuses_a_text_only_folder(tmp_path: Path) -> None:
    import json

    from distil.errors import DistilError
    from distil.remote.api_cache import from_api

    (tmp_path / "gen").mkdir()
    manifest = {
        "format": "distil-generated-data",
        "mode": "endpoint",
        "complete": True,
        "shards": [],
        "signal": "text",
    }
    (tmp_path / "gen" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DistilError, match="holds text only"):
        from_api(tmp_path / "gen", tmp_path / "out", tokenizer_path=tmp_path, max_length=64)
