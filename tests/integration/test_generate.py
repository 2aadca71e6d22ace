"""``distil generate`` end to end with a tiny teacher built in code: shards and manifest, greedy
equal to one-prompt-at-a-time generation, byte-identical resume, refused settings, corrupt shards,
bad input, and ``lm_kd`` training on the output."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from distil.cli import app
from distil.data.generated import generated_shard_files
from distil.errors import DistilError
from tests.helpers import base_args, make_lm_fixture

runner = CliRunner()


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """The lm_kd fixture plus a teacher without padded vocab rows whose EOS logit is doubled, so
    some greedy completions stop early (at different steps) and some run to max_new_tokens."""
    from distil.models.lm import CausalLMSpec, build_causal_lm, save_model_folder
    from distil.models.vocab import load_tokenizer_folder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("generate")
    lm = make_lm_fixture(root)
    tok = load_tokenizer_folder(lm["tok"])
    spec = CausalLMSpec(
        num_layers=2,
        hidden_size=32,
        num_heads=4,
        intermediate_size=64,
        vocab_size=len(tok),
        max_context=64,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = build_causal_lm(spec, seed=3)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] *= 2.0
    save_model_folder(model, root / "gen-teacher", tokenizer=tok, overwrite=True)
    texts = [json.loads(line)["prompt"] for line in lm["pc"].read_text().splitlines()]
    rows = [
        {"id": f"p{i}", "prompt": text[: 4 + 3 * i]} for i, text in enumerate(texts[:10])
    ]  # 2 to 20 tokens
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "command": "generate",
        "teacher": {"model": {"hf": str(root / "gen-teacher")}},
        "prompts": {"source": {"train": [str(root / "prompts.jsonl")]}},
        "generation": {"max_new_tokens": 12, "batch_size": 4},
        "shard_size": 4,
        "output": str(root / "unused"),
    }
    (root / "generate.yaml").write_text(yaml.safe_dump(config))
    yield {
        **lm,
        "gen_teacher": root / "gen-teacher",
        "prompts": root / "prompts.jsonl",
        "config": root / "generate.yaml",
    }
    torch.set_num_threads(threads)


def _generate(fx: dict[str, Path], out: Path, *overrides: str) -> tuple[int, str]:
    result = runner.invoke(app, ["generate", str(fx["config"]), f"output={out}", *overrides])
    extra = repr(result.exception) if result.exception and result.exit_code not in (0, 2) else ""
    return result.exit_code, " ".join((result.output + extra).split())


def _records(out: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for p in sorted(out.glob("shard-*.jsonl"))
        for line in p.read_text().splitlines()
    ]


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.jsonl"))}


def test_greedy_writes_shards_and_manifest_equal_to_one_prompt_at_a_time(
    fx: dict[str, Path], tmp_path: Path
) -> None:
    from distil.cache.manifest import teacher_fingerprint
    from distil.evaluation.lm import generate_texts
    from distil.models.lm import load_causal_lm
    from distil.models.vocab import load_tokenizer_folder, tokenizer_fingerprint

    assert runner.invoke(app, ["validate", str(fx["config"])]).exit_code == 0
    out = tmp_path / "out"
    code, text = _generate(fx, out)
    assert code == 0, text
    assert "wrote 3 shard(s), 0 already complete; 10 completions of 10 prompts" in text
    manifest = json.loads((out / "manifest.json").read_text())
    model, tok = load_causal_lm(fx["gen_teacher"]), load_tokenizer_folder(fx["gen_teacher"])
    assert manifest["complete"] and manifest["num_shards"] == 3 and manifest["num_prompts"] == 10
    assert manifest["teacher_fingerprint"] == teacher_fingerprint(model)
    assert manifest["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
    assert manifest["settings"]["generation.max_new_tokens"] == 12
    assert [(s["file"], s["first_id"], s["last_id"], s["records"]) for s in manifest["shards"]] == [
        ("shard-00000.jsonl", "p0", "p3", 4),
        ("shard-00001.jsonl", "p4", "p7", 4),
        ("shard-00002.jsonl", "p8", "p9", 2),
    ]
    counts = manifest["counts"]
    assert 0 < counts["ended_by_eos"] < 10, (
        "the fixture should stop some completions early, not all"
    )
    assert counts["prompts"] == counts["records"] == 10 and counts["tokens_per_s"] > 0
    records = _records(out)
    prompts = [json.loads(line) for line in fx["prompts"].read_text().splitlines()]
    assert [(r["id"], r["prompt"]) for r in records] == [(p["id"], p["prompt"]) for p in prompts]
    assert set(records[0]) == {"id", "prompt", "completion", "prompt_ids", "completion_ids"}
    assert manifest["token_ids"] == ["prompt_ids", "completion_ids"]
    # batched with left padding, yet each completion is what the prompt alone gives
    for record in records:
        ids = torch.tensor(tok(record["prompt"])["input_ids"])
        alone = generate_texts(
            model, [ids], tok, max_new_tokens=12, sampling_temperature=0.0, seed=0
        )[0]
        assert record["completion"] == alone, record["id"]


def test_builtin_prompts_through_the_shipped_config(fx: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "stdlib"
    args = [
        "generate",
        "generate",
        f"teacher.model={{hf: {fx['gen_teacher']}}}",
        "prompts.corpus_max_bytes=60000",
        "prompts.prompt_tokens=10",
        "prompts.limit=5",
        "generation.max_new_tokens=4",
        f"output={out}",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    records = _records(out)
    ids = [r["id"] for r in records]
    assert (
        len(records) == 5 and ids == sorted(set(ids)) and ids[-1] > 4
    )  # windows spread over the corpus
    assert all(len(r["prompt"]) >= 8 for r in records)
    assert json.loads((out / "manifest.json").read_text())["settings"]["prompts.source"] == "stdlib"


def test_sampled_run_resumes_to_byte_identical_shards(
    fx: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import distil.generation as gen

    sampling = [
        "generation.sampling_temperature=1.0",
        "generation.top_p=0.9",
        "generation.num_return_sequences=2",
        "generation.batch_size=3",
        "shard_size=3",
    ]
    whole = tmp_path / "whole"
    assert _generate(fx, whole, *sampling)[0] == 0
    records = _records(whole)
    assert [(r["id"], r["sample"]) for r in records[:4]] == [
        ("p0", 0),
        ("p0", 1),
        ("p1", 0),
        ("p1", 1),
    ]
    assert any(
        a["completion"] != b["completion"] for a, b in zip(records[::2], records[1::2], strict=True)
    )

    # a crash while writing shard 3 leaves a torn temp file and a manifest listing shards 0 to 2
    real = gen.atomic_write_bytes

    def dying(path: Path, data: bytes) -> None:
        if path.name == "shard-00003.jsonl":
            path.with_name(f".{path.name}.tmp-1").write_bytes(data[: len(data) // 2])
            raise KeyboardInterrupt
        real(path, data)

    killed = tmp_path / "killed"
    monkeypatch.setattr(gen, "atomic_write_bytes", dying)
    assert _generate(fx, killed, *sampling)[0] != 0
    monkeypatch.setattr(gen, "atomic_write_bytes", real)
    assert not json.loads((killed / "manifest.json").read_text())["complete"]
    with pytest.raises(DistilError, match="unfinished"):
        generated_shard_files(killed)
    (killed / "shard-00000.jsonl").unlink()  # and a lost shard, and one cut short
    shard1 = killed / "shard-00001.jsonl"
    shard1.write_bytes(shard1.read_bytes()[:-7])
    code, text = _generate(fx, killed, *sampling)
    assert code == 0, text
    assert "wrote 3 shard(s), 1 already complete" in text
    assert _shards(killed) == _shards(whole) and not list(killed.glob(".*tmp*"))

    # each completion depends on (seed, prompt id, sample) only, not on the rows batched with it
    alone = tmp_path / "alone"
    assert _generate(fx, alone, *sampling, "generation.batch_size=1")[0] == 0
    assert _shards(alone) == _shards(whole)
    reseeded = tmp_path / "reseeded"
    assert _generate(fx, reseeded, *sampling, "generation.seed=1")[0] == 0
    assert _shards(reseeded) != _shards(whole)


@pytest.mark.parametrize("sampled", [False, True])
def test_logprobs_are_the_teachers_own_and_leave_the_text_unchanged(
    fx: dict[str, Path], tmp_path: Path, sampled: bool
) -> None:
    from distil.models.lm import load_causal_lm
    from distil.models.vocab import load_tokenizer_folder

    sampling = ["generation.sampling_temperature=0.7", "generation.top_p=0.9"] if sampled else []
    plain, scored = tmp_path / "plain", tmp_path / "scored"
    assert _generate(fx, plain, *sampling)[0] == 0
    assert _generate(fx, scored, *sampling, "generation.logprobs=true")[0] == 0
    without, records = _records(plain), _records(scored)
    assert [r["completion"] for r in records] == [r["completion"] for r in without]
    assert (
        "generation.logprobs" not in json.loads((plain / "manifest.json").read_text())["settings"]
    )
    assert json.loads((scored / "manifest.json").read_text())["settings"]["generation.logprobs"]
    model, tok = load_causal_lm(fx["gen_teacher"]).eval(), load_tokenizer_folder(fx["gen_teacher"])
    ended = 0
    for r in records:
        ids, logprobs = r["token_ids"], r["token_logprobs"]
        assert len(ids) == len(logprobs) and 1 <= len(ids) <= 12
        ended += ids[-1] == tok.eos_token_id
        body = ids[:-1] if ids[-1] == tok.eos_token_id else ids
        assert tok.decode(body, skip_special_tokens=True) == r["completion"]
        prompt = tok(r["prompt"])["input_ids"]
        with torch.no_grad():  # teacher forcing: log p(token | prefix) at temperature 1
            logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1]
        want = logits.float().log_softmax(-1).gather(-1, torch.tensor(ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(logprobs), want, atol=1e-4), r["id"]
        assert all(x <= 0 for x in logprobs)
    assert 0 < ended < len(records) or sampled  # greedy: some stop early, some run to the limit


def test_changed_settings_are_refused_and_corrupt_shards_named_then_regenerated(
    fx: dict[str, Path], tmp_path: Path
) -> None:

    out = tmp_path / "out"
    assert _generate(fx, out)[0] == 0
    before = _shards(out)
    code, text = _generate(fx, out, "generation.max_new_tokens=8")
    assert (
        code == 2 and "generation.max_new_tokens: 12 there, 8 now" in text and "delete" in text
    ), text
    code, text = _generate(
        fx, out, f"teacher.model={{hf: {fx['teacher']}}}"
    )  # another teacher, same tokenizer
    assert code == 2 and "teacher_fingerprint: '" in text and "tokenizer_fingerprint" not in text, (
        text
    )
    code, text = _generate(fx, out, "prompts.limit=5")
    assert (
        code == 2 and "prompts.limit: None there, 5 now" in text and "prompts_fingerprint" in text
    ), text

    shard = out / "shard-00001.jsonl"
    data = bytearray(shard.read_bytes())
    data[10] ^= 1  # same size, other bytes
    shard.write_bytes(bytes(data))
    with pytest.raises(DistilError, match="shard-00001.jsonl is missing or fails its sha256"):
        generated_shard_files(out)
    code, text = _generate(fx, out)
    assert code == 0 and "wrote 1 shard(s), 2 already complete" in text, text
    assert _shards(out) == before
    assert generated_shard_files(out) == [out / name for name in before]


def test_bad_input_is_refused_with_the_fix(fx: dict[str, Path], tmp_path: Path) -> None:
    no_tok = tmp_path / "teacher-no-tokenizer"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(fx["gen_teacher"] / name, no_tok / name)
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "no-field.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    cases = {
        "missing prompts file": (
            [f"prompts.source={{train: [{tmp_path / 'nope.jsonl'}]}}"],
            "nope.jsonl' does not exist",
        ),
        "empty prompt set": (
            [f"prompts.source={{train: [{tmp_path / 'empty.jsonl'}]}}"],
            "the prompt set is empty",
        ),
        "no prompt field": (
            [f"prompts.source={{train: [{tmp_path / 'no-field.jsonl'}]}}"],
            "needs a string field 'prompt'",
        ),
        "teacher without tokenizer": (
            [f"teacher.model={{hf: {no_tok}}}"],
            "has no tokenizer files",
        ),
        "longer than the context": (
            ["generation.max_new_tokens=60"],
            "exceeds the teacher's context of 64 tokens",
        ),
        "greedy with several samples": (
            ["generation.num_return_sequences=2"],
            "set sampling_temperature > 0",
        ),
        "a recipe config": (["recipe=lm_kd"], "is a `distil run` config"),
    }
    for name, (overrides, expected) in cases.items():
        code, text = _generate(fx, tmp_path / name.replace(" ", "_"), *overrides)
        assert code == 2 and expected in text, (name, text)
    result = runner.invoke(app, ["run", str(fx["config"])])
    assert result.exit_code == 2 and "run it with `distil generate" in " ".join(
        result.output.split()
    )


def _examples(folder: Path, tokenizer: Any) -> tuple[list[dict[str, Any]], str]:
    """The examples lm_kd builds from ``folder`` (train and held-out, in record order), and the
    note on where their token ids came from."""
    from distil.config.lm import LMDataSection
    from distil.data.lm import load_lm_data

    section = LMDataSection.model_validate(
        {"source": {"train": [str(folder)]}, "format": "prompt_completion", "max_length": 64}
    )
    # files, not the built-in corpus: the accelerator is never asked to synchronise
    data = load_lm_data(section, tokenizer, folder.parent / "work", None)
    rows = [*data.train, *data.eval]
    return sorted(rows, key=lambda row: row["example_id"]), data.token_ids


def _strip_token_ids(folder: Path) -> None:
    """Make ``folder`` look like one written before records carried token ids."""
    from distil.storage import sha256_file

    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["token_ids"]
    for shard in manifest["shards"]:
        path = folder / shard["file"]
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text(
            "".join(
                json.dumps({k: v for k, v in r.items() if not k.endswith("_ids")}) + "\n"
                for r in lines
            )
        )
        shard["sha256"] = sha256_file(path)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_lm_kd_trains_on_the_teachers_own_token_ids_not_its_retokenised_text(
    fx: dict[str, Path], tmp_path: Path
) -> None:
    """Issue 13, item 5: decoding the teacher's ids and tokenizing the text again can give other
    ids; the examples built from a generated folder are the ids the teacher wrote."""
    from distil.models.vocab import load_tokenizer_folder

    out = tmp_path / "generated"
    assert _generate(fx, out)[0] == 0
    tok = load_tokenizer_folder(fx["gen_teacher"])
    eos = tok.eos_token_id
    records = _records(out)
    for r in records:
        assert r["prompt_ids"] == tok(r["prompt"])["input_ids"]
        assert tok.decode(r["completion_ids"], skip_special_tokens=True) == r["completion"]
    retokenised = [tok(r["completion"], add_special_tokens=False)["input_ids"] for r in records]
    differ = [
        r["id"] for r, ids in zip(records, retokenised, strict=True) if ids != r["completion_ids"]
    ]
    assert differ, "the teacher's text should re-tokenise to other ids for some records"

    examples, note = _examples(out, tok)
    assert note.startswith("the teacher's stored token ids")
    assert len(examples) == len(records)
    for r, example in zip(records, examples, strict=True):
        completion = [*r["completion_ids"], eos]
        assert example["input_ids"] == r["prompt_ids"] + completion, r["id"]
        assert example["labels"] == [-100] * len(r["prompt_ids"]) + completion, r["id"]


def test_another_tokenizer_and_old_folders_retokenise_the_text(
    fx: dict[str, Path], tmp_path: Path
) -> None:
    from distil.data.corpus import stdlib_root, train_bpe_tokenizer_from_texts
    from distil.models.vocab import load_tokenizer_folder

    out = tmp_path / "generated"
    assert _generate(fx, out)[0] == 0
    records = _records(out)

    def retokenised(tok: Any) -> list[list[int]]:
        return [
            [
                *tok(r["prompt"])["input_ids"],
                *tok(r["completion"], add_special_tokens=False)["input_ids"],
                tok.eos_token_id,
            ]
            for r in records
        ]

    texts = [p.read_text(encoding="utf-8")[:2000] for p in sorted(stdlib_root().glob("*.py"))[:6]]
    other = load_tokenizer_folder(train_bpe_tokenizer_from_texts(texts, tmp_path / "tok2", 320))
    examples, note = _examples(out, other)
    assert note.startswith("text re-tokenised: the token ids in") and "another tokenizer" in note
    assert [e["input_ids"] for e in examples] == retokenised(other)

    # a folder written before records carried ids still loads, from its text
    tok = load_tokenizer_folder(fx["gen_teacher"])
    _strip_token_ids(out)
    examples, note = _examples(out, tok)
    assert note.startswith("text re-tokenised:") and "stores no token ids" in note
    assert [e["input_ids"] for e in examples] == retokenised(tok)
    # and is not completed with shards of the new kind
    code, text = _generate(fx, out)
    assert code == 2 and "token_ids: None there, ['prompt_ids', 'completion_ids'] now" in text, text


@pytest.mark.parametrize("kd_weight", ["0", "0.5"])
def test_lm_kd_trains_on_the_generated_folder(
    fx: dict[str, Path], tmp_path: Path, kd_weight: str
) -> None:
    out = tmp_path / "generated"
    assert _generate(fx, out)[0] == 0
    run_dir = tmp_path / "run"
    args = [
        *base_args(fx, "pc"),
        f"teacher.model={{hf: {fx['gen_teacher']}}}",
        f"data.source={{train: [{out}]}}",
        "data.format=prompt_completion",
        f"kd.kd_weight={kd_weight}",
        "train.max_steps=2",
        "--run-dir",
        str(run_dir),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if m.get("phase") == "student" and "hard_ce/raw" in m]
    assert len(steps) == 2 and all(m["hard_ce/raw"] > 0 for m in steps), metrics
    mode = (run_dir / "mode.txt").read_text()
    assert "data prompt_completion (the teacher's stored token ids" in mode
    # kd_weight 0 is fine-tuning on the teacher's text: the teacher is not run while training
    assert ("the teacher only evaluates" in mode) == (kd_weight == "0")
    assert all(("kd/raw" in m) == (kd_weight != "0") for m in steps)
    # with kd_weight 0 the baseline would train the same objective: none is trained or reported
    # as a gain (issue 13, item 6); with a teacher term, it is
    assert (run_dir / "baseline" / "final").is_dir() == (kd_weight != "0")
    assert ("no baseline" in mode) == (kd_weight == "0")
