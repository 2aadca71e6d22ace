"""``distil generate`` with an endpoint as teacher: prompts → planned requests → a job.

The output folder has the format ``distil generate`` writes for a local teacher (JSONL shards
listed with their sha256 in ``manifest.json``, ``complete`` when every request is answered), so
``lm_kd`` trains on it the same way: ``data.source={train: [FOLDER]}`` with
``data.format=prompt_completion`` (completions API) or ``data.format=chat`` (chat API: each
record also holds the ``messages``, the answer included).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from distil.data.prompts import load_prompts, prompts_fingerprint
from distil.remote.config import EndpointGenerateConfig
from distil.remote.jobs import JobResult, JobSpec, run_job
from distil.remote.plan import plan_requests


def generate_from_endpoint(
    cfg: EndpointGenerateConfig,
    *,
    announce: Callable[[str], None] | None = None,
    show_progress: bool = True,
) -> JobResult:
    """Run (or continue) an endpoint generation job; see :func:`distil.remote.jobs.run_job`.

    Raises:
        DistilError: On a bad prompt set, an unreachable or refusing server, or a fatal error.
    """
    tokenizer: Any = None
    if cfg.tokenizer is not None:
        from distil.models.vocab import load_tokenizer_folder

        tokenizer = load_tokenizer_folder(cfg.tokenizer)
    prompts = load_prompts(cfg.prompts, tokenizer)
    groups = plan_requests(prompts, cfg.variants, cfg.teacher, cfg.generation)
    settings = {
        "prompts": cfg.prompts.model_dump(mode="json"),
        "variants": [v.model_dump(mode="json") for v in cfg.variants],
        "generation": cfg.generation.model_dump(mode="json"),
        "limits": cfg.limits.model_dump(mode="json"),
        "shard_size": cfg.shard_size,
    }
    spec = JobSpec(
        kind="generate",
        endpoint=cfg.teacher,
        limits=cfg.limits,
        retry=cfg.retry,
        budget=cfg.budget,
        generation=cfg.generation,
        groups=groups,
        output=Path(cfg.output),
        shard_size=cfg.shard_size,
        settings=settings,
        prompts_fingerprint=prompts_fingerprint(prompts),
        num_prompts=len(prompts),
        verify=cfg.verify,
    )
    return run_job(spec, announce=announce, show_progress=show_progress)
