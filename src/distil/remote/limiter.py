"""Client-side rate limits: token buckets for requests and tokens per minute, and one cool-down
shared by every worker after a 429.

Each bucket refills continuously at ``limit / 60`` per second and holds at most ten seconds of
refill (at least one request's worth), so a job starts smoothly instead of bursting a whole
minute's quota. Token costs are unknown before the answer: a request takes its estimate, and
:meth:`RateLimiter.settle` puts the difference back (or takes it) when the usage is known, so
the bucket may go into debt and later requests wait for it.

A 429 pauses *every* worker, not just the one that got it (a rate-limit storm is a shared
condition): :meth:`RateLimiter.cool_down` moves one shared ``cooldown_until`` forward, honouring
the server's ``Retry-After``. The time covered by such mandated pauses is summed in
``mandated_wait_s`` (overlapping pauses counted once), so a benchmark can report wall time
without them.

The decisions are pure functions of the clock (:meth:`RateLimiter.reserve` takes ``now``), so
they are unit-tested without sleeping; :meth:`RateLimiter.acquire` is the asyncio wrapper.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

BURST_S = 10.0
"""Seconds of refill a bucket holds when full."""


@dataclass
class TokenBucket:
    """A continuously refilled bucket.

    Attributes:
        rate: Units added per second.
        capacity: Most units held.
        level: Units available now (negative: debt from under-estimated requests).
        updated: Clock time of ``level``.
    """

    rate: float
    capacity: float
    level: float
    updated: float

    @classmethod
    def per_minute(cls, limit: float, now: float) -> TokenBucket:
        """A full bucket for ``limit`` units per minute."""
        capacity = max(1.0, limit / 60.0 * BURST_S)
        return cls(limit / 60.0, capacity, capacity, now)

    def refill(self, now: float) -> None:
        """Add what accrued since the last update."""
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` could be taken (0 if now). An amount above the capacity
        waits for a full bucket and then goes into debt, instead of waiting forever."""
        self.refill(now)
        need = min(amount, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate


class RateLimiter:
    """Requests- and tokens-per-minute limits plus the shared 429 cool-down.

    Args:
        requests_per_minute: Limit on requests started per minute (None: none).
        tokens_per_minute: Limit on prompt + completion tokens per minute (None: none).
        clock: Monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        now = clock()
        self.requests = (
            None
            if requests_per_minute is None
            else TokenBucket.per_minute(requests_per_minute, now)
        )
        self.tokens = (
            None if tokens_per_minute is None else TokenBucket.per_minute(tokens_per_minute, now)
        )
        self.cooldown_until = 0.0
        self.mandated_wait_s = 0.0
        self.cooldowns = 0

    def reserve(self, tokens: float, now: float) -> float:
        """Take one request and ``tokens`` if both are available now, else take nothing.

        Returns:
            0 when taken; otherwise the seconds to wait before asking again.
        """
        wait = max(0.0, self.cooldown_until - now)
        if self.requests is not None:
            wait = max(wait, self.requests.wait_for(1.0, now))
        if self.tokens is not None:
            wait = max(wait, self.tokens.wait_for(tokens, now))
        if wait > 0:
            return wait
        if self.requests is not None:
            self.requests.level -= 1.0
        if self.tokens is not None:
            self.tokens.level -= tokens
        return 0.0

    def settle(self, estimated: float, actual: float) -> None:
        """Correct a request's token estimate once its usage is known."""
        if self.tokens is not None:
            self.tokens.level = min(self.tokens.capacity, self.tokens.level + estimated - actual)

    def cool_down(self, seconds: float, now: float) -> None:
        """Pause every worker until ``now + seconds`` (extends, never shortens, a pause)."""
        until = now + max(0.0, seconds)
        if until > self.cooldown_until:
            # only the part not already covered by a pause counts as new mandated waiting
            self.mandated_wait_s += until - max(self.cooldown_until, now)
            self.cooldown_until = until
            self.cooldowns += 1

    async def acquire(self, tokens: float) -> None:
        """Wait until one request and ``tokens`` may go, then take them."""
        while (wait := self.reserve(tokens, self.clock())) > 0:
            await asyncio.sleep(wait)
