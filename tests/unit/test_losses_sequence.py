"""Sequence-level losses: trace log-likelihoods, SFT on traces and the REDI objective, against
float64 references, with masking, accumulation and the paper's constants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distil.losses.objective import IGNORE_INDEX
from distil.losses.sequence import (
    SequenceNormalization,
    redi_loss,
    redi_objective,
    sequence_log_probs,
    sequence_nll,
)


def _batch(seed: int = 0, b: int = 6, t: int = 7, v: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (b, t), generator=g)
    for row in range(b):  # a prompt of row % 3 tokens, right padding of row % 2
        labels[row, : row % 3] = IGNORE_INDEX
        if row % 2:
            labels[row, t - 1 :] = IGNORE_INDEX
    return logits, labels


def _reference(logits: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[int]]:
    totals, lengths = [], []
    for row in range(labels.shape[0]):
        log_probs = logits[row].double().log_softmax(-1)
        keep = [(t, int(y)) for t, y in enumerate(labels[row]) if y != IGNORE_INDEX]
        totals.append(sum(float(log_probs[t, y]) for t, y in keep))
        lengths.append(len(keep))
    return totals, lengths


def test_sequence_log_probs_matches_float64_and_masks_before_math() -> None:
    logits, labels = _batch()
    totals, lengths = _reference(logits, labels)
    seq = sequence_log_probs(logits, labels)
    assert torch.allclose(seq.total, torch.tensor(totals, dtype=torch.float64), atol=1e-10)
    assert seq.length.tolist() == lengths
    poisoned = logits.clone().requires_grad_(True)
    with torch.no_grad():
        poisoned[labels == IGNORE_INDEX] = float("nan")
    out = sequence_log_probs(poisoned, labels)
    assert torch.isfinite(out.total).all()
    out.total.sum().backward()
    assert poisoned.grad is not None
    assert (poisoned.grad[labels == IGNORE_INDEX] == 0).all()
    half = sequence_log_probs(logits.to(torch.bfloat16), labels)
    assert half.total.dtype == torch.float32  # low precision is upcast


def test_sequence_nll_token_and_sequence_normalisation() -> None:
    logits, labels = _batch(1)
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    tokens = sequence_nll(logits, labels)
    assert torch.allclose(tokens.loss, expected, atol=1e-12)
    totals, lengths = _reference(logits, labels)
    per_trace = [-s / n for s, n in zip(totals, lengths, strict=True)]
    seq = sequence_nll(logits, labels, normalization=SequenceNormalization.SEQUENCE)
    assert math.isclose(float(seq.loss), sum(per_trace) / len(per_trace), rel_tol=1e-12)
    weights = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5, 1.0], dtype=torch.float64)
    weighted = sequence_nll(logits, labels, normalization="sequence", sequence_weights=weights)
    want = sum(w * x for w, x in zip(weights.tolist(), per_trace, strict=True)) / len(per_trace)
    assert math.isclose(float(weighted.loss), want, rel_tol=1e-12)
    assert set(tokens.components) == {"sft_nll/raw", "sft_nll/weighted"}
    with pytest.raises(ValueError, match="sequence_weights"):
        sequence_nll(logits, labels, sequence_weights=torch.ones(2))


@pytest.mark.parametrize("normalization", list(SequenceNormalization))
def test_sequence_nll_accumulation_window_is_normalised_once(
    normalization: SequenceNormalization,
) -> None:
    logits, labels = _batch(2, b=8)
    full = logits.clone().requires_grad_(True)
    sequence_nll(full, labels, normalization=normalization).loss.backward()
    split = logits.clone().requires_grad_(True)
    mask = labels != IGNORE_INDEX
    count = int(mask.sum()) if normalization is SequenceNormalization.TOKENS else 8
    for rows in (slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)):
        sequence_nll(
            split[rows], labels[rows], normalization=normalization, num_items=count
        ).loss.backward()
    assert full.grad is not None and split.grad is not None
    assert torch.allclose(full.grad, split.grad, atol=1e-14)


def test_redi_matches_the_paper_formula_in_float64() -> None:
    logits, labels = _batch(3)
    positive = torch.tensor([True, False, True, False, False, True])
    totals, lengths = _reference(logits, labels)
    norm = [s / n for s, n in zip(totals, lengths, strict=True)]
    pos = [x for x, p in zip(norm, positive.tolist(), strict=True) if p]
    neg = [x for x, p in zip(norm, positive.tolist(), strict=True) if not p]
    out = redi_objective(logits, labels, positive)  # the paper's c+ = 1.0, alpha = 0.8
    want = -sum(pos) / len(pos) + 0.8 * sum(neg) / len(neg)
    assert math.isclose(float(out.loss), want, rel_tol=1e-12)
    assert math.isclose(float(out.components["redi_negative/weighted"]), 0.8 * sum(neg) / len(neg))
    gamma = 1.0
    weighted = redi_objective(logits, labels, positive, negative_reweight_gamma=gamma)
    want_w = -sum(pos) / len(pos) + 0.8 * sum(x * math.exp(gamma * x) for x in neg) / len(neg)
    assert math.isclose(float(weighted.loss), want_w, rel_tol=1e-12)


def test_redi_without_negatives_is_length_normalised_sft() -> None:
    logits, labels = _batch(4)
    everyone = torch.ones(6, dtype=torch.bool)
    sft = sequence_nll(logits, labels, normalization="sequence").loss
    assert torch.allclose(redi_objective(logits, labels, everyone).loss, sft, atol=1e-12)
    mixed = torch.tensor([True, False] * 3)
    alpha_zero = redi_objective(logits, labels, mixed, negative_weight=0.0).loss
    only_pos = sequence_nll(logits[mixed], labels[mixed], normalization="sequence").loss
    assert torch.allclose(alpha_zero, only_pos, atol=1e-12)
    nobody = redi_objective(logits, labels, ~everyone, positive_weight=1.0)
    assert float(nobody.components["redi_positive/raw"]) == 0.0


def test_redi_gradient_raises_positives_and_lowers_negatives() -> None:
    logits, labels = _batch(5)
    positive = torch.tensor([True, True, True, False, False, False])
    before = sequence_log_probs(logits, labels).total
    param = logits.clone().requires_grad_(True)
    redi_objective(param, labels, positive).loss.backward()
    assert param.grad is not None
    after = sequence_log_probs(logits - 0.05 * param.grad, labels).total
    assert (after[positive] > before[positive]).all()
    assert (after[~positive] < before[~positive]).all()


def test_redi_accumulation_with_window_counts_equals_one_batch() -> None:
    logits, labels = _batch(6, b=8)
    positive = torch.tensor([True, False, False, True, True, True, False, True])
    full = logits.clone().requires_grad_(True)
    redi_objective(full, labels, positive, negative_reweight_gamma=0.5).loss.backward()
    split = logits.clone().requires_grad_(True)
    for rows in (slice(0, 3), slice(3, 8)):  # the second micro-batch has one negative only
        redi_objective(
            split[rows],
            labels[rows],
            positive[rows],
            negative_reweight_gamma=0.5,
            num_positive=int(positive.sum()),
            num_negative=int((~positive).sum()),
        ).loss.backward()
    assert full.grad is not None and split.grad is not None
    assert torch.allclose(full.grad, split.grad, atol=1e-14)


def test_negative_reweighting_stops_at_minus_one_over_gamma() -> None:
    """As in the released code the weight is not detached: d/dl [l·exp(γl)] = 0 at l = -1/γ."""
    for gamma in (0.5, 1.0, 2.0):
        level = torch.tensor([-1.0 / gamma], dtype=torch.float64, requires_grad=True)
        out = redi_loss(
            level * 4,
            torch.tensor([4.0], dtype=torch.float64),
            torch.tensor([False]),
            negative_reweight_gamma=gamma,
        )
        out.loss.backward()
        assert level.grad is not None and abs(float(level.grad)) < 1e-12


def test_redi_drops_empty_traces_and_checks_its_inputs() -> None:
    totals = torch.tensor([-3.0, 0.0, -2.0])
    lengths = torch.tensor([3.0, 0.0, 4.0])
    out = redi_loss(totals, lengths, torch.tensor([True, False, False]))
    assert math.isclose(float(out.loss), 1.0 + 0.8 * (-0.5), rel_tol=1e-6)
    with pytest.raises(ValueError, match="bool"):
        redi_loss(totals, lengths, torch.tensor([1, 0, 0]))
    with pytest.raises(ValueError, match="shape"):
        redi_loss(totals, lengths[:2], torch.tensor([True, False]))
    with pytest.raises(ValueError, match=">= 0"):
        redi_loss(totals, lengths, torch.tensor([True, False, False]), negative_weight=-0.8)
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        sequence_log_probs(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
