"""Padded vocabulary rows are never sampled, by any sampler (issue 13 item 2).

The model built here has 8 output rows past the tokenizer, and a forward hook on its output
layer makes those rows win every argmax and hold almost all the probability mass: a sampler
that does not mask them draws them at once. A second hook on the input embedding records every
id the model is fed, so a padded id that was generated shows up at the next step.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from distil.data.corpus import stdlib_root, train_bpe_tokenizer_from_texts
from distil.evaluation.lm import generate_texts, generation_speed, model_summary
from distil.models.lm import CausalLMSpec, build_causal_lm
from distil.models.vocab import KnownIdsOnly, load_tokenizer_folder, mask_unknown_ids
from distil.training.on_policy import SamplingSettings, sample_completions

PADDED = 8


@pytest.fixture(scope="module")
def padded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, list[int]]:
    root = tmp_path_factory.mktemp("padded")
    text = (stdlib_root() / "abc.py").read_text(encoding="utf-8")[:3000]
    tok = load_tokenizer_folder(train_bpe_tokenizer_from_texts([text], root / "tok", 300))
    vocab = len(tok)
    spec = CausalLMSpec(
        num_layers=1,
        hidden_size=16,
        num_heads=2,
        intermediate_size=32,
        vocab_size=vocab + PADDED,
        max_context=64,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = build_causal_lm(spec, seed=0)
    boost = torch.zeros(vocab + PADDED)
    boost[vocab:] = 50.0  # the padded rows win every argmax and every sample

    def favour_padded_rows(_module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return output + boost

    model.get_output_embeddings().register_forward_hook(favour_padded_rows)
    fed: list[int] = []

    def record_ids(_module: Any, inputs: tuple[torch.Tensor, ...]) -> None:
        fed.extend(int(i) for i in inputs[0].flatten())

    model.get_input_embeddings().register_forward_pre_hook(record_ids)
    return model, tok, fed


def test_mask_unknown_ids_sets_padded_rows_to_minus_inf_only() -> None:
    scores = torch.randn(3, 12)  # (B, V_model)
    masked = mask_unknown_ids(scores, 10)
    assert torch.isneginf(masked[:, 10:]).all()
    torch.testing.assert_close(masked[:, :10], scores[:, :10])
    assert not torch.isneginf(scores).any()  # the input is not changed in place
    assert mask_unknown_ids(scores, 12) is scores
    assert KnownIdsOnly(10)(torch.zeros(3, 1, dtype=torch.long), scores)[:, 10:].isneginf().all()


def test_report_generations_never_sample_padded_rows(padded: tuple[Any, Any, list[int]]) -> None:
    model, tok, fed = padded
    prompt = torch.tensor(tok("def f(x):")["input_ids"])
    for temperature in (0.0, 1.0):
        fed.clear()
        texts = generate_texts(
            model, [prompt], tok, max_new_tokens=5, sampling_temperature=temperature, seed=0
        )
        assert max(fed) < len(tok), f"a padded id was generated at temperature {temperature}"
        assert texts[0] != ""


def test_generation_speed_never_decodes_padded_rows(padded: tuple[Any, Any, list[int]]) -> None:
    model, tok, fed = padded
    fed.clear()
    ids = torch.tensor([tok("class A:")["input_ids"]] * 2)
    speed = generation_speed(
        model, ids, max_new_tokens=4, pad_token_id=tok.pad_token_id, vocab_size=len(tok)
    )
    assert speed > 0
    assert max(fed) < len(tok)


def test_report_row_passes_the_tokenizer_vocabulary(padded: tuple[Any, Any, list[int]]) -> None:
    model, tok, fed = padded
    ids = torch.tensor([tok("import os\nimport sys\n")["input_ids"][:8]] * 2)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    fed.clear()
    row = model_summary(
        "student",
        model,
        [batch],
        vocab_size=len(tok),
        teacher=None,
        speed_batch=2,
        speed_prompt_tokens=4,
        speed_new_tokens=4,
        pad_token_id=tok.pad_token_id,
    )
    assert row["gen_tokens_per_s"] > 0
    assert max(fed) < len(tok)


def test_on_policy_sampler_never_samples_padded_rows(padded: tuple[Any, Any, list[int]]) -> None:
    model, tok, _fed = padded
    prompts = [tok("def g():")["input_ids"], tok("x = 1")["input_ids"]]
    out = sample_completions(
        model,
        prompts,
        SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=4, prompt_tokens=8),
        pad_token_id=tok.pad_token_id,
        eos_token_ids=[tok.eos_token_id],
        vocab_size=len(tok),
    )
    assert all(i < len(tok) for row in out for i in row)
