"""``distil cache``: run a causal-LM teacher once over the training data and store its top-k.

For every supervised next-token position (where training computes a loss) a shard stores the
teacher's top-k log-probs at ``kd_temperature`` (fp16 or bf16), their token ids (the smallest
integer type that holds the vocabulary) and the log of the remaining tail mass. Examples are
tokenised by the same code as training (:func:`distil.data.lm.load_lm_data`) and keyed
by example id, plus a hash of their tokens, so a shuffled or resumed run finds its targets.

Shard ``i`` holds examples ``[i·S, (i+1)·S)`` of the training split in dataset order, computed in
fixed batches, so its bytes depend only on the teacher and those examples: a killed writer,
re-run with the same config, skips the shards that were finished (each written atomically, with
a sidecar ``shard-XXXXX.json`` holding its sha256) and produces byte-identical files. Several
processes (``torchrun``/``accelerate launch``, read from ``RANK``/``WORLD_SIZE``) take every
``WORLD_SIZE``-th shard; rank 0 waits for all sidecars and merges them into ``manifest.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save as safetensors_save
from torch import Tensor

import distil
from distil.cache.integrity import atomic_write_bytes, remove_temp_files, sha256_file
from distil.cache.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    SPEC,
    dataset_fingerprint,
    example_hash,
    teacher_fingerprint,
    write_json_atomic,
)
from distil.config.lm import CacheTargets, LMCacheJob
from distil.config.sources import HFModel
from distil.data.lm import IGNORE_INDEX, collate_lm_batch, load_lm_data, shift_for_next_token
from distil.errors import DistilError
from distil.losses.divergences import log_probs
from distil.losses.sparse import sample_tail_targets, sample_teacher_targets, teacher_topk
from distil.models.lm import check_model_fits, load_lm, torch_dtype
from distil.models.vocab import (
    check_teacher_tokenizer,
    load_tokenizer_folder,
    tokenizer_fingerprint,
    tokenizer_vocab_size,
)
from distil.progress import progress_bar, rate_text

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

# Spec fields that describe, but do not decide, the cache's content (the dataset fingerprint
# does): a rerun that differs only there completes the same cache.
INFORMATIONAL_FIELDS = ("created_by", "data_settings")


def id_dtype(vocab_size: int) -> torch.dtype:
    """The smallest signed-or-byte integer type that holds token ids ``< vocab_size``."""
    if vocab_size <= 256:
        return torch.uint8
    if vocab_size <= 2**15:
        return torch.int16
    return torch.int32


def position_dtype(sequence_length: int) -> torch.dtype:
    """The integer type of stored positions within an example."""
    return torch.int16 if sequence_length <= 2**15 else torch.int32


@dataclass(frozen=True)
class WriteResult:
    """What one ``write_cache`` call did.

    Attributes:
        path: The cache folder.
        shards_written: Shards computed by this call.
        shards_skipped: Shards already complete (resume).
        positions_written: Supervised positions in the shards written.
        tokens_read: Non-padding tokens the teacher read for them.
        seconds: Wall time of the shard loop.
        merged: Whether this process wrote ``manifest.json``.
    """

    path: Path
    shards_written: int
    shards_skipped: int
    positions_written: int
    tokens_read: int
    seconds: float
    merged: bool


class _OneProcess:
    """The two members of an Accelerator that ``load_lm_data`` uses, for one process."""

    is_main_process = True

    def wait_for_everyone(self) -> None:
        """Nothing to wait for."""


def shard_name(index: int) -> str:
    """File name of shard ``index``."""
    return f"shard-{index:05d}.safetensors"


def _sidecar(out: Path, index: int) -> Path:
    return out / f"shard-{index:05d}.json"


@dataclass(frozen=True)
class Sampling:
    """Importance-sampled targets instead of top-k (see ``distil.losses.sparse``).

    Attributes:
        num_samples: Ids drawn per position, with replacement.
        proposal_temperature: Temperature of the proposal; None samples from the teacher at
            ``kd_temperature`` itself (then the proposal log-probs equal the teacher's and are
            not stored).
        seed: Seeds each shard's generator with ``seed`` and the shard index, so a rewritten
            shard draws the same ids.
    """

    num_samples: int
    proposal_temperature: float | None
    seed: int


def encode_shard(
    teacher: Callable[[dict[str, Tensor]], Tensor],
    rows: dict[str, list[Any]],
    *,
    pad_token_id: int,
    k: int,
    kd_temperature: float,
    value_dtype: torch.dtype,
    vocab_size: int,
    sequence_length: int,
    batch_size: int,
    sampling: Sampling | None = None,
    shard_index: int = 0,
    tail_samples: int = 0,
    seed: int = 0,
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, Tensor], float, int]:
    """Run the teacher over one shard's examples; return its tensors, kept-mass sum and tokens read.

    Tensors (``E`` examples, ``N`` supervised positions): ``example_ids (E,)`` int64,
    ``example_hashes (E,)`` int64, ``offsets (E + 1,)`` int64 into the position axis,
    ``positions (N,)`` (index ``t`` of the logits row, whose target is token ``t + 1``), and
    either ``topk_log_probs (N, k)``, ``topk_ids (N, k)``, ``tail_log_prob (N,)`` or, with
    ``sampling``, ``sample_ids (N, n)``, ``sample_log_probs (N, n)`` and (with a proposal
    temperature) ``proposal_log_probs (N, n)``. With ``tail_samples`` (top-k only), also
    ``tail_sample_ids (N, m)`` drawn from the teacher outside the top-k and
    ``tail_sample_log_probs (N, m)``. The kept mass is that of the top-k, or of the distinct
    sampled ids. Draws use a generator seeded by ``seed`` (or ``sampling.seed``) and the shard
    index, so a rewritten shard is byte-identical. ``on_batch(examples, tokens)`` is called after
    each teacher batch (for progress).
    """
    n = len(rows["example_id"])
    parts: dict[str, list[Tensor]] = {}
    counts: list[int] = []
    mass_sum, tokens = 0.0, 0
    generator = None
    if sampling is not None or tail_samples:
        base = sampling.seed if sampling is not None else seed
        generator = torch.Generator().manual_seed(base * 1_000_003 + shard_index)
    for start in range(0, n, batch_size):
        batch = [
            {
                "example_id": rows["example_id"][i],
                "input_ids": rows["input_ids"][i],
                "labels": rows["labels"][i],
            }
            for i in range(start, min(start + batch_size, n))
        ]
        cols = collate_lm_batch(batch, pad_token_id=pad_token_id)
        logits = teacher(cols).float()  # (b, T, V)
        mask = shift_for_next_token(cols["labels"]) != IGNORE_INDEX  # (b, T) supervised positions
        tokens += int(cols["attention_mask"].sum())
        if on_batch is not None:
            on_batch(len(batch), int(cols["attention_mask"].sum()))
        pos_of = [mask[r].nonzero().squeeze(-1) for r in range(len(batch))]  # (n_r,) each
        flat_pos = torch.cat(
            [torch.full_like(p, r) * logits.shape[1] + p for r, p in enumerate(pos_of)]
        )
        rows_logits = logits.reshape(-1, logits.shape[-1])[flat_pos]  # (N_b, V) supervised only
        if sampling is None:
            top = teacher_topk(rows_logits, k, kd_temperature=kd_temperature)  # (N_b, k) each
            mass_sum += float(torch.logsumexp(top.log_probs, dim=-1).exp().sum())
            new = {
                "topk_log_probs": top.log_probs.to(value_dtype),
                "topk_ids": top.ids.to(id_dtype(vocab_size)),
                "tail_log_prob": top.tail_log_prob.to(value_dtype),
            }
            if tail_samples:
                tail_ids, tail_lp = sample_tail_targets(
                    rows_logits,
                    top.ids,
                    tail_samples,
                    kd_temperature=kd_temperature,
                    generator=generator,
                )  # (N_b, m) each
                new["tail_sample_ids"] = tail_ids.to(id_dtype(vocab_size))
                new["tail_sample_log_probs"] = tail_lp.to(value_dtype)
        else:
            drawn = sample_teacher_targets(
                rows_logits,
                sampling.num_samples,
                kd_temperature=kd_temperature,
                proposal_temperature=sampling.proposal_temperature,
                generator=generator,
            )
            probs = log_probs(rows_logits, kd_temperature).exp()  # (N_b, V)
            seen = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, drawn.ids, True)
            mass_sum += float((probs * seen).sum())
            new = {
                "sample_ids": drawn.ids.to(id_dtype(vocab_size)),
                "sample_log_probs": drawn.teacher_log_probs.to(value_dtype),
            }
            if sampling.proposal_temperature is not None:
                new["proposal_log_probs"] = drawn.proposal_log_probs.to(value_dtype)
        new["positions"] = torch.cat(pos_of).to(position_dtype(sequence_length))
        for name, tensor in new.items():
            parts.setdefault(name, []).append(tensor)
        counts.extend(int(p.numel()) for p in pos_of)
    offsets = torch.zeros(n + 1, dtype=torch.int64)  # (E + 1,)
    offsets[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0)
    tensors = {
        "example_ids": torch.tensor([int(e) for e in rows["example_id"]], dtype=torch.int64),
        "example_hashes": torch.tensor(
            [example_hash(i) for i in rows["input_ids"]], dtype=torch.int64
        ),
        "offsets": offsets,
        **{name: torch.cat(ts).contiguous() for name, ts in parts.items()},
    }
    return tensors, mass_sum, tokens


def _check_spec(out: Path, spec: dict[str, Any]) -> None:
    path = out / SPEC
    if not path.is_file():
        write_json_atomic(path, spec)
        return
    old = json.loads(path.read_text())
    differ = [
        k
        for k in sorted(set(old) | set(spec))
        if k not in INFORMATIONAL_FIELDS and old.get(k) != spec.get(k)
    ]
    if differ:
        raise DistilError(
            f"{out} holds a cache of another teacher, data or settings ({', '.join(differ)} differ); "
            "choose another cache.out, or delete the folder to rewrite it"
        )


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def merge_manifest(out: Path, spec: dict[str, Any], num_shards: int) -> dict[str, Any]:
    """Merge the shard sidecars into ``manifest.json`` (atomically) and return it.

    Raises:
        DistilError: If a sidecar is missing.
    """
    shards = []
    for i in range(num_shards):
        side = _sidecar(out, i)
        if not side.is_file():
            raise DistilError(
                f"shard {i} of {out} is not finished; re-run `distil cache` with the same config"
            )
        shards.append(json.loads(side.read_text()))
    positions = sum(s["positions"] for s in shards)
    shard_bytes = sum(s["bytes"] for s in shards)
    manifest = {
        **spec,
        "shards": shards,
        "num_examples": sum(s["examples"] for s in shards),
        "num_positions": positions,
        "total_bytes": shard_bytes,
        "bytes_per_position": shard_bytes / max(positions, 1),
        "topk_mass_mean": sum(s["topk_mass_sum"] for s in shards) / max(positions, 1),
    }
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def cache_complete(path: str | Path) -> bool:
    """Whether ``path`` holds a finished cache (its manifest is written last)."""
    return (Path(path) / MANIFEST).is_file()


class _TeacherLogits:
    """The teacher as the cache runs it: frozen, eval, no_grad, its own dtype and device, logits
    sliced to the tokenizer's vocabulary, on the CPU."""

    def __init__(
        self, model: Any, *, vocab_size: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        model.to(device=device, dtype=dtype)
        self.model = model.eval().requires_grad_(False)
        self.vocab_size, self.device, self.dtype = vocab_size, device, dtype

    def __call__(self, cols: dict[str, Tensor]) -> Tensor:
        ids, mask = cols["input_ids"].to(self.device), cols["attention_mask"].to(self.device)
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return logits[..., : self.vocab_size].cpu()  # (b, T, V)

    def describe(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return f"{type(self.model).__name__} ({n:,} params) on {self.device} in {str(self.dtype).removeprefix('torch.')}"


def write_cache(
    job: LMCacheJob, *, teacher_model: Any = None, tokenizer: Any = None
) -> WriteResult:
    """Write (or complete) the teacher cache ``job.teacher.cache``; see the module docstring.

    Args:
        job: The teacher, tokenizer, data and cache settings (an ``lm_kd`` config's).
        teacher_model: The teacher already loaded (in-run writes); loaded from the job when None.
        tokenizer: The run's tokenizer; loaded from the job when None.

    Raises:
        DistilError: On bad teacher/data input, a folder holding another cache, or ranks that
            do not finish within ``merge_timeout_s``.
    """
    c = job.teacher.cache
    if c is None:
        raise DistilError(
            "teacher.cache is not set: give it a path, e.g. teacher.cache.path=runs/teacher-cache"
        )
    out = Path(c.path)
    rank, world = _rank_world()
    if tokenizer is None:
        tokenizer_folder = job.tokenizer_folder()
        tokenizer = load_tokenizer_folder(tokenizer_folder)
        teacher_folder = job.teacher.model.hf if isinstance(job.teacher.model, HFModel) else None
        check_teacher_tokenizer(teacher_folder, tokenizer, tokenizer_folder=tokenizer_folder)
    model = (
        teacher_model
        if teacher_model is not None
        else load_lm(job.teacher.model, tokenizer, seed=job.teacher_seed)
    )
    check_model_fits(model, tokenizer, job.data.max_length, "teacher")
    vocab = tokenizer_vocab_size(tokenizer)
    if c.k > vocab:
        raise DistilError(
            f"teacher.cache.k={c.k} exceeds the vocabulary ({vocab} ids); set teacher.cache.k <= {vocab}"
        )
    out.mkdir(parents=True, exist_ok=True)  # only now: a refused config leaves no folder behind
    data = load_lm_data(job.data, tokenizer, out / "work", _OneProcess())
    train: datasets.Dataset = data.train
    kd_temperature = c.kd_temperature if c.kd_temperature is not None else job.kd_temperature
    dtype = torch_dtype(job.teacher.dtype, model.dtype)
    device = torch.device(
        c.device or job.teacher.device or ("cuda" if torch.cuda.is_available() else "cpu")
    )
    value_dtype = getattr(torch, c.value_dtype.value)
    teacher = _TeacherLogits(model, vocab_size=vocab, device=device, dtype=dtype)
    sampled = c.targets is CacheTargets.SAMPLED
    sampling = Sampling(c.num_samples, c.proposal_temperature, job.seed) if sampled else None
    value_name, id_name = c.value_dtype.value, str(id_dtype(vocab)).removeprefix("torch.")
    spec: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": "lm_sampled" if sampled else "lm_topk",
        "teacher_fingerprint": teacher_fingerprint(teacher.model),  # after the cast: weights as run
        "teacher_dtype": str(dtype).removeprefix("torch."),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "dataset_fingerprint": dataset_fingerprint(train),
        "vocab_size": vocab,
        "sequence_length": job.data.max_length,
        "k": c.num_samples if sampled else c.k,  # ids stored per position
        "kd_temperature": kd_temperature,
        "dtypes": {
            **(
                {"sample_log_probs": value_name, "sample_ids": id_name}
                | ({"proposal_log_probs": value_name} if c.proposal_temperature is not None else {})
                if sampled
                else {
                    "topk_log_probs": value_name,
                    "tail_log_prob": value_name,
                    "topk_ids": id_name,
                }
                | (
                    {"tail_sample_ids": id_name, "tail_sample_log_probs": value_name}
                    if c.tail_samples
                    else {}
                )
            ),
            "positions": str(position_dtype(job.data.max_length)).removeprefix("torch."),
            "example_ids": "int64",
        },
        "examples_per_shard": c.examples_per_shard,
        "forward_batch_size": c.batch_size,
        "split": "train",
        **(
            {"proposal_temperature": c.proposal_temperature, "sampling_seed": job.seed}
            if sampled
            else {}
        ),
        **(
            {"tail_samples": c.tail_samples, "sampling_seed": job.seed}
            if c.tail_samples and not sampled
            else {}
        ),
        "created_by": f"distil {getattr(distil, '__version__', 'dev')}",
        # the settings that made the dataset, so a run whose data differs is told which to match
        "data_settings": {f"data.{k}": v for k, v in job.data.model_dump(mode="json").items()},
    }
    if rank == 0:
        _check_spec(out, spec)
    n = len(train)
    num_shards = math.ceil(n / c.examples_per_shard)
    mine = [i for i in range(num_shards) if i % world == rank]
    todo = [i for i in mine if not (_sidecar(out, i).is_file() and (out / shard_name(i)).is_file())]
    own = [n for i in mine for n in (shard_name(i), _sidecar(out, i).name)]
    if remove_temp_files(out, [*own, *([SPEC, MANIFEST] if rank == 0 else [])]):
        logger.info("removed temp files of an interrupted writer in %s", out)
    logger.info(
        "cache: %d examples in %d shards (%d done, %d to write on rank %d/%d); teacher %s; k=%d %s at kd_temperature=%g",
        n,
        num_shards,
        len(mine) - len(todo),
        len(todo),
        rank,
        world,
        teacher.describe(),
        c.k,
        c.value_dtype.value,
        kd_temperature,
    )
    positions_written = tokens_read = 0
    t0 = time.perf_counter()
    read = [0]  # tokens the teacher read so far, for the rate

    def shard_size(i: int) -> int:
        return min((i + 1) * c.examples_per_shard, n) - i * c.examples_per_shard

    with progress_bar(rank == 0) as bar:
        task = bar.add_task(  # moves per teacher batch, in examples
            "cache",
            total=sum(shard_size(i) for i in mine),
            completed=sum(shard_size(i) for i in mine if i not in todo),
            rate="",
            info="",
        )
        for i in todo:

            def batch_done(examples: int, tokens: int, i: int = i) -> None:
                read[0] += tokens
                rate = rate_text(read[0], time.perf_counter() - t0, "tok")
                bar.update(task, advance=examples, rate=rate, info=f"shard {i}")

            lo, hi = i * c.examples_per_shard, min((i + 1) * c.examples_per_shard, n)
            tensors, mass_sum, tokens = encode_shard(
                teacher,
                train[lo:hi],
                pad_token_id=data.pad_token_id,
                k=c.k,
                kd_temperature=kd_temperature,
                value_dtype=value_dtype,
                vocab_size=vocab,
                sequence_length=job.data.max_length,
                batch_size=c.batch_size,
                sampling=sampling,
                shard_index=i,
                tail_samples=0 if sampled else c.tail_samples,
                seed=job.seed,
                on_batch=batch_done,
            )
            path = out / shard_name(i)
            # One metadata key only: safetensors writes a metadata map in hash order, which varies
            # between processes, and resumed shards must be byte-identical.
            atomic_write_bytes(path, safetensors_save(tensors, metadata={"format": FORMAT_NAME}))
            ids = tensors["example_ids"]
            write_json_atomic(
                _sidecar(out, i),
                {
                    "index": i,
                    "file": path.name,
                    "sha256": sha256_file(path),
                    "bytes": path.stat().st_size,
                    "examples": hi - lo,
                    "first_index": lo,
                    "positions": int(tensors["positions"].numel()),
                    "min_example_id": int(ids.min()),
                    "max_example_id": int(ids.max()),
                    "topk_mass_sum": mass_sum,
                },
            )
            positions_written += int(tensors["positions"].numel())
            tokens_read += tokens

    seconds = time.perf_counter() - t0
    merged = False
    if rank == 0:
        deadline = time.monotonic() + c.merge_timeout_s
        while world > 1 and not all(_sidecar(out, i).is_file() for i in range(num_shards)):
            if time.monotonic() > deadline:
                raise DistilError(
                    f"other ranks did not finish their shards of {out} within teacher.cache.merge_timeout_s={c.merge_timeout_s:g}; "
                    "re-run `distil cache` with the same config to complete it"
                )
            time.sleep(0.2)
        manifest = merge_manifest(out, spec, num_shards)
        merged = True
        logger.info(
            "cache: %s holds %d positions in %d shards, %.1f bytes per position, top-%d mass %.4f",
            out,
            manifest["num_positions"],
            num_shards,
            manifest["bytes_per_position"],
            c.k,
            manifest["topk_mass_mean"],
        )
    return WriteResult(
        out, len(todo), len(mine) - len(todo), positions_written, tokens_read, seconds, merged
    )
