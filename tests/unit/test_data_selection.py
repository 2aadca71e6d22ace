"""Data selection: budgets, the random control, pass-rate preferences, LIMR's learning-impact
score against its reference formula, scorer-based selection and per-example losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distil.data.selection import (
    LIMR_THRESHOLD,
    budget_count,
    learning_impact_scores,
    mean_logprob_scores,
    per_example_nll,
    rewards_from_losses,
    select_above,
    select_by_pass_rate,
    select_random,
    select_top,
)
from distil.errors import DistilError


def test_budgets_are_fractions_or_counts() -> None:
    assert budget_count(100, 0.1) == 10 and budget_count(100, 0.3) == 30
    assert budget_count(7, 0.01) == 1  # at least one
    assert budget_count(100, 25) == 25 and budget_count(10, 25) == 10 and budget_count(10, 1.0) == 1
    for bad in (0, -3, 1.5, 0.0):
        with pytest.raises(DistilError, match="budget"):
            budget_count(10, bad)
    with pytest.raises(DistilError, match="empty"):
        budget_count(0, 0.5)


def test_random_control_is_seeded_and_sized() -> None:
    keys = list(range(50))
    a, b, c = (
        select_random(keys, 0.2, seed=1),
        select_random(keys, 0.2, seed=1),
        select_random(keys, 0.2, seed=2),
    )
    assert a == b and a != c and len(a) == 10 and len(set(a)) == 10


def test_top_scores_break_ties_by_seed_not_by_order() -> None:
    scores = {k: 1.0 for k in range(20)} | {99: 5.0}
    first = select_top(scores, 5, seed=0)
    assert first[0] == 99
    assert {tuple(select_top(scores, 5, seed=s)) for s in range(5)} != {tuple(first)}
    with pytest.raises(DistilError, match="NaN"):
        select_top({1: float("nan")}, 1)
    assert select_above({"a": 0.5, "b": 0.1, "c": 0.2}) == ["a", "c"]
    assert LIMR_THRESHOLD == 0.2


def test_pass_rate_preferences() -> None:
    rates = {"never": 0.0, "rare": 0.125, "half": 0.5, "most": 0.875, "always": 1.0}
    assert select_by_pass_rate(rates, 2, "medium")[0] == "half"
    assert select_by_pass_rate(rates, 5, "hardest") == ["rare", "half", "most", "always", "never"]
    assert select_by_pass_rate(rates, 2, "easiest") == ["always", "most"]


def _limr_reference(sequences: list[list[float]]) -> list[float]:
    """LIMR's calculate_similarity_score, written from its definition."""
    mean = [sum(col) / len(col) for col in zip(*sequences, strict=True)]
    room = sum((1 - m) ** 2 for m in mean)
    return [
        1 - sum((a - m) ** 2 for a, m in zip(seq, mean, strict=True)) / room for seq in sequences
    ]


def test_learning_impact_matches_the_reference_and_its_endpoints() -> None:
    rng = np.random.default_rng(0)
    r = rng.uniform(0, 1, size=(30, 8))
    assert np.allclose(learning_impact_scores(r), _limr_reference(r.tolist()), atol=1e-12)
    same = np.tile([0.1, 0.4, 0.7], (5, 1))
    assert np.allclose(learning_impact_scores(same), 1.0)  # everyone on the average curve
    stuck = np.vstack([same, [[0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0]]])
    scores = learning_impact_scores(stuck)
    assert scores[-1] < scores[0] and scores[-2] < scores[0]  # flat curves stray from the mean
    with pytest.raises(DistilError, match="undefined"):
        learning_impact_scores(np.ones((3, 2)))
    with pytest.raises(DistilError, match="shape"):
        learning_impact_scores(np.ones(3))
    with pytest.raises(DistilError, match="at most"):
        learning_impact_scores([[0.5, 1.5]])


def test_rewards_from_losses_and_mean_logprob_scores() -> None:
    assert np.allclose(rewards_from_losses([[0.0, math.log(2)]]), [[1.0, 0.5]])
    with pytest.raises(DistilError, match="non-negative"):
        rewards_from_losses([[-1.0]])
    traces = [{"token_logprobs": [-1.0, -3.0]}, {"token_logprobs": [-0.5]}]
    assert mean_logprob_scores(traces) == [-2.0, -0.5]
    with pytest.raises(DistilError, match="logprobs=true"):
        mean_logprob_scores([{"id": 1, "sample": 0}])


def test_per_example_nll_matches_cross_entropy_per_row() -> None:
    from distil.models.lm import CausalLMSpec, build_causal_lm

    spec = CausalLMSpec(
        num_layers=1,
        hidden_size=16,
        num_heads=2,
        intermediate_size=32,
        vocab_size=20,
        max_context=16,
    )
    model = build_causal_lm(spec, seed=0).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 17, (3, 6), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100  # a prompt
    labels[2, 4:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "example_id": torch.tensor([7, 8, 9]),
    }
    got = per_example_nll(model, [batch], vocab_size=17)
    assert model.training  # mode restored
    with torch.no_grad():
        logits = model.eval()(input_ids=ids, attention_mask=mask).logits[..., :17]
    for row, key in enumerate((7, 8, 9)):
        targets = labels[row, 1:]
        want = torch.nn.functional.cross_entropy(logits[row, :-1], targets, ignore_index=-100)
        assert got[key] == pytest.approx(float(want), rel=1e-5)


def test_per_key_mean_and_the_selection_section() -> None:
    from pydantic import ValidationError

    from distil.data.selection import SelectionSection, per_key_mean

    assert per_key_mean(["a", "b", "a"], [1.0, 5.0, 3.0]) == {"a": 2.0, "b": 5.0}
    assert SelectionSection(method="random", budget=0.1).budget == 0.1
    with pytest.raises(ValidationError, match="whole count"):
        SelectionSection(budget=2.5)
    with pytest.raises(ValidationError, match="scorer_model"):
        SelectionSection(method="scorer", scorer="model")


def test_training_records_pick_gold_or_traces_of_the_kept_problems() -> None:
    from distil.data.traces import training_records

    problems = [{"id": i, "prompt": f"Q{i}", "completion": "gold"} for i in range(3)]
    traces = [
        {"id": i, "correct": j == 0, "completion": f"t{j}"} for i in range(3) for j in range(2)
    ]
    assert [r["id"] for r in training_records(problems, traces, [0, 2], "gold")] == [0, 2]
    assert len(training_records(problems, traces, [0, 2], "all_traces")) == 4
    kept = training_records(problems, traces, [1], "correct_traces")
    assert [(r["id"], r["completion"]) for r in kept] == [(1, "t0")]
    with pytest.raises(DistilError, match="trace file"):
        training_records(problems, None, [0], "correct_traces")
