"""The live causal-LM teacher: frozen, eval, no_grad, own dtype, vocab slicing, hidden signal."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from distil.errors import DistilError
from distil.models.lm import CausalLMSpec, build_causal_lm
from distil.teachers import LiveLMTeacher, Teacher, TeacherSignal, head_of, hidden_path_matches

SPEC = CausalLMSpec(
    num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64, vocab_size=72, max_context=32
)
VOCAB = 64  # the tokenizer's ids; the model has 8 padded rows


@pytest.fixture
def model() -> Any:
    return build_causal_lm(SPEC, seed=0).train()  # left in train mode on purpose


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    return ids, mask


def test_live_teacher_is_frozen_in_eval_and_slices_padded_rows(model: Any) -> None:
    teacher = LiveLMTeacher(
        model,
        vocab_size=VOCAB,
        device=torch.device("cpu"),
        dtype=torch.float32,
        output_device=torch.device("cpu"),
    )
    assert isinstance(teacher, Teacher)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    ids, mask = _batch()
    out = teacher({"input_ids": ids, "attention_mask": mask})
    assert (
        out.logits is not None
        and out.logits.shape == (2, 16, VOCAB)
        and not out.logits.requires_grad
    )
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out.logits, full[..., :VOCAB])
    teacher.check_deterministic({"input_ids": ids, "attention_mask": mask})
    assert "frozen, eval, no_grad" in teacher.describe() and "float32" in teacher.describe()


def test_teacher_keeps_its_own_precision_under_the_students_autocast(model: Any) -> None:
    teacher = LiveLMTeacher(
        model,
        vocab_size=VOCAB,
        device=torch.device("cpu"),
        dtype=torch.bfloat16,
        output_device=torch.device("cpu"),
    )
    ids, mask = _batch()
    with torch.autocast("cpu", dtype=torch.float16):
        out = teacher({"input_ids": ids, "attention_mask": mask})
    assert out.logits is not None and out.logits.dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.bfloat16
    assert "bfloat16" in teacher.describe()


def test_hidden_signal_rebuilds_the_same_logits(model: Any) -> None:
    ids, mask = _batch()
    assert hidden_path_matches(model, ids, mask)
    teacher = LiveLMTeacher(
        model,
        vocab_size=VOCAB,
        device=torch.device("cpu"),
        dtype=torch.float32,
        output_device=torch.device("cpu"),
        signal=TeacherSignal.HIDDEN,
    )
    out = teacher({"input_ids": ids, "attention_mask": mask})
    assert out.logits is None and out.hidden is not None and out.weight is not None
    assert out.hidden.shape == (2, 16, 32) and out.weight.shape == (VOCAB, 32)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits[..., :VOCAB]
    torch.testing.assert_close(out.hidden @ out.weight.T, full, rtol=1e-4, atol=1e-5)
    weight, bias = head_of(model)
    assert weight.shape == (72, 32) and bias is None


def test_nondeterministic_teacher_is_refused(model: Any) -> None:
    teacher = LiveLMTeacher(
        model,
        vocab_size=VOCAB,
        device=torch.device("cpu"),
        dtype=torch.float32,
        output_device=torch.device("cpu"),
    )
    calls = {"n": 0}
    original = teacher.model.forward

    def noisy(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        calls["n"] += 1
        out.logits = out.logits + calls["n"]  # a teacher left sampling or with dropout on
        return out

    teacher.model.forward = noisy  # type: ignore[method-assign]
    with pytest.raises(DistilError, match="two different answers"):
        teacher.check_deterministic(
            dict(zip(("input_ids", "attention_mask"), _batch(), strict=True))
        )


def test_scaled_logits_are_detected_so_the_hidden_path_is_not_used(model: Any) -> None:
    ids, mask = _batch()
    original = model.forward

    def softcapped(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        out.logits = 3.0 * torch.tanh(out.logits / 3.0)  # e.g. Gemma-2 final logit soft-capping
        return out

    model.forward = softcapped
    assert not hidden_path_matches(model, ids, mask)
