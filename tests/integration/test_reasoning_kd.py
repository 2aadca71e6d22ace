"""``reasoning_kd`` end to end on tiny models: every method and selection trains for the same
budget, REDI's second stage runs the REDI objective on trace pairs, checkpoints become a learning
curve, and the report holds pass@k on held-out and harder problems."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from distil.data.reasoning import (
    ReasoningSplits,
    TaskKind,
    write_reasoning_splits,
    write_reasoning_tokenizer,
)
from distil.data.traces import read_traces, verify_traces
from tests.helpers import run_cli


def _length_parity(record: Mapping[str, Any], completion: str) -> bool:
    """A stand-in verifier with mixed verdicts within a problem (the tiny teacher solves none)."""
    return len(completion) % 2 == 0


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    from distil.config.lm import TeacherSection
    from distil.config.sources import FileData, HFModel
    from distil.data.prompts import PromptsSection
    from distil.generation import GenerateConfig, GenerationSettings, write_generations
    from distil.models.lm import CausalLMSpec, build_causal_lm, save_model_folder
    from distil.models.vocab import load_tokenizer_folder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("reasoning_kd")
    spec = ReasoningSplits(
        kinds=[TaskKind.ADDITION, TaskKind.SORTING],
        train_examples=10,
        pool_examples=12,
        held_out_examples=4,
        harder_examples=4,
    )
    paths = write_reasoning_splits(spec, root / "data")
    tok = load_tokenizer_folder(write_reasoning_tokenizer(root / "tok", model_max_length=128))
    shape = {"num_layers": 1, "hidden_size": 16, "num_heads": 2, "intermediate_size": 32}
    teacher = build_causal_lm(
        CausalLMSpec(
            **shape,
            vocab_size=len(tok),
            max_context=128,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        seed=0,
    )
    with torch.no_grad():
        teacher.lm_head.weight[tok.eos_token_id] += 1.0  # short traces of different lengths
    save_model_folder(teacher, root / "teacher", tokenizer=tok, overwrite=True)
    write_generations(
        GenerateConfig(
            teacher=TeacherSection(model=HFModel(hf=str(root / "teacher"))),
            prompts=PromptsSection(source=FileData(train=[str(paths["pool"])])),
            generation=GenerationSettings(
                max_new_tokens=8,
                sampling_temperature=1.0,
                num_return_sequences=4,
                batch_size=16,
                logprobs=True,
            ),
            output=str(root / "generated"),
        )
    )
    verify_traces(root / "generated", paths["pool"], root / "traces.jsonl", checker=_length_parity)
    yield {"root": root, "teacher": root / "teacher", "traces": root / "traces.jsonl", **paths}
    torch.set_num_threads(threads)


def _run(fx: dict[str, Path], name: str, *overrides: str) -> tuple[Path, dict[str, Any]]:
    run_dir = fx["root"] / "runs" / name
    args = [
        "run",
        "reasoning_kd",
        "--run-dir",
        str(run_dir),
        f"teacher.model.hf={fx['teacher']}",
        "student.model={spec: {num_layers: 1, hidden_size: 16, num_heads: 2, intermediate_size: 32, max_context: 128}}",
        f"problems.pool={fx['pool']}",
        f"problems.traces={fx['traces']}",
        f"problems.held_out={fx['held_out']}",
        f"problems.harder={fx['harder']}",
        "problems.max_length=128",
        "train.max_steps=5",
        "train.batch_size=4",
        "train.checkpoint_every=2",
        "train.warmup_steps=1",
        "eval.problems=3",
        "eval.samples_per_problem=2",
        "eval.ks=[1,2]",
        "eval.max_new_tokens=8",
        "run.log_with=[]",
        *overrides,
    ]
    code, text = run_cli(args)
    assert code == 0, text
    return run_dir, json.loads((run_dir / "report.json").read_text())


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_gold_sft_is_the_no_teacher_arm_with_a_curve_and_pass_at_k(fx: dict[str, Path]) -> None:
    run_dir, report = _run(fx, "gold", "problems.completions=gold")
    rows = report["quality"]["table"]["rows"]
    assert [r["model"] for r in rows] == ["teacher", "no teacher (gold SFT)"]
    for key in (
        "held_out/pass@1",
        "held_out/pass@2",
        "harder/format_errors",
        "held_out/trace_tokens",
    ):
        assert rows[1][key] is not None, key
    assert json.loads((run_dir / "selected.json").read_text()) == list(range(1_000_000, 1_000_012))
    curve = report["details"]["curve"]
    assert [p["step"] for p in curve] == [2, 4, 5] and [p["examples"] for p in curve] == [8, 16, 20]
    assert all(0.0 <= p["held_out/pass@1"] <= 1.0 for p in curve)
    steps = [m for m in _metrics(run_dir) if m.get("phase") == "student" and "sft_nll/raw" in m]
    assert len(steps) == 5  # the budget: max_steps optimiser steps
    assert "no teacher (gold SFT)" in (run_dir / "mode.txt").read_text()


def test_redi_trains_stage_two_on_pairs_with_the_papers_weights(fx: dict[str, Path]) -> None:
    traces = read_traces(fx["traces"])
    assert 0 < sum(t["correct"] for t in traces) < len(traces)
    run_dir, report = _run(fx, "redi", "method=redi", "redi.stage2_share=0.4")
    rows = _metrics(run_dir)
    stage1 = [m for m in rows if m.get("phase") == "student" and "sft_nll/raw" in m]
    stage2 = [m for m in rows if m.get("phase") == "stage2" and "redi_negative/raw" in m]
    assert (len(stage1), len(stage2)) == (3, 2)  # 5 steps: 60 % SFT, 40 % REDI
    assert all(
        m["redi_negative/weighted"] == pytest.approx(0.8 * m["redi_negative/raw"]) for m in stage2
    )
    assert max(m["lr"] for m in stage2) <= 3e-3 * 0.02 + 1e-12  # stage 2 at the paper's lr ratio
    mode = (run_dir / "mode.txt").read_text()
    assert "1·mean(−log π(y⁺)/|y⁺|) + 0.8·mean(log π(y⁻)/|y⁻|)" in mode
    assert [p["step"] for p in report["details"]["curve"]] == [
        2,
        3,
        5,
    ]  # stage 2 continues the steps


@pytest.mark.parametrize("method", ["token_kd", "on_policy"])
def test_token_and_on_policy_kd_reuse_lm_kd_phase(fx: dict[str, Path], method: str) -> None:
    extra = (
        ["on_policy.fraction=1.0", "on_policy.max_new_tokens=6"] if method == "on_policy" else []
    )
    run_dir, report = _run(fx, method, f"method={method}", "eval.teacher=false", *extra)
    steps = [m for m in _metrics(run_dir) if m.get("phase") == "student" and "loss" in m]
    assert len(steps) == 5 and all("kd/raw" in m for m in steps)
    assert report["quality"]["table"]["rows"][0]["model"] in ("token-level KD", "on-policy KD")
    if method == "on_policy":
        assert all(m["on_policy"] == 1.0 for m in steps)


@pytest.mark.parametrize(
    "selection",
    [
        ["selection.method=random", "selection.budget=0.5"],
        ["selection.method=pass_rate", "selection.budget=0.5"],
        ["selection.method=scorer", "selection.budget=6"],
        [
            "selection.method=learning_impact",
            "selection.budget=0.5",
            "selection.probe_steps=4",
            "selection.probe_points=2",
        ],
    ],
)
def test_selection_keeps_the_budget_and_the_same_training_steps(
    fx: dict[str, Path], selection: list[str]
) -> None:
    name = selection[0].split("=")[1]
    run_dir, report = _run(
        fx,
        f"sel-{name}",
        "problems.completions=all_traces",
        "eval.teacher=false",
        "eval.curve_samples=0",
        *selection,
    )
    kept = json.loads((run_dir / "selected.json").read_text())
    assert len(kept) == 6 and len(set(kept)) == 6
    assert report["details"]["problems"] == {"pool": 12, "trained_on": 6, "ids": "selected.json"}
    assert f"{name} " in report["quality"]["table"]["rows"][0]["model"]
    steps = [m for m in _metrics(run_dir) if m.get("phase") == "student" and "sft_nll/raw" in m]
    assert len(steps) == 5
    if name == "learning_impact":
        scores = json.loads((run_dir / "probe" / "scores.json").read_text())
        assert len(scores) == 12 and all(v <= 1.0 for _, v in scores)


def test_config_mistakes_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the teacher folder the shipped config names, as after training it
    (tmp_path / "runs" / "reasoning-teacher").mkdir(parents=True)
    cases = {
        ("method=redi", "problems.completions=gold"): "completions=correct_traces",
        ("method=on_policy",): "on_policy.fraction > 0",
        ("method=sft", "on_policy.fraction=0.5"): "belongs to method=on_policy",
        ("selection.budget=1.5",): "whole count",
        ("problems.traces=null",): "problems.traces",
        ("eval.ks=[1,8]",): "eval.ks",
    }
    for overrides, expected in cases.items():
        code, text = run_cli(["validate", "reasoning_kd", *overrides])
        assert code == 2 and expected in " ".join(text.split()), (overrides, text)
