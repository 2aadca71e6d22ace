"""Pareto fronts and confidence intervals: the arithmetic of choosing a winner."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from distil.search.config import Direction


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[Direction]) -> bool:
    """Whether point ``a`` is at least as good as ``b`` on every axis and better on one."""
    better = False
    for x, y, d in zip(a, b, directions, strict=True):
        if d is Direction.minimize:
            x, y = -x, -y
        if x < y:
            return False
        if x > y:
            better = True
    return better


def pareto_front(points: Sequence[Sequence[float]], directions: Sequence[Direction]) -> list[int]:
    """Indices of the points no other point dominates, sorted by the first axis (best first).

    Points with a NaN coordinate are never on the front. Exact duplicates are all kept.
    """
    finite = [i for i, p in enumerate(points) if all(math.isfinite(v) for v in p)]
    front = [
        i
        for i in finite
        if not any(dominates(points[j], points[i], directions) for j in finite if j != i)
    ]
    sign = -1.0 if directions[0] is Direction.maximize else 1.0
    return sorted(front, key=lambda i: sign * points[i][0])


@dataclass(frozen=True)
class Interval:
    """``mean`` of ``n`` values with its two-sided Student-t confidence interval."""

    mean: float
    sd: float
    n: int
    low: float
    high: float
    confidence: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean, sample standard deviation and the t-interval ``mean ± t(n-1) · sd / √n``.

    With one value the interval is infinite (a single seed says nothing about seed noise).

    Raises:
        ValueError: If ``values`` is empty or holds a NaN.
    """
    if not values:
        raise ValueError("no values")
    if any(not math.isfinite(v) for v in values):
        raise ValueError(f"non-finite value in {list(values)}")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return Interval(mean, math.nan, 1, -math.inf, math.inf, confidence)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    from scipy.stats import t

    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, sd, n, mean - half, mean + half, confidence)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Interval:
    """The interval of ``a - b`` over paired values (the same seeds), which removes the noise the
    two share (data order, initialisation) from the comparison.

    Raises:
        ValueError: If the lengths differ.
    """
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths ({len(a)} vs {len(b)})")
    return mean_interval([x - y for x, y in zip(a, b, strict=True)], confidence)
