"""Benchmark: teachers behind an OpenAI-compatible API (``distil serve`` + the fault proxy).

    python bench/api_teacher.py reliability --teacher runs/lm-teacher   # 500 prompts, faults, kill -9
    python bench/api_teacher.py seqkd --teacher runs/lm-teacher         # SeqKD: API vs local teacher
    python bench/api_teacher.py tokenkd --teacher runs/lm-teacher       # API top_logprobs vs live KD
    python bench/api_teacher.py relabel                                 # Rotten Tomatoes, ADE-style
    python bench/api_teacher.py table                                   # the Markdown table

Reliability: the built-in teacher is served by ``distil serve``; the same 500 prompts (stdlib
windows of 32 tokens, 48 new tokens, greedy, concurrency 4) go once through a clean proxy (the
fault-free reference, run before and after) and once through the fault proxy (429 + Retry-After
10 %, 500 5 %, stalls past the timeout 2 %, truncated JSON 1 %, connection resets 1 %), where the
job is killed with ``kill -9`` after about half of its records and then resumed; then the same
command runs once more. Counted from the proxy's and the server's own logs (not from the client):
records and duplicates, requests re-sent after the kill, the ledger against the server's usage,
wall time without the mandated Retry-After pauses.

Quality: sequence-level KD of a 2x128 student on the teacher's text from the API (the faulty run's
records) vs from ``distil generate`` with the local teacher; token-level KD from the API's top-8
log-probs (``distil cache from-api``) vs live token-level KD on the same text; every student is
scored on the same held-out real text (stdlib validation windows). Relabelling: a MiniLM teacher
fine-tuned on 500 gold Rotten Tomatoes labels, served as a classifier, labels unlabelled snippets
(``distil relabel``); an n-gram MLP trains on its labels (``classifier_kd``) and is scored on the
gold test split.

JSON lines go to ``bench/results/api_teacher.jsonl``, the table to ``bench/results/api_teacher.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT / "src"))  # this checkout's distil, also in this process
RESULTS = BENCH / "results"
JSONL = RESULTS / "api_teacher.jsonl"
MODEL = "lm-teacher"
FAULTS = {
    "rate_limit": 0.10,
    "server_error": 0.05,
    "stall": 0.02,
    "truncate": 0.01,
    "reset": 0.01,
}
RETRY_AFTER_S = 1.0
TIMEOUT_S = 20.0
PROMPTS, PROMPT_TOKENS, NEW_TOKENS, CONCURRENCY = 500, 32, 48, 4
STUDENT_STEPS = 200  # lm_kd steps of each student (2x128, batch 8, 128 tokens)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit(row: dict[str, Any]) -> None:
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "load_avg": os.getloadavg(), **row}
    print(json.dumps(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    with open(JSONL, "a") as f:
        f.write(json.dumps(row) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_health(port: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"nothing answers on port {port}")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x] if path.is_file() else []


class Services:
    """``distil serve`` plus proxies, stopped (by pid) on exit."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []

    def serve(self, folder: Path, *, name: str = MODEL) -> tuple[int, Path]:
        port, usage = free_port(), self.work / f"usage-{name}.jsonl"
        cmd = [sys.executable, "-m", "distil", "serve", str(folder), "--port", str(port)]
        cmd += ["--model-name", name, "--usage-log", str(usage), "--threads", "1"]
        with open(self.work / f"serve-{name}.log", "w") as err:  # the child keeps its own handle
            self.procs.append(subprocess.Popen(cmd, env=ENV, stderr=err))
        wait_health(port)
        return port, usage

    def proxy(self, upstream: int, name: str, rates: dict[str, float]) -> tuple[int, Path]:
        port, plog = free_port(), self.work / f"proxy-{name}.jsonl"
        cmd = [sys.executable, "-m", "distil.remote.faults", "--upstream", f"127.0.0.1:{upstream}"]
        cmd += ["--port", str(port), "--log", str(plog), "--retry-after", str(RETRY_AFTER_S)]
        cmd += ["--stall-s", str(TIMEOUT_S + 2), "--seed", "0"]
        for fault, rate in rates.items():
            cmd += [f"--{fault.replace('_', '-')}", str(rate)]
        self.procs.append(subprocess.Popen(cmd, env=ENV, stderr=subprocess.DEVNULL))
        wait_health(port, 60)
        return port, plog

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(30)


def distil(args: list[str], log_file: Path) -> dict[str, Any]:
    """Run ``python -m distil ARGS``; wall and child CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log_file, "w") as f:
        rc = subprocess.run(
            [sys.executable, "-m", "distil", *args], env=ENV, stdout=f, stderr=f
        ).returncode
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if rc != 0:
        raise RuntimeError(f"distil {' '.join(args[:2])} failed (rc {rc}); see {log_file}")
    return {"wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(cpu, 2)}


def generate_config(
    path: Path, *, port: int, teacher: Path, output: Path, **generation: Any
) -> Path:
    cfg = {
        "command": "generate",
        "teacher": {
            "base_url": f"http://127.0.0.1:{port}/v1",
            "model": MODEL,
            "api": "completions",
            "extra_body": {"return_tokens_as_token_ids": True},
        },
        "tokenizer": str(teacher),
        "prompts": {
            "source": {"builtin": "stdlib"},
            "prompt_tokens": PROMPT_TOKENS,
            "limit": PROMPTS,
        },
        "generation": {"max_new_tokens": NEW_TOKENS, **generation},
        "limits": {"concurrency": CONCURRENCY, "timeout_s": TIMEOUT_S},
        "retry": {"max_attempts": 20, "backoff_initial_s": 0.25, "backoff_max_s": 4.0},
        "budget": {"prices": {MODEL: {"prompt_per_million": 0.5, "completion_per_million": 1.5}}},
        "shard_size": 100,
        "output": str(output),
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def records_of(folder: Path) -> list[dict[str, Any]]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return [
        json.loads(line)
        for s in manifest["shards"]
        for line in (folder / s["file"]).read_text().splitlines()
    ]


def reliability(args: argparse.Namespace) -> None:
    work = args.work / "reliability"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    with Services(work) as services:
        server_port, usage = services.serve(args.teacher)
        clean_port, _ = services.proxy(server_port, "clean", {})
        fault_port, fault_log = services.proxy(server_port, "faults", FAULTS)
        free_walls = []
        for i in (1, 2):
            if i == 2:
                faulty = run_faulty(args, work, fault_port, fault_log, usage)
            out = work / f"free-{i}"
            cfg = generate_config(
                work / f"free-{i}.yaml", port=clean_port, teacher=args.teacher, output=out
            )
            proc = distil(["generate", str(cfg)], work / f"free-{i}.log")
            manifest = json.loads((out / "manifest.json").read_text())
            assert manifest["complete"], out
            free_walls.append(manifest["runs"][-1]["wall_s"])
            emit(
                {
                    "bench": "reliability",
                    "row": f"fault-free run {i}",
                    **proc,
                    "loop_wall_s": free_walls[-1],
                }
            )
        free = {r["key"]: r["completion"] for r in records_of(work / "free-1")}
        same = sum(1 for k, c in faulty["completions"].items() if free.get(k) == c)
        mean_free = sum(free_walls) / len(free_walls)
        emit(
            {
                "bench": "reliability",
                "row": "faults + kill -9 + resume",
                **{k: v for k, v in faulty.items() if k != "completions"},
                "fault_free_loop_wall_s": free_walls,
                "wall_ratio_without_retry_after": round(
                    faulty["loop_wall_without_mandated_s"] / mean_free, 3
                ),
                "completions_equal_to_fault_free": same,
            }
        )


def run_faulty(
    args: argparse.Namespace, work: Path, port: int, plog: Path, usage: Path
) -> dict[str, Any]:
    out = work / "faulty"
    cfg = generate_config(work / "faulty.yaml", port=port, teacher=args.teacher, output=out)
    served_before = len(read_jsonl(usage))
    started = time.time()
    with open(work / "faulty-killed.log", "w") as f:
        job = subprocess.Popen(
            [sys.executable, "-m", "distil", "generate", str(cfg)], env=ENV, stdout=f, stderr=f
        )
    journal = out / "journal.jsonl"
    while job.poll() is None:
        if journal.is_file() and journal.read_bytes().count(b"\n") >= PROMPTS // 2:
            break
        time.sleep(0.02)
    if job.poll() is not None:
        raise RuntimeError("the job finished before the kill")
    killed_at = time.time()
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    journal_lines = journal.read_bytes().count(b"\n")
    log(f"killed after {journal_lines} journal lines ({killed_at - started:.1f}s)")
    resumed = distil(["generate", str(cfg)], work / "faulty-resume.log")
    resumed_at = time.time()
    served_after_resume = len(read_jsonl(usage))
    proxied_after_resume = len(read_jsonl(plog))
    rerun = distil(["generate", str(cfg)], work / "faulty-rerun.log")
    rerun_requests = len(read_jsonl(plog)) - proxied_after_resume  # /v1/models included
    rerun_served = len(read_jsonl(usage)) - served_after_resume
    # counted from the proxy's and the server's logs
    entries = [e for e in read_jsonl(plog) if e["key"] is not None]  # completion requests
    served = read_jsonl(usage)[served_before:]
    run1 = [e for e in entries if e["time"] < killed_at]
    run2 = [e for e in entries if killed_at <= e["time"] < resumed_at]
    answered_run1 = {u["idempotency_key"] for u in served if u["time"] < killed_at}
    sent_run1 = {e["key"] for e in run1}
    sent_run2 = {e["key"] for e in run2}
    records = records_of(out)
    keys = [r["key"] for r in records]
    manifest = json.loads((out / "manifest.json").read_text())
    ledger = read_jsonl(out / "ledger.jsonl")
    by_id = {u["id"]: u for u in served}
    ledger_ids = {c["response_id"] for c in ledger}
    server_tokens_for_ledger = sum(
        by_id[i]["prompt_tokens"] + by_id[i]["completion_tokens"] for i in ledger_ids if i in by_id
    )
    lost = [u for u in served if u["id"] not in ledger_ids]
    pauses = [
        (e["time"], e["time"] + RETRY_AFTER_S)
        for e in entries
        if e["fault"] == "rate_limit" and e["time"] < resumed_at
    ]
    first1 = min(e["time"] for e in run1)
    first2 = min(e["time"] for e in run2)
    resume_loop = manifest["runs"][-2]["wall_s"]  # the resume (the rerun is the last run)
    loop_wall = (killed_at - first1) + resume_loop
    mandated = union_seconds(pauses)
    faults = {f: sum(1 for e in entries if e["fault"] == f) for f in FAULTS}
    return {
        "prompts": PROMPTS,
        "records": len(keys),
        "unique_records": len(set(keys)),
        "duplicates": len(keys) - len(set(keys)),
        "journal_lines_at_kill": journal_lines,
        "killed_after_s": round(killed_at - started, 1),
        "requests_total": sum(1 for e in entries if e["time"] < resumed_at),
        "faults_injected": faults,
        "client_retries": sum(r["retries"] for r in manifest["runs"]),
        "client_errors": manifest["runs"][-2]["errors"],
        "quarantined": len(read_jsonl(out / "quarantine.jsonl")),
        "requests_before_kill": len(run1),
        "resent_after_kill": len(sent_run1 & sent_run2),
        "resent_pct": round(100 * len(sent_run1 & sent_run2) / PROMPTS, 2),
        "resent_already_answered_before_kill": len(answered_run1 & sent_run2),
        "ledger_calls": len(ledger),
        "ledger_tokens": manifest["ledger"]["total_tokens"],
        "server_tokens_for_ledger_ids": server_tokens_for_ledger,
        "ledger_equals_server": manifest["ledger"]["total_tokens"] == server_tokens_for_ledger,
        "server_answers_lost_to_faults_or_kill": len(lost),
        "server_tokens_lost": sum(u["prompt_tokens"] + u["completion_tokens"] for u in lost),
        "ledger_cost_usd": manifest["ledger"]["cost"],
        "rerun_requests": rerun_requests,
        "rerun_server_answers": rerun_served,
        "resume_wall_s": resumed["wall_s"],
        "rerun_wall_s": rerun["wall_s"],
        "loop_wall_s": round(loop_wall, 2),
        "mandated_retry_after_s": round(mandated, 2),
        "loop_wall_without_mandated_s": round(loop_wall - mandated, 2),
        "run2_first_request_after_kill_s": round(first2 - killed_at, 2),
        "completions": {r["key"]: r["completion"] for r in records},
    }


def held_out_file(teacher: Path, path: Path, windows: int = 64) -> Path:
    """Real text: windows of the stdlib corpus's validation split (prompt 32 + 48 real tokens)."""
    import tempfile

    from distil.data.corpus import build_stdlib_corpus, read_corpus_texts
    from distil.models.vocab import load_tokenizer_folder

    tok = load_tokenizer_folder(teacher)
    with tempfile.TemporaryDirectory() as tmp:
        build_stdlib_corpus(Path(tmp), test_fraction=0.0)
        texts = list(read_corpus_texts([Path(tmp) / "validation.jsonl"]))
    span = PROMPT_TOKENS + NEW_TOKENS
    rows = []
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        for s in range(0, len(ids) - span + 1, span * 4):
            rows.append(
                {
                    "prompt": tok.decode(ids[s : s + PROMPT_TOKENS]),
                    "completion": tok.decode(ids[s + PROMPT_TOKENS : s + span]),
                }
            )
    step = max(1, len(rows) // windows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[::step][:windows]))
    return path


def lm_kd(
    work: Path, name: str, teacher: Path, train: list[str], eval_file: Path, *extra: str
) -> dict[str, Any]:
    run_dir = work / f"run-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    args = [
        "run",
        "lm_kd",
        f"teacher.model={{hf: {teacher}}}",
        f"data.source={{train: [{', '.join(train)}], eval: [{eval_file}]}}",
        "data.format=prompt_completion",
        "data.max_length=128",
        "data.overlength=truncate",
        "data.eval_limit=64",
        f"train.max_steps={STUDENT_STEPS}",
        "train.checkpoint_every=1000",
        "eval.baseline=false",
        "run.log_with=[]",
        "run.cpu_threads=1",
        "seed=0",
        *extra,
        "--run-dir",
        str(run_dir),
    ]
    proc = distil(args, work / f"{name}.log")
    report = json.loads((run_dir / "report.json").read_text())
    return {"proc": proc, "rows": report["table"]["rows"]}


def student_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """Held-out perplexity and fidelity of the student (and the teacher) from a report."""
    keys = ("perplexity", "ce", "agreement", "kl_teacher_student")
    rows = {str(r["model"]).split(" ")[0]: r for r in result["rows"]}
    return {
        "student": {k: rows["student"].get(k) for k in keys},
        "teacher": {k: rows["teacher"].get(k) for k in keys},
        **result["proc"],
    }


def seqkd(args: argparse.Namespace) -> None:
    work = args.work / "seqkd"
    work.mkdir(parents=True, exist_ok=True)
    eval_file = held_out_file(args.teacher, work / "held-out.jsonl")
    api_data = args.work / "reliability" / "faulty"
    if not (api_data / "manifest.json").is_file():
        raise SystemExit(
            "run `reliability` first: its faulty (killed + resumed) output is the API data"
        )
    local = work / "local-gen"
    if not (local / "manifest.json").is_file():
        cfg = {
            "command": "generate",
            "teacher": {"model": {"hf": str(args.teacher)}},
            "prompts": {
                "source": {"builtin": "stdlib"},
                "prompt_tokens": PROMPT_TOKENS,
                "limit": PROMPTS,
            },
            "generation": {"max_new_tokens": NEW_TOKENS, "batch_size": 16},
            "output": str(local),
        }
        (work / "local.yaml").write_text(yaml.safe_dump(cfg))
        emit(
            {
                "bench": "seqkd",
                "row": "local distil generate",
                **distil(["generate", str(work / "local.yaml")], work / "local-gen.log"),
            }
        )
    local_text = {
        r["id"]: r["completion"]
        for r in (
            json.loads(x)
            for f in sorted(local.glob("shard-*.jsonl"))
            for x in f.read_text().splitlines()
        )
    }
    api_text = {r["id"]: r["completion"] for r in records_of(api_data)}
    same = sum(1 for i, c in api_text.items() if local_text.get(i) == c)
    results = {}
    for name, data in (("seqkd-local", local), ("seqkd-api", api_data)):
        results[name] = student_metrics(
            lm_kd(work, name, args.teacher, [str(data)], eval_file, "kd.kd_weight=0")
        )
        emit(
            {"bench": "seqkd", "row": name, **results[name], "completions_equal_local_vs_api": same}
        )


def tokenkd(args: argparse.Namespace) -> None:
    work = args.work / "tokenkd"
    work.mkdir(parents=True, exist_ok=True)
    eval_file = held_out_file(args.teacher, work / "held-out.jsonl")
    gen, converted = work / "api-logprobs", work / "converted"
    if not (converted / "cache" / "manifest.json").is_file():
        with Services(work) as services:
            port, _ = services.serve(args.teacher)
            cfg = generate_config(
                work / "gen.yaml", port=port, teacher=args.teacher, output=gen, top_logprobs=20
            )
            emit(
                {
                    "bench": "tokenkd",
                    "row": "api generate top-20",
                    **distil(["generate", str(cfg)], work / "gen.log"),
                }
            )
        shutil.rmtree(converted, ignore_errors=True)
        conv = distil(
            [
                "cache",
                "from-api",
                str(gen),
                str(converted),
                f"tokenizer={args.teacher}",
                "max_length=128",
                "eval_fraction=0",
            ],
            work / "from-api.log",
        )
        manifest = json.loads((converted / "cache" / "manifest.json").read_text())
        emit(
            {
                "bench": "tokenkd",
                "row": "from-api",
                **conv,
                "examples": manifest["num_examples"],
                "positions": manifest["num_positions"],
                "topk_mass_mean": manifest["topk_mass_mean"],
                "source": manifest["source"],
            }
        )
    train = [str(converted / "train.jsonl")]
    for name, extra in (
        ("tokenkd-api-cache", [f"teacher.cache.path={converted / 'cache'}", "kd.kd_temperature=1"]),
        ("tokenkd-live", ["kd.kd_temperature=1"]),
        ("seqkd-same-text", ["kd.kd_weight=0"]),
    ):
        emit(
            {
                "bench": "tokenkd",
                "row": name,
                **student_metrics(lm_kd(work, name, args.teacher, train, eval_file, *extra)),
            }
        )


def relabel(args: argparse.Namespace) -> None:
    import pandas as pd

    sys.path.insert(0, str(BENCH))
    from distil.data.classification import load_rotten_tomatoes
    from rotten_tomatoes import prepare_folders  # type: ignore[import-not-found]

    work = args.work / "relabel"
    work.mkdir(parents=True, exist_ok=True)
    data = load_rotten_tomatoes(0.25, 0)
    names = ["rotten", "fresh"]
    assert data.train.texts is not None and data.test.texts is not None
    train = pd.DataFrame({"text": data.train.texts, "label": [names[i] for i in data.train.labels]})
    gold = train.sample(n=args.gold, random_state=0)
    rest = train.drop(gold.index).head(args.unlabelled)
    gold.to_csv(work / "gold.csv", index=False)
    rest[["text"]].to_csv(work / "unlabelled.csv", index=False)
    rest.to_csv(work / "unlabelled-gold.csv", index=False)
    pd.DataFrame({"text": data.test.texts, "label": [names[i] for i in data.test.labels]}).to_csv(
        work / "test.csv", index=False
    )
    teacher_init, _ = prepare_folders()
    teacher_run = work / "run-teacher"
    if not (teacher_run / "teacher" / "final" / "config.json").is_file():
        shutil.rmtree(teacher_run, ignore_errors=True)
        proc = distil(
            [
                "run",
                "classifier_kd",
                f"data.source={{train: [{work / 'gold.csv'}], eval: [{work / 'test.csv'}]}}",
                "data.text_column=text",
                "data.label_column=label",
                "teacher.model.zoo=null",
                f"teacher.model.hf={teacher_init}",
                "teacher.model.kwargs={max_length: 48}",
                "teacher.train=true",
                "teacher.training.epochs=5",
                "teacher.training.batch_size=32",
                "teacher.training.lr=1e-4",
                "student.model.zoo=mlp",
                "student.model.kwargs={hidden: [16], text_features: 4096}",
                "train.epochs=1",
                "eval.baseline=false",
                "run.log_with=[]",
                "run.cpu_threads=1",
                "--run-dir",
                str(teacher_run),
            ],
            work / "teacher.log",
        )
        emit({"bench": "relabel", "row": "teacher fine-tune on gold", **proc})
    folder = teacher_run / "teacher" / "final"
    for f in teacher_init.iterdir():
        if "token" in f.name or f.name == "vocab.txt":
            shutil.copy(f, folder / f.name)
    config = json.loads((folder / "config.json").read_text())
    labels_sorted = sorted(names)  # classifier_kd maps labels to ids in sorted order
    config["id2label"] = dict(enumerate(labels_sorted))
    config["label2id"] = {n: i for i, n in enumerate(labels_sorted)}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    teacher_report = json.loads((teacher_run / "report.json").read_text())
    out = work / "labelled"
    with Services(work) as services:
        port, _ = services.serve(folder, name="rt-teacher")
        cfg = {
            "command": "relabel",
            "teacher": {"base_url": f"http://127.0.0.1:{port}/v1", "model": "rt-teacher"},
            "input": {"file": str(work / "unlabelled.csv")},
            "labels": names,
            "limits": {"concurrency": 4, "timeout_s": 30},
            "budget": {
                "prices": {"rt-teacher": {"prompt_per_million": 0.5, "completion_per_million": 1.5}}
            },
            "output": str(out),
        }
        (work / "relabel.yaml").write_text(yaml.safe_dump(cfg))
        proc = distil(["relabel", str(work / "relabel.yaml")], work / "relabel.log")
    summary = json.loads((out / "relabel.json").read_text())
    silver = pd.read_csv(out / "labels.csv")
    truth = rest.reset_index(drop=True)
    agree = float((silver["label"].values == truth["label"].values[: len(silver)]).mean())
    emit(
        {
            "bench": "relabel",
            "row": "distil relabel",
            **proc,
            **summary,
            "silver_label_accuracy": round(agree, 4),
            "teacher_rows": teacher_report["table"]["rows"],
        }
    )
    for name, train_file in (
        ("student on API labels", out / "labels.csv"),
        ("student on the 500 gold labels", work / "gold.csv"),
        ("student on gold labels of the same texts", work / "unlabelled-gold.csv"),
    ):
        run_dir = work / f"run-{name.replace(' ', '-')}"
        shutil.rmtree(run_dir, ignore_errors=True)
        proc = distil(
            [
                "run",
                "classifier_kd",
                f"data.source={{train: [{train_file}], eval: [{work / 'test.csv'}]}}",
                "data.text_column=text",
                "data.label_column=label",
                "teacher.model.zoo=mlp",
                "teacher.model.kwargs={hidden: [256], dropout: 0.3, text_features: 4096}",
                "teacher.train=true",
                "teacher.training.epochs=5",
                "teacher.training.batch_size=64",
                "student.model.kwargs={hidden: [16], text_features: 4096}",
                "train.epochs=5",
                "train.batch_size=64",
                "kd.kd_weight=0.5",
                "kd.kd_temperature=2.0",
                "eval.baseline=false",
                "run.log_with=[]",
                "run.cpu_threads=1",
                "--run-dir",
                str(run_dir),
            ],
            work / f"{run_dir.name}.log",
        )
        report = json.loads((run_dir / "report.json").read_text())
        emit({"bench": "relabel", "row": name, **proc, "models": report["table"]["rows"]})


PEERS_PY = BENCH / ".venv-api-peers" / "bin" / "python"


HANG_S = 300.0
"""A resumed peer that sends no request for this long while still running is stuck."""


def watch(job: subprocess.Popen[bytes], plog: Path) -> bool:
    """Wait for ``job``; kill its process group if the proxy sees no request for ``HANG_S``
    (distilabel#1065: a restart from its cache can hang). Returns whether it hung."""
    last, seen = time.monotonic(), len(read_jsonl(plog))
    while job.poll() is None:
        time.sleep(2)
        now = len(read_jsonl(plog))
        if now != seen:
            last, seen = time.monotonic(), now
        elif time.monotonic() - last > HANG_S:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
            return True
    return False


def peers(args: argparse.Namespace) -> None:
    """distilabel and curator under the same faults and the same kill -9 at about half-way."""
    from distil.data.prompts import PromptsSection, load_prompts
    from distil.models.vocab import load_tokenizer_folder

    if not PEERS_PY.is_file():
        raise SystemExit(f"make {PEERS_PY.parent.parent} first (see bench/api_teacher_peers.py)")
    work = args.work / "peers"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    section = PromptsSection(prompt_tokens=PROMPT_TOKENS, limit=PROMPTS)  # {builtin: stdlib}
    prompts = load_prompts(section, load_tokenizer_folder(args.teacher))
    prompt_file = work / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p.text}) + "\n" for p in prompts))
    with Services(work) as services:
        server_port, usage = services.serve(args.teacher)
        for tool in args.tools.split(","):
            port, plog = services.proxy(server_port, tool, FAULTS)
            cmd = [str(PEERS_PY), str(BENCH / "api_teacher_peers.py"), tool]
            cmd += ["--base-url", f"http://127.0.0.1:{port}/v1", "--prompts", str(prompt_file)]
            cmd += ["--cache", str(work / f"{tool}-cache"), "--out", str(work / f"{tool}.json")]
            cmd += ["--timeout", str(TIMEOUT_S), "--concurrency", str(CONCURRENCY)]
            served_before = len(read_jsonl(usage))
            started = time.time()
            with open(work / f"{tool}-killed.log", "w") as f:
                job = subprocess.Popen(cmd, stdout=f, stderr=f, start_new_session=True)
            while job.poll() is None:
                ok = sum(
                    1 for e in read_jsonl(plog) if e.get("status") == 200 and e["fault"] is None
                )
                if ok >= PROMPTS // 2:
                    break
                time.sleep(0.5)
            killed = job.poll() is None
            killed_at = time.time()
            if killed:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()
            with open(work / f"{tool}-resume.log", "w") as f:
                t0 = time.perf_counter()
                resume = subprocess.Popen(cmd, stdout=f, stderr=f, start_new_session=True)
                hung = watch(resume, plog)
                rc = resume.wait()
                resume_wall = time.perf_counter() - t0
            entries = [e for e in read_jsonl(plog) if e.get("body_sha")]
            before = {e["body_sha"] for e in entries if e["time"] < killed_at}
            after = {e["body_sha"] for e in entries if e["time"] >= killed_at}
            rows = json.loads((work / f"{tool}.json").read_text()) if rc == 0 else []
            done = [r for r in rows if r["completion"]]
            texts = [r["prompt"] for r in done if r["prompt"] is not None]
            served = read_jsonl(usage)[served_before:]
            emit(
                {
                    "bench": "peers",
                    "row": tool,
                    "prompts": PROMPTS,
                    "killed_after_s": round(killed_at - started, 1) if killed else None,
                    "resume_rc": rc,
                    "resume_hung": hung,
                    "resume_wall_s": round(resume_wall, 1),
                    "rows": len(rows),
                    "records_with_text": len(done),
                    "records_lost": PROMPTS - len(done),
                    "duplicate_prompts_in_output": len(texts) - len(set(texts)) if texts else None,
                    "requests_total": len(entries),
                    "requests_before_kill": sum(1 for e in entries if e["time"] < killed_at),
                    "resent_after_kill": len(before & after),
                    "server_answers": len(served),
                    "faults_injected": {
                        f: sum(1 for e in entries if e["fault"] == f) for f in FAULTS
                    },
                }
            )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return "-" if value is None else str(value)


def table(_: argparse.Namespace) -> None:
    """``bench/results/api_teacher.md`` from the latest row of each kind in the JSON lines."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for r in read_jsonl(JSONL):
        latest[(r["bench"], r["row"])] = r
    out = ["# Teachers behind an API (bench/api_teacher.py)", ""]
    rel = latest.get(("reliability", "faults + kill -9 + resume"))
    if rel:
        load = ", ".join(f"{x:.1f}" for x in rel["load_avg"])
        out += [
            f"## Reliability: {rel['prompts']} prompts through the fault proxy, `kill -9` at about "
            f"half-way, resume ({rel['time']}, load average {load}, 2 shared CPU cores)",
            "",
            f"Faults injected (429 + Retry-After {RETRY_AFTER_S:g} s / 500 / stall past the "
            f"{TIMEOUT_S:g} s timeout / truncated JSON / reset): {_fmt(rel['faults_injected'])}; "
            f"the client retried {rel['client_retries']} times and quarantined "
            f"{rel['quarantined']} bodies.",
            "",
            "| measure | value | target |",
            "|---|---|---|",
            f"| unique records / duplicates | {rel['unique_records']} / {rel['duplicates']} | {rel['prompts']} / 0 |",
            f"| journal lines at the kill | {rel['journal_lines_at_kill']} (after {rel['killed_after_s']} s) | about half |",
            f"| requests re-sent after the kill (sent before it, sent again) | {rel['resent_after_kill']} ({rel['resent_pct']} %) | <= 1 % (in flight only) |",
            f"| ledger tokens / server usage for the same answers | {rel['ledger_tokens']:,} / {rel['server_tokens_for_ledger_ids']:,} | equal |",
            f"| server answers the client never received (faults, kill) | {rel['server_answers_lost_to_faults_or_kill']} ({rel['server_tokens_lost']:,} tokens) | - |",
            f"| requests of an unchanged rerun | {rel['rerun_requests']} | 0 |",
            f"| loop wall, faulty (kill + resume) / fault-free runs | {rel['loop_wall_s']} s / {_fmt(rel['fault_free_loop_wall_s'])} s | - |",
            f"| mandated Retry-After pauses | {rel['mandated_retry_after_s']} s | - |",
            f"| faulty without them / fault-free (mean) | {rel['wall_ratio_without_retry_after']}x | <= 1.2x |",
            f"| completions equal to the fault-free run (greedy) | {rel['completions_equal_to_fault_free']} | {rel['prompts']} |",
            "",
        ]
    peer_rows = [r for (b, _), r in latest.items() if b == "peers"]
    if rel or peer_rows:
        out += [
            "## The same fault scenario with peers",
            "",
            "| tool | records with text | lost | duplicates | re-sent after the kill | requests | note |",
            "|---|---|---|---|---|---|---|",
        ]
        if rel:
            out.append(
                f"| distil | {rel['unique_records']} | {rel['prompts'] - rel['unique_records']} | "
                f"{rel['duplicates']} | {rel['resent_after_kill']} | {rel['requests_total']} | idempotency keys, fsynced journal |"
            )
        for r in peer_rows:
            out.append(
                f"| {r['row']} | {r['records_with_text']} | {r['records_lost']} | "
                f"{_fmt(r['duplicate_prompts_in_output'])} | {r['resent_after_kill']} | {r['requests_total']} | "
                f"{'resume hung: no request for ' + str(int(HANG_S)) + ' s, killed' if r.get('resume_hung') else 'resume rc ' + str(r['resume_rc'])}, {r['resume_wall_s']} s |"
            )
        out += [
            "",
            "distilabel 1.5.3 and bespokelabs-curator 0.1.31 run in their own venv "
            "(`bench/api_teacher_peers.py`: curator would downgrade openai, datasets and tokenizers "
            "here; neither changes torch or transformers); chat API, 48 new tokens, greedy, 4 "
            "requests in flight, each tool's own retries and cache; its process group is killed "
            "with SIGKILL once 250 answers have passed the proxy intact, then the same command "
            'runs again. "Re-sent" counts request bodies sent both before and after the kill '
            '(at most 4 were in flight). "Lost" is what the finished run does not deliver.',
            "",
        ]
    quality = [r for (b, _), r in latest.items() if b in ("seqkd", "tokenkd") and "student" in r]
    if quality:
        out += [
            f"## Quality: a 2x128 student, {STUDENT_STEPS} steps, scored on held-out real text",
            "",
            "| data / teacher signal | student held-out ppl | teacher held-out ppl | top-1 agreement | KL(t||s) | wall s |",
            "|---|---|---|---|---|---|",
        ]
        for r in quality:
            st, te = r["student"], r["teacher"]
            out.append(
                f"| {r['bench']}: {r['row']} | {_fmt(st['perplexity'])} | {_fmt(te['perplexity'])} | "
                f"{_fmt(st['agreement'])} | {_fmt(st['kl_teacher_student'])} | {r['wall_s']} |"
            )
        out.append("")
    relabel_rows = [r for (b, _), r in latest.items() if b == "relabel"]
    if relabel_rows:
        out += relabel_table(relabel_rows)
    (RESULTS / "api_teacher.md").write_text("\n".join(out) + "\n")


def _student_accuracy(row: dict[str, Any]) -> float | None:
    """The KD student's test accuracy in a ``classifier_kd`` report row list."""
    for model in row.get("models", []):
        if model.get("model") == "student (KD)":
            return float(model["accuracy"])
    return None


def relabel_table(rows: list[dict[str, Any]]) -> list[str]:
    """The relabelling rows as one table: the API teacher, what its labels cost and how right
    they are, and the same student trained on API labels, on 500 gold labels, on gold labels of
    the same texts."""
    by = {r["row"]: r for r in rows}
    out = ["## Relabelling (Rotten Tomatoes, ADE-style)", ""]
    relabel = by.get("distil relabel")
    if relabel is not None:
        teacher = relabel["teacher_rows"][0]
        ledger = relabel["ledger"]
        out += [
            f"API teacher: MiniLM-L6 fine-tuned on 500 gold labels, {teacher['accuracy']:.2%} on "
            f"the gold test split, served by `distil serve`. `distil relabel` labelled "
            f"{relabel['labelled']:,} texts ({relabel['labels_bought']:,} labels bought, "
            f"{relabel['invalid']} invalid, {relabel['unanswered']} unanswered; "
            f"{ledger['total_tokens']:,} tokens, {ledger['cost']:.4f} {ledger['currency']} at the "
            f"config's prices) in {relabel['wall_s']:.0f} s; its labels agree with the gold "
            f"labels on {relabel['silver_label_accuracy']:.2%} of those texts.",
            "",
            "| n-gram MLP student (65k params) trained on | test accuracy |",
            "|---|---:|",
        ]
    names = {
        "student on the 500 gold labels": "the 500 gold labels the teacher was tuned on",
        "student on API labels": "the API teacher's labels of the unlabelled texts",
        "student on gold labels of the same texts": "gold labels of the same texts (upper bound)",
    }
    for key, what in names.items():
        accuracy = _student_accuracy(by.get(key, {}))
        if accuracy is not None:
            out.append(f"| {what} | {accuracy:.2%} |")
    return [*out, ""]


def main() -> None:
    global PROMPTS, STUDENT_STEPS  # knobs for a smoke run of every part
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "part", choices=["reliability", "seqkd", "tokenkd", "relabel", "peers", "table"]
    )
    parser.add_argument("--teacher", type=Path, default=ROOT / "runs" / "lm-teacher")
    parser.add_argument("--work", type=Path, default=BENCH / "artifacts" / "api_teacher")
    parser.add_argument("--gold", type=int, default=500, help="relabel: gold labels of the teacher")
    parser.add_argument("--unlabelled", type=int, default=4000, help="relabel: texts to label")
    parser.add_argument("--prompts", type=int, default=PROMPTS, help="a smaller smoke run")
    parser.add_argument("--tools", default="distilabel,curator", help="peers: which tools")
    parser.add_argument("--steps", type=int, default=STUDENT_STEPS, help="lm_kd student steps")
    args = parser.parse_args()
    PROMPTS, STUDENT_STEPS = args.prompts, args.steps
    {
        "reliability": reliability,
        "seqkd": seqkd,
        "tokenkd": tokenkd,
        "relabel": relabel,
        "peers": peers,
        "table": table,
    }[args.part](args)


if __name__ == "__main__":
    main()
