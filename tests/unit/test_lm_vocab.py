"""Vocabulary checks: padded embedding rows, tokenizer mismatches, fingerprints, missing files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from distil.data.corpus import PadTokenPolicy, stdlib_root, train_bpe_tokenizer_from_texts
from distil.errors import DistilError
from distil.models.lm import CausalLMSpec, build_causal_lm
from distil.models.vocab import (
    align_logits_to_vocab,
    check_distillation_vocab,
    check_same_tokenizer,
    check_vocab_alignment,
    load_tokenizer_folder,
    output_vocab_rows,
    tokenizer_fingerprint,
    tokenizer_vocab_size,
)


def _text(name: str) -> str:
    return (stdlib_root() / name).read_text(encoding="utf-8")[:4_000]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "main": train_bpe_tokenizer_from_texts([_text("abc.py")], root / "main", 300),
        "other_text": train_bpe_tokenizer_from_texts(
            [_text("bisect.py")], root / "other_text", 300
        ),
        "eos_pad": train_bpe_tokenizer_from_texts(
            [_text("abc.py")], root / "eos_pad", 300, pad_policy=PadTokenPolicy.EOS
        ),
    }


def test_padded_embedding_rows_are_sliced_to_the_tokenizer_never_padded(
    folders: dict[str, Path],
) -> None:
    tokenizer = load_tokenizer_folder(folders["main"])
    assert tokenizer_vocab_size(tokenizer) == 300
    teacher = build_causal_lm(CausalLMSpec(1, 32, 4, 64, 320, 16), seed=0)
    student = build_causal_lm(CausalLMSpec(1, 32, 4, 64, 304, 16), seed=1)

    alignment = check_distillation_vocab(
        tokenizer,
        load_tokenizer_folder(folders["main"]),
        teacher_vocab_rows=output_vocab_rows(teacher),
        student_vocab_rows=output_vocab_rows(student),
    )
    assert (
        alignment.tokenizer_vocab_size,
        alignment.teacher_vocab_rows,
        alignment.student_vocab_rows,
    ) == (300, 320, 304)
    assert alignment.needs_slicing

    input_ids = torch.tensor([[5, 17, 299]])
    teacher_logits = teacher(input_ids=input_ids).logits  # [1, 3, 320]
    student_logits = student(input_ids=input_ids).logits  # [1, 3, 304]
    aligned_teacher = align_logits_to_vocab(teacher_logits, alignment.tokenizer_vocab_size)
    aligned_student = align_logits_to_vocab(student_logits, alignment.tokenizer_vocab_size)
    assert aligned_teacher.shape == aligned_student.shape == (1, 3, 300)
    assert torch.equal(aligned_teacher, teacher_logits[..., :300])
    assert torch.equal(aligned_student, student_logits[..., :300])

    with pytest.raises(DistilError, match="never|padding logits would invent"):
        align_logits_to_vocab(torch.zeros(2, 290), 300)
    with pytest.raises(DistilError, match="fewer rows") as error:
        check_vocab_alignment(tokenizer, teacher_vocab_rows=320, student_vocab_rows=256)
    assert "student" in str(error.value) and "resize_token_embeddings" in str(error.value)


def test_different_tokenizers_are_refused_up_front(folders: dict[str, Path]) -> None:
    teacher_tokenizer = load_tokenizer_folder(folders["main"])
    same_tokenizer = load_tokenizer_folder(folders["main"])
    check_same_tokenizer(teacher_tokenizer, same_tokenizer)  # no error

    with pytest.raises(DistilError, match="tokenizers differ") as error:
        check_same_tokenizer(teacher_tokenizer, load_tokenizer_folder(folders["other_text"]))
    message = str(error.value)
    assert "only in the teacher's" in message
    assert "student.tokenizer" in message
    assert "sequence-level KD" in message

    with pytest.raises(DistilError, match="special tokens differ"):
        check_distillation_vocab(
            teacher_tokenizer,
            load_tokenizer_folder(folders["eos_pad"]),
            teacher_vocab_rows=300,
            student_vocab_rows=300,
        )


def test_fingerprint_is_stable_and_tells_tokenizers_apart(folders: dict[str, Path]) -> None:
    main = load_tokenizer_folder(folders["main"])
    fingerprint = tokenizer_fingerprint(main)
    assert len(fingerprint) == 64
    assert tokenizer_fingerprint(load_tokenizer_folder(folders["main"])) == fingerprint
    main.chat_template = "{{ messages }}"  # the chat template does not change token ids
    assert tokenizer_fingerprint(main) == fingerprint
    assert tokenizer_fingerprint(load_tokenizer_folder(folders["other_text"])) != fingerprint
    assert tokenizer_fingerprint(load_tokenizer_folder(folders["eos_pad"])) != fingerprint


def test_missing_tokenizer_files_name_the_problem(tmp_path: Path) -> None:
    folder = tmp_path / "model_only"
    folder.mkdir()
    (folder / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(DistilError, match="no tokenizer files") as error:
        load_tokenizer_folder(folder)
    assert "config.json" in str(error.value) and "save_pretrained" in str(error.value)
    with pytest.raises(DistilError, match="does not exist"):
        load_tokenizer_folder(tmp_path / "nowhere")


def test_output_rows_read_the_model_not_the_tokenizer(folders: dict[str, Any]) -> None:
    model = build_causal_lm(CausalLMSpec(1, 32, 4, 64, 384, 16), seed=0)
    assert output_vocab_rows(model) == 384
