"""lm_kd across tokenizers end to end with tiny models built in code: the report in bits per
byte, training from a cache within float16 of live, on-policy sampling, clear refusals."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import make_lm_fixture, run_cli


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """The lm_kd fixture (a BPE teacher) plus a Metaspace Unigram for the student."""
    from distil.data.corpus import stdlib_root, train_unigram_tokenizer_from_texts

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lm")
    fixture = make_lm_fixture(root)
    texts = [p.read_text(encoding="utf-8")[:2500] for p in sorted(stdlib_root().glob("*.py"))[:14]]
    train_unigram_tokenizer_from_texts(texts, root / "student-tok", 500)
    yield {**fixture, "student_tok": root / "student-tok"}
    torch.set_num_threads(threads)


def _args(lm: dict[str, Path], run_dir: Path | None, *extra: str, data: str = "text") -> list[str]:
    where = [] if run_dir is None else ["--run-dir", str(run_dir)]
    return [
        "run",
        "lm_kd",
        f"teacher.model={{hf: {lm['teacher']}}}",
        f"data.source={{train: [{lm[data]}]}}",
        "data.max_length=64",
        "student.model={spec: {num_layers: 1, hidden_size: 32, num_heads: 2, intermediate_size: 64, max_context: 64}}",
        f"student.tokenizer={lm['student_tok']}",
        "train.batch_size=4",
        "train.max_steps=3",
        "train.checkpoint_every=3",
        "run.log_with=[]",
        "eval.generation.prompt_tokens=8",
        "eval.generation.speed_new_tokens=4",
        "eval.generation.speed_batch=2",
        "data.eval_limit=4",
        "kd.kd_weight=0.7",
        *extra,
        *where,
    ]


def _kd_steps(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["kd/raw"] for r in rows if r.get("phase") == "student" and "kd/raw" in r]


def test_text_kd_across_tokenizers_reports_bits_per_byte(
    lm: dict[str, Path], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    code, out = run_cli(_args(lm, run_dir))
    assert code == 0, out
    assert "across tokenizers" in out and "covered" in out and "shared entries" in out
    report = json.loads((run_dir / "report.json").read_text())
    rows = {r["model"]: r for r in report["table"]["rows"]}
    assert set(rows) == {"teacher", "student (KD)", "baseline (no teacher)"}
    assert rows["teacher"]["vocab"] != rows["student (KD)"]["vocab"]
    assert len({r["bytes"] for r in rows.values()}) == 1  # the same held-out text for all three
    for row in rows.values():
        assert row["bits_per_byte"] > 0 and row["tokens"] > 0
    assert report["quality"]["primary"] == "bits_per_byte"
    assert 0 < report["details"]["alignment"]["coverage"] <= 1
    assert len(_kd_steps(run_dir)) == 3


@pytest.mark.parametrize("loss", ["min_ed", "first_token"])
def test_a_cache_with_every_entry_trains_like_the_live_teacher(
    lm: dict[str, Path], tmp_path: Path, loss: str
) -> None:
    """The alignment and the merged teacher distributions live in the cache; with k = V the
    student sees the live teacher's numbers to float16 precision (through either vocabulary
    map)."""
    common = (
        "eval.baseline=false",
        f"kd.cross_tokenizer.loss={loss}",
        "kd.cross_tokenizer.merge=bayesian",
    )
    code, out = run_cli(_args(lm, tmp_path / "live", *common))
    assert code == 0, out
    cache = f"teacher.cache={{path: {tmp_path / 'cache'}, k: 400}}"
    code, out = run_cli(_args(lm, tmp_path / "cached", *common, cache))
    assert code == 0, out
    assert "cross-tokenizer cache" in out and (tmp_path / "cache" / "manifest.json").is_file()
    live, cached = _kd_steps(tmp_path / "live"), _kd_steps(tmp_path / "cached")
    assert len(live) == len(cached) == 3
    for a, b in zip(live, cached, strict=True):
        assert abs(a - b) <= 1e-3 * abs(a)
    # The same cache for another merge strategy is refused, naming the field.
    code, out = run_cli(
        _args(
            lm, tmp_path / "other", "eval.baseline=false", "kd.cross_tokenizer.loss=min_ed", cache
        )
    )
    assert code != 0 and "merge" in out


def test_on_policy_samples_are_read_by_both_tokenizers(lm: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code, out = run_cli(
        _args(
            lm,
            run_dir,
            "eval.baseline=false",
            "on_policy.fraction=1",
            "on_policy.max_new_tokens=8",
            "on_policy.prompt_tokens=16",
            "kd.cross_tokenizer.loss=uld",
            "kd.cross_tokenizer.alignment=positional",
        )
    )
    assert code == 0, out
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("phase") == "student" and "on_policy" in r]
    assert len(steps) == 3 and all(r["on_policy"] == 1.0 and r["groups"] > 0 for r in steps)


def test_prompt_completion_with_the_decode_fallback(lm: dict[str, Path], tmp_path: Path) -> None:
    code, out = run_cli(
        _args(
            lm,
            tmp_path / "run",
            "data.format=prompt_completion",
            "eval.baseline=false",
            "kd.cross_tokenizer.byte_offsets=decode",
            data="pc",
        )
    )
    assert code == 0, out
    assert "100.0% of the student's text covered" in out.replace("\n", " ")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.format=chat", "chat templates"),
        ("kd.chunked=true", "kd.chunked"),
        ("eval.monitor.every=2", "eval.monitor"),
        ("student.model={from_teacher: {num_layers: 1}}", "from_teacher"),
        ("kd.cross_tokenizer.matched_weight=0.5", "both matched_weight"),
        ("student.tokenizer=/nonexistent/tok", "does not exist"),
    ],
)
def test_impossible_settings_are_refused_before_training(
    lm: dict[str, Path], tmp_path: Path, override: str, message: str
) -> None:
    code, out = run_cli(["validate", *_args(lm, None, override)[1:]])
    assert code != 0 and message in out.replace("\n", " "), out


def test_a_student_tokenizer_that_is_not_a_text_tokenizer_is_refused(
    lm: dict[str, Path], tmp_path: Path
) -> None:
    empty = tmp_path / "not-a-tokenizer"
    empty.mkdir()
    (empty / "preprocessor_config.json").write_text(json.dumps({"image_size": 32}))
    code, out = run_cli(_args(lm, tmp_path / "run", f"student.tokenizer={empty}"))
    assert code != 0 and "tokenizer" in out


def test_the_teachers_own_tokenizer_as_student_tokenizer_is_plain_kd(
    lm: dict[str, Path], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    args: list[Any] = _args(lm, run_dir, "eval.baseline=false", f"student.tokenizer={lm['tok']}")
    code, out = run_cli(args)
    assert code == 0, out
    assert "token-level distillation" in out
    rows = json.loads((run_dir / "report.json").read_text())["table"]["rows"]
    assert "agreement" in rows[1]
