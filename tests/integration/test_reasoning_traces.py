"""Trace collection end to end: problems written by the reasoning module, sampled n times by
``distil generate`` with log-probs, verified into a trace file, filtered, paired and trained on."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from distil.data.reasoning import (
    ReasoningSplits,
    TaskKind,
    read_problems,
    write_reasoning_splits,
    write_reasoning_tokenizer,
)
from distil.data.traces import (
    TraceFilter,
    pass_rates,
    read_traces,
    redi_pairs,
    select_traces,
    verify_traces,
    write_traces,
)
from distil.errors import DistilError
from tests.helpers import run_cli


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from distil.config.lm import TeacherSection
    from distil.config.sources import FileData, HFModel
    from distil.data.prompts import PromptsSection
    from distil.generation import GenerateConfig, GenerationSettings, write_generations
    from distil.models.lm import CausalLMSpec, build_causal_lm, save_model_folder
    from distil.models.vocab import load_tokenizer_folder

    root = tmp_path_factory.mktemp("traces")
    spec = ReasoningSplits(
        kinds=[TaskKind.ADDITION, TaskKind.SORTING],
        train_examples=40,
        pool_examples=6,
        held_out_examples=4,
        harder_examples=4,
    )
    paths = write_reasoning_splits(spec, root / "data")
    tok = load_tokenizer_folder(write_reasoning_tokenizer(root / "tok", model_max_length=96))
    model = build_causal_lm(
        CausalLMSpec(
            num_layers=1,
            hidden_size=16,
            num_heads=2,
            intermediate_size=32,
            vocab_size=len(tok),
            max_context=96,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        seed=0,
    )
    with torch.no_grad():  # end some samples early, so traces have different lengths
        model.lm_head.weight[tok.eos_token_id] += 0.5
    save_model_folder(model, root / "teacher", tokenizer=tok, overwrite=True)
    cfg = GenerateConfig(
        teacher=TeacherSection(model=HFModel(hf=str(root / "teacher"))),
        prompts=PromptsSection(source=FileData(train=[str(paths["pool"])])),
        generation=GenerationSettings(
            max_new_tokens=10,
            sampling_temperature=1.0,
            num_return_sequences=3,
            batch_size=8,
            logprobs=True,
        ),
        shard_size=4,
        output=str(root / "generated"),
    )
    write_generations(cfg)
    return {"root": root, "pool": paths["pool"], "generated": root / "generated", **paths}


def _by_id_parity(record: Mapping[str, Any], completion: str) -> bool:
    """A stand-in verifier with known verdicts (a random teacher never solves a problem)."""
    return int(record["id"]) % 2 == 0


def test_verify_joins_problems_keeps_every_trace_and_its_logprobs(
    generated: dict[str, Path],
) -> None:
    out = generated["root"] / "traces.jsonl"
    summary = verify_traces(generated["generated"], generated["pool"], out)
    traces = read_traces(out)
    problems = read_problems(generated["pool"])
    assert summary.traces == len(traces) == 18 and summary.problems == 6
    assert summary.correct == 0 and not any(t["correct"] for t in traces)  # untrained teacher
    assert summary.format_errors == sum(not t["format_ok"] for t in traces)
    assert [(t["id"], t["sample"]) for t in traces[:4]] == [
        (problems[0]["id"], 0),
        (problems[0]["id"], 1),
        (problems[0]["id"], 2),
        (problems[1]["id"], 0),
    ]
    first = traces[0]
    assert {"prompt", "completion", "answer", "kind", "size", "correct", "format_ok"} <= set(first)
    assert len(first["token_ids"]) == len(first["token_logprobs"]) >= 1
    assert first["answer"] == problems[0]["answer"] and first["prompt"] == problems[0]["prompt"]
    assert summary.pass_rates == pass_rates(traces) == {p["id"]: 0.0 for p in problems}


def test_filters_pairs_and_rates_with_known_verdicts(generated: dict[str, Path]) -> None:
    out = generated["root"] / "parity.jsonl"
    summary = verify_traces(generated["generated"], generated["pool"], out, checker=_by_id_parity)
    traces = read_traces(out)
    even = [t for t in traces if t["id"] % 2 == 0]
    assert summary.correct == len(even) and len(select_traces(traces, "correct")) == len(even)
    assert len(select_traces(traces, TraceFilter.INCORRECT)) == len(traces) - len(even)
    assert len(select_traces(traces)) == len(traces)
    assert set(pass_rates(traces).values()) == {0.0, 1.0}
    assert redi_pairs(traces) == []  # every problem is all-correct or all-wrong
    mixed = [t | {"correct": t["sample"] != 2} for t in traces]  # 2 correct, 1 wrong each
    pairs = redi_pairs(mixed, seed=3)
    assert len(pairs) == 6 and all(p["id"] == n["id"] for p, n in pairs)
    assert all(p["correct"] and not n["correct"] for p, n in pairs)
    assert pairs == redi_pairs(mixed, seed=3)
    assert len(redi_pairs([*mixed, *mixed], max_pairs_per_problem=1)) == 6
    with pytest.raises(DistilError, match="no traces"):
        write_traces([], generated["root"] / "none.jsonl")


def test_refuses_folders_and_problems_that_do_not_match(generated: dict[str, Path]) -> None:
    with pytest.raises(DistilError, match="not a `distil generate`"):
        verify_traces(generated["root"] / "data", generated["pool"], generated["root"] / "x.jsonl")
    with pytest.raises(DistilError, match="not in the problem set"):
        verify_traces(generated["generated"], generated["held_out"], generated["root"] / "x.jsonl")
    changed = [r | {"prompt": r["prompt"] + " "} for r in read_problems(generated["pool"])]
    with pytest.raises(DistilError, match="another problem file"):
        verify_traces(generated["generated"], changed, generated["root"] / "x.jsonl")
    bad = generated["root"] / "bad.jsonl"
    bad.write_text(json.dumps({"id": 1, "prompt": "Q", "completion": "x"}) + "\n")
    with pytest.raises(DistilError, match="verdict"):
        read_traces(bad)


def test_lm_pretrain_trains_on_correct_traces_only(generated: dict[str, Path]) -> None:
    """Rejection-sampling SFT data is plain prompt/completion data for the existing recipes."""
    traces = read_traces(
        verify_traces(
            generated["generated"],
            generated["pool"],
            generated["root"] / "rs.jsonl",
            checker=_by_id_parity,
        ).path
    )
    kept = write_traces(select_traces(traces, "correct"), generated["root"] / "rs-sft.jsonl")
    run_dir = generated["root"] / "run"
    code, text = run_cli(
        [
            "run",
            "lm_pretrain",
            "--run-dir",
            str(run_dir),
            f"tokenizer.path={generated['root'] / 'tok'}",
            f"data.source={{train: [{kept}], eval: [{kept}]}}",
            "data.format=prompt_completion",
            "data.max_length=40",
            "model.num_layers=1",
            "model.hidden_size=16",
            "model.num_heads=2",
            "model.intermediate_size=32",
            "model.max_context=96",
            "train.max_steps=2",
            "train.batch_size=3",
            "run.log_with=[]",
            "eval.generation.prompts=0",
            "export_dir=null",
        ]
    )
    assert code == 0, text
    assert "9 train" in " ".join(text.split())
