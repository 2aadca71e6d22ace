"""``distil relabel``: a teacher behind an endpoint labels unlabelled text for ``classifier_kd``.

The ADE recipe of the seed (paper #2: GPT-3.5 labels unlabelled biomedical text, a small model
trained on those labels beats it): every text becomes one request (a template and an optional
system prompt around it, greedy, a few tokens), through the same job machinery as ``distil
generate`` (resumable, deduplicated, budgeted, retried). Each answer is parsed into one of the
configured labels:

- ``answer: text``: the answer, trimmed and case-folded, equals a label, or contains exactly one
  label as a whole word ("The review is fresh." → ``fresh``);
- ``answer: json``: the answer (code fences stripped) is a JSON object whose ``json_field`` is one
  of the labels (validated with a JSON schema).

Anything else is not a label: the text stays unlabelled, and ``invalid.jsonl`` keeps the answer
and the reason. The labelled rows go to ``labels.csv`` (or ``.jsonl``) with the columns ``id``,
``text`` and ``label``; train on it with ``classifier_kd data.source={train: […/labels.csv]}
data.text_column=text data.label_column=label``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from distil.cache.manifest import write_json_atomic
from distil.config.base import StrictModel
from distil.data.prompts import Prompt, prompts_fingerprint
from distil.errors import DistilError
from distil.remote.config import (
    BudgetSection,
    EndpointGeneration,
    EndpointSection,
    LimitsSection,
    PromptVariant,
    RetrySection,
    check_budget,
)
from distil.remote.jobs import JobResult, JobSpec, run_job
from distil.remote.plan import plan_requests
from distil.storage import atomic_write_bytes
from distil.verify import strip_fences


class AnswerFormat(str, Enum):
    """How the teacher gives its label."""

    TEXT = "text"
    JSON = "json"


class LabelFormat(str, Enum):
    """The labelled file's format."""

    CSV = "csv"
    JSONL = "jsonl"


class RelabelInput(StrictModel):
    """The unlabelled texts: a CSV, JSONL or Parquet file with a text column."""

    file: str
    text_column: str = "text"
    limit: int | None = Field(default=None, ge=1, description="the first N rows")


class RelabelConfig(StrictModel):
    """A ``distil relabel`` config (``command: relabel``)."""

    command: Literal["relabel"] = "relabel"
    teacher: EndpointSection
    input: RelabelInput
    labels: list[str] = Field(min_length=2, description="the label set, as the teacher writes it")
    answer: AnswerFormat = AnswerFormat.TEXT
    json_field: str = Field(default="label", description="answer=json: the field with the label")
    system_prompt: str | None = None
    template: str = Field(default="{text}", description="`{text}` is replaced by the text")
    max_new_tokens: int = Field(default=16, ge=1)
    limits: LimitsSection = LimitsSection()
    retry: RetrySection = RetrySection()
    budget: BudgetSection = BudgetSection()
    output: str = "runs/relabelled"
    label_format: LabelFormat = LabelFormat.CSV

    @field_validator("labels")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        folded = [x.strip().casefold() for x in v]
        if len(set(folded)) != len(folded) or not all(folded):
            raise ValueError(f"labels must be non-empty and distinct (case-insensitively): {v}")
        return v

    @field_validator("template")
    @classmethod
    def _has_slot(cls, v: str) -> str:
        if "{text}" not in v:
            raise ValueError("the template must contain {text}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> RelabelConfig:
        if self.system_prompt and self.teacher.api.value == "completions":
            raise ValueError("system_prompt needs teacher.api=chat; put it into the template")
        check_budget(self.budget, self.teacher.model)
        return self


@dataclass(frozen=True)
class Parsed:
    """A parsed answer: the label, or None and why not."""

    label: str | None
    reason: str = ""


def parse_label(answer: str, labels: Sequence[str], fmt: AnswerFormat, json_field: str) -> Parsed:
    """The label an answer gives (see the module docstring for the rules)."""
    by_fold = {label.strip().casefold(): label for label in labels}
    if fmt is AnswerFormat.JSON:
        try:
            value = json.loads(strip_fences(answer).strip())
        except json.JSONDecodeError as exc:
            return Parsed(None, f"not JSON: {exc.msg}")
        if not isinstance(value, dict) or json_field not in value:
            return Parsed(None, f"no {json_field!r} field")
        got = value[json_field]
        if not isinstance(got, str) or got not in labels:
            return Parsed(None, f"{json_field}={got!r} is not one of {list(labels)}")
        return Parsed(got)
    text = answer.strip().strip(".!\"'`").strip().casefold()
    if text in by_fold:
        return Parsed(by_fold[text])
    found = [
        label
        for fold, label in by_fold.items()
        if re.search(rf"(?<!\w){re.escape(fold)}(?!\w)", text)
    ]
    if len(found) == 1:
        return Parsed(found[0])
    return Parsed(None, "no label in the answer" if not found else f"several labels: {found}")


@dataclass(frozen=True)
class RelabelResult:
    """What ``relabel`` wrote."""

    job: JobResult
    label_file: Path
    labelled: int
    invalid: int
    unanswered: int
    label_counts: dict[str, int]


def _read_texts(section: RelabelInput) -> list[str]:
    import pandas as pd

    path = Path(section.file)
    if not path.is_file():
        raise DistilError(f"input.file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        frame = pd.read_csv(path)
    elif suffix in (".jsonl", ".json"):
        frame = pd.read_json(path, lines=suffix == ".jsonl")
    elif suffix == ".parquet":
        frame = pd.read_parquet(path)
    else:
        raise DistilError(f"input.file {path}: use .csv, .jsonl or .parquet")
    if section.text_column not in frame.columns:
        raise DistilError(
            f"{path} has no column {section.text_column!r} (it has {list(frame.columns)}); set "
            "input.text_column"
        )
    texts = [str(t) for t in frame[section.text_column]][: section.limit]
    if not texts:
        raise DistilError(f"{path} has no rows to label")
    return texts


def relabel(
    cfg: RelabelConfig,
    *,
    announce: Callable[[str], None] | None = None,
    show_progress: bool = True,
) -> RelabelResult:
    """Label ``cfg.input`` with the endpoint teacher (resumable) and write the labelled file.

    Raises:
        DistilError: On a bad input file or a server problem (see ``run_job``).
    """
    texts = _read_texts(cfg.input)
    prompts = [Prompt(i, t) for i, t in enumerate(texts)]
    variant = PromptVariant(
        name="relabel",
        system_prompt=cfg.system_prompt,
        template=cfg.template.replace("{text}", "{prompt}"),
    )
    generation = EndpointGeneration(max_new_tokens=cfg.max_new_tokens)
    groups = plan_requests(prompts, [variant], cfg.teacher, generation)
    out = Path(cfg.output)
    spec = JobSpec(
        kind="relabel",
        endpoint=cfg.teacher,
        limits=cfg.limits,
        retry=cfg.retry,
        budget=cfg.budget,
        generation=generation,
        groups=groups,
        output=out,
        shard_size=1024,
        settings={
            "labels": list(cfg.labels),
            "answer": cfg.answer.value,
            "json_field": cfg.json_field,
            "template": cfg.template,
            "system_prompt": cfg.system_prompt,
            "max_new_tokens": cfg.max_new_tokens,
            "input": cfg.input.model_dump(mode="json"),
        },
        prompts_fingerprint=prompts_fingerprint(prompts),
        num_prompts=len(prompts),
    )
    job = run_job(spec, announce=announce, show_progress=show_progress)
    served = (job.manifest.get("server") or {}).get("distil") or {}
    if served.get("labels") and set(served["labels"]) != set(cfg.labels) and announce:
        announce(
            f"warning: the server's classifier labels {served['labels']} differ from labels "
            f"{cfg.labels}; answers outside the label set count as invalid"
        )
    records = _read_records(out, job.manifest)
    label_of: dict[int | str, Parsed] = {}
    for record in records:
        parsed = parse_label(record["completion"], cfg.labels, cfg.answer, cfg.json_field)
        for pid in [record["id"], *record.get("duplicate_ids", [])]:
            label_of[pid] = parsed
    rows, invalid = [], []
    unanswered = 0
    for p in prompts:
        answer = label_of.get(p.id)
        if answer is None:
            unanswered += 1
        elif answer.label is None:
            invalid.append({"id": p.id, "text": p.text, "reason": answer.reason})
        else:
            rows.append({"id": p.id, "text": p.text, "label": answer.label})
    label_file = out / f"labels.{cfg.label_format.value}"
    if cfg.label_format is LabelFormat.CSV:
        import pandas as pd

        data = pd.DataFrame(rows, columns=["id", "text", "label"]).to_csv(index=False).encode()
    else:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    atomic_write_bytes(label_file, data)
    atomic_write_bytes(
        out / "invalid.jsonl",
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in invalid).encode(),
    )
    counts = dict(Counter(str(r["label"]) for r in rows))
    write_json_atomic(
        out / "relabel.json",
        {
            "label_file": label_file.name,
            "texts": len(prompts),
            "labelled": len(rows),
            "invalid": len(invalid),
            "unanswered": unanswered,
            "label_counts": counts,
            "labels_bought": job.manifest["counts"]["records"],
            "ledger": job.manifest["ledger"],
            "invalid_reasons": dict(Counter(r["reason"] for r in invalid)),
        },
    )
    return RelabelResult(job, label_file, len(rows), len(invalid), unanswered, counts)


def _read_records(out: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for shard in manifest["shards"]
        for line in (out / shard["file"]).read_text().splitlines()
        if line
    ]
