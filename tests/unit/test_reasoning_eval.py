"""pass@k (Chen et al. 2021) against the exact binomial formula, scoring of sampled solutions,
and batched sampling from a tiny model."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from distil.data.reasoning import TaskKind, generate_problem, write_reasoning_tokenizer
from distil.errors import DistilError
from distil.evaluation.reasoning import (
    SampledSolution,
    evaluate_reasoning,
    pass_at_k,
    sample_solutions,
    score_solutions,
)


def test_pass_at_k_equals_the_binomial_formula() -> None:
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1.0 - math.comb(n - c, k) / math.comb(n, k)
                assert math.isclose(pass_at_k(n, c, k), exact, abs_tol=1e-12)
    assert pass_at_k(200, 0, 10) == 0.0 and pass_at_k(200, 200, 1) == 1.0
    assert math.isclose(pass_at_k(200, 37, 1), 37 / 200)  # pass@1 is the share correct
    assert pass_at_k(10_000, 1, 5000) == pytest.approx(0.5)  # no overflow at large n
    values = [pass_at_k(20, 3, k) for k in range(1, 21)]
    assert values == sorted(values)  # more attempts never hurt
    with pytest.raises(ValueError, match="k"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="num_correct"):
        pass_at_k(4, 5, 1)


def _solution(i: int, j: int, text: str, tokens: int = 10) -> SampledSolution:
    return SampledSolution(i, j, text, tokens, True)


def test_score_solutions_counts_correct_format_errors_and_cost() -> None:
    records = [
        {"answer": "12", "kind": "addition", "size": 2},
        {"answer": "7", "kind": "addition", "size": 1},
        {"answer": "3 5", "kind": "sorting", "size": 2},
    ]
    samples = [
        [_solution(0, 0, "#### 12"), _solution(0, 1, "#### 13"), _solution(0, 2, "no answer")],
        [_solution(1, 0, "#### 7"), _solution(1, 1, "#### 7"), _solution(1, 2, "#### 7")],
        [
            _solution(2, 0, "#### 5 3"),
            _solution(2, 1, "#### 3,5", 4),
            _solution(2, 2, "#### 3 5", 6),
        ],
    ]
    scores = score_solutions(records, samples, ks=(1, 2, 3))
    assert scores.correct_samples == 5
    assert scores.pass_at[1] == pytest.approx((1 / 3 + 1 + 1 / 3) / 3)
    assert scores.pass_at[2] == pytest.approx((pass_at_k(3, 1, 2) + 1 + pass_at_k(3, 1, 2)) / 3)
    assert scores.pass_at[3] == 1.0
    assert scores.format_error_rate == pytest.approx(2 / 9)
    assert scores.mean_trace_tokens == pytest.approx((7 * 10 + 4 + 6) / 9)
    assert scores.tokens_per_solved == pytest.approx((7 * 10 + 4 + 6) / 5)
    assert list(scores.by_group) == ["kind=addition", "kind=sorting", "size=1", "size=2"]
    assert scores.by_group["kind=addition"]["pass@1"] == pytest.approx((1 / 3 + 1) / 2)
    assert scores.by_group["kind=sorting"]["format_errors"] == pytest.approx(1 / 3)
    row = scores.row("held_out/")
    assert row["held_out/pass@1"] == scores.pass_at[1] and "held_out/tokens_per_solved" in row
    nothing = score_solutions(records[:1], [[_solution(0, 0, "#### 1")]])
    assert nothing.tokens_per_solved is None and nothing.pass_at == {1: 0.0}


def test_score_solutions_refuses_inconsistent_input() -> None:
    records = [{"answer": "1"}, {"answer": "2"}]
    with pytest.raises(DistilError, match="same"):
        score_solutions(records, [[_solution(0, 0, "#### 1")], []])
    with pytest.raises(DistilError, match="samples for 1"):
        score_solutions(records, [[_solution(0, 0, "#### 1")]])
    with pytest.raises(DistilError, match="pass@k"):
        score_solutions(records[:1], [[_solution(0, 0, "#### 1")]], ks=(2,))
    with pytest.raises(DistilError, match="no problems"):
        score_solutions([], [])


def _tiny_model(root: Path) -> tuple[object, object]:
    from distil.models.lm import CausalLMSpec, build_causal_lm
    from distil.models.vocab import load_tokenizer_folder

    tok = load_tokenizer_folder(write_reasoning_tokenizer(root / "tok", model_max_length=64))
    spec = CausalLMSpec(
        num_layers=1,
        hidden_size=16,
        num_heads=2,
        intermediate_size=32,
        vocab_size=len(tok) + 3,  # padded output rows are never sampled
        max_context=64,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return build_causal_lm(spec, seed=0).eval(), tok


def test_sampling_is_seeded_batched_and_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    import torch

    model, tok = _tiny_model(tmp_path)
    rng = random.Random(0)
    records = [generate_problem(TaskKind.ADDITION, 2, rng).record(i) for i in range(3)]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = sample_solutions(
        model, tok, records, samples_per_problem=2, max_new_tokens=6, batch_size=4, seed=1
    )
    assert torch.equal(torch.get_rng_state(), state)
    other = sample_solutions(
        model, tok, records, samples_per_problem=2, max_new_tokens=6, batch_size=4, seed=2
    )
    assert [[s.completion for s in row] for row in first] != [
        [s.completion for s in row] for row in other
    ]
    assert [len(row) for row in first] == [2, 2, 2]
    for i, row in enumerate(first):
        for j, s in enumerate(row):
            assert (s.problem_index, s.sample) == (i, j) and 1 <= s.tokens <= 6
            assert s.ended_by_eos or s.tokens == 6
    kwargs = {"samples_per_problem": 2, "max_new_tokens": 6, "batch_size": 4, "seed": 1}
    scores = evaluate_reasoning(model, tok, records, ks=(1, 2), **kwargs)  # type: ignore[arg-type]
    assert scores == score_solutions(records, first, ks=(1, 2))  # the same samples again
    assert scores.problems == 3 and scores.samples_per_problem == 2
    assert scores.format_error_rate == 1.0  # an untrained model writes no answer line
