"""The pure parts of the API-teacher client: rate limiter, retry classification and back-off,
idempotency keys and planning, the ledger and budget, answer parsing, the record store's journal
and the fault proxy's draws."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from distil.data.prompts import Prompt
from distil.errors import DistilError
from distil.remote.client import MalformedAnswer, parse_answer, resolve_api_key
from distil.remote.config import (
    Api,
    BudgetSection,
    EndpointGenerateConfig,
    EndpointGeneration,
    EndpointSection,
    Price,
    PromptVariant,
)
from distil.remote.faults import FaultRates
from distil.remote.jobs import FORMAT_NAME, request_body
from distil.remote.ledger import Ledger, PromptTokenEstimator, Usage, cost_of
from distil.remote.limiter import RateLimiter, TokenBucket
from distil.remote.plan import plan_requests, request_key, sample_seed
from distil.remote.records import RecordStore, read_jsonl
from distil.remote.retry import (
    ErrorClass,
    backoff_s,
    classify_status,
    retry_after_s,
    should_retry,
)

ENDPOINT = EndpointSection(base_url="http://127.0.0.1:1/v1", model="m", api=Api.COMPLETIONS)


# -- limiter ------------------------------------------------------------------------------------


def test_bucket_holds_ten_seconds_and_refills_continuously() -> None:
    bucket = TokenBucket.per_minute(60, now=0.0)  # 1 per second, 10 held
    assert bucket.capacity == 10 and bucket.level == 10
    bucket.level = 0
    assert bucket.wait_for(1, now=0.0) == pytest.approx(1.0)
    assert bucket.wait_for(1, now=0.5) == pytest.approx(0.5)
    bucket.refill(100.0)
    assert bucket.level == 10  # never above capacity


def test_requests_per_minute_spaces_requests_after_the_burst() -> None:
    limiter = RateLimiter(requests_per_minute=60, clock=lambda: 0.0)
    taken = [limiter.reserve(0, now=0.0) for _ in range(10)]
    assert taken == [0.0] * 10  # the burst: ten seconds' worth
    assert limiter.reserve(0, now=0.0) == pytest.approx(1.0)  # then one per second
    assert limiter.reserve(0, now=1.0) == 0.0


def test_tokens_per_minute_settles_estimates_and_allows_oversized_requests() -> None:
    limiter = RateLimiter(tokens_per_minute=600, clock=lambda: 0.0)  # 10/s, 100 held
    assert limiter.reserve(80, now=0.0) == 0.0
    assert limiter.reserve(80, now=0.0) == pytest.approx(6.0)  # 20 left, needs 80
    limiter.settle(estimated=80, actual=20)  # it used less: 60 back
    assert limiter.reserve(80, now=0.0) == 0.0
    # larger than the bucket: waits for a full bucket, then goes into debt instead of forever
    limiter2 = RateLimiter(tokens_per_minute=600, clock=lambda: 0.0)
    assert limiter2.reserve(500, now=0.0) == 0.0
    assert limiter2.tokens is not None and limiter2.tokens.level == -400
    assert limiter2.reserve(1, now=0.0) == pytest.approx(40.1)


def test_cooldown_is_shared_extends_and_counts_overlap_once() -> None:
    limiter = RateLimiter(clock=lambda: 0.0)
    limiter.cool_down(2.0, now=10.0)
    assert limiter.reserve(0, now=11.0) == pytest.approx(1.0)  # every caller waits
    limiter.cool_down(1.0, now=10.5)  # shorter than the pause: no change
    assert limiter.cooldown_until == 12.0
    limiter.cool_down(2.0, now=11.0)  # extends to 13: one more second of mandated waiting
    assert limiter.mandated_wait_s == pytest.approx(3.0)
    assert limiter.reserve(0, now=13.0) == 0.0


# -- retry ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "expected", "retry"),
    [
        (429, "", ErrorClass.RATE_LIMITED, True),
        (429, '{"error": {"code": "insufficient_quota"}}', ErrorClass.QUOTA, False),
        (500, "", ErrorClass.SERVER, True),
        (503, "", ErrorClass.SERVER, True),
        (408, "", ErrorClass.TIMEOUT, True),
        (409, "", ErrorClass.CONFLICT, True),
        (400, "", ErrorClass.BAD_REQUEST, False),
        (400, "flagged by our content_policy", ErrorClass.CONTENT_FILTER, False),
        (422, "", ErrorClass.BAD_REQUEST, False),
        (401, "", ErrorClass.AUTH, False),
        (403, "", ErrorClass.AUTH, False),
        (404, "", ErrorClass.NOT_FOUND, False),
    ],
)
def test_status_classes_and_their_policy(
    status: int, body: str, expected: ErrorClass, retry: bool
) -> None:
    assert classify_status(status, body) is expected
    assert should_retry(expected) is retry


def test_x_should_retry_overrides_except_for_fatal_classes() -> None:
    assert should_retry(ErrorClass.BAD_REQUEST, {"x-should-retry": "true"})
    assert not should_retry(ErrorClass.SERVER, {"x-should-retry": "false"})
    assert not should_retry(ErrorClass.AUTH, {"x-should-retry": "true"})
    assert should_retry(ErrorClass.TIMEOUT) and should_retry(ErrorClass.CONNECTION)
    assert should_retry(ErrorClass.MALFORMED)


def test_retry_after_reads_seconds_milliseconds_and_dates() -> None:
    assert retry_after_s({"retry-after": "3"}) == 3.0
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:05 GMT"}, now=1445412480.0) == 5.0
    assert retry_after_s({"retry-after": "soon"}) is None
    assert retry_after_s({}) is None


def test_backoff_grows_exponentially_within_equal_jitter_bounds() -> None:
    rng = random.Random(0)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 8.0)]:
        waits = [backoff_s(attempt, initial_s=0.5, max_s=8.0, rng=rng) for _ in range(50)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits)
        assert max(waits) - min(waits) > 0  # jittered, not in lockstep


# -- keys and planning -----------------------------------------------------------------------------


def _gen(**kw: object) -> EndpointGeneration:
    return EndpointGeneration.model_validate(kw)


def test_key_depends_on_everything_that_changes_the_answer_and_nothing_else() -> None:
    base = {
        "model": "m",
        "api": "chat",
        "api_input": [{"role": "user", "content": "hi"}],
        "params": {"max_tokens": 8, "temperature": 0.7},
        "seed": 0,
        "sample": 0,
    }
    key = request_key(**base)  # type: ignore[arg-type]
    assert key == request_key(**base)  # type: ignore[arg-type]
    for field, value in [
        ("model", "other"),
        ("api", "completions"),
        ("api_input", [{"role": "user", "content": "hi!"}]),
        ("params", {"max_tokens": 9, "temperature": 0.7}),
        ("seed", 1),
        ("sample", 1),
    ]:
        assert request_key(**{**base, field: value}) != key  # type: ignore[arg-type]
    # parameter order does not matter (canonical JSON)
    reordered = {**base, "params": {"temperature": 0.7, "max_tokens": 8}}
    assert request_key(**reordered) == key  # type: ignore[arg-type]


def test_plan_merges_exact_duplicates_and_a_change_touches_only_its_records() -> None:
    prompts = [Prompt(0, "a"), Prompt(1, "b"), Prompt(2, "a")]
    gen = _gen(sampling_temperature=0.5, num_return_sequences=2)
    groups = plan_requests(prompts, [PromptVariant()], ENDPOINT, gen)
    assert [g.prompt.id for g in groups] == [0, 1]
    assert groups[0].duplicates == (2,) and groups[1].duplicates == ()
    keys = {k for g in groups for k in g.sample_keys}
    assert len(keys) == 4
    # a second variant adds its own keys and leaves the first variant's alone
    two = plan_requests(
        prompts, [PromptVariant(), PromptVariant(name="x", template="Q: {prompt}")], ENDPOINT, gen
    )
    assert keys < {k for g in two for k in g.sample_keys}
    # a new prompt adds only its keys; a changed parameter changes every key
    more = plan_requests([*prompts, Prompt(3, "c")], [PromptVariant()], ENDPOINT, gen)
    assert keys < {k for g in more for k in g.sample_keys}
    longer = plan_requests(
        prompts, [PromptVariant()], ENDPOINT, _gen(**{**gen.model_dump(), "max_new_tokens": 65})
    )
    assert not keys & {k for g in longer for k in g.sample_keys}


def test_template_keeps_braces_of_the_prompt_and_chat_gets_the_system_prompt() -> None:
    chat = EndpointSection(base_url="http://x/v1", model="m")
    variant = PromptVariant(system_prompt="be brief", template="Code:\n{prompt}\nEnd")
    (g,) = plan_requests([Prompt(0, "d = {'a': 1}")], [variant], chat, _gen())
    assert g.text == "Code:\nd = {'a': 1}\nEnd"
    assert g.messages == (
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": g.text},
    )
    body = request_body(g, (0,), chat, _gen(top_logprobs=3))
    assert body["messages"][0]["role"] == "system" and body["logprobs"] is True
    assert body["top_logprobs"] == 3 and "n" not in body


def test_seeds_depend_on_content_and_sample_not_on_the_prompt_id() -> None:
    assert sample_seed(0, "g", 0) == sample_seed(0, "g", 0)
    assert len({sample_seed(0, "g", j) for j in range(20)}) == 20
    assert sample_seed(None, "g", 0) is None
    prompts = [Prompt("x", "same"), Prompt("y", "same")]
    (g,) = plan_requests(prompts, [PromptVariant()], ENDPOINT, _gen())
    assert request_body(g, (0,), ENDPOINT, _gen())["seed"] == sample_seed(0, g.group, 0)


def test_config_refuses_keys_in_the_config_and_unpriced_budgets() -> None:
    with pytest.raises(ValueError, match="NAME of an environment variable"):
        EndpointSection(base_url="http://x/v1", model="m", api_key_env="sk-abc123-secret")
    with pytest.raises(ValueError, match="api_key_env"):
        EndpointSection(base_url="http://x/v1", model="m", headers={"Authorization": "Bearer k"})
    with pytest.raises(ValueError, match="budget.prices"):
        EndpointGenerateConfig.model_validate(
            {
                "teacher": {"base_url": "http://x/v1", "model": "m"},
                "prompts": {"source": {"train": ["p.jsonl"]}},
                "budget": {"max_cost": 1.0},
            }
        )
    with pytest.raises(ValueError, match="greedy"):
        _gen(num_return_sequences=2)


def test_api_key_comes_from_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    section = EndpointSection(base_url="http://x/v1", model="m", api_key_env="DISTIL_TEST_KEY")
    monkeypatch.delenv("DISTIL_TEST_KEY", raising=False)
    with pytest.raises(DistilError, match="DISTIL_TEST_KEY, which is not set"):
        resolve_api_key(section)
    monkeypatch.setenv("DISTIL_TEST_KEY", "k-123")
    assert resolve_api_key(section) == "k-123"
    assert "k-123" not in section.model_dump_json()


# -- ledger ---------------------------------------------------------------------------------------


def test_costs_follow_the_price_table() -> None:
    price = Price(prompt_per_million=0.5, completion_per_million=1.5)
    assert cost_of(Usage(1_000_000, 2_000_000), price) == pytest.approx(3.5)
    assert cost_of(Usage(10, 10), None) == 0.0
    ledger = Ledger(BudgetSection(prices={"m": price}), "m")
    ledger.add(Usage(100, 50))
    ledger.add(Usage(10, 5))
    assert (ledger.calls, ledger.prompt_tokens, ledger.completion_tokens) == (2, 110, 55)
    assert ledger.cost == pytest.approx((110 * 0.5 + 55 * 1.5) / 1e6)


def test_budget_reserves_worst_cases_and_stops_within_one_request() -> None:
    price = Price(prompt_per_million=1e6, completion_per_million=1e6)  # 1 per token
    ledger = Ledger(BudgetSection(prices={"m": price}, max_cost=100.0), "m")
    tokens, cost = ledger.worst_case(10, 20)
    assert (tokens, cost) == (30, 30.0)
    admitted = [ledger.admit(tokens, cost) for _ in range(4)]
    assert admitted == [True, True, True, False]  # 90 reserved; a fourth could pass 100
    for _ in range(3):  # each used less than its worst case
        ledger.release(tokens, cost)
        ledger.add(Usage(10, 5))
    assert ledger.cost == 45.0
    spent = []
    while ledger.admit(tokens, cost):
        ledger.release(tokens, cost)
        ledger.add(Usage(10, 20))
        spent.append(ledger.cost)
    assert ledger.cost <= 100.0 and 100.0 - ledger.cost < cost  # within one request, never over
    tokens_only = Ledger(BudgetSection(max_tokens=50), "m")
    assert tokens_only.admit(30, 0.0) and not tokens_only.admit(30, 0.0)


def test_prompt_estimate_starts_at_a_byte_bound_then_learns() -> None:
    est = PromptTokenEstimator()
    assert est.estimate(100) == 100 + 32
    est.observe(100, 32 + 40)
    assert est.estimate(100) == 40 + 32
    est.observe(100, 32 + 20)  # the largest ratio seen is kept
    assert est.estimate(200) == 80 + 32


# -- answers ------------------------------------------------------------------------------------


def test_parse_completion_and_chat_answers_with_logprobs() -> None:
    body = {
        "id": "c1",
        "choices": [
            {
                "index": 1,
                "text": "b",
                "finish_reason": "length",
                "logprobs": {
                    "tokens": ["b"],
                    "token_logprobs": [-0.5],
                    "top_logprobs": [{"a": -1.5, "b": -0.5}],
                },
            },
            {"index": 0, "text": "a", "finish_reason": "stop", "logprobs": None},
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
    }
    answer = parse_answer(body, Api.COMPLETIONS)
    assert [c.text for c in answer.choices] == ["a", "b"]  # ordered by index
    lp = answer.choices[1].logprobs
    assert lp is not None and [a.token for a in lp[0].top] == ["b", "a"]  # best first
    assert answer.usage == Usage(3, 2)
    chat = {
        "choices": [
            {
                "message": {"role": "assistant", "content": "hi"},
                "finish_reason": "stop",
                "logprobs": {
                    "content": [
                        {
                            "token": "hi",
                            "logprob": -0.1,
                            "top_logprobs": [{"token": "hi", "logprob": -0.1}],
                        }
                    ]
                },
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
    parsed = parse_answer(chat, Api.CHAT)
    assert parsed.choices[0].text == "hi" and parsed.choices[0].logprobs is not None


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ([], "not a JSON object"),
        ({"choices": [], "usage": {}}, "no choices"),
        ({"choices": [{"text": "a"}]}, "usage.prompt_tokens"),
        (
            {"choices": [{"text": 3}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}},
            "no text",
        ),
        ({"error": {"message": "boom"}}, "error object"),
        (
            {
                "choices": [{"text": "a", "logprobs": {"tokens": ["a"], "token_logprobs": []}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1},
            },
            "one length",
        ),
    ],
)
def test_malformed_answers_name_the_problem(body: object, reason: str) -> None:
    with pytest.raises(MalformedAnswer, match=reason):
        parse_answer(body, Api.COMPLETIONS)


# -- record store ---------------------------------------------------------------------------------


def test_journal_survives_a_torn_line_and_compaction_keeps_every_record(tmp_path: Path) -> None:
    store = RecordStore(tmp_path, format_name=FORMAT_NAME)
    store.load()
    call = {"call": "c1", "prompt_tokens": 3, "completion_tokens": 4}
    store.append(call, [{"key": "k1", "id": 0, "completion": "x"}])
    store.close()
    with open(tmp_path / "journal.jsonl", "ab") as f:  # a kill in the middle of a write
        f.write(b'{"call": {"call": "c2"}, "records": [{"key": "k2"')
    state = RecordStore(tmp_path, format_name=FORMAT_NAME).load()
    assert set(state.records) == {"k1"} and set(state.calls) == {"c1"} and state.torn_bytes > 0
    assert (tmp_path / "journal.jsonl").read_bytes().endswith(b"\n")  # cut back to a full line
    store = RecordStore(tmp_path, format_name=FORMAT_NAME)
    store.load()
    store.append(
        {"call": "c2", "prompt_tokens": 1, "completion_tokens": 1}, [{"key": "k2", "id": 1}]
    )
    manifest = store.compact(
        kept=[state.records["k1"], {"key": "k2", "id": 1}],
        rejected=[],
        superseded=[],
        calls=[call],
        failures=[],
        manifest={"format": FORMAT_NAME, "mode": "endpoint"},
        shard_size=1,
        previous=None,
    )
    assert [s["records"] for s in manifest["shards"]] == [1, 1]
    assert (tmp_path / "journal.jsonl").read_bytes() == b""
    again = RecordStore(tmp_path, format_name=FORMAT_NAME).load()
    assert set(again.records) == {"k1", "k2"}
    # a later compaction replaces the shard generation and deletes the old one
    second = store.compact(
        kept=[again.records["k2"]],
        rejected=[],
        superseded=[again.records["k1"]],
        calls=[call],
        failures=[],
        manifest={"format": FORMAT_NAME, "mode": "endpoint"},
        shard_size=5,
        previous=manifest,
    )
    assert [p.name for p in tmp_path.glob("shard-*")] == [second["shards"][0]["file"]]
    assert read_jsonl(tmp_path / "superseded.jsonl")[0][0]["key"] == "k1"
    (tmp_path / second["shards"][0]["file"]).write_text("tampered\n")
    with pytest.raises(DistilError, match="sha256"):
        RecordStore(tmp_path, format_name=FORMAT_NAME).load()


def test_store_refuses_a_local_generate_folder(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"format": FORMAT_NAME, "shards": []}))
    with pytest.raises(DistilError, match="another kind"):
        RecordStore(tmp_path, format_name=FORMAT_NAME).load()


def test_format_name_is_the_one_lm_kd_reads() -> None:
    from distil.generation import FORMAT_NAME as LOCAL

    assert LOCAL == FORMAT_NAME


# -- fault proxy ---------------------------------------------------------------------------------


def test_fault_draws_follow_the_rates() -> None:
    rates = FaultRates(rate_limit=0.1, server_error=0.05, stall=0.02, truncate=0.01, reset=0.01)
    assert rates.draw(0.05) == "rate_limit" and rates.draw(0.12) == "server_error"
    assert rates.draw(0.16) == "stall" and rates.draw(0.175) == "truncate"
    assert rates.draw(0.185) == "reset" and rates.draw(0.5) is None
    rng = random.Random(0)
    draws = [rates.draw(rng.random()) for _ in range(20000)]
    assert draws.count("rate_limit") / 20000 == pytest.approx(0.1, abs=0.01)
    with pytest.raises(ValueError):
        FaultRates(rate_limit=0.9, reset=0.2)


def test_prompts_from_a_hugging_face_dataset_keep_their_fields(tmp_path: Path) -> None:
    import datasets

    from distil.data.prompts import PromptsSection, load_prompts

    rows = {"id": ["a", "b"], "question": ["2+2?", "3*3?"], "answer": [4, 9]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    section = PromptsSection.model_validate(
        {"source": {"dataset": str(tmp_path / "ds"), "prompt_field": "question"}}
    )
    prompts = load_prompts(section, None)
    assert [(p.id, p.text, dict(p.fields)) for p in prompts] == [
        ("a", "2+2?", {"answer": 4}),
        ("b", "3*3?", {"answer": 9}),
    ]
    with pytest.raises(DistilError, match="no column 'prompt'"):
        load_prompts(
            PromptsSection.model_validate({"source": {"dataset": str(tmp_path / "ds")}}), None
        )
    with pytest.raises(ValueError, match="prompts.source is"):  # two kinds of source at once
        PromptsSection.model_validate({"source": {"dataset": "x", "train": ["y.jsonl"]}})


def test_generate_config_is_the_endpoints_when_the_teacher_names_a_server() -> None:
    from distil.generation import GenerateConfig
    from distil.remote.config import generate_config_model

    local = {"command": "generate", "teacher": {"model": {"hf": "runs/lm-teacher"}}}
    remote = {"command": "generate", "teacher": {"base_url": "http://x/v1", "model": "m"}}
    assert generate_config_model(local) is GenerateConfig
    assert generate_config_model(remote) is EndpointGenerateConfig
    assert generate_config_model({"command": "generate"}) is GenerateConfig  # all defaults


def test_a_prompt_set_is_one_file_without_held_out_files() -> None:
    from distil.data.prompts import PromptsSection

    with pytest.raises(ValueError, match="one JSONL file"):
        PromptsSection.model_validate({"source": {"train": ["a.jsonl", "b.jsonl"]}})
    with pytest.raises(ValueError, match="no held-out files"):
        PromptsSection.model_validate({"source": {"train": ["a.jsonl"], "eval": ["b.jsonl"]}})
    with pytest.raises(ValueError, match="unknown 'stdlb'"):
        PromptsSection.model_validate({"source": {"builtin": "stdlb"}})
    section = PromptsSection.model_validate({"source": {"dataset": "ds", "split": "test"}})
    assert section.dataset is not None and section.dataset.split == "test"
    assert section.file is None and section.builtin is None
