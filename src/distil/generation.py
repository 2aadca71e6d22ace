"""``distil generate``: sequence-level KD data, i.e. a teacher LM's completions for a prompt set.

Sequence-level KD (Kim & Rush, 2016) trains the student on what the teacher *writes*, not on its
token distributions: train on an output folder with ``lm_kd`` (``data.source={train: [FOLDER]}``,
``data.format=prompt_completion``; ``kd.kd_weight=0`` is plain fine-tuning on the teacher's text).

The folder holds ``shard-00000.jsonl``… (shard ``i`` = prompts ``[i·S, (i+1)·S)``, one line
``{"id", "prompt", "completion", "prompt_ids", "completion_ids"}`` per completion, plus
``"sample"`` when there are several per prompt) and ``manifest.json`` (settings,
teacher/tokenizer/prompt-set fingerprints, the record fields holding token ids, shards with
sha256 and id range, counts). ``prompt_ids`` are what the teacher was given and
``completion_ids`` what it wrote (up to, not including, EOS): training with the same tokenizer
(same ``tokenizer_fingerprint``) uses them instead of re-tokenising the text, which can merge
the teacher's tokens into others. Each shard and then the manifest are written atomically, so
a killed run, re-run with the same config, keeps the shards whose sha256 matches the manifest
and regenerates the rest. Sampling draws row ``r``'s tokens from a generator seeded with
``(seed, prompt id, sample)``, never from the global RNG, so a prompt's text does not depend on
the prompts batched beside it and a resumed run writes byte-identical shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

import distil
from distil.cache.manifest import teacher_fingerprint, write_json_atomic
from distil.config.base import StrictModel
from distil.config.lm import TeacherSection, TorchDtype
from distil.config.sources import HFModel
from distil.data.generated import (
    COMPLETION_IDS,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    PROMPT_IDS,
    TOKEN_IDS,
)
from distil.data.lm import pad_token_id_for
from distil.data.prompts import Prompt, PromptsSection, load_prompts, prompts_fingerprint
from distil.errors import DistilError
from distil.models.lm import load_causal_lm, model_context_length
from distil.models.vocab import (
    load_tokenizer_folder,
    mask_unknown_ids,
    tokenizer_fingerprint,
    tokenizer_vocab_size,
)
from distil.progress import progress_bar, rate_text
from distil.storage import atomic_write_bytes, remove_temp_files, sha256_file

logger = logging.getLogger(__name__)


class GenerationSettings(StrictModel):
    max_new_tokens: int = Field(default=64, ge=1)
    sampling_temperature: float = Field(default=0.0, ge=0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0, le=1, description="nucleus sampling (sampling only)")
    num_return_sequences: int = Field(default=1, ge=1, description="per prompt (sampling only)")
    batch_size: int = Field(default=16, ge=1, description="sequences per generate call")
    seed: int = 0
    logprobs: bool = Field(
        default=False,
        description="also write each generated token's id and the teacher's log-probability",
    )

    @model_validator(mode="after")
    def _sampling_only(self) -> GenerationSettings:
        if self.sampling_temperature == 0 and (self.top_p < 1 or self.num_return_sequences > 1):
            raise ValueError(
                "greedy decoding (sampling_temperature=0) ignores top_p and repeats one completion: "
                "set sampling_temperature > 0, or top_p=1 and num_return_sequences=1"
            )
        return self


class GenerateConfig(StrictModel):
    """A ``distil generate`` config (``command: generate`` in its YAML)."""

    command: Literal["generate"] = "generate"
    teacher: TeacherSection = Field(
        default_factory=TeacherSection, description="{model: {hf: FOLDER}, dtype, device}"
    )
    prompts: PromptsSection = PromptsSection(limit=256)
    generation: GenerationSettings = GenerationSettings()
    shard_size: int = Field(default=64, ge=1, description="prompts per shard")
    output: str = "runs/generated"

    @model_validator(mode="after")
    def _local_teacher(self) -> GenerateConfig:
        if not isinstance(self.teacher.model, HFModel):
            raise ValueError("teacher.model: `distil generate` runs a local folder: {hf: FOLDER}")
        if self.teacher.cache is not None:
            raise ValueError("teacher.cache: `distil generate` runs the teacher itself; drop it")
        return self

    @property
    def teacher_folder(self) -> str:
        assert isinstance(self.teacher.model, HFModel)
        return self.teacher.model.hf


@dataclass(frozen=True)
class GenerateResult:
    path: Path
    shards_written: int
    shards_skipped: int
    manifest: dict[str, Any]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.jsonl"


def row_seed(seed: int, prompt_id: int | str, sample: int) -> int:
    """The seed of one completion's sampler: a function of the run seed, prompt id and sample only."""
    raw = hashlib.sha256(json.dumps([seed, prompt_id, sample]).encode()).digest()
    return int.from_bytes(raw[:8], "little") & ((1 << 63) - 1)


class _TeacherDecoding:
    """A logits processor: masks ids the tokenizer lacks and, when sampling, draws each row's token.

    Hugging Face's sampler draws all rows from the global RNG, so a row's text would depend on
    its neighbours; here row ``r`` uses only its own generator and the drawn token is returned
    as the one finite score, which greedy decoding then picks (cost: a sort of ``[B, V]`` per step).
    With ``record_logprobs`` it keeps, per step, each row's log-probability of the token it
    picks under the teacher's own distribution (temperature 1, no nucleus cut), without storing
    the ``[B, V]`` logits of every step.
    """

    def __init__(
        self,
        vocab: int,
        seeds: list[int] | None,
        temperature: float,
        top_p: float,
        *,
        record_logprobs: bool = False,
    ) -> None:
        self.vocab_size, self.temperature, self.top_p = vocab, temperature, top_p
        self.generators = [torch.Generator().manual_seed(s) for s in seeds or []]
        self.record_logprobs = record_logprobs
        self.step_logprobs: list[torch.Tensor] = []  # one [B] tensor per generated step

    def _record(self, scores: torch.Tensor, chosen: torch.Tensor) -> None:
        if self.record_logprobs:
            log_probs = torch.log_softmax(scores.float(), dim=-1)  # [B, V]
            self.step_logprobs.append(log_probs.gather(-1, chosen).squeeze(-1).cpu())  # [B]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = mask_unknown_ids(scores, self.vocab_size)  # never a padded output row
        if not self.generators:
            self._record(scores, scores.argmax(dim=-1, keepdim=True))  # what greedy picks
            return scores
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)  # [B, V]
        probs, order = probs.sort(dim=-1, descending=True)  # [B, V] each
        probs = probs * ((probs.cumsum(-1) - probs) < self.top_p)  # nucleus: the top-1 always stays
        cdf = probs.double().cumsum(-1)  # [B, V]
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators])
        pick = torch.searchsorted(cdf, (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1))  # [B, 1]
        chosen = order.gather(-1, pick.clamp_max(cdf.shape[-1] - 1))  # [B, 1]
        self._record(scores, chosen)
        return torch.full_like(scores, float("-inf")).scatter_(-1, chosen, 0.0)


def eos_token_ids(tokenizer: Any, model: Any) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the generation config's."""
    found = getattr(model.generation_config, "eos_token_id", None)
    ids = {tokenizer.eos_token_id, *(found if isinstance(found, list) else [found])} - {None}
    if not ids:
        raise DistilError("neither the tokenizer nor the teacher's generation config has an EOS")
    return sorted(int(i) for i in ids)


@torch.no_grad()
def generate_shard(
    model: Any,
    tokenizer: Any,
    prompts: list[Prompt],
    prompt_ids: list[list[int]],
    settings: GenerationSettings,
    *,
    device: torch.device,
) -> tuple[bytes, dict[str, int]]:
    """The JSONL bytes of one shard and its counts (records, generated tokens, ended by EOS)."""
    from transformers import GenerationConfig, LogitsProcessorList

    n, sampling = settings.num_return_sequences, settings.sampling_temperature > 0
    rows = [(p, ids, j) for p, ids in zip(prompts, prompt_ids, strict=True) for j in range(n)]
    pad_id, eos_ids = pad_token_id_for(tokenizer), eos_token_ids(tokenizer, model)
    vocab = tokenizer_vocab_size(tokenizer)
    # Explicit neutral values, so a teacher's generation_config.json cannot add unrecorded processing.
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=False,
        num_beams=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        pad_token_id=pad_id,
        eos_token_id=eos_ids,
        use_cache=True,
    )
    lines: list[str] = []
    counts = {"records": 0, "generated_tokens": 0, "ended_by_eos": 0}
    for start in range(0, len(rows), settings.batch_size):
        batch = rows[start : start + settings.batch_size]
        width = max(len(ids) for _, ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [b, P], left-padded
        attention_mask = torch.zeros_like(input_ids)  # [b, P]
        for r, (_, ids, _) in enumerate(batch):
            input_ids[r, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[r, width - len(ids) :] = 1
        seeds = [row_seed(settings.seed, p.id, j) for p, _, j in batch] if sampling else None
        decoding = _TeacherDecoding(
            vocab,
            seeds,
            settings.sampling_temperature,
            settings.top_p,
            record_logprobs=settings.logprobs,
        )
        out = model.generate(
            input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
            logits_processor=LogitsProcessorList([decoding]),
        )
        step_logprobs = torch.stack(decoding.step_logprobs, 1) if settings.logprobs else None
        for r, (p, prompt_ids_of_row, j) in enumerate(batch):
            new = out[r, width:].tolist()
            end = next((i for i, t in enumerate(new) if t in eos_ids), None)
            kept = new if end is None else new[:end]
            counts["generated_tokens"] += len(kept) + (end is not None)
            counts["ended_by_eos"] += end is not None
            text = tokenizer.decode(kept, skip_special_tokens=True)
            # The ids as the teacher wrote them: decoding and re-encoding the text can merge
            # them into other tokens (16 "." become 8 ".."), which the teacher never produced.
            record = {
                "id": p.id,
                "prompt": p.text,
                "completion": text,
                PROMPT_IDS: list(prompt_ids_of_row),
                COMPLETION_IDS: kept,
            } | ({"sample": j} if n > 1 else {})
            if step_logprobs is not None:  # the generated ids through the first EOS
                generated = len(kept) + (end is not None)
                record["token_ids"] = new[:generated]
                record["token_logprobs"] = [
                    round(x, 6) for x in step_logprobs[r, :generated].tolist()
                ]
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    counts["records"] = len(lines)
    return "".join(lines).encode("utf-8"), counts


def _settings(cfg: GenerateConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The config values that decide the output, by dotted key (the prompts file path is not one:
    its content is, through the prompt-set fingerprint)."""
    p = cfg.prompts
    source = p.builtin or ("dataset" if p.dataset is not None else "file")
    out: dict[str, Any] = {"prompts.source": source, "prompts.limit": p.limit}
    if p.builtin is not None:
        out |= {
            "prompts.prompt_tokens": p.prompt_tokens,
            "prompts.corpus_max_bytes": p.corpus_max_bytes,
        }
    generation = cfg.generation.model_dump(mode="json")
    if not generation["logprobs"]:  # added later: folders made before it have no such key
        del generation["logprobs"]
    out |= {f"generation.{k}": v for k, v in generation.items()}
    return out | {"shard_size": cfg.shard_size, "dtype": str(dtype).removeprefix("torch.")}


def _short(value: Any) -> str:
    return repr(value)[:14] + "…" if isinstance(value, str) and len(value) > 16 else repr(value)


def _check_same(out: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    if old.get("format") != FORMAT_NAME:
        raise DistilError(
            f"{out}/{MANIFEST} is not a `distil generate` manifest; use another output"
        )
    # TOKEN_IDS too: a folder written before records carried ids is not completed with shards
    # that do, so a reader sees one kind of record per folder
    fingerprints = [
        "teacher_fingerprint",
        "tokenizer_fingerprint",
        "prompts_fingerprint",
        TOKEN_IDS,
    ]
    mine, theirs = {**new, **new["settings"]}, {**old, **old.get("settings", {})}
    keys = ["format_version", *new["settings"], *fingerprints]
    differ = [
        f"{k}: {_short(theirs.get(k))} there, {_short(mine.get(k))} now"
        for k in keys
        if theirs.get(k) != mine.get(k)
    ]
    if differ:
        raise DistilError(
            f"{out} holds generations made differently ({'; '.join(differ)}); re-run with the settings it was "
            f"made with to complete it, or choose another output folder, or delete {out} to regenerate it"
        )


def write_generations(cfg: GenerateConfig) -> GenerateResult:
    """Generate (or complete) ``cfg.output``; see the module docstring.

    Raises:
        DistilError: On a missing or empty prompt set, a teacher folder without tokenizer files,
            prompts too long for the context, or an output folder made with other settings.
    """
    out = Path(cfg.output)
    trust = cfg.teacher.model.trust_remote_code if isinstance(cfg.teacher.model, HFModel) else False
    tokenizer = load_tokenizer_folder(cfg.teacher_folder, trust_remote_code=trust)
    prompts = load_prompts(cfg.prompts, tokenizer)
    # verbose=False: prompts too long for the context are refused below, by distil
    encoded = tokenizer([p.text for p in prompts], add_special_tokens=True, verbose=False)[
        "input_ids"
    ]
    prompt_ids = [list(ids) for ids in encoded]
    empty = [p.id for p, ids in zip(prompts, prompt_ids, strict=True) if not ids]
    if empty:
        raise DistilError(f"prompt(s) {empty[:5]} tokenize to no token; remove them or add text")
    dtype = (
        None if cfg.teacher.dtype is TorchDtype.AUTO else getattr(torch, cfg.teacher.dtype.value)
    )
    model = load_causal_lm(cfg.teacher_folder, trust_remote_code=trust, dtype=dtype)
    context = model_context_length(model)
    longest = max(range(len(prompts)), key=lambda i: len(prompt_ids[i]))
    if len(prompt_ids[longest]) + cfg.generation.max_new_tokens > context:
        raise DistilError(
            f"prompt {prompts[longest].id!r} has {len(prompt_ids[longest])} tokens, + generation.max_new_tokens="
            f"{cfg.generation.max_new_tokens} exceeds the teacher's context of {context} tokens; lower "
            "max_new_tokens or prompts.prompt_tokens, or shorten the prompts"
        )
    device = torch.device(cfg.teacher.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)  # type: ignore[arg-type]  # transformers types .to() for dtypes only
    model.eval().requires_grad_(False)
    spec: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "settings": _settings(cfg, model.dtype),
        "teacher_fingerprint": teacher_fingerprint(model),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        TOKEN_IDS: [PROMPT_IDS, COMPLETION_IDS],  # record fields made by that tokenizer
        "prompts_fingerprint": prompts_fingerprint(prompts),
        "num_prompts": len(prompts),
    }
    out.mkdir(parents=True, exist_ok=True)
    entries: dict[int, dict[str, Any]] = {}
    if (out / MANIFEST).is_file():
        try:
            old = json.loads((out / MANIFEST).read_text())
        except json.JSONDecodeError as exc:
            raise DistilError(
                f"{out / MANIFEST} is not valid JSON; delete {out} to regenerate"
            ) from exc
        _check_same(out, old, spec)
        entries = {int(s["index"]): s for s in old.get("shards", [])}
    size = cfg.shard_size
    num_shards = -(-len(prompts) // size)
    remove_temp_files(out, [MANIFEST, *(shard_name(i) for i in range(num_shards))])

    def done(i: int) -> bool:
        path = out / shard_name(i)
        return i in entries and path.is_file() and sha256_file(path) == entries[i]["sha256"]

    todo = [i for i in range(num_shards) if not done(i)]
    for i in todo:
        if (out / shard_name(i)).is_file():
            why = "fails its manifest sha256" if i in entries else "has no manifest entry"
            logger.warning("%s %s; regenerating it", out / shard_name(i), why)
    g = cfg.generation
    sampled = f"sampling_temperature={g.sampling_temperature:g} top_p={g.top_p:g}"
    decoding = sampled if g.sampling_temperature > 0 else "greedy"
    logger.info(
        "generate: %d prompts in %d shards (%d done); teacher %s in %s on %s (frozen, eval, no_grad); %s, %d new tokens, %d per prompt",
        len(prompts),
        num_shards,
        num_shards - len(todo),
        cfg.teacher_folder,
        model.dtype,
        device,
        decoding,
        g.max_new_tokens,
        g.num_return_sequences,
    )
    version = getattr(distil, "__version__", "dev")
    manifest = {
        **spec,
        "teacher": cfg.teacher_folder,
        "device": str(device),
        "created_by": f"distil {version}",
    }
    written_tokens, t0 = 0, time.perf_counter()
    with progress_bar() as bar:
        left = sum(min(size, len(prompts) - i * size) for i in todo)
        task = bar.add_task(
            "generate", total=len(prompts), completed=len(prompts) - left, rate="", info=""
        )
        for i in todo:
            chunk = slice(i * size, min((i + 1) * size, len(prompts)))
            started = time.perf_counter()
            data, counts = generate_shard(
                model, tokenizer, prompts[chunk], prompt_ids[chunk], g, device=device
            )
            path = out / shard_name(i)
            atomic_write_bytes(path, data)
            entries[i] = {
                "index": i,
                "file": path.name,
                "sha256": sha256_file(path),
                "bytes": len(data),
                "prompts": chunk.stop - chunk.start,
                "first_id": prompts[chunk.start].id,
                "last_id": prompts[chunk.stop - 1].id,
                **counts,
                "seconds": round(time.perf_counter() - started, 3),
            }
            write_json_atomic(out / MANIFEST, _finish(manifest, entries, num_shards))
            written_tokens += counts["generated_tokens"]
            rate = rate_text(written_tokens, time.perf_counter() - t0, "tok")
            bar.update(task, advance=chunk.stop - chunk.start, rate=rate, info=f"shard {i}")
    manifest = _finish(manifest, entries, num_shards)
    write_json_atomic(out / MANIFEST, manifest)
    return GenerateResult(out, len(todo), num_shards - len(todo), manifest)


def _finish(
    manifest: dict[str, Any], entries: dict[int, dict[str, Any]], num_shards: int
) -> dict[str, Any]:
    shards = [entries[i] for i in sorted(entries) if i < num_shards]
    seconds = sum(s["seconds"] for s in shards)
    tokens = sum(s["generated_tokens"] for s in shards)
    counts = {
        "prompts": sum(s["prompts"] for s in shards),
        "records": sum(s["records"] for s in shards),
        "generated_tokens": tokens,
        "ended_by_eos": sum(s["ended_by_eos"] for s in shards),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None,
    }
    done = {"num_shards": num_shards, "complete": len(shards) == num_shards}
    return {**manifest, **done, "shards": shards, "counts": counts}
