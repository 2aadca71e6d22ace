"""Tests for distil.losses.representation against naive float64 formulas."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distil.losses import representation as rp
from distil.losses.representation import REPRESENTATION_LOSSES, RepresentationLoss

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Tiny tensors: OpenMP fan-out costs more than it saves; restore the setting after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def random_rotation(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(randn(d, d, seed=seed))
    return q


def test_table_matches_enum() -> None:
    assert set(REPRESENTATION_LOSSES) == {r.value for r in RepresentationLoss}


def test_projector_factory() -> None:
    assert isinstance(rp.make_projector(8, 8), nn.Identity)
    linear = rp.make_projector(6, 10)
    assert isinstance(linear, nn.Linear)
    assert linear(torch.randn(2, 3, 6)).shape == (2, 3, 10)
    conv = rp.make_projector(4, 12, kind="conv1x1", bias=False)
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.bias is None
    assert conv(torch.randn(2, 4, 5, 5)).shape == (2, 12, 5, 5)
    with pytest.raises(ValueError):
        rp.make_projector(4, 5, kind="mlp")


def test_projected_hint_trains_the_projector() -> None:
    torch.manual_seed(0)
    projector = rp.make_projector(6, 10)
    student, teacher = torch.randn(4, 6), torch.randn(4, 10)
    rp.hint_loss(projector(student), teacher).backward()
    assert isinstance(projector, nn.Linear) and projector.weight.grad is not None


def test_hint_and_cosine_match_naive_formulas() -> None:
    s, t = randn(2, 5, 4, seed=1), randn(2, 5, 4, seed=2)
    mask = torch.tensor([[True, False, True, True, False], [False, True, True, False, False]])
    hint = rp.hint_loss(s, t, mask, reduction="none")
    torch.testing.assert_close(hint, ((s - t) ** 2).mean(-1) * mask)
    torch.testing.assert_close(rp.hint_loss(s, t, mask), ((s - t) ** 2).mean(-1)[mask].mean())
    cos = (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))
    torch.testing.assert_close(rp.cosine_loss(s, t, mask, reduction="none"), (1 - cos) * mask)
    maps_s, maps_t = randn(3, 2, 4, 4, seed=3), randn(3, 2, 4, 4, seed=4)
    torch.testing.assert_close(
        rp.hint_loss(maps_s, maps_t, feature_dims=3), F.mse_loss(maps_s, maps_t)
    )
    assert float(rp.hint_loss(s, s.clone())) == 0.0
    assert abs(float(rp.cosine_loss(s, 3.0 * s))) < 1e-12
    torch.testing.assert_close(rp.cosine_loss(s, -s), torch.tensor(2.0, dtype=F64))
    with pytest.raises(ValueError, match="projector"):
        rp.hint_loss(s, t[..., :3])


def naive_attention_map(a: torch.Tensor) -> torch.Tensor:
    q = (a**2).mean(1).flatten(1)
    return q / q.norm(dim=-1, keepdim=True)


def test_attention_transfer() -> None:
    s, t = randn(3, 4, 5, 5, seed=5), randn(3, 7, 5, 5, seed=6)  # channel counts may differ
    want = ((naive_attention_map(s) - naive_attention_map(t)) ** 2).sum(-1)
    torch.testing.assert_close(rp.attention_transfer(s, t, reduction="none"), want)
    torch.testing.assert_close(rp.attention_map(s), naive_attention_map(s))
    # Invariant to scaling the features; zero against itself; bounded by 4 (unit vectors).
    torch.testing.assert_close(rp.attention_transfer(5.0 * s, t), rp.attention_transfer(s, t))
    assert float(rp.attention_transfer(s, s.clone())) == 0.0
    assert bool((want <= 4.0).all())
    with pytest.raises(ValueError, match="spatial"):
        rp.attention_transfer(s, randn(3, 4, 4, 4, seed=7))


def test_attention_kl_with_causal_zeros() -> None:
    b, h, n = 2, 3, 4
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    scores_s = randn(b, h, n, n, seed=8).masked_fill(~causal, float("-inf"))
    scores_t = randn(b, h, n, n, seed=9).masked_fill(~causal, float("-inf"))
    a_s, a_t = torch.softmax(scores_s, -1), torch.softmax(scores_t, -1)
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    naive = torch.zeros(b, h, n, dtype=F64)
    for i, j, q in itertools.product(range(b), range(h), range(n)):
        keep = a_t[i, j, q] > 0
        naive[i, j, q] = (
            a_t[i, j, q][keep] * (a_t[i, j, q][keep] / a_s[i, j, q][keep]).log()
        ).sum()
    naive = naive * mask.unsqueeze(1)
    torch.testing.assert_close(rp.attention_kl(a_s, a_t, mask, reduction="none"), naive)
    # Default normaliser: supervised (head, query) rows.
    torch.testing.assert_close(rp.attention_kl(a_s, a_t, mask), naive.sum() / (h * int(mask.sum())))
    from_scores = rp.attention_kl(scores_s, scores_t, mask, inputs_are_probs=False)
    torch.testing.assert_close(from_scores, rp.attention_kl(a_s, a_t, mask))
    s = scores_s.clone().requires_grad_()
    value = rp.attention_kl(s, scores_t, mask, inputs_are_probs=False)
    (grad,) = torch.autograd.grad(value, s)
    assert bool(torch.isfinite(grad).all()) and bool((grad[..., ~causal] == 0).all())


def test_channel_wise_distillation() -> None:
    s, t = randn(2, 3, 4, 5, seed=10), randn(2, 3, 4, 5, seed=11)
    tau = 2.0
    naive = torch.zeros(2, 3, dtype=F64)
    for n, c in itertools.product(range(2), range(3)):
        p = torch.softmax(t[n, c].flatten() / tau, 0)
        q = torch.softmax(s[n, c].flatten() / tau, 0)
        naive[n, c] = (p * (p / q).log()).sum()
    # No τ² inside: mmrazor's value is τ²·this (objective.py applies τ² via WeightedTerm).
    torch.testing.assert_close(rp.channel_wise_distillation(s, t, kd_temperature=tau), naive.mean())
    assert float(rp.channel_wise_distillation(s, s.clone())) == 0.0


def naive_rkd_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    b = s.shape[0]
    pairs = [(i, j) for i in range(b) for j in range(b) if i != j]
    d_s = torch.stack([(s[i] - s[j]).norm() for i, j in pairs])
    d_t = torch.stack([(t[i] - t[j]).norm() for i, j in pairs])
    return F.smooth_l1_loss(d_s / d_s.mean(), d_t / d_t.mean())


def naive_rkd_angle(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    b = s.shape[0]

    def angle(x: torch.Tensor, i: int, j: int, k: int) -> torch.Tensor:
        e_ij = (x[i] - x[j]) / (x[i] - x[j]).norm()
        e_kj = (x[k] - x[j]) / (x[k] - x[j]).norm()
        return (e_ij * e_kj).sum()

    triples = [(i, j, k) for i in range(b) for j in range(b) for k in range(b) if i != j and k != j]
    a_s = torch.stack([angle(s, *tr) for tr in triples])
    a_t = torch.stack([angle(t, *tr) for tr in triples])
    return F.smooth_l1_loss(a_s, a_t)


def test_relational_kd_matches_naive_and_is_invariant() -> None:
    s, t = randn(5, 4, seed=12), randn(5, 6, seed=13, scale=3.0)  # widths may differ
    torch.testing.assert_close(rp.rkd_distance(s, t), naive_rkd_distance(s, t))
    torch.testing.assert_close(rp.rkd_angle(s, t), naive_rkd_angle(s, t))
    # Both relations are invariant to rotation, translation and scale of the student.
    moved = 2.5 * s @ random_rotation(4, 14) + 1.0
    torch.testing.assert_close(rp.rkd_distance(moved, t), rp.rkd_distance(s, t))
    torch.testing.assert_close(rp.rkd_angle(moved, t), rp.rkd_angle(s, t))
    assert abs(float(rp.rkd_distance(moved, s))) < 1e-12
    assert abs(float(rp.rkd_angle(moved, s))) < 1e-12


def test_relational_kd_handles_duplicate_examples() -> None:
    s = randn(4, 3, seed=15)
    s = torch.cat([s, s[:1]]).requires_grad_()  # two identical rows: zero distance
    t = randn(5, 3, seed=16)
    for fn in (rp.rkd_distance, rp.rkd_angle):
        (grad,) = torch.autograd.grad(fn(s, t), s)
        assert bool(torch.isfinite(grad).all())


def naive_mi_alpha(scores: torch.Tensor, alpha: float, log_q: torch.Tensor) -> torch.Tensor:
    b = scores.shape[0]
    joint, marginal = [], []
    for j in range(b):
        m_all = torch.stack([scores[k, j].exp() for k in range(b)]).mean()
        m_others = torch.stack([scores[k, j].exp() for k in range(b) if k != j]).mean()
        q = log_q[j].exp()
        joint.append(scores[j, j] - torch.log(alpha * m_all + (1 - alpha) * q))
        for i in range(b):
            if i != j:
                marginal.append(scores[i, j].exp() / (alpha * m_others + (1 - alpha) * q))
    return 1 + torch.stack(joint).mean() - torch.stack(marginal).mean()


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_mi_alpha_bound_matches_naive(alpha: float) -> None:
    scores = randn(5, 5, seed=17)
    log_q = randn(5, seed=18, scale=0.3)
    torch.testing.assert_close(
        rp.mi_alpha_bound(scores, mi_alpha=alpha, log_baseline=log_q),
        naive_mi_alpha(scores, alpha, log_q),
    )


def test_mi_alpha_endpoints() -> None:
    scores = randn(6, 6, seed=19, scale=2.0)
    # α = 1: InfoNCE (the marginal term is exactly 1).
    info_nce = (scores.diagonal() - (torch.logsumexp(scores, 0) - math.log(6))).mean()
    torch.testing.assert_close(rp.mi_alpha_bound(scores, mi_alpha=1.0), info_nce)
    # α = 0 with q = 1: the TUBA/NWJ-type bound 1 + E_joint[f] − E_marginal[e^f].
    off = ~torch.eye(6, dtype=torch.bool)
    tuba = 1 + scores.diagonal().mean() - scores.exp()[off].mean()
    torch.testing.assert_close(rp.mi_alpha_bound(scores, mi_alpha=0.0), tuba)


def test_mi_alpha_loss_rewards_aligned_features() -> None:
    t = randn(8, 5, seed=20)
    aligned = rp.mi_alpha_loss(t + 0.01 * randn(8, 5, seed=21), t)
    shuffled = rp.mi_alpha_loss(
        t[torch.randperm(8, generator=torch.Generator().manual_seed(22))], t
    )
    assert float(aligned) < float(shuffled)
    scores = rp.separable_critic_scores(
        randn(3, 4, seed=23), randn(3, 4, seed=24), critic_temperature=0.5
    )
    assert scores.shape == (3, 3) and bool((scores.abs() <= 2.0 + 1e-12).all())


@pytest.mark.parametrize(
    "call",
    [
        lambda s, t: rp.hint_loss(s, t),
        lambda s, t: rp.cosine_loss(s, t),
        lambda s, t: rp.rkd_distance(s, t),
        lambda s, t: rp.rkd_angle(s, t),
        lambda s, t: rp.mi_alpha_loss(s, t, mi_alpha=0.5, critic_temperature=0.7),
        lambda s, t: rp.attention_transfer(s.reshape(4, 1, 3, 2), t.reshape(4, 1, 3, 2)),
        lambda s, t: rp.channel_wise_distillation(
            s.reshape(4, 2, 3, 1), t.reshape(4, 2, 3, 1), kd_temperature=1.5
        ),
        lambda s, t: rp.attention_kl(
            s.reshape(1, 2, 2, 6), t.reshape(1, 2, 2, 6), inputs_are_probs=False
        ),
    ],
)
def test_gradcheck_float64(call) -> None:  # type: ignore[no-untyped-def]
    s, t = randn(4, 6, seed=25).requires_grad_(), randn(4, 6, seed=26)
    assert torch.autograd.gradcheck(lambda a: call(a, t), (s,))


def test_item_losses_ignore_masked_items_and_upcast() -> None:
    s, t = randn(3, 4, 2, 2, seed=27), randn(3, 4, 2, 2, seed=28)
    mask = torch.tensor([True, False, True])
    for fn in (
        lambda a, m: rp.attention_transfer(a, t, m),
        lambda a, m: rp.hint_loss(a, t, m, feature_dims=3),
        lambda a, m: rp.cosine_loss(a, t, m, feature_dims=3),
    ):
        garbage = s.clone()
        garbage[~mask] = float("nan")
        g = garbage.requires_grad_()
        value = fn(g, mask)
        (grad,) = torch.autograd.grad(value, g)
        torch.testing.assert_close(value, fn(s, mask))
        assert bool((grad[~mask] == 0).all())
        z = s.clone().requires_grad_()
        empty = fn(z, torch.zeros(3, dtype=torch.bool))
        (grad0,) = torch.autograd.grad(empty, z)
        assert float(empty.detach()) == 0.0 and bool((grad0 == 0).all())
        half = fn(s.to(torch.bfloat16), mask)
        assert half.dtype == torch.float32


def test_cosine_similarity_matching_ignores_the_coordinates_of_each_space() -> None:
    """Zero for the same geometry (also after a rotation and a scaling of one space), a float64
    reference elsewhere, and a gradient that reaches the student."""
    from distil.losses.representation import cosine_similarity_matching

    g = torch.Generator().manual_seed(0)
    t = torch.randn(6, 8, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    assert float(cosine_similarity_matching(t, t)) == 0.0
    assert float(cosine_similarity_matching(3.0 * t @ q, t)) < 1e-12  # rotated and scaled: same
    s = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)  # other width
    sn, tn = s / s.norm(dim=1, keepdim=True), t / t.norm(dim=1, keepdim=True)
    off = ~torch.eye(6, dtype=torch.bool)
    want = ((sn @ sn.T)[off] - (tn @ tn.T)[off]).pow(2).mean()
    got = cosine_similarity_matching(s, t)
    torch.testing.assert_close(got, want)
    got.backward()
    assert s.grad is not None and bool(s.grad.abs().sum() > 0)
    with pytest.raises(ValueError, match=">= 2"):
        cosine_similarity_matching(s[:1], t[:1])
