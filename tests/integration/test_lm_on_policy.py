"""On-policy distillation in lm_kd and the teacher-hacking monitor, with tiny models built in code."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from distil.data.lm import IGNORE_INDEX, shift_for_next_token
from distil.evaluation.hacking import HELD_OUT, ORACLE, PROXY, hacking_verdict, monitor_plot
from distil.models.lm import load_causal_lm
from distil.models.vocab import load_tokenizer_folder
from distil.training.on_policy import (
    SamplingSettings,
    completion_batch,
    is_on_policy_step,
    prompt_of,
    sample_completions,
)
from tests.helpers import base_args, make_lm_fixture
from tests.helpers import run_cli as _run


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield make_lm_fixture(tmp_path_factory.mktemp("lm"))
    torch.set_num_threads(threads)


def test_step_choice_is_a_pure_function_with_the_right_share() -> None:
    assert not any(is_on_policy_step(0.0, seed=1, step=s) for s in range(50))
    assert all(is_on_policy_step(1.0, seed=1, step=s) for s in range(50))
    picks = [is_on_policy_step(0.3, seed=7, step=s) for s in range(2000)]
    assert picks == [is_on_policy_step(0.3, seed=7, step=s) for s in range(2000)]  # resume-safe
    assert 0.27 < sum(picks) / len(picks) < 0.33
    assert picks != [is_on_policy_step(0.3, seed=8, step=s) for s in range(2000)]


def test_prompt_of_and_completion_batch_mask_the_prompt() -> None:
    assert prompt_of([5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 7, 8], 1) == [
        5,
        6,
    ]  # its own prompt
    assert prompt_of([5, 6, 7, 8], [5, 6, 7, 8], 3) == [5, 6, 7]  # packed text: the first tokens
    batch = completion_batch([[5, 6], [9]], [[1, 2, 0], [3]], pad_token_id=0, example_ids=[4, 2])
    assert batch["input_ids"].tolist() == [[5, 6, 1, 2, 0], [9, 3, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    targets = shift_for_next_token(batch["labels"])
    # the last prompt token predicts the first sampled token; the EOS (0 here) is a target too
    assert targets.tolist() == [[-100, 1, 2, 0, -100], [3, -100, -100, -100, -100]]
    assert batch["example_id"].tolist() == [4, 2]


def test_batched_sampling_equals_one_prompt_at_a_time_and_skips_padded_ids(
    lm: dict[str, Path],
) -> None:
    tok = load_tokenizer_folder(lm["tok"])
    model = load_causal_lm(lm["teacher"], dtype=torch.float32)  # 8 padded vocabulary rows
    with torch.no_grad():  # make the padded rows the most likely: they must still never be drawn
        model.get_output_embeddings().weight[len(tok) :] = (
            50.0 * model.get_output_embeddings().weight[0]
        )
    model.train()
    prompts = [tok.encode("def main():")[:5], tok.encode("import os\nimport sys")[:9], [7]]
    greedy = SamplingSettings(temperature=0.0, top_p=1.0, max_new_tokens=6, prompt_tokens=8)
    kw: dict[str, Any] = {
        "pad_token_id": tok.pad_token_id,
        "eos_token_ids": [tok.eos_token_id],
        "vocab_size": len(tok),
    }
    together = sample_completions(model, prompts, greedy, **kw)
    alone = [sample_completions(model, [p], greedy, **kw)[0] for p in prompts]
    assert together == alone  # left padding and the attention mask are handled
    assert model.training  # back to train mode after sampling
    sampled = sample_completions(model, prompts * 4, SamplingSettings(1.0, 0.9, 6, 8), **kw)
    for c in [*together, *sampled]:
        assert 1 <= len(c) <= 6 and all(t < len(tok) for t in c)
        assert tok.eos_token_id not in c[:-1]  # cut after the first EOS


def _monitored_args(lm: dict[str, Path], run_dir: Path, *extra: str) -> list[str]:
    return [
        *base_args(lm),
        "kd.kd_weight=1",
        "eval.baseline=false",
        "eval.monitor.every=2",
        "eval.monitor.examples=4",
        "on_policy.max_new_tokens=8",
        "on_policy.prompt_tokens=8",
        *extra,
        "--run-dir",
        str(run_dir),
    ]


def test_fully_on_policy_run_logs_generation_keeps_samples_and_reports_the_monitor(
    lm: dict[str, Path], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    code, out = _run(
        _monitored_args(lm, run_dir, "on_policy.fraction=1", f"eval.monitor.oracle={lm['teacher']}")
    )
    assert code == 0, out
    mode = (run_dir / "mode.txt").read_text()
    assert "on-policy fraction λ=1" in mode and "on the sampled tokens only" in mode
    assert "off-policy" not in mode and "on-policy (λ=1: the teacher scores" in " ".join(
        mode.split()
    )
    # every statement of the mode line is true of λ = 1: no CE term is claimed (issue 13, item 6)
    flat = " ".join(mode.split())
    assert "no CE: every step is on-policy" in flat and "·CE" not in flat
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["phase"] == "student" and "loss" in r]
    assert len(steps) == 6 and all(
        r["on_policy"] == 1 and r["gen_s"] > 0 and r["train_s"] > 0 for r in steps
    )
    assert all(r["kd/raw"] > 0 and r.get("hard_ce/weighted", 0.0) == 0.0 for r in steps)
    monitored = [r for r in rows if HELD_OUT in r]
    assert [r["step"] for r in monitored] == [0, 2, 4, 6]
    # the oracle here is the teacher itself: both measures are the same number
    assert all(abs(r[ORACLE] - r[HELD_OUT]) < 1e-9 for r in monitored)
    samples = [
        json.loads(line)
        for line in (run_dir / "student" / "samples.jsonl").read_text().splitlines()
    ]
    assert samples and samples[0]["step"] == 0 and samples[0]["completion"]
    summary = json.loads((run_dir / "student" / "summary.json").read_text())
    assert summary["on_policy_steps"] == 6 and summary["generation_s"] > 0
    report = json.loads((run_dir / "report.json").read_text())
    assert report["monitor"]["measure"] == ORACLE and report["monitor"]["flag"] in (True, False)
    md = (run_dir / "report.md").read_text()
    assert "## Teacher-hacking monitor" in md and "plots/monitor.png" in md
    assert (run_dir / "plots" / "monitor.png").stat().st_size > 1000
    assert "Teacher-hacking monitor" in (run_dir / "report.html").read_text()


def test_mixed_fraction_follows_the_step_choice_and_repeats_exactly(
    lm: dict[str, Path], tmp_path: Path
) -> None:
    finals = []
    for name in ("a", "b"):
        run_dir = tmp_path / name
        code, out = _run(
            _monitored_args(lm, run_dir, "on_policy.fraction=0.5", "eval.monitor.every=0")
        )
        assert code == 0, out
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        chosen = [bool(r["on_policy"]) for r in rows if r["phase"] == "student" and "loss" in r]
        assert chosen == [is_on_policy_step(0.5, seed=0, step=s) for s in range(6)]
        assert any(chosen) and not all(chosen)
        finals.append(load_file(str(run_dir / "student" / "final" / "model.safetensors")))
    for key in finals[0]:
        assert torch.equal(finals[0][key], finals[1][key]), key  # sampling is seeded per step


def test_on_policy_settings_that_cannot_run_are_refused(
    lm: dict[str, Path], tmp_path: Path
) -> None:
    cases = {
        "kd.kd_weight=0": "needs a teacher to score the samples",
        "teacher.cache.path=somewhere": "needs a live teacher",
        "on_policy.max_new_tokens=60": "beyond the",
    }
    for override, message in cases.items():
        code, out = _run(
            [
                *base_args(lm),
                "on_policy.fraction=0.5",
                "on_policy.prompt_tokens=8",
                override,
                "--run-dir",
                str(tmp_path / override.split("=")[0]),
            ]
        )
        assert code != 0 and message in out, (override, out)


def _rows(golden: list[float], proxy: list[float], key: str = HELD_OUT) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for i, (g, p) in enumerate(zip(golden, proxy, strict=True)):
        step = 2 * i
        if step:
            rows += [
                {"phase": "student", "step": step - 1, PROXY: p},
                {"phase": "student", "step": step, PROXY: p},
            ]
        rows.append({"phase": "student", "step": step, key: g})
    return rows


def test_verdict_flags_a_falling_proxy_with_a_rising_golden_measure() -> None:
    hacked = _rows([1.0, 0.8, 0.7, 0.75, 0.85], [9, 2.0, 1.5, 1.2, 1.0], key=ORACLE)
    verdict = hacking_verdict(hacked)
    assert verdict["flag"] is True and verdict["measure"] == ORACLE and verdict["best_step"] == 4
    assert "teacher hacking" in verdict["text"]
    healthy = hacking_verdict(_rows([1.0, 0.8, 0.7, 0.69, 0.7], [9, 2.0, 1.5, 1.2, 1.0]))
    assert healthy["flag"] is False and "no teacher hacking" in healthy["text"]
    overfit = hacking_verdict(_rows([1.0, 0.8, 0.7, 0.9, 1.0], [9, 2.0, 1.5, 1.6, 1.7]))
    assert overfit["flag"] is False and "not the hacking pattern" in overfit["text"]
    assert hacking_verdict(_rows([1.0, 0.9], [9, 2.0]))["flag"] is None
    png = monitor_plot(hacked + _rows([1.0, 0.9, 0.8, 0.8, 0.9], [9, 2, 1.5, 1.2, 1.0]))
    assert png is not None and png.startswith(b"\x89PNG")
