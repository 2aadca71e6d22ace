"""What to do after a failed request: classify the error, then retry, skip or stop the job.

| class | from | policy |
|---|---|---|
| ``rate_limited`` | 429 | retry after the shared cool-down (``Retry-After`` honoured) |
| ``server`` | 5xx | retry with back-off |
| ``timeout`` | client timeout, 408 | retry with back-off |
| ``conflict`` | 409 | retry with back-off |
| ``connection`` | reset, refused, protocol error | retry with back-off |
| ``malformed`` | a 200 whose body is not a valid answer | quarantine the body, retry |
| ``bad_request`` | 400, 413, 422, other 4xx | never retried; the request is marked failed |
| ``content_filter`` | a filtered answer or a 400 naming the content policy | never retried; marked |
| ``auth`` | 401, 403 | never retried; stops the job (every request would fail) |
| ``not_found`` | 404 (wrong model name or URL) | never retried; stops the job |
| ``quota`` | 429 ``insufficient_quota`` | never retried; stops the job |

A server may override the status-based decision with ``x-should-retry: true|false`` (as the
OpenAI client does). Back-off is exponential with "equal jitter": attempt ``a`` waits
``d/2 + U(0, d/2)`` with ``d = min(max, initial · 2^(a-1))``, so workers that failed together
do not retry together.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Mapping
from enum import Enum


class ErrorClass(str, Enum):
    """Why a request attempt failed."""

    RATE_LIMITED = "rate_limited"
    SERVER = "server"
    TIMEOUT = "timeout"
    CONFLICT = "conflict"
    CONNECTION = "connection"
    MALFORMED = "malformed"
    BAD_REQUEST = "bad_request"
    CONTENT_FILTER = "content_filter"
    AUTH = "auth"
    NOT_FOUND = "not_found"
    QUOTA = "quota"


RETRYABLE = frozenset(
    {
        ErrorClass.RATE_LIMITED,
        ErrorClass.SERVER,
        ErrorClass.TIMEOUT,
        ErrorClass.CONFLICT,
        ErrorClass.CONNECTION,
        ErrorClass.MALFORMED,
    }
)
"""Transient: the same request may succeed later."""

FATAL = frozenset({ErrorClass.AUTH, ErrorClass.NOT_FOUND, ErrorClass.QUOTA})
"""Every later request would fail the same way: the job stops."""


def classify_status(status: int, body: str = "") -> ErrorClass:
    """The class of an HTTP error status (``body``: the error text, for filters and quota)."""
    lowered = body.lower()
    if status == 429:
        return ErrorClass.QUOTA if "insufficient_quota" in lowered else ErrorClass.RATE_LIMITED
    if status in (401, 403):
        return ErrorClass.AUTH
    if status == 404:
        return ErrorClass.NOT_FOUND
    if status == 408:
        return ErrorClass.TIMEOUT
    if status == 409:
        return ErrorClass.CONFLICT
    if status >= 500:
        return ErrorClass.SERVER
    if "content_filter" in lowered or "content_policy" in lowered or "content policy" in lowered:
        return ErrorClass.CONTENT_FILTER
    return ErrorClass.BAD_REQUEST


def should_retry(error: ErrorClass, headers: Mapping[str, str] | None = None) -> bool:
    """Whether to retry: the class's policy unless the server says ``x-should-retry``.

    Fatal classes are never retried, whatever the header says.
    """
    if error in FATAL:
        return False
    hint = (headers or {}).get("x-should-retry")
    if hint == "true":
        return True
    if hint == "false":
        return False
    return error in RETRYABLE


def retry_after_s(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds the server asks to wait: ``retry-after-ms``, ``retry-after`` in seconds, or an
    HTTP date; None when absent or unreadable."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_s(attempt: int, *, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Wait before retry number ``attempt`` (1 = the first retry): exponential, equal jitter."""
    ceiling = min(max_s, initial_s * 2.0 ** (max(1, attempt) - 1))
    return ceiling / 2.0 + rng.uniform(0.0, ceiling / 2.0)
