"""Byte-span groups of two tokenizations: exact bytes, full coverage, BOS/EOS asymmetry,
special tokens, the loop reference, positional pairs and collation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from distil.alignment import (
    ByteSpanEncoder,
    Special,
    TokenSpans,
    align_spans,
    alignment_stats,
    collate_groups,
    cut_aligned_blocks,
    positional_alignment,
)
from distil.alignment.groups import IGNORE_INDEX
from distil.data.lm import IGNORE_INDEX as DATA_IGNORE_INDEX
from distil.errors import DistilError
from tests.helpers import TRICKY_TEXTS


def _walk(s_ends: list[int], t_ends: list[int]) -> list[tuple[int, int, int, int]]:
    """Loop reference (GOLD's two-pointer walk, with tokens that share an end kept together):
    advance the side whose token ends first; close a group where both end at the same unit."""
    groups, i, j, gi, gj = [], 0, 0, 0, 0
    while i < len(s_ends) and j < len(t_ends):
        if s_ends[i] < t_ends[j]:
            i += 1
        elif s_ends[i] > t_ends[j]:
            j += 1
        else:
            end = s_ends[i]
            while i + 1 < len(s_ends) and s_ends[i + 1] == end:
                i += 1
            while j + 1 < len(t_ends) and t_ends[j + 1] == end:
                j += 1
            groups.append((gi, i, gj, j))
            i, j = i + 1, j + 1
            gi, gj = i, j
    return groups


def _check_groups(student: TokenSpans, teacher: TokenSpans, groups: np.ndarray) -> None:
    """Every group covers the same units on both sides, runs are contiguous and in order."""
    previous = (-1, -1)
    for s_first, s_last, t_first, t_last in groups.tolist():
        assert s_first > previous[0] and t_first > previous[1]
        previous = (s_last, t_last)
        # target t is input token t + 1
        assert student.starts[s_first + 1] == teacher.starts[t_first + 1]
        assert student.ends[s_last + 1] == teacher.ends[t_last + 1]


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_groups_cover_every_completion_byte_with_the_same_bytes(
    tokenizer_pair: dict[str, Any], text: str
) -> None:
    """Prompt/completion: the completion starts a segment on both sides, so every completion
    byte and the EOS are covered, whitespace runs and multi-byte characters included."""
    s_enc = ByteSpanEncoder(tokenizer_pair["uni600"])
    t_enc = ByteSpanEncoder(tokenizer_pair["bpe500"])
    segments = ["prompt: ", text, Special.EOS]
    student, teacher = s_enc.encode_segments(segments), t_enc.encode_segments(segments)
    n_prompt_s = len(s_enc.encode_text("prompt: "))
    n_prompt_t = len(t_enc.encode_text("prompt: "))
    s_sup = np.arange(len(student)) >= n_prompt_s
    t_sup = np.arange(len(teacher)) >= n_prompt_t
    alignment = align_spans(student, teacher, student_supervised=s_sup, teacher_supervised=t_sup)
    assert alignment.student_units == len(text.encode("utf-8")) + 1  # the EOS is one unit
    assert alignment.coverage == 1.0
    _check_groups(student, teacher, alignment.groups)
    # The EOS is its own one-to-one group.
    assert alignment.groups[-1].tolist() == [
        len(student) - 2,
        len(student) - 2,
        len(teacher) - 2,
        len(teacher) - 2,
    ]
    # Vectorised == loop reference.
    s_ends = student.ends[1:][s_sup[1:]].tolist()
    t_ends = teacher.ends[1:][t_sup[1:]].tolist()
    offset_s, offset_t = n_prompt_s - 1, n_prompt_t - 1
    reference = [
        (a + offset_s, b + offset_s, c + offset_t, d + offset_t)
        for a, b, c, d in _walk(s_ends, t_ends)
    ]
    assert [tuple(g) for g in alignment.groups.tolist()] == reference


def test_multi_byte_characters_align_byte_by_byte_where_both_split_them(
    tokenizer_pair: dict[str, Any],
) -> None:
    """An emoji is four byte tokens in both the byte-level BPE and the byte-fallback Unigram:
    four one-to-one groups, not one group of the whole character."""
    s_enc = ByteSpanEncoder(tokenizer_pair["uni600"])
    t_enc = ByteSpanEncoder(tokenizer_pair["bpe500"])
    segments = [Special.EOS, "😀"]
    student, teacher = s_enc.encode_segments(segments), t_enc.encode_segments(segments)
    assert len(student) == len(teacher) == 5
    alignment = align_spans(student, teacher)
    assert alignment.groups.tolist() == [[k, k, k, k] for k in range(4)]


def test_bos_on_one_side_only_changes_nothing_but_the_teacher_indices(
    tokenizer_pair: dict[str, Any],
) -> None:
    """trl#5885: one tokenizer adds BOS, the other not. BOS is zero-width, so the groups are
    the same, shifted by one position on the side that has it."""
    s_enc = ByteSpanEncoder(tokenizer_pair["uni600"])
    t_enc = ByteSpanEncoder(tokenizer_pair["bpe500"])
    tokenizer_pair["bpe500"].bos_token = "<|endoftext|>"  # give the teacher a BOS token
    try:
        completion = TRICKY_TEXTS[0]
        student = s_enc.encode_segments(["q: ", completion, Special.EOS])
        plain = t_enc.encode_segments(["q: ", completion, Special.EOS])
        with_bos = t_enc.encode_segments([Special.BOS, "q: ", completion, Special.EOS])
    finally:
        tokenizer_pair["bpe500"].bos_token = None
    assert len(with_bos) == len(plain) + 1

    def supervised(spans: TokenSpans, first: int) -> np.ndarray:
        return np.arange(len(spans)) >= first

    n_s = len(s_enc.encode_text("q: "))
    n_t = len(t_enc.encode_text("q: "))
    a = align_spans(
        student,
        plain,
        student_supervised=supervised(student, n_s),
        teacher_supervised=supervised(plain, n_t),
    )
    b = align_spans(
        student,
        with_bos,
        student_supervised=supervised(student, n_s),
        teacher_supervised=supervised(with_bos, n_t + 1),
    )
    assert a.coverage == b.coverage == 1.0
    shifted = a.groups.copy()
    shifted[:, 2:] += 1
    assert b.groups.tolist() == shifted.tolist()


def test_eos_on_one_side_only_is_left_out(tokenizer_pair: dict[str, Any]) -> None:
    s_enc = ByteSpanEncoder(tokenizer_pair["uni600"])
    t_enc = ByteSpanEncoder(tokenizer_pair["bpe500"])
    text = TRICKY_TEXTS[1]
    student = s_enc.encode_segments([Special.EOS, text])
    teacher = t_enc.encode_segments([Special.EOS, text, Special.EOS])
    alignment = align_spans(student, teacher)
    assert alignment.coverage == 1.0
    assert alignment.groups[-1, 3] == len(teacher) - 3  # the teacher's EOS target is unpaired
    assert alignment.teacher_units == alignment.student_units + 1


def test_packed_documents_align_eos_to_eos_and_skip_only_the_unpredicted_start(
    tokenizer_pair: dict[str, Any],
) -> None:
    s_enc = ByteSpanEncoder(tokenizer_pair["uni600"])
    t_enc = ByteSpanEncoder(tokenizer_pair["bpe500"])
    segments = [TRICKY_TEXTS[0], Special.EOS, TRICKY_TEXTS[2], Special.EOS]
    student, teacher = s_enc.encode_segments(segments), t_enc.encode_segments(segments)
    alignment = align_spans(student, teacher)
    _check_groups(student, teacher, alignment.groups)
    eos_s = np.flatnonzero(student.ids == tokenizer_pair["uni600"].eos_token_id) - 1
    eos_t = np.flatnonzero(teacher.ids == tokenizer_pair["bpe500"].eos_token_id) - 1
    pairs = {(g[0], g[2]) for g in alignment.groups.tolist() if g[0] == g[1] and g[2] == g[3]}
    assert set(zip(eos_s.tolist(), eos_t.tolist(), strict=True)) <= pairs
    # Neither side predicts its first token, so at most the bytes up to the first common
    # boundary are lost.
    lost = alignment.student_units - alignment.covered_units
    first_common = np.intersect1d(student.ends[1:], teacher.ends[1:])[0]
    assert lost <= first_common - student.ends[0]


def test_an_unsupervised_gap_is_never_inside_a_group(tokenizer_pair: dict[str, Any]) -> None:
    s_enc = ByteSpanEncoder(tokenizer_pair["uni600"])
    t_enc = ByteSpanEncoder(tokenizer_pair["bpe500"])
    parts = ["user: hi", " answer one", " user: more", " answer two"]
    student, teacher = s_enc.encode_segments(parts), t_enc.encode_segments(parts)

    def mask(enc: ByteSpanEncoder) -> np.ndarray:
        sizes = [len(enc.encode_text(p)) for p in parts]
        return np.repeat([False, True, False, True], sizes)

    alignment = align_spans(
        student, teacher, student_supervised=mask(s_enc), teacher_supervised=mask(t_enc)
    )
    gap_start = len("user: hi answer one")
    gap_end = gap_start + len(" user: more")
    for s_first, s_last, _, _ in alignment.groups.tolist():
        lo, hi = student.starts[s_first + 1], student.ends[s_last + 1]
        assert hi <= gap_start or lo >= gap_end
    assert alignment.coverage == 1.0


def test_identical_tokenizers_give_one_to_one_groups(tokenizer_pair: dict[str, Any]) -> None:
    enc = ByteSpanEncoder(tokenizer_pair["uni600"])
    spans = enc.encode_segments([Special.EOS, *TRICKY_TEXTS])
    alignment = align_spans(spans, spans)
    n = len(spans) - 1
    assert alignment.groups.tolist() == [[k, k, k, k] for k in range(n)]
    stats = alignment_stats([alignment])
    assert stats["one_to_one"] == 1.0 and stats["coverage"] == 1.0


def test_different_tokenizers_form_larger_groups(tokenizer_pair: dict[str, Any]) -> None:
    s_enc = ByteSpanEncoder(tokenizer_pair["uni600"])
    t_enc = ByteSpanEncoder(tokenizer_pair["bpe500"])
    alignments = [
        align_spans(
            s_enc.encode_segments([Special.EOS, t]), t_enc.encode_segments([Special.EOS, t])
        )
        for t in TRICKY_TEXTS
    ]
    stats = alignment_stats(alignments)
    assert 0 < stats["one_to_one"] < 1
    assert stats["max_group_tokens"] > 2
    assert stats["coverage"] == 1.0
    assert stats["groups"] == sum(a.groups.shape[0] for a in alignments)


def test_alignment_stats_on_a_hand_example() -> None:
    from distil.alignment import SpanAlignment

    groups = np.array([[0, 0, 0, 0], [1, 3, 1, 1], [4, 4, 2, 3]], dtype=np.int32)
    stats = alignment_stats(
        [SpanAlignment(groups, covered_units=9, student_units=10, teacher_units=9)]
    )
    assert stats["groups"] == 3
    assert stats["one_to_one"] == pytest.approx(1 / 3)
    assert stats["student_tokens_one_to_one"] == pytest.approx(1 / 5)
    assert stats["teacher_tokens_one_to_one"] == pytest.approx(1 / 4)
    assert stats["max_group_tokens"] == 4
    assert stats["coverage"] == pytest.approx(0.9)


def test_ignore_index_matches_the_data_convention() -> None:
    assert IGNORE_INDEX == DATA_IGNORE_INDEX


def test_positional_alignment_pairs_the_kth_supervised_targets() -> None:
    student = torch.tensor([[-100, 5, 6, 7, 8], [1, 2, -100, -100, -100]])
    teacher = torch.tensor([[-100, -100, 9, 9, -100, -100], [3, 3, 3, 3, 3, -100]])
    groups = positional_alignment(student, teacher)
    reference = []
    for row in range(2):
        s = (student[row] != -100).nonzero().flatten().tolist()
        t = (teacher[row] != -100).nonzero().flatten().tolist()
        reference += [(row, a, b) for a, b in zip(s, t, strict=False)]
    got = list(
        zip(
            groups.example.tolist(),
            groups.student_first.tolist(),
            groups.teacher_first.tolist(),
            strict=True,
        )
    )
    assert got == reference
    assert torch.equal(groups.student_first, groups.student_last)
    assert torch.equal(groups.teacher_first, groups.teacher_last)


def test_collate_groups_builds_index_tensors_and_checks_them() -> None:
    student = torch.tensor([[5, 6, 7, -100], [1, 2, 3, 4]])
    teacher = torch.tensor([[9, 9, -100], [8, 8, 8]])
    a = np.array([[0, 1, 0, 0], [2, 2, 1, 1]], dtype=np.int32)
    b = np.array([[0, 3, 0, 2]], dtype=np.int32)
    groups = collate_groups([a, b], student, teacher)
    assert groups.example.tolist() == [0, 0, 1]
    assert groups.student_last.tolist() == [1, 2, 3]
    assert groups.num_groups == 3
    with pytest.raises(ValueError, match="beyond"):
        collate_groups([np.array([[0, 4, 0, 0]]), b], student, teacher)
    with pytest.raises(ValueError, match="unsupervised"):
        collate_groups([np.array([[3, 3, 0, 0]]), b], student, teacher)
    with pytest.raises(ValueError, match="rows"):
        collate_groups([a], student, teacher)
    empty = collate_groups([np.zeros((0, 4)), np.zeros((0, 4))], student, teacher)
    assert empty.num_groups == 0


def test_packed_stream_cuts_into_blocks_that_read_the_same_text(
    tokenizer_pair: dict[str, Any],
) -> None:
    s_enc = ByteSpanEncoder(tokenizer_pair["uni600"])
    t_enc = ByteSpanEncoder(tokenizer_pair["bpe500"])
    segments: list[str | Special] = []
    for text in TRICKY_TEXTS * 3:
        segments += [text, Special.EOS]
    student, teacher = s_enc.encode_segments(segments), t_enc.encode_segments(segments)
    blocks = cut_aligned_blocks(student, teacher, 16)
    assert len(blocks) == len(student) // 16
    for k, block in enumerate(blocks):
        assert block.student.ids.tolist() == student.ids[16 * k : 16 * (k + 1)].tolist()
        assert block.teacher.starts[0] >= block.student.starts[0]
        assert block.teacher.ends[-1] <= block.student.ends[-1]
        _check_groups(block.student, block.teacher, block.alignment.groups)
    coverage = sum(b.alignment.covered_units for b in blocks) / sum(
        b.alignment.student_units for b in blocks
    )
    assert coverage > 0.6
    # A teacher that needs more tokens than its context keeps the first ones: the rest of the
    # block's text is left out of the groups, never misaligned.
    cut = cut_aligned_blocks(teacher, student, 16, teacher_max_length=16)
    assert all(len(b.teacher) <= 16 for b in cut)
    for block in cut:
        _check_groups(block.student, block.teacher, block.alignment.groups)
    with pytest.raises(DistilError, match="block_size"):
        cut_aligned_blocks(student, teacher, 1)


def test_padded_groups_and_the_alignment_kinds() -> None:
    from distil.alignment import AlignmentKind, batch_groups, groups_from_padded

    student = torch.tensor([[5, 6, 7, -100], [1, 2, 3, 4]])
    teacher = torch.tensor([[9, 9, -100], [8, 8, 8]])
    padded = torch.tensor(
        [[[0, 1, 0, 0], [2, 2, 1, 1]], [[0, 3, 0, 2], [-1, -1, -1, -1]]]
    )  # (B, G_max, 4)
    groups = groups_from_padded(padded, student, teacher)
    reference = collate_groups(
        [np.array([[0, 1, 0, 0], [2, 2, 1, 1]]), np.array([[0, 3, 0, 2]])], student, teacher
    )
    for field in ("example", "student_first", "student_last", "teacher_first", "teacher_last"):
        assert torch.equal(getattr(groups, field), getattr(reference, field))
    assert batch_groups(AlignmentKind.BYTE_SPAN, padded, student, teacher).num_groups == 3
    positional = batch_groups("positional", padded, student, teacher)
    assert positional.student_first.tolist() == [0, 1, 0, 1, 2]
    with pytest.raises(ValueError, match="beyond"):
        groups_from_padded(torch.tensor([[[0, 9, 0, 0]], [[0, 0, 0, 0]]]), student, teacher)
