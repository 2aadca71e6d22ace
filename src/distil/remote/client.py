"""One request to an OpenAI-compatible endpoint, with rate limits, retries and answer checks.

The official ``openai`` async client is the transport (base URL, auth header, connection pool,
timeouts, error types); its own retries are off (``max_retries=0``) because retrying here is
per error class and shares one cool-down across workers (:mod:`distil.remote.retry`,
:mod:`distil.remote.limiter`). Answers are read as raw bytes and checked here
(:func:`parse_answer`), so a truncated or malformed body is quarantined with the reason instead
of surfacing as a half-filled object.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from distil.errors import DistilError
from distil.remote.config import Api, EndpointSection, LimitsSection, RetrySection
from distil.remote.ledger import Usage
from distil.remote.limiter import RateLimiter
from distil.remote.retry import ErrorClass, backoff_s, classify_status, retry_after_s, should_retry

logger = logging.getLogger(__name__)

QUARANTINE_BODY_CHARS = 4000
"""Characters of a malformed body kept in ``quarantine.jsonl``."""

PROBE_ATTEMPTS = 3
"""Tries of the ``/v1/models`` probe before a server counts as unreachable."""


class MalformedAnswer(Exception):
    """A 200 answer that is not a valid completion (the message is the reason)."""


@dataclass(frozen=True)
class TopLogprob:
    """One of the top-k alternatives at a position."""

    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprobs:
    """The sampled token at one position, its log-prob and the top-k alternatives."""

    token: str
    logprob: float
    top: tuple[TopLogprob, ...]


@dataclass(frozen=True)
class Choice:
    """One completion of an answer."""

    index: int
    text: str
    finish_reason: str | None
    logprobs: tuple[TokenLogprobs, ...] | None


@dataclass(frozen=True)
class Answer:
    """A parsed, checked answer."""

    response_id: str
    choices: tuple[Choice, ...]
    usage: Usage


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedAnswer(f"{where} is not a number ({value!r})")
    return float(value)


def _token_count(usage: Any, name: str) -> int:
    value = usage.get(name) if isinstance(usage, dict) else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MalformedAnswer(f"usage.{name} is missing or not a count ({value!r})")
    return value


def _completion_logprobs(raw: Any, i: int) -> tuple[TokenLogprobs, ...]:
    where = f"choices[{i}].logprobs"
    if not isinstance(raw, dict):
        raise MalformedAnswer(f"{where} is not an object")
    tokens, values = raw.get("tokens"), raw.get("token_logprobs")
    tops = raw.get("top_logprobs") or [None] * len(tokens or [])
    if not isinstance(tokens, list) or not isinstance(values, list) or len(tokens) != len(values):
        raise MalformedAnswer(f"{where}: tokens and token_logprobs are not lists of one length")
    if not isinstance(tops, list) or len(tops) != len(tokens):
        raise MalformedAnswer(f"{where}.top_logprobs does not have one entry per token")
    out = []
    for t, (token, value, top) in enumerate(zip(tokens, values, tops, strict=True)):
        alternatives = sorted(
            (
                TopLogprob(str(k), _number(v, f"{where}.top_logprobs[{t}]"))
                for k, v in (top or {}).items()
            ),
            key=lambda a: -a.logprob,
        )
        out.append(TokenLogprobs(str(token), _number(value, f"{where}[{t}]"), tuple(alternatives)))
    return tuple(out)


def _chat_logprobs(raw: Any, i: int) -> tuple[TokenLogprobs, ...]:
    where = f"choices[{i}].logprobs.content"
    content = raw.get("content") if isinstance(raw, dict) else None
    if not isinstance(content, list):
        raise MalformedAnswer(f"{where} is not a list")
    out = []
    for t, entry in enumerate(content):
        if not isinstance(entry, dict) or not isinstance(entry.get("top_logprobs", []), list):
            raise MalformedAnswer(f"{where}[{t}] is not a token entry")
        top = tuple(
            TopLogprob(str(a.get("token")), _number(a.get("logprob"), f"{where}[{t}].top"))
            for a in entry.get("top_logprobs", [])
        )
        out.append(
            TokenLogprobs(
                str(entry.get("token")),
                _number(entry.get("logprob"), f"{where}[{t}].logprob"),
                tuple(sorted(top, key=lambda a: -a.logprob)),
            )
        )
    return tuple(out)


def parse_answer(body: Any, api: Api) -> Answer:
    """Check and read an answer of ``/v1/completions`` or ``/v1/chat/completions``.

    Raises:
        MalformedAnswer: Naming the first thing missing or of the wrong type.
    """
    if not isinstance(body, dict):
        raise MalformedAnswer("the body is not a JSON object")
    if "error" in body and "choices" not in body:
        raise MalformedAnswer(f"an error object in a 200 answer: {str(body['error'])[:200]}")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        raise MalformedAnswer("no choices")
    usage = body.get("usage")
    parsed = []
    for i, c in enumerate(choices):
        if not isinstance(c, dict):
            raise MalformedAnswer(f"choices[{i}] is not an object")
        finish = c.get("finish_reason")
        if api is Api.CHAT:
            message = c.get("message")
            if not isinstance(message, dict):
                raise MalformedAnswer(f"choices[{i}].message is missing")
            text = message.get("content")
            if text is None and finish == "content_filter":
                text = ""
            lp = c.get("logprobs")
            logprobs = None if lp is None else _chat_logprobs(lp, i)
        else:
            text = c.get("text")
            lp = c.get("logprobs")
            logprobs = None if lp is None else _completion_logprobs(lp, i)
        if not isinstance(text, str):
            raise MalformedAnswer(f"choices[{i}] has no text")
        index = c.get("index", i)
        if isinstance(index, bool) or not isinstance(index, int):
            raise MalformedAnswer(f"choices[{i}].index is not an integer")
        parsed.append(Choice(index, text, finish if isinstance(finish, str) else None, logprobs))
    parsed.sort(key=lambda c: c.index)
    usage_obj = Usage(
        _token_count(usage, "prompt_tokens"), _token_count(usage, "completion_tokens")
    )
    return Answer(str(body.get("id", "")), tuple(parsed), usage_obj)


def resolve_api_key(endpoint: EndpointSection) -> str | None:
    """The key from the environment variable the config names (None when it names none).

    Raises:
        DistilError: If the variable is named but not set.
    """
    if endpoint.api_key_env is None:
        return None
    key = os.environ.get(endpoint.api_key_env)
    if not key:
        raise DistilError(
            f"teacher.api_key_env names {endpoint.api_key_env}, which is not set: export "
            f"{endpoint.api_key_env}=<your key> (distil reads the key from there and never writes it)"
        )
    return key


@dataclass
class CallStats:
    """Counters over every attempt of a run (shown in the progress bar, kept in the manifest)."""

    attempts: int = 0
    retries: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    quarantined: int = 0


@dataclass(frozen=True)
class CallResult:
    """What came of one request after its retries."""

    answer: Answer | None
    error: ErrorClass | None
    message: str
    attempts: int


class EndpointClient:
    """Sends requests to one endpoint, honouring limits and the retry policy.

    Args:
        endpoint: Server, model, API, key variable.
        limits: Timeouts (concurrency is the caller's).
        retry: Attempts and back-off.
        limiter: The shared rate limiter.
        quarantine: Called with each malformed answer (and the reason).
        stats: Counters to update.
    """

    def __init__(
        self,
        endpoint: EndpointSection,
        limits: LimitsSection,
        retry: RetrySection,
        *,
        limiter: RateLimiter,
        quarantine: Callable[[dict[str, Any]], None],
        stats: CallStats,
    ) -> None:
        import openai

        self.endpoint, self.limits, self.retry = endpoint, limits, retry
        self.limiter, self.quarantine, self.stats = limiter, quarantine, stats
        self.rng = random.Random(retry.seed)
        key = resolve_api_key(endpoint)
        self.key_sent = key is not None
        self.timeout = openai.Timeout(limits.timeout_s, connect=limits.connect_timeout_s)
        # an explicit placeholder, so a local server never receives an OPENAI_API_KEY from the env
        self.client = openai.AsyncOpenAI(
            base_url=endpoint.base_url,
            api_key=key or "no-key",
            max_retries=0,
            timeout=self.timeout,
            default_headers=endpoint.headers or None,
        )

    async def close(self) -> None:
        """Close the connection pool."""
        await self.client.close()

    async def check(self) -> dict[str, Any]:
        """Ask ``/v1/models`` whether the server is up, takes the key and serves the model.

        Returns:
            The model's entry (``distil serve`` adds a ``distil`` object with fingerprints), or
            an empty dict when the server has no ``/v1/models``.

        Raises:
            DistilError: Unreachable server, refused key, or a model the server does not serve.
        """
        import openai

        url = self.endpoint.base_url
        try:
            for attempt in range(1, PROBE_ATTEMPTS + 1):  # a reset or a timeout may be passing
                try:
                    raw = await self.client.models.with_raw_response.list(timeout=self.timeout)
                    break
                except openai.APIConnectionError:
                    if attempt == PROBE_ATTEMPTS:
                        raise
                    await asyncio.sleep(
                        backoff_s(
                            attempt,
                            initial_s=self.retry.backoff_initial_s,
                            max_s=self.retry.backoff_max_s,
                            rng=self.rng,
                        )
                    )
        except openai.APIConnectionError as exc:
            raise DistilError(
                f"cannot reach {url} ({type(exc).__name__}: {exc}); is the server running and the "
                "base_url right (it usually ends in /v1)? `distil serve FOLDER --port N` starts a "
                "local one"
            ) from exc
        except openai.APIStatusError as exc:
            error = classify_status(exc.status_code, _error_text(exc))
            if error is ErrorClass.AUTH:
                how = (
                    f"the key in ${self.endpoint.api_key_env}"
                    if self.key_sent
                    else "no key (teacher.api_key_env is null)"
                )
                raise DistilError(
                    f"{url} refused {how} (HTTP {exc.status_code}): check the key, or set "
                    "teacher.api_key_env to the variable that holds the right one"
                ) from exc
            logger.warning(
                "%s/models answered HTTP %d; the model name cannot be checked before sending",
                url,
                exc.status_code,
            )
            return {}
        try:
            served = json.loads(raw.http_response.text)["data"]
            names = [str(m["id"]) for m in served]
        except (json.JSONDecodeError, KeyError, TypeError):
            logger.warning("%s/models answered something unreadable; model name not checked", url)
            return {}
        if self.endpoint.model not in names:
            raise DistilError(
                f"{url} does not serve a model named {self.endpoint.model!r}; it serves "
                f"{names}: set teacher.model to one of them"
            )
        return dict(served[names.index(self.endpoint.model)])

    async def call(self, body: Mapping[str, Any], *, key: str, est_tokens: int) -> CallResult:
        """Send one request (``body``: the API's fields), retrying transient failures.

        Args:
            body: Request fields (``model``, ``prompt`` or ``messages``, ``max_tokens``, …).
            key: The idempotency key, sent as the ``Idempotency-Key`` header.
            est_tokens: Tokens the request may use, for the tokens-per-minute bucket.
        """
        import openai

        api = self.endpoint.api
        resource = self.client.chat.completions if api is Api.CHAT else self.client.completions
        fields = {k: v for k, v in body.items() if k != "extra_body"}
        extra = body.get("extra_body") or None
        error: ErrorClass = ErrorClass.SERVER
        message = ""
        for attempt in range(1, self.retry.max_attempts + 1):
            await self.limiter.acquire(est_tokens)
            self.stats.attempts += 1
            headers: Mapping[str, str] = {}
            retry_after = None
            try:
                raw = await resource.with_raw_response.create(
                    **fields,
                    extra_body=extra,
                    extra_headers={"Idempotency-Key": key},
                    timeout=self.timeout,
                )
                text = raw.http_response.text
                try:
                    answer = parse_answer(json.loads(text), api)
                except (json.JSONDecodeError, MalformedAnswer) as exc:
                    error, message = ErrorClass.MALFORMED, f"{type(exc).__name__}: {exc}"
                    self.stats.quarantined += 1
                    self.quarantine(
                        {
                            "key": key,
                            "attempt": attempt,
                            "time": time.time(),
                            "reason": message,
                            "body": text[:QUARANTINE_BODY_CHARS],
                            "body_chars": len(text),
                        }
                    )
                else:
                    self.limiter.settle(est_tokens, answer.usage.total_tokens)
                    return CallResult(answer, None, "", attempt)
            except openai.APIStatusError as exc:
                message = f"HTTP {exc.status_code}: {_error_text(exc)[:300]}"
                error = classify_status(exc.status_code, _error_text(exc))
                headers = {k.lower(): v for k, v in exc.response.headers.items()}
                retry_after = retry_after_s(headers)
            except openai.APITimeoutError:
                error, message = ErrorClass.TIMEOUT, f"no answer within {self.limits.timeout_s:g}s"
            except openai.APIConnectionError as exc:
                cause = exc.__cause__ or exc
                error, message = ErrorClass.CONNECTION, f"{type(cause).__name__}: {cause}"[:300]
            self.limiter.settle(est_tokens, 0)  # a failed attempt is assumed to use no quota
            self.stats.errors[error.value] += 1
            if error is ErrorClass.RATE_LIMITED:
                wait = retry_after if retry_after is not None else self.retry.rate_limit_cooldown_s
                self.limiter.cool_down(wait, self.limiter.clock())
            if not should_retry(error, headers) or attempt == self.retry.max_attempts:
                return CallResult(None, error, message, attempt)
            self.stats.retries += 1
            logger.info(
                "attempt %d of %s failed (%s: %s); retrying", attempt, key, error.value, message
            )
            if error is not ErrorClass.RATE_LIMITED:  # a 429 waits in acquire() for the cool-down
                await asyncio.sleep(
                    backoff_s(
                        attempt,
                        initial_s=self.retry.backoff_initial_s,
                        max_s=self.retry.backoff_max_s,
                        rng=self.rng,
                    )
                )
        return CallResult(None, error, message, self.retry.max_attempts)


def _error_text(exc: Any) -> str:
    """The error body of an ``openai.APIStatusError`` as text."""
    body = getattr(exc, "body", None)
    if body is not None:
        return json.dumps(body) if not isinstance(body, str) else body
    try:
        return str(exc.response.text)
    except Exception:  # the body may be unreadable (a reset mid-error)
        return str(exc)
