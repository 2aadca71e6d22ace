"""Interleaved speed measurement: paired per-round ratios, quartiles, and the verdict that says
when a speed-up is too noisy to call (issue 13 item 4). No timed assertions: the timings here
are made up or only counted."""

from __future__ import annotations

import pytest

from distil.evaluation.cost import (
    Spread,
    interleaved_seconds,
    is_noisy,
    speed_columns,
    speedup_spread,
    speedup_verdict,
    times_text,
)


def test_spread_quartiles_of_known_values() -> None:
    s = Spread.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.q1, s.q3, s.low, s.high, s.n) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    one = Spread.of([7.0])
    assert one.q1 == one.median == one.q3 == 7.0
    assert s.scaled(1e3).median == 3000.0
    with pytest.raises(ValueError):
        Spread.of([])


def test_paired_ratios_cancel_load_that_changes_between_rounds() -> None:
    # the machine's load multiplies every model's time in a round by the same factor, from 1x to
    # 40x: the per-round ratio stays 10 while ratios of unpaired medians would not
    load = [1.0, 40.0, 3.0, 25.0, 1.5, 8.0, 30.0]
    teacher = [10e-3 * f for f in load]
    student = [1e-3 * f for f in load]
    spread = speedup_spread(teacher, student)
    assert spread.median == pytest.approx(10.0) and spread.q1 == pytest.approx(spread.q3)
    assert not is_noisy(spread)
    assert speedup_verdict(spread).startswith("10x faster at batch 1")


def test_verdicts_say_when_the_spread_is_too_large_to_call() -> None:
    straddles = Spread.of([0.8, 0.9, 1.1, 1.2, 1.3])
    assert is_noisy(straddles) and "too noisy to call" in speedup_verdict(straddles)
    wide = Spread.of([5.0, 14.7, 20.0, 29.6, 40.0])  # q3 / q1 = 2: not a headline
    assert is_noisy(wide) and "too noisy to call" in speedup_verdict(wide)
    slower = Spread.of([0.30, 0.32, 0.33, 0.34, 0.36])
    assert speedup_verdict(slower).startswith("3.0x slower")
    assert times_text(28.33) == "28x" and times_text(8.24) == "8.2x"


def test_interleaved_rounds_rotate_the_order_and_pair_the_samples() -> None:
    order: list[str] = []
    fns = {name: (lambda name=name: order.append(name)) for name in ("t", "s", "b")}
    seconds = interleaved_seconds(fns, rounds=6, warmup=1, min_round_seconds=0.0)
    assert {k: len(v) for k, v in seconds.items()} == {"t": 6, "s": 6, "b": 6}
    timed = order[3 * 2 :]  # after 1 warm-up and 1 calibration call each
    firsts = [timed[3 * r] for r in range(6)]
    assert firsts == ["t", "s", "b", "t", "s", "b"]  # each round starts with another model
    cols = speed_columns(seconds, "t")
    assert cols["t"]["speedup_verdict"] is None
    assert cols["s"]["speedup_rounds"] == 6 and isinstance(cols["s"]["speedup_verdict"], str)
    assert (
        cols["s"]["latency_b1_ms_q1"] <= cols["s"]["latency_b1_ms"] <= cols["s"]["latency_b1_ms_q3"]
    )
