"""An endpoint job: send a plan's requests, keep every answer exactly once, account for the cost.

:func:`run_job` is shared by ``distil generate`` (endpoint mode) and ``distil relabel``. It

1. loads the output folder (:class:`~distil.remote.records.RecordStore`): every record already
   there is found by its idempotency key, so only missing samples become requests (an unchanged
   rerun sends none, not even a ``/v1/models`` probe); permanent failures (400, content filter)
   are not re-sent;
2. checks the server once (reachable, key accepted, model served) before the first request;
3. runs ``limits.concurrency`` asyncio workers; each request passes the budget (worst-case cost
   reserved before sending), the rate limiter and the retry policy; each answer is one fsynced
   journal line holding its records and usage, so a ``kill -9`` loses only requests in flight;
4. names every fallback: a server that ignores ``n`` (the missing samples are then requested one
   by one) or ``logprobs`` (the records then carry text only: sequence-level KD), in the log, the
   announcement and the manifest;
5. verifies completions (rejection sampling, :mod:`distil.verify`) as they arrive;
6. at the end (done, budget reached, or a fatal error) seals the folder: training records in
   plan order, rejected samples apart, records of requests the config no longer makes kept as
   ``superseded`` (a later config that makes them again reuses them), and the manifest.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import distil
from distil.data.generated import (
    FORMAT_NAME,
    FORMAT_VERSION,
)  # what `distil generate` writes, lm_kd reads
from distil.errors import DistilError
from distil.remote.client import CallResult, CallStats, Choice, EndpointClient
from distil.remote.config import (
    Api,
    BudgetSection,
    EndpointGeneration,
    EndpointSection,
    LimitsSection,
    RetrySection,
    SampleRequests,
)
from distil.remote.ledger import Ledger, PromptTokenEstimator, Usage
from distil.remote.limiter import RateLimiter
from distil.remote.plan import RequestGroup, sample_seed
from distil.remote.records import RecordStore, StoreState, canonical_json
from distil.remote.retry import FATAL, ErrorClass
from distil.verify import Verdict, Verifier, VerifySection, select_samples

logger = logging.getLogger(__name__)

PERMANENT = frozenset({ErrorClass.BAD_REQUEST, ErrorClass.CONTENT_FILTER})
REFUSALS_BEFORE_STOP = 5
"""A job whose first requests are all refused (400/422) stops: its requests do not suit the server."""


@dataclass(frozen=True)
class JobSpec:
    """Everything a job needs.

    Attributes:
        kind: ``generate`` or ``relabel`` (recorded in the manifest).
        groups: The planned requests (see :mod:`distil.remote.plan`).
        settings: Config values recorded in the manifest.
        verify: Rejection sampling, or None.
    """

    kind: str
    endpoint: EndpointSection
    limits: LimitsSection
    retry: RetrySection
    budget: BudgetSection
    generation: EndpointGeneration
    groups: Sequence[RequestGroup]
    output: Path
    shard_size: int
    settings: Mapping[str, Any]
    prompts_fingerprint: str
    num_prompts: int
    verify: VerifySection | None = None


@dataclass(frozen=True)
class JobResult:
    """What a run did; ``manifest`` is the folder's manifest after it."""

    path: Path
    manifest: dict[str, Any]
    run: dict[str, Any]


@dataclass(frozen=True)
class _Unit:
    """One request: a group and the sample indices its choices fill."""

    group: RequestGroup
    samples: tuple[int, ...]


def check_hash(verify: VerifySection) -> str:
    """A short hash of the verifier settings (a stored verdict is reused only under the same)."""
    text = canonical_json(verify.check.model_dump(mode="json"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def request_body(
    unit_group: RequestGroup,
    samples: Sequence[int],
    endpoint: EndpointSection,
    generation: EndpointGeneration,
) -> dict[str, Any]:
    """The API fields of the request that fills ``samples`` of a group."""
    body: dict[str, Any] = {
        "model": endpoint.model,
        "max_tokens": generation.max_new_tokens,
        "temperature": generation.sampling_temperature,
        "top_p": generation.top_p,
    }
    if len(samples) > 1:
        body["n"] = len(samples)
    seed = sample_seed(generation.seed, unit_group.group, samples[0])
    if seed is not None:
        body["seed"] = seed
    if generation.stop:
        body["stop"] = list(generation.stop)
    k = generation.top_logprobs
    if endpoint.api is Api.CHAT:
        assert unit_group.messages is not None
        body["messages"] = [dict(m) for m in unit_group.messages]
        if k:
            body |= {"logprobs": True, "top_logprobs": k}
    else:
        body["prompt"] = unit_group.text
        if k:
            body["logprobs"] = k
    if endpoint.extra_body:
        body["extra_body"] = dict(endpoint.extra_body)
    return body


def _logprobs_json(choice: Choice) -> dict[str, Any] | None:
    if choice.logprobs is None:
        return None
    return {
        "tokens": [t.token for t in choice.logprobs],
        "logprobs": [t.logprob for t in choice.logprobs],
        "top": [[{"token": a.token, "logprob": a.logprob} for a in t.top] for t in choice.logprobs],
    }


def prompt_record(group: RequestGroup) -> dict[str, Any]:
    """What a verifier sees of the prompt: its fields, id and text."""
    return {**group.prompt.fields, "id": group.prompt.id, "prompt": group.text}


@dataclass
class _Flags:
    n_ignored: bool = False
    logprobs_missing: bool = False
    fallbacks: list[str] = field(default_factory=list)


class _Job:
    """One run of a job (state shared by its workers)."""

    def __init__(self, spec: JobSpec, announce: Callable[[str], None], show_progress: bool) -> None:
        self.spec = spec
        self.announce = announce
        self.show_progress = show_progress
        self.store = RecordStore(spec.output, format_name=FORMAT_NAME)
        self.ledger = Ledger(spec.budget, spec.endpoint.model)
        self.estimator = PromptTokenEstimator()
        self.limiter = RateLimiter(spec.limits.requests_per_minute, spec.limits.tokens_per_minute)
        self.stats = CallStats()
        self.flags = _Flags()
        self.verifier: Verifier | None = None if spec.verify is None else spec.verify.check.build()
        self.check_id = None if spec.verify is None else check_hash(spec.verify)
        self.by_key = {k: (g, j) for g in spec.groups for j, k in enumerate(g.sample_keys)}
        self.state = StoreState()
        self.queue: asyncio.Queue[_Unit] = asyncio.Queue()
        self.cond = asyncio.Condition()
        self.in_flight = 0
        self.stopping: str | None = None
        self.fatal: tuple[ErrorClass, str] | None = None
        self.new_records = 0
        self.new_failures = 0
        self.gave_up = 0
        self.refused = 0
        self.sent = 0
        self.started = time.time()

    # -- planning ---------------------------------------------------------------------------

    def units(self) -> list[_Unit]:
        """The requests still to send, in plan order."""
        out: list[_Unit] = []
        per_sample = self.spec.generation.samples_via is SampleRequests.REQUESTS
        for g in self.spec.groups:
            missing = tuple(
                j
                for j, k in enumerate(g.sample_keys)
                if k not in self.state.records
                and not (
                    k in self.state.failures
                    and ErrorClass(self.state.failures[k]["error"]) in PERMANENT
                )
            )
            if not missing:
                continue
            if per_sample or len(missing) == 1:
                out.extend(_Unit(g, (j,)) for j in missing)
            else:
                out.append(_Unit(g, missing))
        return out

    # -- one request ------------------------------------------------------------------------

    async def send(self, client: EndpointClient, unit: _Unit) -> None:
        g, gen = unit.group, self.spec.generation
        tokens, cost = self.ledger.worst_case(
            self.estimator.estimate(g.text_bytes), gen.max_new_tokens * len(unit.samples)
        )
        async with self.cond:
            while not self.ledger.admit(tokens, cost):
                if self.stopping is not None:
                    return
                if self.in_flight == 0:
                    self.stopping = "budget"
                    return
                await self.cond.wait()
            if self.stopping is not None:
                self.ledger.release(tokens, cost)
                return
            self.in_flight += 1
        self.sent += 1
        spent = 0.0
        try:
            body = request_body(g, unit.samples, self.spec.endpoint, gen)
            result = await client.call(body, key=g.sample_keys[unit.samples[0]], est_tokens=tokens)
            if result.answer is not None:  # counted before the reservation goes: no gap to race
                spent = self.ledger.add(result.answer.usage)
        finally:
            async with self.cond:
                self.ledger.release(tokens, cost)
                self.in_flight -= 1
                self.cond.notify_all()
        await self.settle(unit, result, spent)

    async def settle(self, unit: _Unit, result: CallResult, cost: float) -> None:
        g = unit.group
        keys = [g.sample_keys[j] for j in unit.samples]
        if result.answer is None:
            assert result.error is not None
            if result.error in FATAL:
                self.fatal = (result.error, result.message)
                self.stopping = "fatal"
            elif result.error in PERMANENT:
                lost: list[dict[str, Any]] = [
                    {
                        "key": k,
                        "error": result.error.value,
                        "message": result.message,
                        "time": time.time(),
                    }
                    for k in keys
                ]
                self.store.append(None, [], lost)
                for f in lost:
                    self.state.failures[f["key"]] = f
                self.new_failures += len(keys)
                logger.warning("request %s failed for good: %s", keys[0], result.message)
                self.refused += 1
                if self.refused >= REFUSALS_BEFORE_STOP and self.new_records == 0:
                    # every request refused, none answered: the request itself is wrong here
                    self.fatal = (result.error, result.message)
                    self.stopping = "fatal"
            else:
                self.gave_up += len(keys)
                logger.warning(
                    "request %s failed %d times (%s: %s); a rerun sends it again",
                    keys[0],
                    result.attempts,
                    result.error.value,
                    result.message,
                )
            return
        answer = result.answer
        self.estimator.observe(g.text_bytes, answer.usage.prompt_tokens)
        call_id = uuid.uuid4().hex
        filled = list(zip(unit.samples, answer.choices, strict=False))
        call = {
            "call": call_id,
            "response_id": answer.response_id,
            "keys": [g.sample_keys[j] for j, _ in filled],
            "time": time.time(),
            "prompt_tokens": answer.usage.prompt_tokens,
            "completion_tokens": answer.usage.completion_tokens,
            "cost": cost,
            "attempts": result.attempts,
        }
        if len(answer.choices) < len(unit.samples):
            if not self.flags.n_ignored:
                self.flags.n_ignored = True
                self.fallback(
                    f"the server returned {len(answer.choices)} choice(s) for n={len(unit.samples)}: it "
                    "ignores n, so the missing samples are requested one by one (each with its own seed)"
                )
            for j in unit.samples[len(answer.choices) :]:
                self.queue.put_nowait(_Unit(g, (j,)))
        asked = self.spec.generation.top_logprobs
        if asked and not self.flags.logprobs_missing and any(c.logprobs is None for _, c in filled):
            self.flags.logprobs_missing = True
            self.fallback(
                f"the server ignored logprobs (top_logprobs={asked} was asked): these records carry "
                "text only, so they serve sequence-level KD; token-level KD needs a server that "
                "returns top_logprobs (`distil serve` does)"
            )
        records: list[dict[str, Any]] = []
        failures: list[dict[str, Any]] = []
        for j, choice in filled:
            key = g.sample_keys[j]
            if choice.finish_reason == "content_filter":
                failures.append(
                    {
                        "key": key,
                        "error": ErrorClass.CONTENT_FILTER.value,
                        "message": "finish_reason=content_filter",
                        "time": time.time(),
                    }
                )
                continue
            record = self.make_record(g, j, choice, call_id, answer.usage, len(answer.choices))
            if self.verifier is not None:
                record["verdict"] = await self.verdict(g, choice.text)
            records.append(record)
        self.store.append(call, records, failures)
        self.state.calls[call_id] = call
        for r in records:
            self.state.records[r["key"]] = r
        for f in failures:
            self.state.failures[f["key"]] = f
        self.new_records += len(records)
        self.new_failures += len(failures)

    def make_record(
        self, g: RequestGroup, sample: int, choice: Choice, call_id: str, usage: Usage, choices: int
    ) -> dict[str, Any]:
        record: dict[str, Any] = {
            "key": g.sample_keys[sample],
            "id": g.prompt.id,
            "sample": sample,
            "variant": g.variant,
            "prompt": g.text,
            "completion": choice.text,
            "finish_reason": choice.finish_reason,
            "call": call_id,
            "usage": {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "choices_in_call": choices,
            },
        }
        if g.messages is not None:
            record["messages"] = [
                *map(dict, g.messages),
                {"role": "assistant", "content": choice.text},
            ]
        logprobs = _logprobs_json(choice)
        if logprobs is not None:
            record["logprobs"] = logprobs
        return record

    async def verdict(self, g: RequestGroup, completion: str) -> dict[str, Any]:
        assert self.verifier is not None
        verdict: Verdict = await asyncio.to_thread(self.verifier, prompt_record(g), completion)
        return {**verdict.to_json(), "check": self.check_id}

    def fallback(self, text: str) -> None:
        self.flags.fallbacks.append(text)
        logger.warning("%s", text)
        self.announce(f"fallback: {text}")

    # -- the run ----------------------------------------------------------------------------

    def mode_line(self, todo: list[_Unit], planned: int, done: int) -> str:
        spec, gen = self.spec, self.spec.generation
        signal = (
            f"text + top-{gen.top_logprobs} log-probs per token (token-level KD possible: "
            "`distil cache from-api`)"
            if gen.top_logprobs
            else "text only (sequence-level KD)"
        )
        decoding = (
            "greedy"
            if gen.sampling_temperature == 0
            else f"sampling_temperature={gen.sampling_temperature:g} top_p={gen.top_p:g}"
        )
        lim = spec.limits
        rates = ", ".join(
            f"{v:g} {u}/min"
            for v, u in ((lim.requests_per_minute, "requests"), (lim.tokens_per_minute, "tokens"))
            if v is not None
        )
        duplicates = sum(len(g.duplicates) for g in spec.groups)
        return (
            f"{spec.kind} (endpoint): {spec.endpoint.model} at {spec.endpoint.base_url} via "
            f"/{'chat/completions' if spec.endpoint.api is Api.CHAT else 'completions'}; "
            f"{len(spec.groups)} requests x {gen.num_return_sequences} sample(s) = {planned} records "
            f"({duplicates} duplicate prompt(s) merged), {done} already there, {len(todo)} request(s) "
            f"to send; {decoding}, {gen.max_new_tokens} new tokens, signal: {signal}; "
            f"concurrency {lim.concurrency}{', ' + rates if rates else ''}, timeout {lim.timeout_s:g}s, "
            f"up to {spec.retry.max_attempts} attempts; budget: {self.ledger.limit_text()}"
            + (
                f"; rejection sampling: {spec.verify.check.kind}, keep {spec.verify.keep.value}"
                if spec.verify is not None
                else ""
            )
        )

    async def run(self) -> JobResult:
        from distil.training.progress import progress_bar, rate_text

        if self.store.remove_temp_files():
            logger.info("removed temp files of an interrupted run in %s", self.spec.output)
        self.state = self.store.load()
        for call in self.state.calls.values():
            self.ledger.add(Usage(int(call["prompt_tokens"]), int(call["completion_tokens"])))
        planned = len(self.by_key)
        done = sum(1 for k in self.by_key if k in self.state.records)
        todo = self.units()
        self.announce(self.mode_line(todo, planned, done))
        server = dict((self.state.manifest or {}).get("server") or {})
        client = None
        if todo:
            client = EndpointClient(
                self.spec.endpoint,
                self.spec.limits,
                self.spec.retry,
                limiter=self.limiter,
                quarantine=self.store.quarantine,
                stats=self.stats,
            )
            try:
                server = await client.check()
            except BaseException:
                await client.close()
                raise
        for unit in todo:
            self.queue.put_nowait(unit)
        t0 = time.perf_counter()
        tokens_at_start = self.ledger.total_tokens
        with progress_bar(self.show_progress) as bar:
            task = bar.add_task(self.spec.kind, total=planned, completed=done, rate="", info="")

            def refresh() -> None:
                elapsed = time.perf_counter() - t0
                rate = (
                    f"{rate_text(self.new_records, elapsed, 'rec')} · "
                    f"{rate_text(self.ledger.total_tokens - tokens_at_start, elapsed, 'tok')}"
                )
                info = (
                    f"{self.ledger.cost:.4g} {self.ledger.currency} · retries {self.stats.retries}"
                    f" · errors {sum(self.stats.errors.values())}"
                )
                bar.update(task, completed=done + self.new_records, rate=rate, info=info)

            async def worker() -> None:
                assert client is not None
                while self.stopping is None:
                    try:
                        unit = self.queue.get_nowait()
                    except asyncio.QueueEmpty:
                        if self.in_flight == 0:
                            return
                        async with self.cond:  # a reply may still requeue samples (ignored n)
                            if self.in_flight > 0 and self.queue.empty():
                                await self.cond.wait()
                        continue
                    await self.send(client, unit)
                    refresh()

            try:
                if client is not None:
                    await asyncio.gather(*(worker() for _ in range(self.spec.limits.concurrency)))
            finally:
                if client is not None:
                    await client.close()
                self.store.close()
            refresh()
        wall = time.perf_counter() - t0
        run = {
            "started": self.started,
            "wall_s": round(wall, 3),
            "requests_sent": self.sent,
            "attempts": self.stats.attempts,
            "retries": self.stats.retries,
            "errors": dict(self.stats.errors),
            "quarantined": self.stats.quarantined,
            "records_new": self.new_records,
            "failures_new": self.new_failures,
            "gave_up": self.gave_up,
            "mandated_wait_s": round(self.limiter.mandated_wait_s, 3),
            "cooldowns": self.limiter.cooldowns,
            "stopped": self.stopping,
            "fallbacks": list(self.flags.fallbacks),
        }
        manifest = await self.seal(server, run)
        if self.fatal is not None:
            error, message = self.fatal
            fix = {
                ErrorClass.AUTH: "check the key in the variable teacher.api_key_env names",
                ErrorClass.NOT_FOUND: "check teacher.model and teacher.base_url (GET /v1/models lists the models)",
                ErrorClass.QUOTA: "the account's quota is used up: add credit or use another key",
                ErrorClass.BAD_REQUEST: f"the first {REFUSALS_BEFORE_STOP} requests were all refused, "
                "so the requests do not suit this server (a parameter it rejects? "
                "teacher.extra_body, generation.top_logprobs, teacher.api?)",
                ErrorClass.CONTENT_FILTER: f"the first {REFUSALS_BEFORE_STOP} requests were all "
                "filtered by the server's content policy; check the prompts",
            }[error]
            raise DistilError(
                f"the server stopped the job ({error.value}: {message}); {fix}. Everything answered "
                f"so far is kept in {self.spec.output}: re-run the same command to continue"
            )
        return JobResult(self.spec.output, manifest, run)

    async def seal(self, server: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
        spec = self.spec
        records = self.state.records
        if self.verifier is not None:  # verdicts missing, or made by other verifier settings
            stale = [
                (self.by_key[k][0], k)
                for k in self.by_key
                if k in records and (records[k].get("verdict") or {}).get("check") != self.check_id
            ]
            for g, k in stale:
                records[k] = {
                    **records[k],
                    "verdict": await self.verdict(g, records[k]["completion"]),
                }
        kept, rejected = [], []
        missing = failed = 0
        for g in spec.groups:
            present = []
            for k in g.sample_keys:
                if k in records:
                    fresh = {**records[k], "id": g.prompt.id, "variant": g.variant}
                    if g.duplicates:
                        fresh["duplicate_ids"] = list(g.duplicates)
                    present.append(fresh)
                elif k in self.state.failures:
                    failed += 1
                else:
                    missing += 1
            if spec.verify is None:
                kept.extend(present)
                continue
            verdicts = [Verdict(r["verdict"]["passed"], r["verdict"]["score"]) for r in present]
            for r, keep in zip(present, select_samples(verdicts, spec.verify.keep), strict=True):
                if keep:
                    kept.append(r)
                else:
                    reason = (
                        "failed verification"
                        if not r["verdict"]["passed"]
                        else f"not the {spec.verify.keep.value} sample"
                    )
                    rejected.append({**r, "rejected": reason})
        superseded = [r for k, r in records.items() if k not in self.by_key]
        failures = [
            f for k, f in self.state.failures.items() if k in self.by_key and k not in records
        ]
        calls = sorted(self.state.calls.values(), key=lambda c: c.get("time", 0))
        previous = self.state.manifest or {}
        complete = missing == 0 and self.stopping is None
        seconds = sum(r["wall_s"] for r in previous.get("runs", [])) + run["wall_s"]
        ledger = self.ledger.summary()
        gen = spec.generation
        signal = "text"
        if gen.top_logprobs and any("logprobs" in r for r in kept):
            signal = f"text+top_logprobs:{gen.top_logprobs}"
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "mode": "endpoint",
            "job": spec.kind,
            "teacher": {
                "base_url": spec.endpoint.base_url,
                "model": spec.endpoint.model,
                "api": spec.endpoint.api.value,
                "api_key_env": spec.endpoint.api_key_env,  # the variable's name, never the key
            },
            "server": server,
            "settings": dict(spec.settings),
            "prompts_fingerprint": spec.prompts_fingerprint,
            "num_prompts": spec.num_prompts,
            "signal": signal,
            "fallbacks": sorted({*previous.get("fallbacks", []), *self.flags.fallbacks}),
            "counts": {
                "prompts": spec.num_prompts,
                "requests_planned": len(self.by_key),
                "records": len(kept),
                "rejected": len(rejected),
                "duplicate_prompts": sum(len(g.duplicates) for g in spec.groups),
                "failed": failed,
                "missing": missing,
                "superseded": len(superseded),
                "generated_tokens": ledger["completion_tokens"],
                "ended_by_eos": sum(1 for r in kept if r.get("finish_reason") == "stop"),
                "seconds": round(seconds, 3),
                "tokens_per_s": round(int(ledger["completion_tokens"]) / seconds, 2)
                if seconds > 0
                else None,
            },
            "ledger": ledger,
            "runs": [*previous.get("runs", []), run],
            "complete": complete,
            "stopped": self.stopping,
            "created_by": f"distil {getattr(distil, '__version__', 'dev')}",
        }
        if spec.verify is not None:
            manifest["verify"] = {
                **spec.verify.model_dump(mode="json"),
                "check_hash": self.check_id,
            }
        return self.store.compact(
            kept=kept,
            rejected=rejected,
            superseded=superseded,
            calls=calls,
            failures=failures,
            manifest=manifest,
            shard_size=spec.shard_size,
            previous=self.state.manifest,
        )


def run_job(
    spec: JobSpec,
    *,
    announce: Callable[[str], None] | None = None,
    show_progress: bool = True,
) -> JobResult:
    """Run (or continue) a job; see the module docstring.

    Args:
        spec: The job.
        announce: Receives the mode line and every fallback (the CLI prints them); logged when None.
        show_progress: Show the rich progress bar (records/s, tokens/s, spend, retries, errors).

    Raises:
        DistilError: Unreachable server, refused key, unknown model (before any request), a
            fatal error during the run (after sealing what was answered), or a folder of
            another kind.
    """
    say = announce or (lambda text: logger.info("%s", text))
    return asyncio.run(_Job(spec, say, show_progress).run())


def error_counts(manifest: Mapping[str, Any]) -> Counter[str]:
    """Errors over every run recorded in a manifest, by class."""
    total: Counter[str] = Counter()
    for run in manifest.get("runs", []):
        total.update(run.get("errors", {}))
    return total
