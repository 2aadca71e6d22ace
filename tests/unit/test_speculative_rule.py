"""The accept/resample rule of speculative decoding and the α/τ formulas, on explicit numbers."""

from __future__ import annotations

import math

import pytest
import torch

from distil.decoding.speculative import (
    SpeculativeResult,
    proposal_lengths,
    residual_distribution,
    sample_categorical,
    verify_greedy,
    verify_sampled,
)
from distil.evaluation.speculative import (
    acceptance_by_position,
    block_summary,
    expected_acceptance,
    greedy_target_calls,
    modelled_speedup,
    predicted_block_efficiency,
    predicted_from_positions,
    top1_agreement,
)

F64 = torch.float64
P = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=F64)
Q = torch.tensor([0.1, 0.4, 0.3, 0.0, 0.2], dtype=F64)


def test_residual_is_normalised_positive_part_and_p_when_equal() -> None:
    want = (P - Q).clamp_min(0)
    torch.testing.assert_close(residual_distribution(P, Q), want / want.sum())
    torch.testing.assert_close(residual_distribution(P, P.clone()), P)


def test_sample_categorical_never_draws_zero_weight_ids() -> None:
    weights = torch.tensor([[0.0, 0.5, 0.0, 0.5]] * 5, dtype=F64)
    u = torch.tensor([0.0, 0.25, 0.4999, 0.5, 0.9999], dtype=F64)
    assert sample_categorical(weights, u).tolist() == [1, 1, 1, 3, 3]


def test_accept_test_is_u_below_p_over_q() -> None:
    # d = 1: p/q = 0.5, accepted iff u < 0.5; d = 0: p/q = 5, always accepted.
    drafts = torch.tensor([[1], [1], [0]])
    q = Q.expand(3, 1, 5)
    p = P.expand(3, 2, 5)
    u = torch.tensor([[0.49], [0.51], [0.999]], dtype=F64)
    accepted, _ = verify_sampled(drafts, q, p, torch.ones(3, dtype=torch.long), u, torch.zeros(3))
    assert accepted.tolist() == [1, 0, 1]


def test_one_position_rule_reproduces_the_target_distribution_exactly() -> None:
    """Every (draft token, acceptance uniform, resample uniform) on a fine grid, each weighted by
    q(d): the marginal of the emitted token is p up to the grid's resolution."""
    grid = 400
    d, ia, ir = (
        x.reshape(-1)
        for x in torch.meshgrid(
            torch.arange(5), torch.arange(grid), torch.arange(grid), indexing="ij"
        )
    )
    ua, ur = (ia.double() + 0.5) / grid, (ir.double() + 0.5) / grid
    n = d.numel()
    # the bonus position gets a distribution that must never be used here
    p = torch.stack([P, torch.tensor([0, 0, 0, 0, 1.0], dtype=F64)]).expand(n, 2, 5)
    accepted, nxt = verify_sampled(
        d[:, None], Q.expand(n, 1, 5), p, torch.ones(n, dtype=torch.long), ua[:, None], ur
    )
    emitted = torch.where(accepted == 1, d, nxt)
    weight = Q[d] / grid**2
    marginal = torch.zeros(5, dtype=F64).index_add_(0, emitted, weight)
    torch.testing.assert_close(marginal, P, atol=2.0 / grid, rtol=0)
    acceptance = float((weight * (accepted == 1)).sum())
    assert acceptance == pytest.approx(float(torch.minimum(P, Q).sum()), abs=2.0 / grid)


def test_bonus_token_comes_from_the_next_target_distribution() -> None:
    drafts = torch.tensor([[0, 0]])
    q = torch.tensor([[[1.0, 0, 0], [1.0, 0, 0]]], dtype=F64)
    p = torch.tensor([[[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0]]], dtype=F64)
    accepted, nxt = verify_sampled(
        drafts, q, p, torch.tensor([2]), torch.full((1, 2), 0.9, dtype=F64), torch.tensor([0.3])
    )
    assert (accepted.item(), nxt.item()) == (2, 2)


def test_greedy_verification_and_proposal_lengths() -> None:
    target_logits = torch.full((3, 4, 6), -1.0)
    for row, argmaxes in enumerate([[1, 2, 3, 4], [1, 5, 3, 0], [2, 2, 2, 2]]):
        target_logits[row, torch.arange(4), torch.tensor(argmaxes)] = 1.0
    drafts = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 2, 3]])
    accepted, nxt = verify_greedy(drafts, target_logits, torch.tensor([3, 3, 3]))
    assert accepted.tolist() == [3, 1, 0] and nxt.tolist() == [4, 5, 2]
    # an EOS (id 2) ends a proposal: row 0 offers only [1, 2]
    assert proposal_lengths(drafts, [2]).tolist() == [2, 2, 2]
    accepted, nxt = verify_greedy(drafts, target_logits, torch.tensor([2, 3, 3]))
    assert accepted.tolist() == [2, 1, 0]
    assert proposal_lengths(torch.tensor([[5, 6]]), []).tolist() == [2]


def test_expected_acceptance_is_one_minus_tvd_against_float64_reference() -> None:
    g = torch.Generator().manual_seed(0)
    t, d = torch.randn(3, 7, generator=g, dtype=F64), torch.randn(3, 7, generator=g, dtype=F64)
    for temp in (1.0, 0.5):
        p, q = torch.softmax(t / temp, -1), torch.softmax(d / temp, -1)
        want = torch.minimum(p, q).sum(-1)
        got = expected_acceptance(t, d, sampling_temperature=temp)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.allclose(expected_acceptance(t, t.clone()), torch.ones(3, dtype=F64))
    assert top1_agreement(t, t + 0.0).all()


def test_block_efficiency_formula_endpoints_and_series() -> None:
    assert predicted_block_efficiency(0.0, 4) == 1.0
    assert predicted_block_efficiency(1.0, 4) == 5.0
    alpha = 0.6
    assert predicted_block_efficiency(alpha, 4) == pytest.approx(sum(alpha**k for k in range(5)))
    assert modelled_speedup(3.0, 4, 0.25) == pytest.approx(1.5)
    assert modelled_speedup(3.0, 4, 0.25, verify_cost=2.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="alpha"):
        predicted_block_efficiency(1.5, 2)


def test_greedy_calls_follow_from_the_agreement_sequence() -> None:
    agree = [True, True, False, True, True, True, True, False, False, True]
    calls, accepted = greedy_target_calls(agree, 2)
    # rounds at t = 0 (2 kept), 3 (2), 6 (1), 8 (0), 9 (g = 0: last token, target alone)
    assert accepted == [2, 2, 1, 0, 0] and calls == 5
    assert sum(a + 1 for a in accepted) == len(agree)
    assert greedy_target_calls([True] * 9, 8)[0] == 1
    assert greedy_target_calls([False] * 4, 3)[0] == 4


def test_block_statistics_of_a_run() -> None:
    result = SpeculativeResult(
        tokens=[[1] * 7, [1] * 4],
        gamma=3,
        sampling_temperature=0.0,
        block_row=(0, 0, 0, 1, 1),
        block_proposed=(3, 3, 1, 3, 2),
        block_accepted=(3, 1, 0, 0, 2),
        block_emitted=(4, 2, 1, 1, 3),
        target_calls=3,
        draft_calls=7,
        seconds=1.0,
        cpu_seconds=1.0,
    )
    summary = block_summary(result)
    assert summary["tau"] == pytest.approx((4 + 2 + 1) / 3)  # full rounds only
    assert summary["tokens_per_call"] == pytest.approx(11 / 5)
    assert summary["acceptance"] == pytest.approx(4 / (3 + 2 + 1))
    by_position = acceptance_by_position(result)
    assert by_position == pytest.approx([2 / 3, 1 / 2, 1.0])
    assert math.isclose(sum(result.block_emitted), sum(len(t) for t in result.tokens))


def test_prediction_from_positions_is_exact_for_greedy_and_the_formula_for_constant_alpha() -> None:
    agree = [True, True, False, True, True, True, True, False, False, True]
    calls, _accepted = greedy_target_calls(agree, 2)
    got = predicted_from_positions([[float(a) for a in agree]], 2)
    # rounds at t = 0, 3, 6 propose γ = 2; those at t = 8 and 9 have room for 1 and 0 only
    assert got["rounds"] == calls and got["tau"] == pytest.approx((3 + 3 + 2) / 3)
    assert got["tokens_per_call"] == pytest.approx(len(agree) / calls)
    long = predicted_from_positions([[0.7] * 4000], 4)
    assert long["tau"] == pytest.approx(predicted_block_efficiency(0.7, 4), rel=1e-9)
    # the same mean acceptance, unevenly spread, gives more tokens per round
    mixed = predicted_from_positions([[1.0, 0.4] * 2000], 4)
    assert mixed["tau"] > predicted_block_efficiency(0.7, 4)
