"""The cost ledger: tokens and spend from each answer's ``usage``, and the budget that stops a job.

Totals come only from what servers report in ``usage`` (never from local token counts), per
call, so they equal the server's own accounting for every answer the client received. A budget
is enforced *before* a request is sent: a request is admitted only if the spend so far, plus
the most that the requests already in flight can still cost, plus the most this one can cost
(its prompt estimate and ``max_tokens`` per sample), stays within the limit. So the job never
passes the limit (up to a prompt-length estimate error), and it stops when the next request no
longer fits: within one request of the limit.
"""

from __future__ import annotations

from dataclasses import dataclass

from distil.remote.config import BudgetSection, Price

CHAT_OVERHEAD_TOKENS = 32
"""Tokens a chat template may add around the messages (role markers, separators)."""


@dataclass(frozen=True)
class Usage:
    """Tokens of one call, as the server reported them."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        """Prompt + completion."""
        return self.prompt_tokens + self.completion_tokens


def cost_of(usage: Usage, price: Price | None) -> float:
    """The price of a call's tokens (0 without a price)."""
    if price is None:
        return 0.0
    return (
        usage.prompt_tokens * price.prompt_per_million
        + usage.completion_tokens * price.completion_per_million
    ) / 1e6


class PromptTokenEstimator:
    """Upper-bound-ish prompt token counts before the server has counted them.

    Starts at one token per UTF-8 byte (a byte-level BPE never needs more) plus the chat
    overhead, then uses the largest tokens-per-byte ratio seen in answers so far.
    """

    def __init__(self) -> None:
        self.ratio: float | None = None

    def estimate(self, text_bytes: int) -> int:
        """Estimated prompt tokens of a request whose prompt text has ``text_bytes`` bytes."""
        return int(text_bytes * (1.0 if self.ratio is None else self.ratio)) + CHAT_OVERHEAD_TOKENS

    def observe(self, text_bytes: int, prompt_tokens: int) -> None:
        """Learn from a server's count."""
        if text_bytes > 0:
            seen = max(0, prompt_tokens - CHAT_OVERHEAD_TOKENS) / text_bytes
            self.ratio = seen if self.ratio is None else max(self.ratio, seen)


class Ledger:
    """Totals over calls and the budget admission of new ones.

    Args:
        budget: Prices and limits.
        model: The model whose price applies.
    """

    def __init__(self, budget: BudgetSection, model: str) -> None:
        self.price = budget.prices.get(model)
        self.currency = budget.currency
        self.max_cost = budget.max_cost
        self.max_tokens = budget.max_tokens
        self.calls = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cost = 0.0
        self.reserved_cost = 0.0
        self.reserved_tokens = 0

    @property
    def total_tokens(self) -> int:
        """Prompt + completion tokens so far."""
        return self.prompt_tokens + self.completion_tokens

    def add(self, usage: Usage) -> float:
        """Count one call's usage; return its cost."""
        cost = cost_of(usage, self.price)
        self.calls += 1
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        self.cost += cost
        return cost

    def worst_case(self, prompt_tokens: int, completion_tokens: int) -> tuple[int, float]:
        """Tokens and cost of a request at most (estimated prompt, max completion)."""
        usage = Usage(prompt_tokens, completion_tokens)
        return usage.total_tokens, cost_of(usage, self.price)

    def admit(self, tokens: int, cost: float) -> bool:
        """Reserve a request's worst case if it fits the budget; False (nothing reserved) if not."""
        if self.max_cost is not None and self.cost + self.reserved_cost + cost > self.max_cost:
            return False
        if (
            self.max_tokens is not None
            and self.total_tokens + self.reserved_tokens + tokens > self.max_tokens
        ):
            return False
        self.reserved_cost += cost
        self.reserved_tokens += tokens
        return True

    def release(self, tokens: int, cost: float) -> None:
        """Drop a reservation (the call finished and was counted with :meth:`add`, or failed)."""
        self.reserved_cost = max(0.0, self.reserved_cost - cost)
        self.reserved_tokens = max(0, self.reserved_tokens - tokens)

    def limit_text(self) -> str:
        """The budget in words, for the mode line."""
        parts = []
        if self.max_cost is not None:
            parts.append(f"max {self.max_cost:g} {self.currency}")
        if self.max_tokens is not None:
            parts.append(f"max {self.max_tokens:,} tokens")
        price = (
            "no price"
            if self.price is None
            else f"{self.price.prompt_per_million:g}/{self.price.completion_per_million:g} "
            f"{self.currency} per 1M prompt/completion tokens"
        )
        return f"{price}; {', '.join(parts) if parts else 'no budget limit'}"

    def summary(self) -> dict[str, float | int | str]:
        """Totals for the manifest."""
        return {
            "calls": self.calls,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cost": round(self.cost, 8),
            "currency": self.currency,
        }
