"""Data read by two tokenizers, and the cross-tokenizer teacher cache built from it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
import torch

from distil.alignment import AlignmentKind, batch_groups
from distil.config.lm import LMDataSection
from distil.data.lm import build_lm_dataset, options_from, shift_for_next_token
from distil.data.lm_pairs import PairedLMData, build_paired_examples
from distil.errors import DistilError
from distil.losses.cross_tokenizer import group_log_probs
from distil.teachers.cross import CrossTokenizerCache, group_targets, write_cross_cache
from tests.helpers import TRICKY_TEXTS

TEXTS = [t * 6 for t in TRICKY_TEXTS]


def _section(**kw: Any) -> LMDataSection:
    return LMDataSection(source={"train": ["unused.jsonl"]}, **kw)


def test_packed_pairs_keep_the_student_blocks_and_align_the_teacher_inside_them(
    tokenizer_pair: dict[str, Any],
) -> None:
    student, teacher = tokenizer_pair["uni600"], tokenizer_pair["bpe500"]
    records = datasets.Dataset.from_dict({"text": TEXTS})
    section = _section(max_length=32)
    pairs, stats = build_paired_examples(records, section, student, teacher, teacher_max_length=64)
    plain = build_lm_dataset(records, student, options_from(section))
    assert pairs["input_ids"] == plain["input_ids"] and pairs["labels"] == plain["labels"]
    assert 0 < stats["coverage"] <= 1 and 0 < stats["one_to_one"] < 1
    stream = b"".join(t.encode() + b"\x00" for t in TEXTS)  # \x00 stands for the EOS unit
    for row in pairs:
        # The teacher's tokens spell a piece of the same stream the student's block reads.
        pieces = [t.encode() for t in row["texts"]]
        assert all(p in stream for p in pieces)
        groups = np.asarray(row["groups"]).reshape(-1, 4)
        assert groups.shape[0] > 0 and (groups[:, 1] < len(row["input_ids"]) - 1).all()
        assert (groups[:, 3] < len(row["teacher_input_ids"]) - 1).all()


def test_prompt_completion_pairs_cover_every_completion_byte(
    tokenizer_pair: dict[str, Any],
) -> None:
    student, teacher = tokenizer_pair["uni600"], tokenizer_pair["bpe500"]
    records = datasets.Dataset.from_dict(
        {"prompt": ["Q: " + t[:9] for t in TRICKY_TEXTS], "completion": list(TRICKY_TEXTS)}
    )
    section = _section(max_length=96, format="prompt_completion")
    pairs, stats = build_paired_examples(records, section, student, teacher)
    plain = build_lm_dataset(records, student, options_from(section))
    assert pairs["input_ids"] == plain["input_ids"] and pairs["labels"] == plain["labels"]
    assert stats["coverage"] == 1.0
    eos = teacher.eos_token_id
    assert all(row[-1] == eos for row in pairs["teacher_labels"])
    with pytest.raises(DistilError, match="student tokens long"):
        build_paired_examples(
            records, _section(max_length=8, format="prompt_completion"), student, teacher
        )


def test_chat_data_is_refused_across_tokenizers(tokenizer_pair: dict[str, Any]) -> None:
    records = datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": "hi"}]]})
    with pytest.raises(DistilError, match="chat"):
        build_paired_examples(
            records, _section(format="chat"), tokenizer_pair["uni600"], tokenizer_pair["bpe500"]
        )


def _paired(tokenizer_pair: dict[str, Any]) -> PairedLMData:
    student, teacher = tokenizer_pair["uni600"], tokenizer_pair["bpe500"]
    records = datasets.Dataset.from_dict({"text": TEXTS})
    pairs, stats = build_paired_examples(
        records, _section(max_length=32), student, teacher, teacher_max_length=64
    )
    return PairedLMData(
        pairs,
        pairs,
        np.zeros(len(pairs), np.int64),
        np.zeros(len(pairs), np.int64),
        np.zeros(len(pairs), np.int64),
        1,
        1,
        stats,
    )


def test_collate_returns_both_sides_and_padded_groups(tokenizer_pair: dict[str, Any]) -> None:
    data = _paired(tokenizer_pair)
    cols = data.collate(data.train, [0, 2])
    assert cols["input_ids"].shape[0] == cols["teacher_input_ids"].shape[0] == 2
    groups = batch_groups(
        AlignmentKind.BYTE_SPAN,
        cols["groups"],
        shift_for_next_token(cols["labels"]),
        shift_for_next_token(cols["teacher_labels"]),
    )
    assert groups.num_groups == sum(len(data.train[i]["groups"]) // 4 for i in (0, 2))
    assert data.eval_texts() and all(isinstance(t, str) for t in data.eval_texts())


def _merged(
    cols: dict[str, torch.Tensor], vocab: int, merge: str = "observed"
) -> tuple[Any, torch.Tensor]:
    targets = shift_for_next_token(cols["labels"])
    t_targets = shift_for_next_token(cols["teacher_labels"])
    groups = batch_groups("byte_span", cols["groups"], targets, t_targets)
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(*cols["teacher_input_ids"].shape, vocab, generator=g)
    merged = group_log_probs(
        logits, t_targets, groups.example, groups.teacher_first, groups.teacher_last, merge=merge
    )
    return groups, merged


@pytest.mark.parametrize("k", [8, 500])
def test_cross_cache_rebuilds_the_merged_distributions(
    tokenizer_pair: dict[str, Any], tmp_path: Path, k: int
) -> None:
    data = _paired(tokenizer_pair)
    vocab = len(tokenizer_pair["bpe500"])
    answers: dict[int, tuple[Any, torch.Tensor]] = {}

    def compute(indices: list[int]) -> dict[str, torch.Tensor]:
        groups, merged = _merged(data.collate(data.train, indices), vocab)
        answers[indices[0]] = (groups, merged)
        return group_targets(merged, groups, k=k, max_groups=32, batch_size=len(indices))

    spec = {"dataset_fingerprint": "d", "merge": "observed"}
    write_cross_cache(
        tmp_path / "c",
        example_ids=data.train["example_id"],
        compute=compute,
        spec=spec,
        value_dtype=torch.float16,
        id_dtype=torch.int16,
        examples_per_shard=4,
        batch_size=2,
    )
    cache = CrossTokenizerCache(
        tmp_path / "c", expect=spec, vocab_size=vocab, output_device=torch.device("cpu")
    )
    groups, merged = answers[2]
    cols = data.collate(data.train, [2, 3])
    out = cache({"example_id": cols["example_id"], "aligned_groups": groups})
    rebuilt = out.group_log_probs
    assert rebuilt is not None and rebuilt.shape == merged.shape
    # The total mass of every group is kept; the top k entries to float16 precision.
    torch.testing.assert_close(rebuilt.logsumexp(-1), merged.logsumexp(-1), atol=2e-3, rtol=0)
    top = merged.topk(min(k, vocab), dim=-1)
    torch.testing.assert_close(rebuilt.gather(-1, top.indices), top.values, atol=2e-2, rtol=0)
    if k >= vocab:
        torch.testing.assert_close(rebuilt, merged, atol=2e-2, rtol=0)
    else:  # the rest is spread evenly
        rest = torch.ones_like(merged, dtype=torch.bool).scatter_(1, top.indices, False)
        spread = rebuilt[rest].reshape(merged.shape[0], -1)
        assert torch.allclose(spread, spread[:, :1].expand_as(spread))
    from dataclasses import replace

    moved = groups.teacher_first.clone()
    moved[0] += 1
    other = replace(
        groups, teacher_first=moved, teacher_last=torch.maximum(groups.teacher_last, moved)
    )
    with pytest.raises(DistilError, match="another alignment"):
        cache({"example_id": cols["example_id"], "aligned_groups": other})
    with pytest.raises(DistilError, match="does not match"):
        CrossTokenizerCache(
            tmp_path / "c",
            expect={**spec, "merge": "bayesian"},
            vocab_size=vocab,
            output_device=torch.device("cpu"),
        )
    assert math.isfinite(float(rebuilt.max()))


@pytest.mark.parametrize("loss", ["hybrid", "min_ed", "first_token"])
def test_the_cross_path_with_one_tokenizer_is_same_tokenizer_kd(
    tokenizer_pair: dict[str, Any], loss: str
) -> None:
    """The whole cross-tokenizer path (paired examples, byte-span groups, the group merge and the
    loss) with the teacher's tokenizer on both sides must be same-tokenizer forward-KL KD: every
    group is one-to-one and matched, so loss and gradient equal ``token_objective``'s."""
    from distil.alignment.vocab import first_token_map, shared_vocabulary
    from distil.losses.objective import cross_tokenizer_objective, token_objective

    tok = tokenizer_pair["bpe500"]
    records = datasets.Dataset.from_dict({"text": TEXTS})
    pairs, stats = build_paired_examples(
        records, _section(max_length=32), tok, tok, teacher_max_length=32
    )
    assert stats["one_to_one"] == pytest.approx(1.0)
    data = PairedLMData(pairs, pairs, *(np.zeros(len(pairs), np.int64),) * 3, 1, 1, stats)
    cols = data.collate(data.train, list(range(min(4, len(pairs)))))
    assert torch.equal(cols["input_ids"], cols["teacher_input_ids"])
    targets = shift_for_next_token(cols["labels"])
    groups = batch_groups(
        "byte_span", cols["groups"], targets, shift_for_next_token(cols["teacher_labels"])
    )
    assert groups.num_groups == int((targets != -100).sum())  # one group per supervised target
    vocab = len(tok)
    g = torch.Generator().manual_seed(0)
    t_logits = 2 * torch.randn(*cols["input_ids"].shape, vocab, generator=g)
    s_logits = torch.randn(*cols["input_ids"].shape, vocab, generator=g).requires_grad_(True)
    ref = token_objective(
        s_logits, t_logits, targets, kd_weight=0.9, kd_temperature=1.0, divergence="forward_kl"
    )
    params: dict[str, Any] = {"merge": "observed"}
    if loss == "hybrid":
        params |= {
            "shared_vocabulary": shared_vocabulary(tok, tok),
            "matched_divergence": "forward_kl",
        }
    elif loss == "min_ed":
        params |= {"vocab_map": torch.arange(vocab), "divergence": "forward_kl"}
    else:  # the real first-token map: the identity when both sides share one tokenizer
        vocab_map = first_token_map(tok, tok)
        assert torch.equal(vocab_map, torch.arange(vocab))
        params |= {"vocab_map": vocab_map, "divergence": "forward_kl"}
    out = cross_tokenizer_objective(
        s_logits, t_logits, groups, kd_weight=0.9, kd_temperature=1.0, loss=loss, **params
    )
    assert float(out.loss.detach()) == pytest.approx(float(ref.loss.detach()), rel=1e-5)
    (g_ref,) = torch.autograd.grad(ref.loss, s_logits)
    (g_out,) = torch.autograd.grad(out.loss, s_logits)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-4, atol=1e-7)
