"""Cross-tokenizer losses: loop reference, float64 agreement, zero at identical inputs, the
same-tokenizer limits, merge semantics, masking and reduction."""

from __future__ import annotations

import math

import pytest
import torch

from distil.alignment import AlignedGroups, SharedVocabulary, VocabMatch, positional_alignment
from distil.losses.cross_tokenizer import (
    CROSS_TOKENIZER_LOSSES,
    GroupMerge,
    group_log_probs,
    hybrid_uld,
    min_ed,
    uld,
)
from distil.losses.divergences import forward_kl, generalized_jsd

B, TS, TT, VS, VT = 2, 7, 6, 11, 13


def _targets(rows: list[list[int]], vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (len(rows), len(rows[0])), generator=g)
    mask = torch.tensor(rows, dtype=torch.bool)
    return torch.where(mask, ids, -100)


def _batch(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, AlignedGroups]:
    g = torch.Generator().manual_seed(0)
    student = (2 * torch.randn(B, TS, VS, generator=g)).to(dtype)
    teacher = (2 * torch.randn(B, TT, VT, generator=g)).to(dtype)
    s_targets = _targets([[0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0]], VS, 1)
    t_targets = _targets([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0]], VT, 2)
    # (example, s_first, s_last, t_first, t_last): 1:1, 2:1, 1:2, 3:2 and 1:3 groups
    rows = [(0, 1, 1, 0, 0), (0, 2, 3, 1, 1), (0, 4, 4, 2, 3), (1, 0, 2, 1, 2), (1, 3, 3, 3, 3)]
    cols = torch.tensor(rows).T
    groups = AlignedGroups(cols[0], cols[1], cols[2], cols[3], cols[4], s_targets, t_targets)
    return student, teacher, groups


def _shared() -> SharedVocabulary:
    return SharedVocabulary(
        torch.tensor([0, 2, 3, 7, 12]), torch.tensor([1, 0, 5, 9, 4]), VT, VS, VocabMatch.SURFACE
    )


def _vocab_map() -> torch.Tensor:
    return torch.tensor([0, 1, 1, 2, 3, 5, 8, 8, 10, 4, 6, 7, 9])


# ------------------------------------------------------------------------------------------
# Loop reference, float64, one group at a time
# ------------------------------------------------------------------------------------------


def _merged(
    logits: torch.Tensor, targets: torch.Tensor, row: int, a: int, b: int, merge: str, t: float
) -> torch.Tensor:
    probs = torch.softmax(logits[row].double() / t, dim=-1)
    if merge == "observed":
        out = probs[a].clone()
        for k in range(a + 1, b + 1):
            out = out * probs[k, targets[row, k]]
    else:
        out = probs[b].clone()
        for k in range(a, b):
            out = out * probs[k, targets[row, k]]
    return out


def _sorted_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    p, q = p.sort(descending=True).values, q.sort(descending=True).values
    width = max(p.numel(), q.numel())
    p = torch.cat([p, p.new_zeros(width - p.numel())])
    q = torch.cat([q, q.new_zeros(width - q.numel())])
    return (p - q).abs().sum()


def _reference(
    name: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    groups: AlignedGroups,
    merge: str,
    t: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    values = []
    for g in range(groups.num_groups):
        row = int(groups.example[g])
        q = _merged(
            student,
            groups.student_targets,
            row,
            int(groups.student_first[g]),
            int(groups.student_last[g]),
            merge,
            t,
        )
        p = _merged(
            teacher.detach(),
            groups.teacher_targets,
            row,
            int(groups.teacher_first[g]),
            int(groups.teacher_last[g]),
            merge,
            t,
        )
        if name == "uld":
            values.append(_sorted_l1(p, q))
        elif name == "hybrid":
            shared = _shared()
            pm, qm = p[shared.teacher_ids], q[shared.student_ids]
            m = beta * pm + (1 - beta) * qm
            jsd = (beta * pm * (pm / m).log() + (1 - beta) * qm * (qm / m).log()).sum()
            t_rest = [v for v in range(VT) if v not in shared.teacher_ids.tolist()]
            s_rest = [v for v in range(VS) if v not in shared.student_ids.tolist()]
            w = len(shared) / VT
            values.append(w * jsd + (1 - w) * _sorted_l1(p[t_rest], q[s_rest]))
        else:
            projected = torch.zeros(VS, dtype=torch.float64)
            for v, s in enumerate(_vocab_map().tolist()):
                projected[s] += p[v]
            live = projected > 0
            kl = (
                (projected[live] * (projected[live] / q[live]).log()).sum()
                - projected.sum()
                + q.sum()
            )
            values.append(kl)
    return torch.stack(values)


def _call(
    name: str, student: torch.Tensor, teacher: torch.Tensor, groups: AlignedGroups, **kw: object
) -> torch.Tensor:
    extra: dict[str, object] = {}
    if name == "hybrid":
        extra["shared_vocabulary"] = _shared()
    if name == "min_ed":
        extra["vocab_map"] = _vocab_map()
    return CROSS_TOKENIZER_LOSSES[name](student, teacher, groups, **extra, **kw)


@pytest.mark.parametrize("name", ["uld", "hybrid", "min_ed"])
@pytest.mark.parametrize("merge", ["observed", "bayesian"])
def test_vectorised_equals_the_loop_reference_values_and_gradients(name: str, merge: str) -> None:
    student, teacher, groups = _batch()
    student.requires_grad_(True)
    got = _call(name, student, teacher, groups, merge=merge, reduction="none", kd_temperature=1.5)
    ref = _reference(name, student, teacher, groups, merge, t=1.5)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(got.sum(), student)
    (ref_grad,) = torch.autograd.grad(ref.sum(), student)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", ["uld", "hybrid", "min_ed"])
def test_float32_agrees_with_a_float64_reference(name: str) -> None:
    student, teacher, groups = _batch(torch.float64)
    exact = _call(name, student, teacher, groups)
    single = _call(name, student.float(), teacher.float(), groups)
    assert single.dtype == torch.float32
    assert abs(float(single) - float(exact)) <= 1e-5 * max(1.0, abs(float(exact)))
    half = _call(name, student.bfloat16(), teacher.bfloat16(), groups)
    assert half.dtype == torch.float32  # bf16 inputs are upcast


def _same_tokenizer_batch() -> tuple[torch.Tensor, AlignedGroups]:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(B, TS, VS, generator=g, dtype=torch.float64)
    targets = _targets([[1, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 0, 0]], VS, 4)
    return logits, positional_alignment(targets, targets)


def test_every_loss_is_zero_for_identical_tokenizers_and_distributions() -> None:
    logits, groups = _same_tokenizer_batch()
    identity = SharedVocabulary(torch.arange(VS), torch.arange(VS), VS, VS, VocabMatch.RAW)
    for merge in GroupMerge:
        assert float(uld(logits, logits, groups, merge=merge)) == pytest.approx(0, abs=1e-15)
        assert float(
            hybrid_uld(logits, logits, groups, shared_vocabulary=identity, merge=merge)
        ) == pytest.approx(0, abs=1e-15)
        assert float(
            min_ed(logits, logits, groups, vocab_map=torch.arange(VS), merge=merge)
        ) == pytest.approx(0, abs=1e-15)


def test_uld_is_identity_free_a_permuted_vocabulary_costs_nothing() -> None:
    logits, groups = _same_tokenizer_batch()
    permuted = logits[..., torch.randperm(VS, generator=torch.Generator().manual_seed(5))]
    assert float(uld(logits, permuted, groups)) == pytest.approx(0, abs=1e-15)
    assert float(uld(logits, permuted.flip(-1) * 2, groups)) > 0.01


def test_same_tokenizer_limits_are_the_plain_divergences() -> None:
    """With one tokenizer, the hybrid is GKD's JSD (every entry shared, adaptive weight 1) and
    MinED with the identity map is forward KL, position by position."""
    g = torch.Generator().manual_seed(6)
    student = torch.randn(B, TS, VS, generator=g, dtype=torch.float64)
    teacher = torch.randn(B, TS, VS, generator=g, dtype=torch.float64)
    targets = _targets([[1, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 0, 0]], VS, 4)
    groups = positional_alignment(targets, targets)
    mask = targets != -100
    identity = SharedVocabulary(torch.arange(VS), torch.arange(VS), VS, VS, VocabMatch.RAW)
    torch.testing.assert_close(
        hybrid_uld(
            student, teacher, groups, shared_vocabulary=identity, beta=0.3, kd_temperature=2.0
        ),
        generalized_jsd(student, teacher, mask, beta=0.3, kd_temperature=2.0),
    )
    torch.testing.assert_close(
        min_ed(student, teacher, groups, vocab_map=torch.arange(VS), kd_temperature=2.0),
        forward_kl(student, teacher, mask, kd_temperature=2.0),
    )


@pytest.mark.parametrize("merge", ["observed", "bayesian"])
def test_merged_entry_of_the_observed_token_is_the_joint_probability_of_the_run(merge: str) -> None:
    student, _, groups = _batch()
    merged = group_log_probs(
        student,
        groups.student_targets,
        groups.example,
        groups.student_first,
        groups.student_last,
        merge=merge,
    )
    log_probs = torch.log_softmax(student, dim=-1)
    for g in range(groups.num_groups):
        row, a, b = (
            int(groups.example[g]),
            int(groups.student_first[g]),
            int(groups.student_last[g]),
        )
        ids = groups.student_targets[row, a : b + 1]
        joint = sum(float(log_probs[row, a + k, ids[k]]) for k in range(b - a + 1))
        token = ids[0] if merge == "observed" else ids[-1]
        assert float(merged[g, token]) == pytest.approx(joint, abs=1e-12)
        assert float(merged[g].exp().sum()) <= 1 + 1e-12


def test_reduction_and_normalisation_over_groups() -> None:
    student, teacher, groups = _batch()
    per_group = uld(student, teacher, groups, reduction="none")
    assert per_group.shape == (groups.num_groups,)
    torch.testing.assert_close(uld(student, teacher, groups), per_group.mean())
    torch.testing.assert_close(uld(student, teacher, groups, reduction="sum"), per_group.sum())
    torch.testing.assert_close(uld(student, teacher, groups, num_items=20), per_group.sum() / 20)


def test_no_groups_gives_exactly_zero_with_zero_gradient() -> None:
    student, teacher, groups = _batch()
    empty = AlignedGroups(
        *(torch.zeros(0, dtype=torch.long) for _ in range(5)),
        groups.student_targets,
        groups.teacher_targets,
    )
    student.requires_grad_(True)
    for name in ("uld", "hybrid", "min_ed"):
        loss = _call(name, student, teacher, empty)
        assert float(loss.detach()) == 0.0
        (grad,) = torch.autograd.grad(loss, student)
        assert not grad.any()


def test_unsupervised_rows_never_leak_even_nan() -> None:
    student, teacher, groups = _batch()
    poisoned_s, poisoned_t = student.clone(), teacher.clone()
    poisoned_s[groups.student_targets == -100] = float("nan")
    poisoned_t[groups.teacher_targets == -100] = float("nan")
    poisoned_s.requires_grad_(True)
    for name in ("uld", "hybrid", "min_ed"):
        loss = _call(name, poisoned_s, poisoned_t, groups)
        assert math.isfinite(float(loss.detach()))
        torch.testing.assert_close(loss, _call(name, student, teacher, groups))
        (grad,) = torch.autograd.grad(loss, poisoned_s)
        assert torch.isfinite(grad).all()
        assert not grad[groups.student_targets == -100].any()


def test_kd_temperature_divides_the_logits() -> None:
    student, teacher, groups = _batch()
    torch.testing.assert_close(
        uld(student, teacher, groups, kd_temperature=3.0), uld(student / 3, teacher / 3, groups)
    )


def test_hybrid_weights_and_vocabulary_checks() -> None:
    student, teacher, groups = _batch()
    shared = _shared()
    adaptive = hybrid_uld(student, teacher, groups, shared_vocabulary=shared, reduction="none")
    w = len(shared) / VT
    matched = hybrid_uld(
        student,
        teacher,
        groups,
        shared_vocabulary=shared,
        matched_weight=1.0,
        unmatched_weight=0.0,
        reduction="none",
    )
    unmatched = hybrid_uld(
        student,
        teacher,
        groups,
        shared_vocabulary=shared,
        matched_weight=0.0,
        unmatched_weight=1.0,
        reduction="none",
    )
    torch.testing.assert_close(adaptive, w * matched + (1 - w) * unmatched)
    with pytest.raises(ValueError, match="both"):
        hybrid_uld(student, teacher, groups, shared_vocabulary=shared, matched_weight=0.5)
    with pytest.raises(ValueError, match=">= 0"):
        hybrid_uld(
            student,
            teacher,
            groups,
            shared_vocabulary=shared,
            matched_weight=-1.0,
            unmatched_weight=1.0,
        )
    with pytest.raises(ValueError, match="slice the logits"):
        hybrid_uld(student[..., :-1], teacher, groups, shared_vocabulary=shared)
    with pytest.raises(ValueError, match="pointwise"):
        hybrid_uld(
            student, teacher, groups, shared_vocabulary=shared, matched_divergence="tvd_plus_plus"
        )
    forward = hybrid_uld(
        student, teacher, groups, shared_vocabulary=shared, matched_divergence="forward_kl"
    )
    assert float(forward) > 0


def test_min_ed_map_checks() -> None:
    student, teacher, groups = _batch()
    with pytest.raises(ValueError, match="one student id per"):
        min_ed(student, teacher, groups, vocab_map=torch.zeros(VT - 1, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        min_ed(student, teacher, groups, vocab_map=torch.full((VT,), VS, dtype=torch.long))
    reverse = min_ed(student, teacher, groups, vocab_map=_vocab_map(), divergence="reverse_kl")
    assert float(reverse) > 0


def test_cross_tokenizer_objective_with_one_tokenizer_is_the_token_objective() -> None:
    from distil.losses.objective import cross_tokenizer_objective, token_objective

    g = torch.Generator().manual_seed(7)
    student = torch.randn(B, TS, VS, generator=g, dtype=torch.float64)
    teacher = torch.randn(B, TS, VS, generator=g, dtype=torch.float64)
    targets = _targets([[1, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 0, 0]], VS, 4)
    groups = positional_alignment(targets, targets)
    cross = cross_tokenizer_objective(
        student,
        teacher,
        groups,
        kd_weight=0.7,
        kd_temperature=2.0,
        loss="min_ed",
        vocab_map=torch.arange(VS),
        num_items=12,
        num_groups=12,
    )
    plain = token_objective(
        student, teacher, targets, kd_weight=0.7, kd_temperature=2.0, num_items=12
    )
    torch.testing.assert_close(cross.loss, plain.loss)
    for key in ("hard_ce/raw", "kd/raw", "kd/weighted"):
        torch.testing.assert_close(cross.components[key], plain.components[key])


def test_cross_tokenizer_objective_mixes_ce_and_the_soft_term_once() -> None:
    from distil.losses.objective import cross_tokenizer_objective

    student, teacher, groups = _batch()
    out = cross_tokenizer_objective(student, teacher, groups, kd_weight=0.25, kd_temperature=1.0)
    mask = groups.student_targets != -100
    ce = torch.nn.functional.cross_entropy(student[mask], groups.student_targets[mask])
    torch.testing.assert_close(out.loss, 0.75 * ce + 0.25 * uld(student, teacher, groups))
    with pytest.raises(ValueError, match="kd_weight"):
        cross_tokenizer_objective(student, teacher, groups, kd_weight=1.5, kd_temperature=1.0)


@pytest.mark.parametrize("name", ["uld", "hybrid", "min_ed"])
def test_precomputed_teacher_groups_give_the_same_loss(name: str) -> None:
    """A cache hands over the teacher's merged group distributions instead of logits."""
    student, teacher, groups = _batch()
    merged = group_log_probs(
        teacher, groups.teacher_targets, groups.example, groups.teacher_first, groups.teacher_last
    )
    live = _call(name, student, teacher, groups)
    cached = _call(name, student, None, groups, teacher_group_log_probs=merged)
    torch.testing.assert_close(cached, live)
    with pytest.raises(ValueError, match="not both"):
        _call(name, student, teacher, groups, teacher_group_log_probs=merged)
    with pytest.raises(ValueError, match="rows for"):
        _call(name, student, None, groups, teacher_group_log_probs=merged[:-1])


@pytest.mark.parametrize("name", ["uld", "hybrid", "min_ed"])
def test_micro_batches_with_window_counts_give_the_whole_batch_gradient(name: str) -> None:
    """Normalise once (F6): a batch of 2 in one call equals two micro-batches of 1 that each
    divide by the whole window's tokens and groups."""
    from dataclasses import replace

    from distil.losses.objective import cross_tokenizer_objective

    student, teacher, groups = _batch()
    extra: dict[str, object] = {}
    if name == "hybrid":
        extra["shared_vocabulary"] = _shared()
    if name == "min_ed":
        extra["vocab_map"] = _vocab_map()
    tokens = int((groups.student_targets != -100).sum())
    kw = {
        "kd_weight": 0.6,
        "kd_temperature": 2.0,
        "loss": name,
        "num_items": tokens,
        "num_groups": groups.num_groups,
        **extra,
    }
    whole = student.clone().requires_grad_(True)
    cross_tokenizer_objective(whole, teacher, groups, **kw).loss.backward()
    parts = student.clone().requires_grad_(True)
    for row in range(B):
        keep = groups.example == row
        micro = replace(
            groups,
            example=groups.example[keep] - row,
            student_first=groups.student_first[keep],
            student_last=groups.student_last[keep],
            teacher_first=groups.teacher_first[keep],
            teacher_last=groups.teacher_last[keep],
            student_targets=groups.student_targets[row : row + 1],
            teacher_targets=groups.teacher_targets[row : row + 1],
        )
        cross_tokenizer_objective(
            parts[row : row + 1], teacher[row : row + 1], micro, **kw
        ).loss.backward()
    assert whole.grad is not None and parts.grad is not None
    torch.testing.assert_close(parts.grad, whole.grad)
