"""Causal LMs: build from a spec, layer-dropped students, save/load round trip, parameter counts."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from distil.data.corpus import stdlib_root, train_bpe_tokenizer_from_texts
from distil.errors import DistilError
from distil.models.lm import (
    CausalLMSpec,
    build_causal_lm,
    check_fits_context,
    count_parameters,
    init_student_from_teacher,
    load_causal_lm,
    model_context_length,
    save_model_folder,
    uniform_layer_indices,
    verify_student_from_teacher,
)
from distil.models.vocab import load_tokenizer_folder

TEACHER_SPEC = CausalLMSpec(
    num_layers=4,
    hidden_size=32,
    num_heads=4,
    intermediate_size=64,
    vocab_size=320,
    max_context=64,
    num_kv_heads=2,
    eos_token_id=0,
    pad_token_id=1,
)


@pytest.fixture(scope="module")
def teacher() -> Any:
    return build_causal_lm(TEACHER_SPEC, seed=0).eval()


def test_build_from_spec_is_seeded_without_touching_global_rng() -> None:
    state = torch.random.get_rng_state()
    first = build_causal_lm(TEACHER_SPEC, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    second = build_causal_lm(TEACHER_SPEC, seed=7)
    for (name, a), (_, b) in zip(
        first.state_dict().items(), second.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    config = first.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (4, 32, 4)
    assert (config.num_key_value_heads, config.intermediate_size, config.vocab_size) == (2, 64, 320)
    assert model_context_length(first) == 64
    check_fits_context(64, first)
    with pytest.raises(DistilError, match="longer than the teacher's context of 64"):
        check_fits_context(65, first, role="teacher")
    assert first(input_ids=torch.zeros(1, 5, dtype=torch.long)).logits.shape == (1, 5, 320)
    with pytest.raises(DistilError, match="must divide"):
        build_causal_lm(CausalLMSpec(2, 30, 4, 64, 320, 64))


def test_uniform_layer_indices_match_distilbert() -> None:
    assert uniform_layer_indices(12, 6) == (0, 2, 4, 7, 9, 11)
    assert uniform_layer_indices(4, 2) == (0, 3)
    assert uniform_layer_indices(4, 4) == (0, 1, 2, 3)
    assert uniform_layer_indices(4, 1) == (0,)
    with pytest.raises(DistilError, match="between 1 and 4"):
        uniform_layer_indices(4, 5)


def test_student_copies_embeddings_head_norm_and_the_chosen_layers(teacher: Any) -> None:
    student = init_student_from_teacher(teacher, [1, 3])

    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    for student_layer, teacher_layer in ((0, 1), (1, 3)):
        student_params = dict(student.model.layers[student_layer].named_parameters())
        teacher_params = dict(teacher.model.layers[teacher_layer].named_parameters())
        assert student_params.keys() == teacher_params.keys()
        for name, tensor in student_params.items():
            assert torch.equal(tensor, teacher_params[name]), (student_layer, name)
    # A copy, not a view: training the student leaves the teacher alone.
    assert student.lm_head.weight.data_ptr() != teacher.lm_head.weight.data_ptr()
    assert student.training

    uniform = init_student_from_teacher(teacher, num_layers=2)
    verify_student_from_teacher(teacher, uniform, (0, 3))
    with torch.no_grad():
        uniform.model.layers[1].mlp.up_proj.weight.add_(1.0)
    with pytest.raises(
        DistilError, match=r"model\.layers\.1\.mlp\.up_proj\.weight <- model\.layers\.3"
    ):
        verify_student_from_teacher(teacher, uniform, (0, 3))
    with pytest.raises(DistilError, match="increasing, distinct and within 0..3"):
        init_student_from_teacher(teacher, [3, 1])
    with pytest.raises(DistilError, match="exactly one"):
        init_student_from_teacher(teacher)


def test_save_and_load_round_trip_gives_identical_logits(teacher: Any, tmp_path: Path) -> None:
    texts = [(stdlib_root() / "abc.py").read_text(encoding="utf-8")[:4_000]]
    tokenizer = load_tokenizer_folder(train_bpe_tokenizer_from_texts(texts, tmp_path / "tok", 300))
    student = init_student_from_teacher(teacher, num_layers=2).eval()

    folder = save_model_folder(student, tmp_path / "student", tokenizer=tokenizer)
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert (folder / "tokenizer.json").is_file()
    loaded = load_causal_lm(folder)
    input_ids = torch.tensor([tokenizer("def f(x):\n    return x\n")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=input_ids).logits, student(input_ids=input_ids).logits, rtol=0, atol=0
        )
    assert load_tokenizer_folder(folder).get_vocab() == tokenizer.get_vocab()

    with pytest.raises(DistilError, match="not empty"):
        save_model_folder(student, folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DistilError, match="no config.json"):
        load_causal_lm(tmp_path / "empty")
    with pytest.raises(DistilError, match="does not exist"):
        load_causal_lm(tmp_path / "nowhere")


def test_count_parameters_counts_tied_embeddings_once(teacher: Any) -> None:
    untied = count_parameters(teacher)
    assert untied.total == sum(p.numel() for p in teacher.parameters())
    assert untied.embedding == 2 * 320 * 32  # input embedding + separate LM head
    assert untied.non_embedding == untied.total - untied.embedding

    tied = build_causal_lm(dataclasses.replace(TEACHER_SPEC, tie_word_embeddings=True), seed=0)
    tied_count = count_parameters(tied)
    assert tied_count.embedding == 320 * 32
    assert tied_count.total == untied.total - 320 * 32
    tied_student = init_student_from_teacher(tied, num_layers=2)
    assert tied_student.lm_head.weight is tied_student.model.embed_tokens.weight  # still tied
    tied.model.embed_tokens.weight.requires_grad_(False)
    assert count_parameters(tied).trainable == tied_count.total - 320 * 32
