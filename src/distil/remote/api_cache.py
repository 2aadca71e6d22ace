"""``distil cache from-api``: an endpoint's ``top_logprobs`` as a distil teacher cache.

When the server returned the top-k log-probs of every generated token, the records of an
endpoint ``distil generate`` folder hold, per position, the teacher's k most likely tokens and
their log-probs. This module turns them into what ``lm_kd teacher.cache.path=…`` reads: the cache
format of ``distil cache`` (kind ``lm_topk``: top-k log-probs, their ids and the log of the tail
mass ``log(1 − Σ top-k)``, at ``kd_temperature`` 1, the temperature servers report), plus the
prompt/completion files whose tokens the cache is aligned with. No peer does this: token-level
KD from a teacher you cannot load.

Alignment, per record (``L`` returned tokens ``y_1..y_L`` with distributions ``d_1..d_L``,
``d_i = p(· | prompt, y_<i)``): ``lm_kd`` trains on ``prompt + completion + EOS`` and supervises
the completion and the EOS. So the completion written is ``y_1..y_{L-1}`` and the targets are
all ``L`` distributions: ``d_i`` at the position predicting ``y_i`` and ``d_L`` at the position
predicting the EOS. When ``y_L`` is the EOS (``distil serve`` reports it) this is exactly the
teacher's ending; when the answer was cut by ``max_tokens`` (or the server leaves the EOS out),
the last token is dropped and ``d_L`` is the teacher's distribution where the EOS now stands.
No target is invented. ``lm_kd`` reads text, so a completion whose tokens the tokenizer would
split differently when re-reading the text is cut at its longest prefix that round-trips (the
distribution at the cut becomes the EOS target); a trained teacher rarely needs it.

A record is left out (counted by reason, never silently) when a token string does not map to
one id of the tokenizer (servers that write ``token_id:N``, as ``distil serve`` and vLLM do with
``return_tokens_as_token_ids``, are exact), a position has fewer than k alternatives, the
prompt tokenises to another length than the server counted, or the example exceeds
``max_length``.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_save

import distil
from distil.cache.manifest import (
    FORMAT_NAME as CACHE_FORMAT,
)
from distil.cache.manifest import (
    FORMAT_VERSION as CACHE_VERSION,
)
from distil.cache.manifest import (
    dataset_fingerprint,
    example_hash,
    write_json_atomic,
)
from distil.errors import DistilError
from distil.storage import atomic_write_bytes, sha256_file

logger = logging.getLogger(__name__)

TOKEN_ID_PREFIX = "token_id:"


@dataclass(frozen=True)
class Targets:
    """One example's teacher targets (``n`` supervised positions, top ``k``).

    Attributes:
        positions: ``(n,)`` logits-row indices (their target is token ``t + 1``).
        log_probs: ``(n, k)`` teacher log-probs, best first.
        ids: ``(n, k)`` token ids.
        tail_log_prob: ``(n,)`` ``log(1 − Σ exp(log_probs))``.
    """

    positions: torch.Tensor
    log_probs: torch.Tensor
    ids: torch.Tensor
    tail_log_prob: torch.Tensor


@dataclass(frozen=True)
class ConversionResult:
    """What ``from_api`` wrote and what it left out."""

    out: Path
    train_file: Path
    eval_file: Path | None
    cache: Path
    examples: int
    eval_examples: int
    positions: int
    excluded: Counter[str]
    cut: Counter[str]


class TokenTable:
    """Token strings as servers write them → ids: ``token_id:N``, else the decoded text of one
    token when exactly one id decodes to it."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        seen: dict[str, int | None] = {}
        for i in range(vocab_size):
            text = tokenizer.decode([i])
            seen[text] = None if text in seen else i
        self.by_text = seen
        self.vocab_size = vocab_size

    def id_of(self, token: str) -> int | None:
        """The id, or None when unknown or ambiguous."""
        if token.startswith(TOKEN_ID_PREFIX):
            try:
                value = int(token[len(TOKEN_ID_PREFIX) :])
            except ValueError:
                return None
            return value if 0 <= value < self.vocab_size else None
        return self.by_text.get(token)


def _tail(top_log_probs: torch.Tensor) -> torch.Tensor:
    """``log(1 − Σ exp)`` over the last dim, in float64 (``-inf`` when the top-k hold it all)."""
    mass = torch.logsumexp(top_log_probs.double(), dim=-1)  # (n,)
    safe = torch.where(mass < 0, mass, torch.full_like(mass, -1.0))
    tail = torch.where(
        safe > -math.log(2.0), torch.log(-torch.expm1(safe)), torch.log1p(-torch.exp(safe))
    )
    return torch.where(mass < 0, tail, torch.full_like(tail, float("-inf")))


def record_example(
    record: Mapping[str, Any],
    prompt_text: str,
    *,
    tokenizer: Any,
    table: TokenTable,
    k: int,
    max_length: int,
) -> tuple[list[int], list[int], Targets] | str:
    """Prompt ids, completion ids and targets of one record, or why it cannot be used."""
    lp = record.get("logprobs")
    if not isinstance(lp, dict) or not lp.get("tokens"):
        return "no logprobs"
    chosen = [table.id_of(t) for t in lp["tokens"]]
    if any(c is None for c in chosen):
        return "token string not in the vocabulary (or ambiguous)"
    top_ids, top_lps = [], []
    for position in lp["top"]:
        if len(position) < k:
            return f"fewer than k={k} alternatives at a position"
        ids = [table.id_of(a["token"]) for a in position[:k]]
        if any(i is None for i in ids) or len(set(ids)) != k:
            return "token string not in the vocabulary (or ambiguous)"
        top_ids.append(ids)
        top_lps.append([float(a["logprob"]) for a in position[:k]])
    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=True)["input_ids"])
    if len(prompt_ids) != int(record["usage"]["prompt_tokens"]):
        return "prompt tokenises to another length than the server counted"
    completion_ids = longest_retokenisable_prefix(
        tokenizer, [int(c) for c in chosen[:-1] if c is not None]
    )
    n = len(completion_ids) + 1  # supervised positions: the completion's tokens and the EOS
    if len(prompt_ids) + n > max_length:
        return f"longer than max_length={max_length}"
    start = len(prompt_ids) - 1
    log_probs = torch.tensor(top_lps[:n], dtype=torch.float32)  # (n, k)
    targets = Targets(
        positions=torch.arange(start, start + n, dtype=torch.int64),
        log_probs=log_probs,
        ids=torch.tensor(top_ids[:n], dtype=torch.int64),
        tail_log_prob=_tail(log_probs).float(),
    )
    return prompt_ids, completion_ids, targets


def longest_retokenisable_prefix(tokenizer: Any, ids: list[int]) -> list[int]:
    """The longest prefix of ``ids`` whose decoded text tokenises back to exactly it.

    ``lm_kd`` reads text, so a sampled token sequence that the tokenizer would split
    differently (rare for a trained teacher, common for a random one) is cut where it stops
    round-tripping; the teacher's distribution at the cut becomes the EOS position's target.
    """
    for m in range(len(ids), -1, -1):
        text = tokenizer.decode(ids[:m])
        if list(tokenizer(text, add_special_tokens=False)["input_ids"]) == ids[:m]:
            return ids[:m]
    return []


def _generated_records(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from distil.data.generated import generated_shard_files

    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise DistilError(f"{folder} has no manifest.json: give a `distil generate` output folder")
    manifest = json.loads(manifest_path.read_text())
    files = generated_shard_files(folder)
    if files is None or manifest.get("mode") != "endpoint":
        raise DistilError(
            f"{folder} is not the output of `distil generate` with an endpoint teacher"
        )
    if not str(manifest.get("signal", "")).startswith("text+top_logprobs"):
        raise DistilError(
            f"{folder} holds text only (signal {manifest.get('signal')!r}): the server returned no "
            "top_logprobs, or generation.top_logprobs was 0. Train on the text (sequence-level KD: "
            f"distil run lm_kd 'data.source={{train: [{folder}]}}' data.format=prompt_completion), or "
            "generate again with generation.top_logprobs=k from a server that returns them"
        )
    records = [json.loads(line) for f in files for line in f.read_text().splitlines() if line]
    return manifest, records


def from_api(
    generated: Path,
    out: Path,
    *,
    tokenizer_path: Path,
    max_length: int,
    eval_fraction: float = 0.05,
    examples_per_shard: int = 256,
    value_dtype: torch.dtype = torch.float16,
) -> ConversionResult:
    """Write ``out/train.jsonl``, ``out/eval.jsonl`` and the cache ``out/cache`` (see module doc).

    Args:
        generated: A finished endpoint ``distil generate`` folder whose records hold log-probs.
        out: A new folder.
        tokenizer_path: The teacher's tokenizer (the student's too: token-level KD needs one vocab).
        max_length: ``data.max_length`` of the ``lm_kd`` run (the cache records it).
        eval_fraction: The last fraction of examples goes to ``eval.jsonl`` (no targets needed).
        examples_per_shard: Examples per cache shard.
        value_dtype: Storage of log-probs (float16 or bfloat16).

    Raises:
        DistilError: On a folder without log-probs, an existing ``out``, a tokenizer other than
            the one the server reports, or no usable record.
    """
    from distil.cache.writer import id_dtype, merge_manifest, position_dtype, shard_name
    from distil.data.lm import LMDataFormat, LMDataOptions, build_lm_dataset, load_local_records
    from distil.models.vocab import (
        load_tokenizer_folder,
        tokenizer_fingerprint,
        tokenizer_vocab_size,
    )

    if out.exists() and any(out.iterdir()):
        raise DistilError(f"{out} exists and is not empty; choose another --out or delete it")
    manifest, records = _generated_records(generated)
    tokenizer = load_tokenizer_folder(tokenizer_path)
    vocab = tokenizer_vocab_size(tokenizer)
    fingerprint = tokenizer_fingerprint(tokenizer)
    served = (manifest.get("server") or {}).get("distil") or {}
    if served.get("tokenizer_fingerprint") not in (None, fingerprint):
        raise DistilError(
            f"the server reported another tokenizer than {tokenizer_path} (fingerprints "
            f"{served['tokenizer_fingerprint'][:12]}… vs {fingerprint[:12]}…); give the teacher's tokenizer"
        )
    if tokenizer.eos_token_id is None:
        raise DistilError(f"the tokenizer in {tokenizer_path} has no EOS token")
    k = int(manifest["settings"]["generation"]["top_logprobs"])
    chat = manifest["teacher"]["api"] == "chat"
    table = TokenTable(tokenizer, vocab)
    rows: list[dict[str, Any]] = []
    targets: list[Targets] = []
    excluded: Counter[str] = Counter()
    cut: Counter[str] = Counter()
    for record in records:
        prompt_text = record["prompt"]
        if chat:  # the prompt the server tokenised: the chat template up to the answer
            prompt_text = str(
                tokenizer.apply_chat_template(
                    record["messages"][:-1], tokenize=False, add_generation_prompt=True
                )
            )
        made = record_example(
            record,
            prompt_text,
            tokenizer=tokenizer,
            table=table,
            k=k,
            max_length=max_length,
        )
        if isinstance(made, str):
            excluded[made] += 1
            continue
        _, completion_ids, t = made
        if len(completion_ids) + 1 < len(record["logprobs"]["tokens"]):
            cut["completions cut to their longest re-tokenisable prefix"] += 1
        rows.append(
            {
                "example_id": len(rows),
                "prompt": prompt_text,
                "completion": tokenizer.decode(completion_ids),
                "source_key": record["key"],
            }
        )
        targets.append(t)
    if len(rows) < 2:
        raise DistilError(
            f"only {len(rows)} of {len(records)} records could be aligned with the tokenizer "
            f"({dict(excluded)}); check --tokenizer and that the server returns token ids"
        )
    n_eval = max(1, round(len(rows) * eval_fraction)) if eval_fraction > 0 else 0
    train_rows, eval_rows = rows[: len(rows) - n_eval], rows[len(rows) - n_eval :]
    out.mkdir(parents=True, exist_ok=True)
    train_file = out / "train.jsonl"
    atomic_write_bytes(train_file, _jsonl(train_rows))
    eval_file = None
    if eval_rows:
        eval_file = out / "eval.jsonl"
        atomic_write_bytes(eval_file, _jsonl(eval_rows))
    # the dataset exactly as lm_kd builds it from these files: its fingerprint and token ids
    options = LMDataOptions(data_format=LMDataFormat.PROMPT_COMPLETION, max_length=max_length)
    with tempfile.TemporaryDirectory(prefix="distil-from-api-") as tmp:
        records_ds = load_local_records([train_file], cache_dir=Path(tmp))
        dataset = build_lm_dataset(records_ds, tokenizer, options)
    for row, t, example in zip(train_rows, targets, dataset, strict=False):
        ids = example["input_ids"]
        if example["example_id"] != row["example_id"] or len(ids) != int(t.positions[-1]) + 2:
            raise DistilError(
                f"internal: example {row['example_id']} is not aligned with its targets"
            )
    cache = out / "cache"
    cache.mkdir()
    value_name = str(value_dtype).removeprefix("torch.")
    id_name = str(id_dtype(vocab)).removeprefix("torch.")
    spec: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "format_version": CACHE_VERSION,
        "kind": "lm_topk",
        "teacher_fingerprint": served.get("teacher_fingerprint")
        or f"remote:{manifest['teacher']['base_url']}#{manifest['teacher']['model']}",
        "teacher_dtype": served.get("dtype", "unknown"),
        "tokenizer_fingerprint": fingerprint,
        "dataset_fingerprint": dataset_fingerprint(dataset),
        "vocab_size": vocab,
        "sequence_length": max_length,
        "k": k,
        "kd_temperature": 1.0,
        "dtypes": {
            "topk_log_probs": value_name,
            "tail_log_prob": value_name,
            "topk_ids": id_name,
            "positions": str(position_dtype(max_length)).removeprefix("torch."),
            "example_ids": "int64",
        },
        "examples_per_shard": examples_per_shard,
        "forward_batch_size": 0,
        "split": "train",
        "source": {
            "kind": "api",
            "generated": str(generated),
            "teacher": manifest["teacher"],
            "records": len(records),
            "excluded": dict(excluded),
            "cut": dict(cut),
        },
        "created_by": f"distil {getattr(distil, '__version__', 'dev')}",
    }
    num_shards = math.ceil(len(train_rows) / examples_per_shard)
    positions_total = 0
    for s in range(num_shards):
        lo, hi = s * examples_per_shard, min((s + 1) * examples_per_shard, len(train_rows))
        part = targets[lo:hi]
        counts = torch.tensor([int(t.positions.numel()) for t in part], dtype=torch.int64)
        offsets = torch.zeros(len(part) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(counts, 0)
        tensors = {
            "example_ids": torch.tensor(
                [r["example_id"] for r in train_rows[lo:hi]], dtype=torch.int64
            ),
            "example_hashes": torch.tensor(
                [example_hash(dataset[i]["input_ids"]) for i in range(lo, hi)], dtype=torch.int64
            ),
            "offsets": offsets,
            "positions": torch.cat([t.positions for t in part]).to(position_dtype(max_length)),
            "topk_log_probs": torch.cat([t.log_probs for t in part]).to(value_dtype),
            "topk_ids": torch.cat([t.ids for t in part]).to(id_dtype(vocab)),
            "tail_log_prob": torch.cat([t.tail_log_prob for t in part]).to(value_dtype),
        }
        path = cache / shard_name(s)
        atomic_write_bytes(path, safetensors_save(tensors, metadata={"format": CACHE_FORMAT}))
        mass = float(torch.logsumexp(tensors["topk_log_probs"].float(), dim=-1).exp().sum())
        write_json_atomic(
            cache / f"shard-{s:05d}.json",
            {
                "index": s,
                "file": path.name,
                "sha256": sha256_file(path),
                "bytes": path.stat().st_size,
                "examples": hi - lo,
                "first_index": lo,
                "positions": int(counts.sum()),
                "min_example_id": lo,
                "max_example_id": hi - 1,
                "topk_mass_sum": mass,
            },
        )
        positions_total += int(counts.sum())
    merge_manifest(cache, spec, num_shards)
    if excluded:
        logger.warning(
            "from-api: left out %d of %d records: %s",
            sum(excluded.values()),
            len(records),
            dict(excluded),
        )
    return ConversionResult(
        out,
        train_file,
        eval_file,
        cache,
        len(train_rows),
        len(eval_rows),
        positions_total,
        excluded,
        cut,
    )


def _jsonl(rows: Sequence[Mapping[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
