"""Token surfaces, shared vocabulary entries, the MinED map and the longest-prefix map."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from distil.alignment import (
    VocabMatch,
    first_token_map,
    min_edit_distance_map,
    shared_vocabulary,
    token_surfaces,
)
from distil.alignment.vocab import (
    byte_level_decoder_table,
    canonical_surface_ids,
    levenshtein_bit_parallel,
    levenshtein_block,
    min_edit_distance_map_from_keys,
    special_token_ids,
)


def _levenshtein(a: bytes, b: bytes) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (ca != cb))
    return row[-1]


def _matrix(strings: list[bytes]) -> torch.Tensor:
    return torch.tensor([list(s) for s in strings], dtype=torch.int32).reshape(len(strings), -1)


def test_byte_level_table_is_a_bijection_onto_bytes() -> None:
    table = byte_level_decoder_table()
    assert sorted(table.values()) == list(range(256))
    assert table["Ġ"] == ord(" ") and table["Ċ"] == ord("\n") and table["a"] == ord("a")


def test_surfaces_are_the_bytes_each_token_stands_for(tokenizer_pair: dict[str, Any]) -> None:
    for name in ("bpe500", "uni600"):
        tokenizer = tokenizer_pair[name]
        surfaces = token_surfaces(tokenizer)
        assert len(surfaces) == len(tokenizer)
        specials = special_token_ids(tokenizer)
        assert all(surfaces[i] is None for i in specials)
        # Concatenated surfaces of an encoding are the text's bytes.
        text = "def f(x):\n    return x  # é 日本 😀"
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert b"".join(surfaces[i] or b"" for i in ids) == text.encode("utf-8")
    uni = tokenizer_pair["uni600"]
    uni_surfaces = token_surfaces(uni)
    assert uni_surfaces[uni.convert_tokens_to_ids("<0x41>")] == b"A"
    spaced = [
        i
        for i, p in enumerate(uni.convert_ids_to_tokens(list(range(len(uni)))))
        if p.startswith("▁") and len(p) > 1
    ]
    assert spaced and all(uni_surfaces[i].startswith(b" ") for i in spaced)


def test_identical_tokenizers_share_every_entry(tokenizer_pair: dict[str, Any]) -> None:
    tokenizer = tokenizer_pair["uni600"]
    raw = shared_vocabulary(tokenizer, tokenizer, match=VocabMatch.RAW)
    assert torch.equal(raw.teacher_ids, torch.arange(len(tokenizer)))
    assert torch.equal(raw.student_ids, raw.teacher_ids)
    # By surface, a byte piece <0x41> and a learned piece "A" are one entry (the lower id).
    surface = shared_vocabulary(tokenizer, tokenizer)
    assert torch.equal(surface.teacher_ids, surface.student_ids)
    surfaces = token_surfaces(tokenizer)
    specials = special_token_ids(tokenizer)
    distinct = {surfaces[i] for i in range(len(tokenizer)) if i not in specials} - {None}
    assert len(surface) == len(distinct) + len(specials)


def test_surface_matching_pairs_space_marked_entries_raw_matching_misses(
    tokenizer_pair: dict[str, Any],
) -> None:
    teacher, student = tokenizer_pair["bpe500"], tokenizer_pair["uni600"]
    surface = shared_vocabulary(teacher, student)
    raw = shared_vocabulary(teacher, student, match="raw")
    assert len(surface) > len(raw) > 0
    t_surfaces, s_surfaces = token_surfaces(teacher), token_surfaces(student)
    t_special, s_special = special_token_ids(teacher), special_token_ids(student)
    for t, s in zip(surface.teacher_ids.tolist(), surface.student_ids.tolist(), strict=True):
        if t in t_special:
            assert t_special[t] == s_special[s]
        else:
            assert t_surfaces[t] == s_surfaces[s]
    assert len(set(surface.student_ids.tolist())) == len(surface)  # one-to-one
    pieces = teacher.convert_ids_to_tokens(surface.teacher_ids.tolist())
    assert any(p.startswith("Ġ") for p in pieces)  # " def" pairs "Ġdef" with "▁def"


def test_nested_bpe_of_the_same_family_shares_its_whole_vocabulary(
    tokenizer_pair: dict[str, Any],
) -> None:
    small, large = tokenizer_pair["bpe320"], tokenizer_pair["bpe500"]
    shared = shared_vocabulary(large, small, match="raw")
    assert len(shared) == len(small)


@pytest.mark.parametrize("len_a", [1, 2, 5, 13, 62])
@pytest.mark.parametrize("len_b", [1, 3, 8])
def test_levenshtein_kernels_equal_the_dynamic_programme(len_a: int, len_b: int) -> None:
    rng = random.Random(len_a * 100 + len_b)
    a = [bytes(rng.choice(b"abcz") for _ in range(len_a)) for _ in range(7)]
    b = [bytes(rng.choice(b"abcz") for _ in range(len_b)) for _ in range(5)]
    reference = torch.tensor([[_levenshtein(x, y) for y in b] for x in a])
    assert torch.equal(levenshtein_bit_parallel(_matrix(a), _matrix(b)), reference)
    assert torch.equal(levenshtein_block(_matrix(a), _matrix(b)).long(), reference)


def test_min_edit_distance_map_equals_brute_force_with_lowest_id_ties() -> None:
    rng = random.Random(0)
    teacher = [bytes(rng.choice(b"ab ") for _ in range(rng.randint(0, 6))) for _ in range(40)]
    teacher.append(b"x" * 70)  # longer than the bit-parallel kernel takes
    student = [bytes(rng.choice(b"ab ") for _ in range(rng.randint(1, 4))) for _ in range(25)]
    mapping = min_edit_distance_map_from_keys(teacher, student).tolist()
    for t, s in zip(teacher, mapping, strict=True):
        distances = [_levenshtein(t, candidate) for candidate in student]
        assert s == distances.index(min(distances))


def test_min_edit_distance_map_of_identical_tokenizers_is_the_identity_up_to_duplicates(
    tokenizer_pair: dict[str, Any],
) -> None:
    tokenizer = tokenizer_pair["bpe320"]
    mapping = min_edit_distance_map(tokenizer, tokenizer)
    surfaces = token_surfaces(tokenizer)
    canonical = canonical_surface_ids(tokenizer)
    for i, j in enumerate(mapping.tolist()):
        assert j == i or (surfaces[i] is not None and j == canonical[surfaces[i]])


def test_min_edit_distance_map_sends_eos_to_eos(tokenizer_pair: dict[str, Any]) -> None:
    teacher, student = tokenizer_pair["bpe500"], tokenizer_pair["uni600"]
    mapping = min_edit_distance_map(teacher, student)
    assert mapping.shape == (len(teacher),)
    assert int(mapping[teacher.eos_token_id]) == student.eos_token_id
    assert int(mapping.max()) < len(student)


def test_duplicate_surfaces_resolve_to_the_entry_the_tokenizer_writes(
    tokenizer_pair: dict[str, Any],
) -> None:
    """A Unigram with byte fallback has ``"▁"`` and ``<0x20>`` for a space, ``"!"`` and
    ``<0x21>``: every correspondence must use the piece the tokenizer writes, not the byte
    piece with the lower id (which the student never sees as a target)."""
    teacher, uni = tokenizer_pair["bpe500"], tokenizer_pair["uni600"]
    canonical = canonical_surface_ids(uni)
    space = canonical[b" "]
    assert uni.convert_ids_to_tokens(space) == "▁"
    assert uni.encode(" ", add_special_tokens=False) == [space]
    byte_space = uni.convert_tokens_to_ids("<0x20>")
    assert byte_space < space  # the lowest id would have been the byte piece
    for surface, i in canonical.items():
        piece = uni.convert_ids_to_tokens(i)
        written = uni.encode(surface.decode("utf-8", "ignore"), add_special_tokens=False)
        if len(written) == 1 and token_surfaces(uni)[written[0]] == surface:
            assert i == written[0], (surface, piece)
    t_space = teacher.encode(" ", add_special_tokens=False)
    assert len(t_space) == 1
    shared = shared_vocabulary(teacher, uni)
    pairs = dict(zip(shared.teacher_ids.tolist(), shared.student_ids.tolist(), strict=True))
    assert pairs[t_space[0]] == space
    assert int(min_edit_distance_map(teacher, uni)[t_space[0]]) == space
    assert int(first_token_map(teacher, uni)[t_space[0]]) == space


def test_first_token_map_sends_each_entry_to_the_students_first_token_of_its_text(
    tokenizer_pair: dict[str, Any],
) -> None:
    teacher, student = tokenizer_pair["bpe500"], tokenizer_pair["uni600"]
    mapping = first_token_map(teacher, student).tolist()
    assert len(mapping) == len(teacher) and max(mapping) < len(student)
    t_surfaces, s_surfaces = token_surfaces(teacher), token_surfaces(student)
    checked = 0
    for i, j in enumerate(mapping):
        surface = t_surfaces[i]
        if not surface:
            continue
        try:
            text = surface.decode("utf-8")
        except UnicodeDecodeError:
            continue
        first = student.encode(text, add_special_tokens=False)[0]
        assert s_surfaces[j] == s_surfaces[first] and surface.startswith(s_surfaces[j] or b"?")
        checked += 1
    assert checked > len(teacher) // 2  # the rest: specials and pieces of multi-byte characters
    assert mapping[teacher.eos_token_id] == student.eos_token_id


def test_first_token_map_of_identical_tokenizers_is_the_identity_up_to_duplicates(
    tokenizer_pair: dict[str, Any],
) -> None:
    tokenizer = tokenizer_pair["bpe320"]
    surfaces = token_surfaces(tokenizer)
    canonical = canonical_surface_ids(tokenizer)
    for i, j in enumerate(first_token_map(tokenizer, tokenizer).tolist()):
        assert j == i or (surfaces[i] is not None and j == canonical[surfaces[i]])
