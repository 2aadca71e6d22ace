"""Tests for distil.losses.sparse: top-k + tail and importance-sampled teachers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distil.losses import divergences as dv
from distil.losses import sparse as sp
from distil.losses.divergences import DIVERGENCE_TERMS

F64 = torch.float64

TERM_CASES: list[tuple[str, dict[str, float]]] = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("symmetric_kl", {"reverse_kl_weight": 0.3}),
    ("generalized_jsd", {"beta": 0.3}),
    ("generalized_jsd", {"beta": 0.0}),
    ("skew_kl", {"skew_alpha": 0.2}),
    ("skew_reverse_kl", {"skew_alpha": 0.2}),
    ("total_variation", {}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in p.items())}" for n, p in TERM_CASES]


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Tiny tensors: OpenMP fan-out costs more than it saves; restore the setting after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def rand_logits(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def test_term_table_covers_all_sum_divergences() -> None:
    assert {name for name, _ in TERM_CASES} == set(DIVERGENCE_TERMS)


@pytest.mark.parametrize(("name", "params"), TERM_CASES, ids=IDS)
def test_topk_with_tail_at_k_equals_v_is_the_full_divergence(
    name: str, params: dict[str, float]
) -> None:
    s, t = rand_logits(3, 4, 9, seed=1), rand_logits(3, 4, 9, seed=2)
    mask = torch.rand(3, 4, generator=torch.Generator().manual_seed(3)) > 0.3
    top = sp.teacher_topk(t, 9, kd_temperature=1.5)
    # Shuffle the ids so nothing depends on their order.
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(4))
    got = sp.topk_divergence(
        s,
        top.log_probs[..., perm],
        top.ids[..., perm],
        mask,
        divergence=name,
        kd_temperature=1.5,
        reduction="none",
        **params,
    )
    want = dv.compute_divergence(name, s, t, mask, kd_temperature=1.5, reduction="none", **params)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("name", "params"), TERM_CASES, ids=IDS)
def test_topk_bucket_values_match_naive_reference(name: str, params: dict[str, float]) -> None:
    s, t = rand_logits(5, 12, seed=5), rand_logits(5, 12, seed=6)
    k = 4
    top = sp.teacher_topk(t, k)
    got = sp.topk_divergence(s, top.log_probs, top.ids, divergence=name, reduction="none", **params)
    # Naive: coarsen both full distributions to [top-k ids..., everything else] in float64.
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    p_b = torch.cat([p.gather(-1, top.ids), 1 - p.gather(-1, top.ids).sum(-1, keepdim=True)], -1)
    q_b = torch.cat([q.gather(-1, top.ids), 1 - q.gather(-1, top.ids).sum(-1, keepdim=True)], -1)
    want = DIVERGENCE_TERMS[name](q_b.log(), p_b.log(), **params).sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(("name", "params"), TERM_CASES, ids=IDS)
@settings(max_examples=15, deadline=None, database=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 15), scale=st.floats(0.1, 20.0))
def test_topk_is_nonnegative_and_at_most_the_full_value(
    name: str, params: dict[str, float], seed: int, k: int, scale: float
) -> None:
    s = rand_logits(4, 16, seed=seed, scale=scale).float()
    t = rand_logits(4, 16, seed=seed + 1, scale=scale).float()
    top = sp.teacher_topk(t, k)
    full = dv.compute_divergence(name, s, t, reduction="none", **params)
    exact = sp.topk_divergence(
        s,
        top.log_probs,
        top.ids,
        teacher_tail_log_prob=top.tail_log_prob,
        divergence=name,
        reduction="none",
        **params,
    )
    derived = sp.topk_divergence(
        s, top.log_probs, top.ids, divergence=name, reduction="none", **params
    )
    # A tail derived from fp32 log-probs is lost only where they carry none (mass exactly 1).
    no_tail_info = torch.logsumexp(top.log_probs.double(), -1) >= 0
    assert bool((torch.isfinite(derived) | no_tail_info).all())
    for values in (exact, derived):
        assert bool((values >= -1e-6).all()), values.min()
    # Coarsening cannot increase an f-divergence (data processing inequality).
    assert bool((exact <= full * (1 + 1e-5) + 1e-6).all())


def test_topk_zero_when_student_equals_teacher() -> None:
    t = rand_logits(6, 20, seed=7)
    for k in (1, 5, 20):
        top = sp.teacher_topk(t, k)
        for name in DIVERGENCE_TERMS:
            assert (
                abs(float(sp.topk_divergence(t.clone(), top.log_probs, top.ids, divergence=name)))
                < 1e-12
            )


def test_explicit_tail_equals_derived_tail() -> None:
    s, t = rand_logits(4, 10, seed=8), rand_logits(4, 10, seed=9)
    top = sp.teacher_topk(t, 3)
    derived = sp.topk_divergence(s, top.log_probs, top.ids)
    explicit = sp.topk_divergence(
        s, top.log_probs, top.ids, teacher_tail_log_prob=top.tail_log_prob
    )
    torch.testing.assert_close(derived, explicit, rtol=1e-12, atol=1e-14)


def test_student_tail_is_exact_when_the_top_k_hold_almost_all_mass() -> None:
    # Top-k mass 1 − ~1e-13: log(1 − Σq) in fp32 would be -inf or noise; logsumexp over the
    # non-top-k logits is exact.
    s = torch.tensor([[30.0, 29.0, 0.0, -1.0, -2.0]])
    ids = torch.tensor([[0, 1]])
    buckets = sp.student_bucket_log_probs(s, ids)
    assert buckets.dtype == torch.float32
    s64 = s.double()
    want_tail = torch.logsumexp(s64[:, 2:], -1) - torch.logsumexp(s64, -1)
    torch.testing.assert_close(buckets[:, -1].double(), want_tail, rtol=1e-6, atol=0)
    naive = torch.log1p(-torch.softmax(s, -1)[:, :2].sum(-1))
    assert not torch.isfinite(naive).all() or not torch.allclose(naive.double(), want_tail)


def test_truncated_kl_without_tail_can_go_negative_but_ours_cannot() -> None:
    # F7 (verl#7856): Σ_k p_k (log p_k − log q_k) over the top-k only is negative whenever the
    # student puts more mass on the teacher's top-k than the teacher does; clamping it at 0
    # discards the gradient. With a tail bucket both sides are proper distributions.
    s = torch.tensor([[4.0, 3.0, -3.0, -3.0, -3.0]], dtype=F64)
    t = torch.tensor([[1.0, 0.0, 0.0, 0.0, -0.5]], dtype=F64)
    top = sp.teacher_topk(t, 2)
    lq_top = torch.log_softmax(s, -1).gather(-1, top.ids)
    truncated = (top.log_probs.exp() * (top.log_probs - lq_top)).sum()
    assert float(truncated) < 0
    ours = sp.topk_divergence(s, top.log_probs, top.ids, teacher_tail_log_prob=top.tail_log_prob)
    p_b = torch.cat([top.log_probs.exp(), top.tail_log_prob.exp().unsqueeze(-1)], -1)
    q = torch.softmax(s, -1)
    q_b = torch.cat([q[:, :2], q[:, 2:].sum(-1, keepdim=True)], -1)
    torch.testing.assert_close(ours, (p_b * (p_b.log() - q_b.log())).sum())
    assert float(ours) > 0


def test_quantised_cache_within_tolerance_is_renormalised() -> None:
    s, t = rand_logits(8, 50, seed=10).float(), rand_logits(8, 50, seed=11, scale=4.0).float()
    top = sp.teacher_topk(t, 8)
    cached = top.log_probs.to(torch.bfloat16)  # what a compact cache stores
    for tail in (None, top.tail_log_prob.to(torch.bfloat16)):
        values = sp.topk_divergence(
            s, cached, top.ids, teacher_tail_log_prob=tail, reduction="none"
        )
        assert values.dtype == torch.float32
        assert bool((values >= 0).all())


def test_mass_check_catches_logits_passed_as_log_probs() -> None:
    s, t = rand_logits(2, 10, seed=12), rand_logits(2, 10, seed=13)
    values, ids = t.topk(3, dim=-1)  # raw logits, not log-probs
    with pytest.raises(ValueError, match="log-probs"):
        sp.topk_divergence(s, values + 5.0, ids)
    top = sp.teacher_topk(t, 3)
    with pytest.raises(ValueError, match="mass"):
        sp.topk_divergence(s, top.log_probs, top.ids, teacher_tail_log_prob=top.tail_log_prob - 1.0)


def test_tvd_plus_plus_has_no_sparse_form() -> None:
    s, t = rand_logits(2, 6, seed=14), rand_logits(2, 6, seed=15)
    top = sp.teacher_topk(t, 2)
    with pytest.raises(ValueError, match="pointwise"):
        sp.topk_divergence(s, top.log_probs, top.ids, divergence="tvd_plus_plus")


@pytest.mark.parametrize(("name", "params"), TERM_CASES, ids=IDS)
def test_gradcheck_float64(name: str, params: dict[str, float]) -> None:
    s = rand_logits(2, 3, 6, seed=16).requires_grad_()
    t = rand_logits(2, 3, 6, seed=17)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    top = sp.teacher_topk(t, 2)
    assert torch.autograd.gradcheck(
        lambda a: sp.topk_divergence(
            a, top.log_probs, top.ids, mask, divergence=name, kd_temperature=1.3, **params
        ),
        (s,),
    )
    samples = sp.sample_teacher_targets(t, 5, generator=torch.Generator().manual_seed(18))
    assert torch.autograd.gradcheck(
        lambda a: sp.sampled_divergence(
            a, samples.ids, samples.teacher_log_probs, mask, divergence=name, **params
        ),
        (s,),
    )


def test_masks_and_all_masked() -> None:
    s, t = rand_logits(2, 4, 7, seed=19), rand_logits(2, 4, 7, seed=20)
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    top = sp.teacher_topk(t, 3)
    samples = sp.sample_teacher_targets(t, 4, generator=torch.Generator().manual_seed(21))
    calls = [
        lambda a, m: sp.topk_divergence(a, top.log_probs, top.ids, m),
        lambda a, m: sp.sampled_divergence(a, samples.ids, samples.teacher_log_probs, m),
    ]
    for call in calls:
        a = s.clone().requires_grad_()
        value = call(a, mask)
        (grad,) = torch.autograd.grad(value, a)
        garbage = s.clone()
        garbage[~mask] = float("nan")
        b = garbage.requires_grad_()
        value2 = call(b, mask)
        (grad2,) = torch.autograd.grad(value2, b)
        assert value == value2 and torch.equal(grad, grad2) and bool((grad[~mask] == 0).all())
        c = s.clone().requires_grad_()
        empty = call(c, torch.zeros_like(mask))
        (grad3,) = torch.autograd.grad(empty, c)
        assert float(empty.detach()) == 0.0 and bool((grad3 == 0).all())


@pytest.mark.parametrize(("name", "params"), TERM_CASES, ids=IDS)
def test_exhaustive_uniform_samples_give_the_exact_value(
    name: str, params: dict[str, float]
) -> None:
    # Every id once under a uniform proposal: (1/V)·Σ_v t_v / (1/V) = Σ_v t_v exactly.
    s, t = rand_logits(3, 7, seed=22), rand_logits(3, 7, seed=23)
    ids = torch.arange(7).expand(3, 7)
    lp = torch.log_softmax(t, -1)
    uniform = torch.full((3, 7), -torch.log(torch.tensor(7.0, dtype=F64)).item(), dtype=F64)
    got = sp.sampled_divergence(
        s, ids, lp, proposal_log_probs=uniform, divergence=name, reduction="none", **params
    )
    want = dv.compute_divergence(name, s, t, reduction="none", **params)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("proposal_temperature", [None, 3.0])
@pytest.mark.parametrize(("name", "params"), TERM_CASES[:4] + TERM_CASES[5:], ids=IDS[:4] + IDS[5:])
def test_sampled_estimate_is_unbiased_and_nonnegative(
    name: str, params: dict[str, float], proposal_temperature: float | None
) -> None:
    s, t = rand_logits(1, 6, seed=24, scale=1.5), rand_logits(1, 6, seed=25, scale=1.5)
    draws = 400
    teacher = t.expand(draws, 6)  # one independent draw of n samples per row
    samples = sp.sample_teacher_targets(
        teacher,
        8,
        proposal_temperature=proposal_temperature,
        generator=torch.Generator().manual_seed(26),
    )
    student = s.expand(draws, 6).clone().requires_grad_()
    estimates = sp.sampled_divergence(
        student,
        samples.ids,
        samples.teacher_log_probs,
        proposal_log_probs=samples.proposal_log_probs,
        divergence=name,
        reduction="none",
        **params,
    )
    assert bool((estimates >= -1e-12).all())  # every single estimate is non-negative
    true = dv.compute_divergence(name, s, t, **params)
    stderr = estimates.std() / draws**0.5
    assert abs(float(estimates.detach().mean() - true)) < 5 * float(stderr.detach()) + 1e-9
    # The gradient is unbiased too.
    (grad,) = torch.autograd.grad(estimates.mean(), student)
    s_true = s.clone().requires_grad_()
    (true_grad,) = torch.autograd.grad(dv.compute_divergence(name, s_true, t, **params), s_true)
    per_draw = grad * draws  # gradient of each row's own estimate
    grad_stderr = per_draw.std(0) / draws**0.5
    assert bool(((per_draw.mean(0) - true_grad[0]).abs() < 5 * grad_stderr + 1e-9).all())


def test_sample_teacher_targets_log_probs_and_shapes() -> None:
    t = rand_logits(2, 3, 9, seed=27)
    samples = sp.sample_teacher_targets(
        t,
        5,
        kd_temperature=2.0,
        proposal_temperature=4.0,
        generator=torch.Generator().manual_seed(28),
    )
    assert samples.ids.shape == samples.teacher_log_probs.shape == (2, 3, 5)
    torch.testing.assert_close(
        samples.teacher_log_probs, torch.log_softmax(t / 2.0, -1).gather(-1, samples.ids)
    )
    torch.testing.assert_close(
        samples.proposal_log_probs, torch.log_softmax(t / 4.0, -1).gather(-1, samples.ids)
    )


def test_half_student_is_computed_in_fp32() -> None:
    s, t = rand_logits(3, 11, seed=29), rand_logits(3, 11, seed=30)
    top = sp.teacher_topk(t.float(), 4)
    got = sp.topk_divergence(s.to(torch.bfloat16), top.log_probs, top.ids)
    want = sp.topk_divergence(s.to(torch.bfloat16).float(), top.log_probs, top.ids)
    assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.parametrize("k", [2, 4])
def test_topk_plus_sampled_tail_is_an_unbiased_forward_kl(k: int) -> None:
    """Exact head + importance-sampled tail: mean value and gradient match the full forward KL."""
    s, t = rand_logits(1, 9, seed=40, scale=1.5), rand_logits(1, 9, seed=41, scale=1.5)
    draws = 2000
    top = sp.teacher_topk(t.expand(draws, 9), k)
    ids, lp = sp.sample_tail_targets(
        t.expand(draws, 9), top.ids, 3, generator=torch.Generator().manual_seed(42)
    )
    assert not bool(
        (ids.unsqueeze(-1) == top.ids.unsqueeze(-2)).any()
    )  # drawn outside the top-k only
    torch.testing.assert_close(lp, torch.log_softmax(t, -1).expand(draws, 9).gather(-1, ids))
    targets = top._replace(tail_sample_ids=ids, tail_sample_log_probs=lp)
    student = s.expand(draws, 9).clone().requires_grad_()
    estimates = sp.topk_sampled_tail_kl(student, targets, reduction="none")
    true = dv.compute_divergence("forward_kl", s, t)
    stderr = estimates.std() / draws**0.5
    assert abs(float(estimates.detach().mean() - true)) < 5 * float(stderr.detach()) + 1e-9
    (grad,) = torch.autograd.grad(estimates.mean(), student)
    s_true = s.clone().requires_grad_()
    (true_grad,) = torch.autograd.grad(dv.compute_divergence("forward_kl", s_true, t), s_true)
    per_draw = grad * draws
    assert bool(
        ((per_draw.mean(0) - true_grad[0]).abs() < 5 * per_draw.std(0) / draws**0.5 + 1e-9).all()
    )
    # the bucketed top-k loss has the same value only when the tail is matched exactly; its
    # gradient on tail ids is q_j(1 - p_tail/q_tail), not q_j - p_j: biased for each tail token
    exact = sp.teacher_topk(t, k)
    bucket = sp.topk_divergence(
        s_true, exact.log_probs, exact.ids, teacher_tail_log_prob=exact.tail_log_prob
    )
    (bucket_grad,) = torch.autograd.grad(bucket, s_true)
    assert float((bucket_grad - true_grad).abs().max()) > 1e-3


def test_sampled_tail_with_an_empty_tail_is_the_exact_kl() -> None:
    s, t = rand_logits(2, 5, seed=43), rand_logits(2, 5, seed=44)
    top = sp.teacher_topk(t, 5)  # k = V: no tail
    ids, lp = sp.sample_tail_targets(t, top.ids, 2)
    got = sp.topk_sampled_tail_kl(
        s, top._replace(tail_sample_ids=ids, tail_sample_log_probs=lp), reduction="sum"
    )
    torch.testing.assert_close(got, dv.compute_divergence("forward_kl", s, t, reduction="sum"))
