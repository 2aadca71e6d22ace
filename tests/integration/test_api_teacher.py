"""Teachers behind an OpenAI-compatible API, end to end on 127.0.0.1: a real ``distil serve``
subprocess (tiny teacher from ``make_lm_fixture``, an API key required), the fault-injecting
proxy, ``distil generate`` in endpoint mode (resume after ``kill -9``, reruns, changed settings,
budget, rejection sampling, servers that ignore ``n``/``logprobs``, bad endpoints), token-level
KD from the API's ``top_logprobs`` through ``distil cache from-api`` + ``lm_kd``, and
``distil relabel`` with a classifier behind the endpoint feeding ``classifier_kd``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from fastapi import FastAPI, Request
from typer.testing import CliRunner

from distil.cli import app
from tests.helpers import free_port, make_lm_fixture, word_level_tokenizer

runner = CliRunner()
KEY_ENV = "DISTIL_TEST_API_KEY"
SERVER_KEY = "test-key-123"
MODEL = "tiny"


def _wait_health(port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"no server on port {port} after {timeout}s")


class ThreadServer:
    """A FastAPI app under uvicorn in a thread of this process (no second model load)."""

    def __init__(self, app_: Any) -> None:
        import uvicorn

        self.port = free_port()
        config = uvicorn.Config(app_, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        _wait_health(self.port, 30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("api")
    lm = make_lm_fixture(root)
    texts = [json.loads(line)["prompt"] for line in lm["pc"].read_text().splitlines()]
    prompts = [{"id": i, "prompt": t} for i, t in enumerate(texts[:24])]
    prompts.append({"id": 100, "prompt": texts[0]})  # an exact duplicate of prompt 0
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    port = free_port()
    usage = root / "usage.jsonl"
    server_env = {**os.environ, "DISTIL_SERVER_KEY": SERVER_KEY, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "distil", "serve", str(lm["teacher"]), "--port", str(port)]
    cmd += ["--model-name", MODEL, "--api-key-env", "DISTIL_SERVER_KEY", "--usage-log", str(usage)]
    server = subprocess.Popen(
        cmd, env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    os.environ[KEY_ENV] = SERVER_KEY
    try:
        _wait_health(port)
        yield {**lm, "root": root, "port": port, "usage": usage, "prompts": root / "prompts.jsonl"}
    finally:
        server.terminate()
        server.wait(20)
        os.environ.pop(KEY_ENV, None)
        torch.set_num_threads(threads)


def _usage_lines(env: dict[str, Any]) -> list[dict[str, Any]]:
    path: Path = env["usage"]
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _config(env: dict[str, Any], out: Path, port: int | None = None, **sections: Any) -> Path:
    teacher = {
        "base_url": f"http://127.0.0.1:{port or env['port']}/v1",
        "model": MODEL,
        "api": "completions",
        "api_key_env": KEY_ENV,
        "extra_body": {"return_tokens_as_token_ids": True},
    }
    teacher.update(sections.pop("teacher", {}))
    cfg = {
        "command": "generate",
        "teacher": teacher,
        "prompts": {"source": {"train": [str(env["prompts"])]}},
        "generation": {"max_new_tokens": 6},
        "limits": {"concurrency": 4, "timeout_s": 5},
        "retry": {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "rate_limit_cooldown_s": 0.2},
        "shard_size": 7,
        "output": str(out),
        **sections,
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _generate(config: Path, *overrides: str) -> tuple[int, str]:
    result = runner.invoke(app, ["generate", str(config), *overrides])
    extra = repr(result.exception) if result.exception and result.exit_code not in (0, 2) else ""
    return result.exit_code, " ".join((result.output + extra).split())


def _shard_records(out: Path, name: str = "shards") -> list[dict[str, Any]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [
        json.loads(line)
        for entry in manifest[name]
        for line in (out / entry["file"]).read_text().splitlines()
    ]


def test_serve_speaks_the_openai_schema_with_n_seed_and_logprobs(env: dict[str, Any]) -> None:
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{env['port']}/v1", api_key=SERVER_KEY)
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    kw: dict[str, Any] = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 12, "n": 3}
    kw |= {"temperature": 1.5, "seed": 7, "logprobs": 4}
    first = client.completions.create(**kw, extra_body={"return_tokens_as_token_ids": True})
    again = client.completions.create(**kw, extra_body={"return_tokens_as_token_ids": True})
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seeded
    assert len({c.text for c in first.choices}) > 1  # n independent samples
    vocab = 400  # the fixture's tokenizer; the teacher has 8 padded rows above it
    for c in first.choices:
        assert c.logprobs is not None and c.logprobs.top_logprobs is not None
        ids = [int(t.split(":")[1]) for t in c.logprobs.tokens or []]
        assert ids and max(ids) < vocab  # padded rows are never sampled
        assert all(len(top) == 4 for top in c.logprobs.top_logprobs)
    assert first.usage is not None and first.usage.completion_tokens == sum(
        len(c.logprobs.tokens or []) for c in first.choices if c.logprobs
    )
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "import os"}],
        max_tokens=5,
        logprobs=True,
        top_logprobs=2,
    )
    assert chat.choices[0].logprobs is not None and chat.choices[0].logprobs.content
    assert all(len(t.top_logprobs) == 2 for t in chat.choices[0].logprobs.content)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong").models.list()
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=500)


def test_generate_writes_every_record_once_and_a_rerun_sends_nothing(
    env: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "gen"
    config = _config(
        env,
        out,
        generation={"max_new_tokens": 6, "sampling_temperature": 0.9, "num_return_sequences": 2},
    )
    before = len(_usage_lines(env))
    code, text = _generate(config)
    assert code == 0, text
    assert "1 duplicate prompt(s) merged" in text and "complete" in text
    records = _shard_records(out)
    assert len(records) == 24 * 2 and len({r["key"] for r in records}) == 48
    assert records[0]["duplicate_ids"] == [100]
    sent = len(_usage_lines(env)) - before
    assert sent == 24  # n=2 in one request per prompt
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"]["records"] == 48
    assert manifest["teacher"]["api_key_env"] == KEY_ENV
    assert SERVER_KEY not in "".join(p.read_text() for p in out.iterdir() if p.is_file())
    server_tokens = sum(
        u["prompt_tokens"] + u["completion_tokens"] for u in _usage_lines(env)[before:]
    )
    assert manifest["ledger"]["total_tokens"] == server_tokens
    code, text = _generate(config)
    assert code == 0 and "this run sent 0 request(s)" in text
    assert len(_usage_lines(env)) - before == sent  # not even a /v1/models probe was needed


def test_changed_settings_resend_only_the_records_they_affect(
    env: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "change"
    config = _config(env, out)
    assert _generate(config)[0] == 0
    base = {r["key"] for r in _shard_records(out)}
    before = len(_usage_lines(env))
    two = [{"name": "default"}, {"name": "doc", "template": "# {prompt}"}]
    code, text = _generate(config, f"variants={json.dumps(two)}")
    assert code == 0, text
    assert len(_usage_lines(env)) - before == 24  # only the new variant's requests
    both = _shard_records(out)
    assert base < {r["key"] for r in both} and len(both) == 48
    before = len(_usage_lines(env))
    assert _generate(config, "generation.max_new_tokens=5")[0] == 0
    assert len(_usage_lines(env)) - before == 24  # every request changed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["superseded"] == 48 and manifest["counts"]["records"] == 24
    before = len(_usage_lines(env))
    code, text = _generate(config)  # back to the first settings: reused from superseded
    assert code == 0 and "this run sent 0 request(s)" in text
    assert {r["key"] for r in _shard_records(out)} == base
    assert len(_usage_lines(env)) == before


def test_kill_9_mid_run_then_resume_gives_exact_records_and_an_exact_ledger(
    env: dict[str, Any], tmp_path: Path
) -> None:
    proxy_port = free_port()
    log = tmp_path / "proxy.jsonl"
    proxy = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distil.remote.faults",
            "--upstream",
            f"127.0.0.1:{env['port']}",
            "--port",
            str(proxy_port),
            "--rate-limit",
            "0.1",
            "--server-error",
            "0.05",
            "--stall",
            "0.03",
            "--truncate",
            "0.05",
            "--reset",
            "0.05",
            "--retry-after",
            "0.2",
            "--stall-s",
            "2",
            "--latency-s",
            "0.08",
            "--seed",
            "3",
            "--log",
            str(log),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    out = tmp_path / "killed"
    config = _config(
        env,
        out,
        port=proxy_port,
        generation={"max_new_tokens": 6, "sampling_temperature": 0.7, "num_return_sequences": 3},
        limits={"concurrency": 4, "timeout_s": 1.0},
        retry={"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "max_attempts": 20},
    )
    config_data = yaml.safe_load(config.read_text())
    config_data["generation"]["samples_via"] = "requests"  # 72 requests: time to kill mid-way
    config.write_text(yaml.safe_dump(config_data))
    try:
        _wait_health(proxy_port, 30)
        job = subprocess.Popen(
            [sys.executable, "-m", "distil", "generate", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        journal = out / "journal.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and job.poll() is None:
            if journal.is_file() and journal.read_bytes().count(b"\n") >= 20:
                break
            time.sleep(0.01)
        assert job.poll() is None, "the job ended before it could be killed"
        os.kill(job.pid, signal.SIGKILL)
        job.wait()
        assert not (out / "manifest.json").exists()  # killed before sealing anything
        first_run_end = time.time()
        code, text = _generate(config)
        assert code == 0, text
    finally:
        proxy.terminate()
        proxy.wait(10)
    records = _shard_records(out)
    keys = [r["key"] for r in records]
    assert len(keys) == 24 * 3 and len(set(keys)) == len(keys)  # exact, no duplicate
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert {e["fault"] for e in entries} >= {"rate_limit", "server_error", "truncate", "reset"}
    delivered_first = {
        e["key"]
        for e in entries
        if e["time"] < first_run_end and e["fault"] is None and e.get("status") == 200
    }
    resent = {e["key"] for e in entries if e["time"] >= first_run_end} & delivered_first
    assert len(resent) <= 4  # only what was in flight (concurrency 4) is sent again
    manifest = json.loads((out / "manifest.json").read_text())
    ledger_ids = {
        json.loads(line)["response_id"] for line in (out / "ledger.jsonl").read_text().splitlines()
    }
    served = {u["id"]: u for u in _usage_lines(env)}
    assert ledger_ids <= set(served)
    assert manifest["ledger"]["total_tokens"] == sum(
        served[i]["prompt_tokens"] + served[i]["completion_tokens"] for i in ledger_ids
    )
    assert (out / "quarantine.jsonl").is_file()  # the truncated bodies, with the reason
    reasons = [
        json.loads(line)["reason"] for line in (out / "quarantine.jsonl").read_text().splitlines()
    ]
    assert reasons and all("JSONDecodeError" in r for r in reasons)


def test_bad_endpoints_fail_clearly_before_any_request(env: dict[str, Any], tmp_path: Path) -> None:
    closed = free_port()
    code, text = _generate(_config(env, tmp_path / "a", port=closed))
    assert code == 2 and "cannot reach" in text and "distil serve" in text
    code, text = _generate(_config(env, tmp_path / "b", teacher={"model": "nope"}))
    assert code == 2 and "does not serve a model named 'nope'" in text and "['tiny']" in text
    os.environ["DISTIL_TEST_WRONG_KEY"] = "wrong"
    try:
        code, text = _generate(
            _config(env, tmp_path / "c", teacher={"api_key_env": "DISTIL_TEST_WRONG_KEY"})
        )
    finally:
        del os.environ["DISTIL_TEST_WRONG_KEY"]
    assert code == 2 and "refused the key in $DISTIL_TEST_WRONG_KEY (HTTP 401)" in text
    assert "wrong" not in text.replace("DISTIL_TEST_WRONG_KEY", "")
    code, text = _generate(
        _config(env, tmp_path / "d", teacher={"api_key_env": "DISTIL_UNSET_VAR"})
    )
    assert code == 2 and "DISTIL_UNSET_VAR, which is not set" in text
    before = len(_usage_lines(env))
    code, text = _generate(_config(env, tmp_path / "e", generation={"max_new_tokens": 500}))
    assert code == 2 and "maximum context length" in text and "were all refused" in text
    assert len(_usage_lines(env)) == before
    failures = (tmp_path / "e" / "failures.jsonl").read_text().splitlines()
    assert 5 <= len(failures) <= 5 + 3  # the first five, plus what was in flight


def test_a_server_that_ignores_n_and_logprobs_gets_named_fallbacks(
    env: dict[str, Any], tmp_path: Path
) -> None:
    """A black-box server (as `transformers serve` behaves): one choice, no logprobs."""
    upstream = f"http://127.0.0.1:{env['port']}"
    blackbox = FastAPI()

    def relay(method: str, path: str, auth: str, body: dict[str, Any] | None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{upstream}/v1/{path}", data=data, method=method)
        req.add_header("authorization", auth)
        req.add_header("content-type", "application/json")
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    @blackbox.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @blackbox.api_route("/v1/{path:path}", methods=["GET", "POST"])
    async def forward(path: str, request: Request) -> Any:
        auth = request.headers.get("authorization", "")
        body = None
        if request.method == "POST":
            body = await request.json()
            for field in ("n", "logprobs", "top_logprobs", "return_tokens_as_token_ids"):
                body.pop(field, None)
        return await asyncio.to_thread(relay, request.method, path, auth, body)

    with ThreadServer(blackbox) as server:
        out = tmp_path / "blackbox"
        config = _config(
            env,
            out,
            port=server.port,
            generation={
                "max_new_tokens": 4,
                "sampling_temperature": 0.8,
                "num_return_sequences": 2,
                "top_logprobs": 3,
            },
        )
        code, text = _generate(config)
    assert code == 0, text
    assert "fallback: the server returned 1 choice(s) for n=2: it ignores n" in text
    assert "fallback: the server ignored logprobs" in text and "sequence-level KD" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"]["records"] == 48
    assert manifest["signal"] == "text" and len(manifest["fallbacks"]) == 2
    assert "token-level KD: distil cache from-api" not in text
    refused = runner.invoke(
        app, ["cache", "from-api", str(out), str(tmp_path / "c"), f"tokenizer={env['tok']}"]
    )
    assert refused.exit_code == 2 and "holds text only" in " ".join(refused.output.split())


def test_budget_stops_within_one_request_and_a_rerun_continues(
    env: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "budget"
    price = {"prompt_per_million": 1e6, "completion_per_million": 1e6}  # 1 unit per token
    config = _config(
        env,
        out,
        budget={"prices": {MODEL: price}, "max_cost": 150.0},
        limits={"concurrency": 3, "timeout_s": 5},
    )
    code, text = _generate(config)
    assert code == 0, text
    assert "budget reached" in text and "stopped: budget" in text
    manifest = json.loads((out / "manifest.json").read_text())
    spent = manifest["ledger"]["cost"]
    assert 0 < spent <= 150.0
    # the next request's worst case (prompt estimate + 6 tokens) no longer fitted
    worst_prompt = max(r["usage"]["prompt_tokens"] for r in _shard_records(out))
    assert 150.0 - spent < worst_prompt + 32 + 6
    assert not manifest["complete"] and manifest["counts"]["missing"] > 0
    before = len(_usage_lines(env))
    code, text = _generate(config, "budget.max_cost=100000")
    assert code == 0 and " complete;" in text
    assert len(_usage_lines(env)) - before == manifest["counts"]["missing"]


def test_rejection_sampling_keeps_passing_samples_and_the_failing_ones_apart(
    env: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "verify"
    config = _config(
        env,
        out,
        generation={"max_new_tokens": 6, "sampling_temperature": 1.0, "num_return_sequences": 4},
        verify={"check": {"kind": "regex", "pattern": "[aeiou]"}, "keep": "best"},
    )
    code, text = _generate(config)
    assert code == 0, text
    kept, rejected = _shard_records(out), _shard_records(out, "rejected")
    assert len(kept) + len(rejected) == 24 * 4
    assert all(r["verdict"]["passed"] for r in kept)
    assert len({r["id"] for r in kept}) == len(kept)  # at most one (the best) per prompt
    failing = [r for r in rejected if not r["verdict"]["passed"]]
    assert failing and all(r["rejected"] == "failed verification" for r in failing)
    assert all("no match" in r["verdict"]["reason"] for r in failing)
    assert any(r["rejected"] == "not the best sample" for r in rejected)
    # another keep policy re-selects from the stored verdicts without a single request
    before = len(_usage_lines(env))
    code, text = _generate(config, "verify.keep=passing")
    assert code == 0 and "this run sent 0 request(s)" in text and len(_usage_lines(env)) == before
    assert len(_shard_records(out)) == sum(1 for r in [*kept, *rejected] if r["verdict"]["passed"])


def test_token_level_kd_from_the_apis_top_logprobs(env: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "logprobs"
    config = _config(env, out, generation={"max_new_tokens": 10, "top_logprobs": 5})
    code, text = _generate(config)
    assert code == 0 and "token-level KD: distil cache from-api" in text
    converted = tmp_path / "converted"
    result = runner.invoke(
        app,
        [
            "cache",
            "from-api",
            str(out),
            str(converted),
            f"tokenizer={env['tok']}",
            "max_length=64",
            "eval_fraction=0.2",
        ],
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((converted / "cache" / "manifest.json").read_text())
    assert (
        manifest["k"] == 5 and manifest["kd_temperature"] == 1.0 and manifest["kind"] == "lm_topk"
    )
    assert manifest["source"]["kind"] == "api" and manifest["num_examples"] == 19
    from distil.cache.reader import CacheReader

    reader = CacheReader(converted / "cache")
    targets = reader.get(0)
    mass = targets.log_probs.float().exp().sum(-1) + targets.tail_log_prob.float().exp()
    assert torch.allclose(mass, torch.ones_like(mass), atol=2e-3)
    args = [
        "run",
        "lm_kd",
        f"teacher.model={{hf: {env['teacher']}}}",
        f"data.source={{train: [{converted / 'train.jsonl'}], eval: [{converted / 'eval.jsonl'}]}}",
        "data.format=prompt_completion",
        "data.max_length=64",
        f"teacher.cache.path={converted / 'cache'}",
        "kd.kd_temperature=1",
        "student.model={from_teacher: {num_layers: 2}}",
        "train.batch_size=4",
        "train.max_steps=2",
        "train.checkpoint_every=2",
        "run.log_with=[]",
        "eval.baseline=false",
        "eval.generation.prompts=1",
        "eval.generation.prompt_tokens=8",
        "eval.generation.max_new_tokens=2",
        "eval.generation.speed_new_tokens=2",
        "eval.generation.speed_batch=2",
        "data.eval_limit=4",
        "--run-dir",
        str(tmp_path / "run"),
    ]
    result = runner.invoke(app, args)
    flat = " ".join(result.output.split())
    assert result.exit_code == 0, flat
    assert "the student learns from the cached" in flat and "top-5" in flat


def test_sequence_level_kd_trains_on_the_endpoint_records(
    env: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "seqkd"
    config = _config(env, out, generation={"max_new_tokens": 8, "top_logprobs": 2})
    assert _generate(config)[0] == 0
    args = [
        "run",
        "lm_kd",
        f"teacher.model={{hf: {env['teacher']}}}",
        f"data.source={{train: [{out}]}}",
        "data.format=prompt_completion",
        "data.max_length=64",
        "kd.kd_weight=0",
        "student.model={from_teacher: {num_layers: 2}}",
        "train.batch_size=4",
        "train.max_steps=2",
        "train.checkpoint_every=2",
        "run.log_with=[]",
        "eval.baseline=false",
        "eval.generation.prompts=1",
        "eval.generation.prompt_tokens=8",
        "eval.generation.max_new_tokens=2",
        "eval.generation.speed_new_tokens=2",
        "eval.generation.speed_batch=2",
        "data.eval_limit=4",
        "--run-dir",
        str(tmp_path / "run"),
    ]
    result = runner.invoke(app, args)
    flat = " ".join(result.output.split())
    assert result.exit_code == 0, flat
    assert "kd_weight=0: fine-tuning on the data alone" in flat
    # an API returns text only: it is tokenized, and the mode line says so
    mode = " ".join((tmp_path / "run" / "mode.txt").read_text().split())
    assert "(text re-tokenised:" in mode and "stores no token ids (made by an endpoint" in mode


def _classifier_folder(root: Path) -> Path:
    import transformers

    words = [
        "a",
        "good",
        "great",
        "fun",
        "film",
        "bad",
        "dull",
        "boring",
        "sad",
        "plot",
        "cast",
        "the",
        "was",
        "and",
    ]
    fast = word_level_tokenizer(words)
    config = transformers.BertConfig(
        vocab_size=fast.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=2,
        id2label={0: "rotten", 1: "fresh"},
        label2id={"rotten": 0, "fresh": 1},
    )
    torch.manual_seed(0)
    folder = root / "classifier"
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def test_relabel_with_a_classifier_endpoint_feeds_classifier_kd(tmp_path: Path) -> None:
    from distil.remote.server import build_app, load_backend

    backend = load_backend(_classifier_folder(tmp_path))
    sentences = ["a good film", "a bad film", "great fun", "dull and boring", "the cast was sad"]
    texts = [f"{s} {w}" for s in sentences for w in ("plot", "cast", "film", "fun", "sad", "good")]
    texts.append(texts[0])  # a duplicate: labelled once, written twice
    import pandas as pd

    pd.DataFrame({"text": texts}).to_csv(tmp_path / "unlabelled.csv", index=False)
    with ThreadServer(build_app(backend, model_name="clf")) as server:
        cfg = {
            "command": "relabel",
            "teacher": {"base_url": f"http://127.0.0.1:{server.port}/v1", "model": "clf"},
            "input": {"file": str(tmp_path / "unlabelled.csv")},
            "labels": ["rotten", "fresh"],
            "output": str(tmp_path / "labelled"),
        }
        (tmp_path / "relabel.yaml").write_text(yaml.safe_dump(cfg))
        result = runner.invoke(app, ["relabel", str(tmp_path / "relabel.yaml")])
    flat = " ".join(result.output.split())
    assert result.exit_code == 0, flat
    labelled = pd.read_csv(tmp_path / "labelled" / "labels.csv")
    assert len(labelled) == len(texts) and set(labelled["label"]) <= {"rotten", "fresh"}
    summary = json.loads((tmp_path / "labelled" / "relabel.json").read_text())
    assert summary["labels_bought"] == len(texts) - 1 and summary["invalid"] == 0
    assert summary["ledger"]["total_tokens"] > 0
    args = [
        "run",
        "classifier_kd",
        f"data.source={{train: [{tmp_path / 'labelled' / 'labels.csv'}]}}",
        "data.text_column=text",
        "data.label_column=label",
        "data.test_fraction=0.2",
        "teacher.model.zoo=mlp",
        "teacher.model.kwargs={hidden: [8], text_features: 256}",
        "teacher.train=true",
        "teacher.training.epochs=1",
        "teacher.training.batch_size=8",
        "train.batch_size=8",
        "student.model.kwargs={hidden: [4], text_features: 256}",
        "train.epochs=1",
        "eval.baseline=false",
        "run.log_with=[]",
        "--run-dir",
        str(tmp_path / "clf-run"),
    ]
    run = runner.invoke(app, args)
    assert run.exit_code == 0, " ".join(run.output.split())


class _SlowBackend:
    """The tiny teacher, one second per request, counting what it generates."""

    kind = "causal_lm"

    def __init__(self, inner: Any) -> None:
        self.inner, self.info, self.calls = inner, inner.info, 0

    def prompt_ids(self, prompt: str) -> list[int]:
        return list(self.inner.prompt_ids(prompt))

    def generate(self, ids: list[int], d: Any) -> Any:
        self.calls += 1
        time.sleep(1.0)
        return self.inner.generate(ids, d)


def test_serve_drops_a_queued_request_whose_client_gave_up(
    env: dict[str, Any], tmp_path: Path
) -> None:
    import openai

    from distil.remote.server import CausalLMBackend, build_app

    backend = _SlowBackend(CausalLMBackend(env["teacher"]))
    usage = tmp_path / "usage.jsonl"
    with ThreadServer(build_app(backend, model_name=MODEL, usage_log=usage)) as server:  # type: ignore[arg-type]
        url = f"http://127.0.0.1:{server.port}/v1"
        patient = openai.OpenAI(base_url=url, api_key="k", max_retries=0, timeout=30)
        hasty = openai.OpenAI(base_url=url, api_key="k", max_retries=0, timeout=0.4)
        first = threading.Thread(
            target=lambda: patient.completions.create(model=MODEL, prompt="a", max_tokens=2)
        )
        first.start()
        time.sleep(0.2)  # the first request holds the model now
        with pytest.raises(openai.APITimeoutError):
            hasty.completions.create(model=MODEL, prompt="b", max_tokens=2)
        first.join()
        time.sleep(0.5)  # the abandoned request's turn has come and gone
    assert backend.calls == 1  # it was dropped, not computed for nobody
    assert len(usage.read_text().splitlines()) == 1
