"""Teacher-output cache: format, exactness against the live teacher, lookup by id, integrity."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from distil.cache import CacheIntegrityError, CacheMismatchError, CacheReader
from distil.cache.integrity import sha256_file
from distil.cache.manifest import RUN_FIELDS, read_manifest
from distil.cache.writer import write_cache
from distil.config.lm import LMCacheJob
from distil.data.lm import shift_for_next_token
from distil.errors import DistilError
from distil.losses.objective import token_objective
from distil.losses.sparse import teacher_topk, topk_divergence
from distil.models.lm import build_from_spec, load_lm
from distil.models.vocab import load_tokenizer_folder, tokenizer_vocab_size
from distil.teachers import LiveLMTeacher, Teacher, TeacherSignal
from distil.teachers.cached import CachedTeacher
from tests.helpers import CACHE_SPEC as SPEC
from tests.helpers import write_fixture


def cache_config(root: Path, out: Path, **cache: Any) -> LMCacheJob:
    """A cache job over the fixture: 48 examples of 24 tokens, 16 per shard."""
    return LMCacheJob.model_validate(
        {
            "tokenizer": str(root / "tok"),
            "data": {
                "source": {"train": [str(root / "text.jsonl")]},
                "max_length": 24,
                "train_limit": 48,
            },
            "teacher": {
                "model": {"spec": SPEC},
                "cache": {
                    "path": str(out),
                    "examples_per_shard": 16,
                    "batch_size": 8,
                    "device": "cpu",
                    **cache,
                },
            },
        }
    )


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared machine: a second thread mostly waits
    root = tmp_path_factory.mktemp("cache")
    write_fixture(root)
    cfg = cache_config(root, root / "k8", k=8, kd_temperature=2.0)
    write_cache(cfg)
    tok = load_tokenizer_folder(root / "tok")
    teacher_model = load_lm(cfg.teacher.model, tok, seed=cfg.teacher_seed)
    vocab = tokenizer_vocab_size(tok)
    live = LiveLMTeacher(
        teacher_model,
        vocab_size=vocab,
        device=torch.device("cpu"),
        dtype=torch.float32,
        output_device=torch.device("cpu"),
    )
    from distil.cache.writer import _OneProcess
    from distil.data.lm import load_lm_data

    data = load_lm_data(cfg.data, tok, root / "work", _OneProcess())
    yield {"root": root, "cfg": cfg, "live": live, "data": data, "vocab": vocab, "tok": tok}
    torch.set_num_threads(threads)


def batch_of(fx: dict[str, Any], indices: list[int]) -> dict[str, torch.Tensor]:
    return fx["data"].collate(fx["data"].train, indices)


def test_manifest_records_format_fingerprints_and_shards(fx: dict[str, Any]) -> None:
    out = fx["root"] / "k8"
    m = read_manifest(out)
    for field in (*RUN_FIELDS, "format_version", "k", "dtypes", "shards", "teacher_dtype"):
        assert field in m, field
    assert (m["k"], m["kd_temperature"], m["sequence_length"]) == (8, 2.0, 24)
    assert m["dtypes"]["topk_log_probs"] == "float16" and m["dtypes"]["topk_ids"] == "int16"
    assert len(m["shards"]) == 3 and m["num_examples"] == 48
    for s in m["shards"]:
        assert sha256_file(out / s["file"]) == s["sha256"]
        t = load_file(out / s["file"])
        assert t["topk_log_probs"].dtype == torch.float16 and t["topk_ids"].dtype == torch.int16
        assert (int(t["example_ids"].min()), int(t["example_ids"].max())) == (
            s["min_example_id"],
            s["max_example_id"],
        )
    # one supervised position per next-token target of the data
    assert m["num_positions"] == int(fx["data"].targets_per_example.sum())
    assert m["bytes_per_position"] < 8 * 4 + 8  # k·(2 + 2) + tail + position + per-example index
    assert 0 < m["topk_mass_mean"] <= 1


def test_cached_teacher_satisfies_protocol_and_rejects_mismatches(fx: dict[str, Any]) -> None:
    out = fx["root"] / "k8"
    teacher = CachedTeacher(out, expect={"kd_temperature": 2.0, "sequence_length": 24})
    assert isinstance(teacher, Teacher)
    assert "top-8" in teacher.describe()
    for field, value in (
        ("kd_temperature", 1.0),
        ("sequence_length", 32),
        ("tokenizer_fingerprint", "0" * 64),
        ("dataset_fingerprint", "f" * 64),
    ):
        with pytest.raises(CacheMismatchError, match=field):
            CachedTeacher(out, expect={field: value})


def test_topk_cache_loss_equals_sparse_loss_from_live_teacher(fx: dict[str, Any]) -> None:
    teacher = CachedTeacher(fx["root"] / "k8")
    cols = batch_of(fx, [5, 17, 40, 2])
    targets = shift_for_next_token(cols["labels"])
    mask = targets != -100
    cached = teacher.targets(cols["input_ids"], cols["attention_mask"], cols["example_id"])
    assert torch.equal(cached.mask, mask)
    live_logits = fx["live"](cols).logits
    live = teacher_topk(live_logits, 8, kd_temperature=2.0)
    student = torch.randn(*live_logits.shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cached.topk.ids[mask], live.ids[mask])
    for div in ("forward_kl", "reverse_kl"):
        got = topk_divergence(
            student,
            cached.topk.log_probs,
            cached.topk.ids,
            mask,
            teacher_tail_log_prob=cached.topk.tail_log_prob,
            divergence=div,
            kd_temperature=2.0,
        )
        want = topk_divergence(
            student,
            live.log_probs,
            live.ids,
            mask,
            teacher_tail_log_prob=live.tail_log_prob,
            divergence=div,
            kd_temperature=2.0,
        )
        torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-4)  # fp16 storage rounding


@pytest.mark.parametrize("value_dtype", ["float16", "bfloat16"])
def test_full_vocab_cache_reproduces_live_teacher_loss(
    fx: dict[str, Any], value_dtype: str
) -> None:
    out = fx["root"] / f"full-{value_dtype}"
    write_cache(
        cache_config(fx["root"], out, k=fx["vocab"], value_dtype=value_dtype, kd_temperature=2.0)
    )
    teacher = CachedTeacher(out, signal=TeacherSignal.LOGITS)  # dense logits rebuilt from top-k
    cols = batch_of(fx, [0, 33, 47])
    targets = shift_for_next_token(cols["labels"])
    live_logits = fx["live"](cols).logits
    cached_logits = teacher(  # by token hash: no example_id
        {"input_ids": cols["input_ids"], "attention_mask": cols["attention_mask"]}
    ).logits
    student = torch.randn(*live_logits.shape, generator=torch.Generator().manual_seed(1))
    kw: dict[str, Any] = {"kd_weight": 1.0, "kd_temperature": 2.0}
    want = token_objective(student, live_logits, targets, **kw).loss
    got = token_objective(student, cached_logits, targets, **kw).loss
    # fp16 keeps ~3 decimal digits of each log-prob, bf16 ~2
    torch.testing.assert_close(
        got, want, rtol=2e-3 if value_dtype == "float16" else 2e-2, atol=1e-3
    )


def test_shuffled_and_resumed_reading_gets_each_examples_targets(fx: dict[str, Any]) -> None:
    out = fx["root"] / "k8"
    order = torch.randperm(48, generator=torch.Generator().manual_seed(3)).tolist()
    batches = [order[i : i + 6] for i in range(0, 48, 6)]
    teacher = CachedTeacher(out, max_loaded_shards=1)  # every batch crosses shards: evictions
    for b, idx in enumerate(batches):
        if b == 4:  # "resume": a fresh reader in the middle of the epoch
            teacher = CachedTeacher(out, max_loaded_shards=1)
        cols = batch_of(fx, idx)
        by_id = teacher.targets(cols["input_ids"], cols["attention_mask"], cols["example_id"])
        by_tokens = teacher.targets(cols["input_ids"], cols["attention_mask"])
        live = teacher_topk(fx["live"](cols).logits, 8, kd_temperature=2.0)
        mask = by_id.mask
        assert torch.equal(mask, shift_for_next_token(cols["labels"]) != -100)
        assert torch.equal(by_id.topk.ids, by_tokens.topk.ids)
        assert torch.equal(by_id.topk.ids[mask], live.ids[mask])
        torch.testing.assert_close(
            by_id.topk.log_probs[mask], live.log_probs[mask], rtol=1e-3, atol=1e-3
        )


def test_wrong_example_id_or_unknown_tokens_are_errors(fx: dict[str, Any]) -> None:
    teacher = CachedTeacher(fx["root"] / "k8")
    cols = batch_of(fx, [1, 2])
    with pytest.raises(DistilError, match="other tokens than the cached example"):
        teacher.targets(cols["input_ids"], cols["attention_mask"], cols["example_id"].flip(0))
    with pytest.raises(DistilError, match="not in the cache"):
        teacher.targets(cols["input_ids"], cols["attention_mask"], torch.tensor([10_000, 1]))
    with pytest.raises(DistilError, match="not in the teacher cache"):
        teacher.targets(cols["input_ids"].flip(1), cols["attention_mask"])


def test_corrupt_or_truncated_shard_is_named(fx: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(fx["root"] / "k8", out)
    shard = out / "shard-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF  # flip a value byte: the file still parses
    shard.write_bytes(bytes(raw))
    # found when the cache is opened, before any step reads shard 1
    with pytest.raises(CacheIntegrityError, match="shard-00001.safetensors fails its checksum"):
        CacheReader(out)
    reader = CacheReader(out, verify=False)  # opened unchecked: found when first read
    reader.get(0)  # shard 0 is fine
    problems = reader.verify_all()
    assert len(problems) == 1 and "shard-00001" in problems[0]
    (out / "shard-00002.safetensors").write_bytes(b"")  # truncated to nothing
    with pytest.raises(CacheIntegrityError, match="shard-00002.safetensors"):
        CacheReader(out, verify=False)


def test_cache_refuses_a_tokenizer_that_is_not_the_teachers(
    fx: dict[str, Any], tmp_path: Path
) -> None:
    from distil.data.corpus import stdlib_root, train_bpe_tokenizer_from_texts
    from distil.models.lm import save_model_folder

    teacher_dir = tmp_path / "teacher"
    save_model_folder(
        load_lm(fx["cfg"].teacher.model, fx["tok"], seed=0), teacher_dir, tokenizer=fx["tok"]
    )
    other = (stdlib_root() / "bisect.py").read_text(encoding="utf-8")[:3000]
    train_bpe_tokenizer_from_texts([other], tmp_path / "other-tok", 300)
    data = fx["cfg"].model_dump(mode="json")

    def job(tokenizer: Path, out: Path) -> LMCacheJob:
        teacher = data["teacher"] | {
            "model": {"hf": str(teacher_dir)},
            "cache": data["teacher"]["cache"] | {"path": str(out)},
        }
        return LMCacheJob.model_validate(data | {"tokenizer": str(tokenizer), "teacher": teacher})

    out = tmp_path / "cache"
    with pytest.raises(DistilError, match="not the teacher's"):
        write_cache(job(tmp_path / "other-tok", out))
    assert not out.exists()  # refused before anything was written
    # the teacher's own tokenizer, named explicitly, is fine
    assert write_cache(job(teacher_dir, tmp_path / "ok")).shards_written > 0


def test_rewriting_a_folder_with_other_settings_is_refused(fx: dict[str, Any]) -> None:
    with pytest.raises(DistilError, match="k differ"):
        write_cache(cache_config(fx["root"], fx["root"] / "k8", k=4, kd_temperature=2.0))
    again = write_cache(cache_config(fx["root"], fx["root"] / "k8", k=8, kd_temperature=2.0))
    assert (again.shards_written, again.shards_skipped) == (0, 3)


@pytest.mark.parametrize("proposal_temperature", [None, 3.0])
def test_sampled_cache_gives_the_live_teachers_sampled_loss(
    fx: dict[str, Any], proposal_temperature: float | None
) -> None:
    from distil.losses.divergences import log_probs
    from distil.losses.sparse import sampled_divergence

    out = fx["root"] / f"sampled-{proposal_temperature}"
    cfg = cache_config(
        fx["root"],
        out,
        targets="sampled",
        num_samples=6,
        kd_temperature=2.0,
        proposal_temperature=proposal_temperature,
    )
    write_cache(cfg)
    m = read_manifest(out)
    assert m["kind"] == "lm_sampled" and m["k"] == 6
    assert ("proposal_log_probs" in m["dtypes"]) == (proposal_temperature is not None)
    assert m["bytes_per_position"] < 6 * 4 * (1.5 if proposal_temperature else 1) + 8
    teacher = CachedTeacher(out)
    cols = batch_of(fx, [3, 30, 44])
    mask = shift_for_next_token(cols["labels"]) != -100
    cached = teacher.sampled_targets(cols["input_ids"], cols["attention_mask"], cols["example_id"])
    assert torch.equal(cached.mask, mask)
    live_logits = fx["live"](cols).logits
    ids = cached.samples.ids
    live_lp = log_probs(live_logits, 2.0).gather(-1, ids)  # (B, T, n)
    live_lr = (
        live_lp
        if proposal_temperature is None
        else log_probs(live_logits, proposal_temperature).gather(-1, ids)
    )
    torch.testing.assert_close(
        cached.samples.teacher_log_probs[mask], live_lp[mask], rtol=2e-3, atol=2e-3
    )
    student = torch.randn(*live_logits.shape, generator=torch.Generator().manual_seed(2))
    got = sampled_divergence(
        student,
        ids,
        cached.samples.teacher_log_probs,
        mask,
        proposal_log_probs=cached.samples.proposal_log_probs,
        kd_temperature=2.0,
    )
    want = sampled_divergence(
        student, ids, live_lp, mask, proposal_log_probs=live_lr, kd_temperature=2.0
    )
    torch.testing.assert_close(got, want, rtol=5e-3, atol=1e-4)
    with pytest.raises(DistilError, match="no dense distribution"):
        CachedTeacher(out, signal=TeacherSignal.LOGITS)
    sparse = teacher(cols)  # the default signal: the cached samples, as the sparse losses read them
    assert sparse.sparse is not None and torch.equal(sparse.sparse.ids, cached.samples.ids)
    # sampling is seeded per shard: a rewritten shard draws the same ids, byte for byte
    before = (out / "shard-00001.safetensors").read_bytes()
    for name in ("shard-00001.safetensors", "shard-00001.json", "manifest.json"):
        (out / name).unlink()
    assert write_cache(cfg).shards_written == 1
    assert (out / "shard-00001.safetensors").read_bytes() == before


def test_open_lm_cache_checks_the_run_and_names_the_teacher(fx: dict[str, Any]) -> None:
    from distil.teachers.cached import open_lm_cache

    kw: dict[str, Any] = {
        "tokenizer": fx["tok"],
        "dataset": fx["data"].train,
        "sequence_length": 24,
        "kd_temperature": 2.0,
        "vocab_size": fx["vocab"],
    }
    assert open_lm_cache(fx["root"] / "k8", teacher_model=fx["live"].model, **kw).k == 8
    other = build_from_spec(fx["cfg"].teacher.model.spec, fx["tok"], seed=99)
    with pytest.raises(CacheMismatchError, match="teacher_fingerprint"):
        open_lm_cache(fx["root"] / "k8", teacher_model=other, **kw)
    with pytest.raises(CacheMismatchError, match="dataset_fingerprint"):
        open_lm_cache(fx["root"] / "k8", **{**kw, "dataset": fx["data"].train.select(range(47))})


def test_decoded_shards_are_bounded_by_a_byte_budget(fx: dict[str, Any]) -> None:
    """The default keeps every shard of a small cache decoded (no re-decoding on shuffled
    batches); a tiny budget keeps only the shard in use."""
    out = fx["root"] / "k8"
    roomy, tight = CachedTeacher(out), CachedTeacher(out, max_loaded_bytes=1)
    shards = len(roomy.reader.manifest["shards"])
    assert shards > 1
    for example_id in range(48):
        roomy.reader.get(example_id)
        tight.reader.get(example_id)
        assert len(tight.reader.shards) == 1
    assert len(roomy.reader.shards) == shards


def test_teacher_fingerprint_covers_zero_dim_buffers() -> None:
    """BatchNorm's ``num_batches_tracked`` is a 0-d tensor: it is hashed, not a crash."""
    from torch import nn

    from distil.cache.manifest import teacher_fingerprint

    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    before = teacher_fingerprint(a)
    assert before == teacher_fingerprint(a)
    a[1].num_batches_tracked += 1
    assert teacher_fingerprint(a) != before


def test_a_dataset_mismatch_names_the_data_setting_to_match(fx: dict[str, Any]) -> None:
    from distil.cache.writer import _OneProcess
    from distil.data.lm import load_lm_data
    from distil.teachers.cached import open_lm_cache

    cfg = fx["cfg"]
    fewer = cfg.data.model_copy(update={"train_limit": 40})
    data = load_lm_data(fewer, fx["tok"], fx["root"] / "work-40", _OneProcess())
    kwargs = {
        "tokenizer": fx["tok"],
        "dataset": data.train,
        "sequence_length": cfg.data.max_length,
        "kd_temperature": 2.0,
        "vocab_size": fx["vocab"],
    }
    with pytest.raises(CacheMismatchError, match="data.train_limit: cache 48, run 40"):
        open_lm_cache(fx["root"] / "k8", **kwargs, data_settings=fewer.model_dump(mode="json"))
    # without the run's settings, the cache's own are named
    with pytest.raises(CacheMismatchError, match="written with .*data.train_limit=48"):
        open_lm_cache(fx["root"] / "k8", **kwargs)
