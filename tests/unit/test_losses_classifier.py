"""Tests for distil.losses.classifier: Hinton KD, DKD, PLD, standardisation, mixup targets."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from distil.losses import classifier as cl
from distil.losses.classifier import CLASSIFIER_LOSSES, ClassifierLoss
from distil.losses.divergences import forward_kl

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Tiny tensors: OpenMP fan-out costs more than it saves; restore the setting after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def randn(*shape: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def labels_for(b: int, c: int, seed: int) -> torch.Tensor:
    return torch.randint(0, c, (b,), generator=torch.Generator().manual_seed(seed))


def naive_dkd(
    s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example TCKD and NCKD written from the paper with explicit probabilities."""
    tckd, nckd = [], []
    for i in range(s.shape[0]):
        p, q = torch.softmax(t[i] / temp, -1), torch.softmax(s[i] / temp, -1)
        g = int(y[i])
        b_t = torch.stack([p[g], 1 - p[g]])
        b_s = torch.stack([q[g], 1 - q[g]])
        tckd.append((b_t * (b_t / b_s).log()).sum())
        keep = [c for c in range(s.shape[1]) if c != g]
        p_hat = torch.softmax(t[i, keep] / temp, -1)
        q_hat = torch.softmax(s[i, keep] / temp, -1)
        nckd.append((p_hat * (p_hat / q_hat).log()).sum())
    return torch.stack(tckd), torch.stack(nckd)


def naive_pld(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temp: float) -> torch.Tensor:
    out = []
    for i in range(s.shape[0]):
        g = int(y[i])
        others = sorted((c for c in range(s.shape[1]) if c != g), key=lambda c: -float(t[i, c]))
        order = [g, *others]
        alpha = torch.softmax(t[i] / temp, -1)
        total = s.new_zeros(())
        for k, c in enumerate(order):
            rest = torch.stack([s[i, j] for j in order[k:]])
            total = total + alpha[c] * (torch.logsumexp(rest, 0) - s[i, c])
        out.append(total)
    return torch.stack(out)


def test_table_matches_enum() -> None:
    assert set(CLASSIFIER_LOSSES) == {c.value for c in ClassifierLoss}


def test_hinton_kd_is_forward_kl_and_cross_entropy_form_adds_entropy() -> None:
    s, t = randn(6, 10, seed=1), randn(6, 10, seed=2)
    torch.testing.assert_close(
        cl.hinton_kd(s, t, kd_temperature=3.0), forward_kl(s, t, kd_temperature=3.0)
    )
    p = torch.softmax(t / 3.0, -1)
    want = -(p * torch.log_softmax(s / 3.0, -1)).sum(-1)
    got = cl.hinton_kd(s, t, kd_temperature=3.0, form="cross_entropy", reduction="none")
    torch.testing.assert_close(got, want)


def test_dkd_matches_naive_reference() -> None:
    s, t, y = randn(7, 6, seed=3), randn(7, 6, seed=4), labels_for(7, 6, 5)
    tckd, nckd = naive_dkd(s, t, y, 4.0)
    got = cl.dkd(
        s, t, labels=y, kd_temperature=4.0, tckd_weight=1.0, nckd_weight=8.0, reduction="none"
    )
    torch.testing.assert_close(got, tckd + 8.0 * nckd, rtol=1e-10, atol=1e-12)


def test_dkd_decomposes_classical_kd() -> None:
    # The paper's identity: KD = TCKD + (1 − p_gold^T)·NCKD.
    s, t, y = randn(9, 8, seed=6), randn(9, 8, seed=7), labels_for(9, 8, 8)
    tckd = cl.dkd(
        s, t, labels=y, kd_temperature=2.0, tckd_weight=1.0, nckd_weight=0.0, reduction="none"
    )
    nckd = cl.dkd(
        s, t, labels=y, kd_temperature=2.0, tckd_weight=0.0, nckd_weight=1.0, reduction="none"
    )
    p_gold = torch.softmax(t / 2.0, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    kd = forward_kl(s, t, kd_temperature=2.0, reduction="none")
    torch.testing.assert_close(tckd + (1 - p_gold) * nckd, kd, rtol=1e-10, atol=1e-12)


def test_pld_matches_naive_reference_and_its_structure() -> None:
    s, t, y = randn(5, 6, seed=9), randn(5, 6, seed=10), labels_for(5, 6, 11)
    got = cl.pld(s, t, labels=y, kd_temperature=2.0, reduction="none")
    torch.testing.assert_close(got, naive_pld(s, t, y, 2.0), rtol=1e-10, atol=1e-12)
    assert bool((got > 0).all())
    # Shift-invariant in the student's logits.
    torch.testing.assert_close(
        cl.pld(s + 7.5, t, labels=y, reduction="none"), cl.pld(s, t, labels=y, reduction="none")
    )
    # With two classes the list is [gold, other]: the loss is α_gold·CE (the k=2 term is 0).
    s2, t2, y2 = randn(4, 2, seed=12), randn(4, 2, seed=13), labels_for(4, 2, 14)
    alpha_gold = torch.softmax(t2, -1).gather(-1, y2.unsqueeze(-1)).squeeze(-1)
    ce = F.cross_entropy(s2, y2, reduction="none")
    torch.testing.assert_close(cl.pld(s2, t2, labels=y2, reduction="none"), alpha_gold * ce)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("hinton_kd", {}),
        ("dkd", {"nckd_weight": 2.0}),
        ("pld", {}),
        ("standardized_kd", {}),
    ],
)
def test_gradcheck_masks_and_half_inputs(name: str, kwargs: dict[str, float]) -> None:
    fn = CLASSIFIER_LOSSES[name]
    s, t, y = randn(4, 5, seed=15).requires_grad_(), randn(4, 5, seed=16), labels_for(4, 5, 17)
    mask = torch.tensor([True, False, True, True])
    assert torch.autograd.gradcheck(
        lambda a: fn(a, t, mask, labels=y, kd_temperature=1.5, **kwargs), (s,)
    )
    # Masked rows are ignored, even when they hold nan; all-masked is exactly 0 with zero grad.
    garbage = s.detach().clone()
    garbage[~mask] = float("nan")
    g = garbage.requires_grad_()
    value = fn(g, t, mask, labels=y, **kwargs)
    (grad,) = torch.autograd.grad(value, g)
    torch.testing.assert_close(value, fn(s.detach(), t, mask, labels=y, **kwargs))
    assert bool((grad[~mask] == 0).all()) and bool(torch.isfinite(grad).all())
    z = s.detach().clone().requires_grad_()
    empty = fn(z, t, torch.zeros(4, dtype=torch.bool), labels=y, **kwargs)
    (grad0,) = torch.autograd.grad(empty, z)
    assert float(empty.detach()) == 0.0 and bool((grad0 == 0).all())
    half = fn(s.detach().to(torch.bfloat16), t.to(torch.bfloat16), labels=y, **kwargs)
    assert half.dtype == torch.float32
    torch.testing.assert_close(
        half,
        fn(s.detach().to(torch.bfloat16).float(), t.to(torch.bfloat16).float(), labels=y, **kwargs),
    )


@settings(max_examples=20, deadline=None, database=None)
@given(seed=st.integers(0, 2**31 - 1), classes=st.integers(3, 12), temp=st.floats(0.5, 6.0))
def test_dkd_and_kd_are_zero_at_identity_and_nonnegative(
    seed: int, classes: int, temp: float
) -> None:
    s, t, y = (
        randn(4, classes, seed=seed, scale=3.0),
        randn(4, classes, seed=seed + 1, scale=3.0),
        labels_for(4, classes, seed),
    )
    for fn in (cl.hinton_kd, cl.dkd, cl.standardized_kd):
        assert abs(float(fn(t.clone(), t, labels=y, kd_temperature=temp))) < 1e-12
        assert bool((fn(s, t, labels=y, kd_temperature=temp, reduction="none") >= -1e-12).all())


def test_dkd_requires_labels() -> None:
    with pytest.raises(ValueError, match="labels"):
        cl.dkd(randn(2, 3, seed=18), randn(2, 3, seed=19))
    with pytest.raises(ValueError, match="int64"):
        cl.pld(randn(2, 3, seed=18), randn(2, 3, seed=19), labels=torch.zeros(2, dtype=torch.int32))


def test_standardisation() -> None:
    z = randn(5, 9, seed=20, scale=7.0) + 3.0
    std = cl.standardize_logits(z)
    torch.testing.assert_close(std.mean(-1), torch.zeros(5, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(std.var(-1), torch.ones(5, dtype=F64), atol=1e-6, rtol=0)
    const = torch.full((2, 4), 3.0, dtype=F64, requires_grad=True)
    out = cl.standardize_logits(const)
    (grad,) = torch.autograd.grad(out.sum(), const)
    assert bool((out == 0).all()) and bool(torch.isfinite(grad).all())
    # Standardised KD is invariant to a positive affine map of either side's logits.
    s, t = randn(6, 7, seed=21), randn(6, 7, seed=22)
    base = cl.standardized_kd(s, t, kd_temperature=2.0)
    torch.testing.assert_close(
        cl.standardized_kd(3.0 * s - 1.0, 0.5 * t + 4.0, kd_temperature=2.0),
        base,
        rtol=1e-6,
        atol=1e-9,
    )
    assert float(cl.standardized_kd(2.0 * t + 1.0, t)) < 1e-6


def test_mixed_targets_and_soft_target_cross_entropy() -> None:
    a, b = torch.tensor([0, 2, 1]), torch.tensor([1, 2, 0])
    lam = torch.tensor([0.7, 0.4, 1.0])  # the last example is left unmixed (partial mixup)
    targets = cl.mixed_targets(a, b, lam, 3)
    torch.testing.assert_close(targets.sum(-1), torch.ones(3))
    assert targets[2].tolist() == [0.0, 1.0, 0.0]
    s = randn(3, 3, seed=23)
    got = cl.soft_target_cross_entropy(s, targets, reduction="none")
    want = lam * F.cross_entropy(s, a, reduction="none") + (1 - lam) * F.cross_entropy(
        s, b, reduction="none"
    )
    torch.testing.assert_close(got, want.to(got.dtype))
    onehot = cl.mixed_targets(a, a, 0.3, 3)
    torch.testing.assert_close(cl.soft_target_cross_entropy(s, onehot), F.cross_entropy(s, a))
    std = cl.soft_target_cross_entropy(s, onehot, standardize=True)
    torch.testing.assert_close(std, F.cross_entropy(cl.standardize_logits(s), a))
