"""Tests for distil.losses.divergences against plainly written float64 formulas."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distil.losses import divergences as dv
from distil.losses.divergences import DIVERGENCE_TERMS, DIVERGENCES, Divergence

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """These tensors are tiny: OpenMP fan-out costs far more than it saves (~600× per op on a
    busy 2-core machine), so run this module single-threaded and restore the setting after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# (name, method params) covering every divergence and interior parameter values.
CASES: list[tuple[str, dict[str, float]]] = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("symmetric_kl", {"reverse_kl_weight": 0.3}),
    ("generalized_jsd", {"beta": 0.3}),
    ("skew_kl", {"skew_alpha": 0.2}),
    ("skew_reverse_kl", {"skew_alpha": 0.2}),
    ("total_variation", {}),
    ("tvd_plus_plus", {}),
]
NON_NEGATIVE = [c for c in CASES if c[0] != "tvd_plus_plus"]
IDS = [c[0] for c in CASES]


def naive(name: str, s: torch.Tensor, t: torch.Tensor, temp: float, **kw: float) -> torch.Tensor:
    """Per-position divergences written directly from the textbook formulas, in float64."""
    p = torch.softmax(t.double() / temp, -1)
    q = torch.softmax(s.double() / temp, -1)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * (a.log() - b.log())).sum(-1)

    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "symmetric_kl":
        lam = kw["reverse_kl_weight"]
        return (1 - lam) * kl(p, q) + lam * kl(q, p)
    if name == "generalized_jsd":
        beta = kw["beta"]
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "skew_kl":
        a = kw["skew_alpha"]
        return kl(p, a * p + (1 - a) * q)
    if name == "skew_reverse_kl":
        a = kw["skew_alpha"]
        return kl(q, (1 - a) * p + a * q)
    if name == "total_variation":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "tvd_plus_plus":
        out = torch.empty(p.shape[:-1], dtype=F64)
        for idx in torch.cartesian_prod(*[torch.arange(n) for n in p.shape[:-1]]).reshape(
            -1, p.dim() - 1
        ):
            pv, qv = p[tuple(idx)], q[tuple(idx)]
            reward = (pv > qv).double()
            adv = (reward - reward.mean()) / (reward.std() + 1e-5)
            out[tuple(idx)] = -(adv * qv.log()).mean()
        return out
    raise AssertionError(name)


def rand_logits(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def test_tables_are_consistent() -> None:
    assert set(DIVERGENCES) == {d.value for d in Divergence}
    assert set(DIVERGENCE_TERMS) == set(DIVERGENCES) - {"tvd_plus_plus"}
    assert DIVERGENCES[Divergence.FORWARD_KL] is dv.forward_kl  # str enum members work as keys


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_matches_naive_float64_reference(name: str, params: dict[str, float]) -> None:
    s, t = rand_logits(3, 4, 7, seed=1), rand_logits(3, 4, 7, seed=2)
    mask = torch.rand(3, 4, generator=torch.Generator().manual_seed(3)) > 0.3
    fn = DIVERGENCES[name]
    got = fn(s, t, mask, kd_temperature=2.0, reduction="none", **params)
    want = naive(name, s, t, 2.0, **params) * mask
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    mean = fn(s, t, mask, kd_temperature=2.0, **params)
    torch.testing.assert_close(mean, want.sum() / mask.sum(), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_zero_at_identical_inputs(name: str, params: dict[str, float]) -> None:
    s = rand_logits(5, 11, seed=4)
    value = DIVERGENCES[name](s, s.clone(), kd_temperature=1.5, **params)
    assert abs(float(value)) < 1e-12


@pytest.mark.parametrize(("name", "params"), NON_NEGATIVE, ids=[c[0] for c in NON_NEGATIVE])
@settings(max_examples=25, deadline=None, database=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.01, 30.0),
    vocab=st.integers(2, 40),
    temp=st.floats(0.25, 8.0),
)
def test_non_negative_in_fp32(
    name: str, params: dict[str, float], seed: int, scale: float, vocab: int, temp: float
) -> None:
    s = rand_logits(4, vocab, seed=seed, scale=scale).float()
    # A teacher close to the student is where rounding could push a naive KL below zero.
    t = s + 1e-3 * rand_logits(4, vocab, seed=seed + 1).float()
    for teacher in (t, rand_logits(4, vocab, seed=seed + 2, scale=scale).float()):
        values = DIVERGENCES[name](s, teacher, kd_temperature=temp, reduction="none", **params)
        assert values.dtype == torch.float32
        assert bool((values >= -1e-6).all()), values.min()


def test_jsd_endpoints_are_the_kl_limits() -> None:
    s, t = rand_logits(6, 9, seed=5, scale=1.0), rand_logits(6, 9, seed=6, scale=1.0)
    fkl, rkl = dv.forward_kl(s, t), dv.reverse_kl(s, t)
    assert dv.generalized_jsd(s, t, beta=0.0) == fkl
    assert dv.generalized_jsd(s, t, beta=1.0) == rkl

    # β→0: JSD/β → KL(p‖q); β→1: JSD/(1−β) → KL(q‖p). The error is first order in β (resp.
    # 1−β) once ε is well below every ratio p_v/q_v (resp. q_v/p_v), so check the rate:
    # 100× smaller ε gives a ~100× smaller error.
    def errors(eps: float) -> tuple[float, float]:
        low = float(dv.generalized_jsd(s, t, beta=eps) / eps - fkl) / float(fkl)
        high = float(dv.generalized_jsd(s, t, beta=1 - eps) / eps - rkl) / float(rkl)
        return abs(low), abs(high)

    coarse, fine = errors(1e-4), errors(1e-6)
    for c, f in zip(coarse, fine, strict=True):
        assert f < 1e-4
        assert f < c / 50


@settings(max_examples=20, deadline=None, database=None)
@given(seed=st.integers(0, 2**31 - 1), beta=st.floats(0.01, 0.99))
def test_jsd_swap_symmetry_and_entropy_bound(seed: int, beta: float) -> None:
    s, t = rand_logits(3, 8, seed=seed, scale=4.0), rand_logits(3, 8, seed=seed + 1, scale=4.0)
    a = dv.generalized_jsd(s, t, beta=beta, reduction="none")
    b = dv.generalized_jsd(t, s, beta=1 - beta, reduction="none")
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    assert bool((a <= bound + 1e-12).all())


def test_jsd_mixture_is_in_probability_space() -> None:
    # Averaging log-probabilities (the TRL#2202 bug) gives a different, wrong number.
    s, t = rand_logits(4, 6, seed=7), rand_logits(4, 6, seed=8)
    lp, lq = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    wrong_log_m = 0.5 * lp + 0.5 * lq
    wrong = 0.5 * (lp.exp() * (lp - wrong_log_m)).sum(-1) + 0.5 * (
        lq.exp() * (lq - wrong_log_m)
    ).sum(-1)
    right = dv.generalized_jsd(s, t, reduction="none")
    torch.testing.assert_close(right, naive("generalized_jsd", s, t, 1.0, beta=0.5))
    assert not torch.allclose(right, wrong)


def test_parameter_endpoints_reduce_to_kl() -> None:
    s, t = rand_logits(4, 7, seed=9), rand_logits(4, 7, seed=10)
    fkl, rkl = dv.forward_kl(s, t), dv.reverse_kl(s, t)
    torch.testing.assert_close(dv.skew_kl(s, t, skew_alpha=0.0), fkl)
    torch.testing.assert_close(dv.skew_reverse_kl(s, t, skew_alpha=0.0), rkl)
    torch.testing.assert_close(dv.symmetric_kl(s, t, reverse_kl_weight=0.0), fkl)
    torch.testing.assert_close(dv.symmetric_kl(s, t, reverse_kl_weight=1.0), rkl)
    # Skew KL is bounded by −log α even when the student puts no mass where the teacher does.
    s_far = torch.full((1, 7), -1e4, dtype=F64)
    s_far[0, 0] = 0.0
    t_far = torch.zeros(1, 7, dtype=F64)
    t_far[0, 0] = -1e4
    assert float(dv.skew_kl(s_far, t_far, skew_alpha=0.1)) <= -math.log(0.1) + 1e-9


def test_tvd_bounds_and_pinsker() -> None:
    s, t = rand_logits(8, 12, seed=11, scale=3.0), rand_logits(8, 12, seed=12, scale=3.0)
    tvd = dv.total_variation(s, t, reduction="none")
    kl = dv.forward_kl(s, t, reduction="none")
    assert bool(((tvd >= 0) & (tvd <= 1)).all())
    assert bool((tvd <= torch.sqrt(kl / 2) + 1e-12).all())


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_gradcheck_float64(name: str, params: dict[str, float]) -> None:
    s = rand_logits(2, 3, 5, seed=13).requires_grad_()
    t = rand_logits(2, 3, 5, seed=14).requires_grad_(name != "tvd_plus_plus")
    mask = torch.tensor([[True, False, True], [True, True, False]])
    fn = DIVERGENCES[name]
    assert torch.autograd.gradcheck(
        lambda a, b: fn(a, b, mask, kd_temperature=1.7, num_items=5, **params), (s, t)
    )


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_masked_positions_are_ignored(name: str, params: dict[str, float]) -> None:
    s, t = rand_logits(2, 5, 6, seed=15), rand_logits(2, 5, 6, seed=16)
    mask = torch.tensor([[True, False, True, False, True], [False, True, True, False, False]])
    fn = DIVERGENCES[name]

    def run(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        student = student.clone().requires_grad_()
        value = fn(student, teacher, mask, **params)
        (grad,) = torch.autograd.grad(value, student)
        return value, grad

    v1, g1 = run(s, t)
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = float("nan")  # garbage, even nan, at masked positions changes nothing
    t2[~mask] = 1e9
    v2, g2 = run(s2, t2)
    assert v1 == v2
    assert torch.equal(g1, g2)
    assert bool((g1[~mask] == 0).all())


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_masked_is_exactly_zero(name: str, params: dict[str, float], reduction: str) -> None:
    s = rand_logits(2, 3, 4, seed=17).float().requires_grad_()
    t = rand_logits(2, 3, 4, seed=18).float()
    mask = torch.zeros(2, 3, dtype=torch.bool)
    value = DIVERGENCES[name](s, t, mask, reduction=reduction, **params)
    assert bool((value == 0).all())
    value.sum().backward()
    assert s.grad is not None
    assert bool((s.grad == 0).all())


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_computed_in_fp32(
    name: str, params: dict[str, float], dtype: torch.dtype
) -> None:
    s, t = rand_logits(3, 10, seed=19).to(dtype), rand_logits(3, 10, seed=20).to(dtype)
    got = DIVERGENCES[name](s, t, kd_temperature=2.0, **params)
    want = DIVERGENCES[name](s.float(), t.float(), kd_temperature=2.0, **params)
    assert got.dtype == torch.float32
    assert torch.equal(got, want)


@pytest.mark.parametrize(("name", "params"), NON_NEGATIVE, ids=[c[0] for c in NON_NEGATIVE])
def test_padded_vocab_entries_contribute_nothing(name: str, params: dict[str, float]) -> None:
    # Vocabulary padding assigned -inf on both sides (F2 guard) must give finite values and
    # gradients equal to the divergence over the real vocabulary.
    s, t = rand_logits(3, 6, seed=21), rand_logits(3, 6, seed=22)
    pad = torch.full((3, 2), float("-inf"), dtype=F64)
    s_pad = torch.cat([s, pad], -1).requires_grad_()
    got = DIVERGENCES[name](s_pad, torch.cat([t, pad], -1), **params)
    (grad,) = torch.autograd.grad(got, s_pad)
    torch.testing.assert_close(got, DIVERGENCES[name](s, t, **params))
    assert bool(torch.isfinite(grad).all())
    assert bool((grad[:, 6:] == 0).all())


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_gradient_accumulation_invariance(name: str, params: dict[str, float]) -> None:
    # batch 8 × accum 1 == batch 2 × accum 4 when num_items counts the whole window.
    s = rand_logits(8, 5, 7, seed=23)
    t = rand_logits(8, 5, 7, seed=24)
    lengths = torch.tensor([5, 1, 3, 0, 4, 2, 5, 1])  # variable supervised tokens per row
    mask = torch.arange(5) < lengths.unsqueeze(1)
    fn = DIVERGENCES[name]
    full = s.clone().requires_grad_()
    fn(full, t, mask, **params).backward()
    window = int(mask.sum())
    accum = s.clone().requires_grad_()
    for i in range(0, 8, 2):
        fn(accum[i : i + 2], t[i : i + 2], mask[i : i + 2], num_items=window, **params).backward()
    assert full.grad is not None and accum.grad is not None
    torch.testing.assert_close(accum.grad, full.grad, rtol=1e-12, atol=1e-14)


def test_reductions_and_num_items() -> None:
    s, t = rand_logits(2, 4, 5, seed=25), rand_logits(2, 4, 5, seed=26)
    mask = torch.tensor([[True, True, False, False], [True, False, False, False]])
    per = dv.forward_kl(s, t, mask, reduction="none")
    assert per.shape == (2, 4)
    assert bool((per[~mask] == 0).all())
    total = dv.forward_kl(s, t, mask, reduction="sum")
    torch.testing.assert_close(total, per.sum())
    torch.testing.assert_close(dv.forward_kl(s, t, mask), total / 3)
    torch.testing.assert_close(dv.forward_kl(s, t, mask, num_items=10), total / 10)
    torch.testing.assert_close(dv.forward_kl(s, t, mask, num_items=torch.tensor(6)), total / 6)
    unmasked = dv.forward_kl(s, t, reduction="none")
    assert unmasked.shape == (2, 4)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda s, t: dv.generalized_jsd(s, t, beta=1.5), "beta"),
        (lambda s, t: dv.generalized_jsd(s, t, beta=-0.1), "beta"),
        (lambda s, t: dv.skew_kl(s, t, skew_alpha=1.0), "skew_alpha"),
        (lambda s, t: dv.symmetric_kl(s, t, reverse_kl_weight=2.0), "reverse_kl_weight"),
        (lambda s, t: dv.forward_kl(s, t, kd_temperature=0.0), "kd_temperature"),
        (lambda s, t: dv.forward_kl(s, t[..., :3]), "same shape"),
        (lambda s, t: dv.forward_kl(s, t, torch.ones(2, 4)), "bool"),
        (lambda s, t: dv.forward_kl(s, t, torch.ones(3, dtype=torch.bool)), "mask shape"),
        (lambda s, t: dv.forward_kl(s, t, reduction="sum", num_items=3), "num_items"),
        (lambda s, t: dv.forward_kl(s, t, reduction="batchmean"), "batchmean"),
    ],
)
def test_invalid_arguments_fail_loudly(call, match: str) -> None:  # type: ignore[no-untyped-def]
    s, t = rand_logits(2, 4, seed=27), rand_logits(2, 4, seed=28)
    with pytest.raises(ValueError, match=match):
        call(s, t)


def test_tvd_plus_plus_gradient_raises_logits_where_teacher_is_higher() -> None:
    s, t = rand_logits(1, 9, seed=29), rand_logits(1, 9, seed=30)
    s.requires_grad_()
    dv.tvd_plus_plus(s, t).backward()
    p, q = torch.softmax(t, -1), torch.softmax(s.detach(), -1)
    reward = (p > q).double()
    advantage = (reward - reward.mean()) / (reward.std() + 1e-5)
    assert s.grad is not None
    torch.testing.assert_close(s.grad, -advantage / 9)
    # Gradient descent on the surrogate reduces the true TVD.
    student = s.detach().clone().requires_grad_()
    before = float(dv.total_variation(student.detach(), t))
    opt = torch.optim.SGD([student], lr=2.0)
    for _ in range(50):
        opt.zero_grad()
        dv.tvd_plus_plus(student, t).backward()
        opt.step()
    assert float(dv.total_variation(student.detach(), t)) < 0.5 * before


def test_tvd_plus_plus_ignores_padded_vocab_entries() -> None:
    # Ids no token maps to (-inf on both sides) leave the reward statistics, the mean and the
    # gradient of the real vocabulary unchanged, as they do for the divergences above.
    s, t = rand_logits(3, 6, seed=31), rand_logits(3, 6, seed=32)
    pad = torch.full((3, 2), float("-inf"), dtype=F64)
    s_pad = torch.cat([s, pad], -1).requires_grad_()
    s_real = s.clone().requires_grad_()
    got = dv.tvd_plus_plus(s_pad, torch.cat([t, pad], -1))
    want = dv.tvd_plus_plus(s_real, t)
    (grad,) = torch.autograd.grad(got, s_pad)
    (grad_real,) = torch.autograd.grad(want, s_real)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad[:, :6], grad_real)
    assert bool((grad[:, 6:] == 0).all())
