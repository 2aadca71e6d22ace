"""``distil run compress`` end to end on tiny models: a causal LM pruned, distilled from its
unpruned self, quantised, distilled again through fake quantisation and exported (a rerun reuses
every stage); LoRA-KD on the teacher's own generations (#78); a CNN pruned, distilled and
quantised to static int8; and a run killed inside a distil stage that resumes from the stage's
checkpoint to the same weights as a run never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from distil.models.classifier import SmallCNN
from tests.helpers import make_lm_fixture, run_cli


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    yield make_lm_fixture(tmp_path_factory.mktemp("lm"))


def _lm_config(
    lm: dict[str, Path], root: Path, stages: list[dict[str, object]], **extra: object
) -> Path:
    config = {
        "recipe": "compress",
        "source": {"kind": "causal_lm", "model": {"hf": str(lm["teacher"])}},
        "store": str(root / "store"),
        "stages": stages,
        "distillation": {
            "data": {"source": {"train": [str(lm["text"])]}, "max_length": 64, "eval_limit": 4},
            **extra.pop("distillation", {}),  # type: ignore[dict-item]
        },
        "train": {"batch_size": 4, "max_steps": 3, "checkpoint_every": 2},
        "measure": {"latency": False},
        "run": {"log_with": [], "output_dir": str(root / "runs")},
        **extra,
    }
    path = root / "compress.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def _report(run_dir: Path) -> dict[str, object]:
    report: dict[str, object] = json.loads((run_dir / "report.json").read_text())
    return report


def _rows(report: dict[str, object]) -> dict[str, dict[str, object]]:
    table = report["table"]
    assert isinstance(table, dict)
    return {row["model"]: row for row in table["rows"]}


def test_lm_prune_distil_quantise_qat_export_then_reused(
    lm: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    stages: list[dict[str, object]] = [
        {
            "stage": "prune",
            "method": {"num_layers": 3, "hidden_size": 16},
            "calibration": {"num_examples": 8, "batch_size": 4},
        },
        {"stage": "distil"},
        {"stage": "quantise", "scheme": "int8_dynamic"},
        {"stage": "distil", "overrides": {"train.max_steps": 2, "train.lr": 1e-4}},
        {"stage": "export"},
    ]
    config = _lm_config(lm, tmp_path, stages)
    code, out = run_cli(["run", str(config), "--run-dir", str(tmp_path / "first")])
    assert code == 0, out
    report = _report(tmp_path / "first")
    rows = _rows(report)
    names = ["prune (prune)", "distil (distil)", "quantise (quantise)", "distil_2 (distil)"]
    assert [rows[n]["status"] for n in names] == ["ran"] * 4
    assert rows["prune (prune)"]["params"] < rows["teacher (source)"]["params"]  # type: ignore[operator]
    assert "baseline (scratch, same shape)" in rows
    assert all(isinstance(rows[n]["perplexity"], float) for n in names)
    details = {s["name"]: s for s in report["details"]["stages"]}  # type: ignore[index]
    assert details["distil_2"]["details"]["mode"] == "qat"
    assert details["distil_2"]["details"]["train_summary"]["steps"] == 2
    # every training stage's curve is in the run's metrics.jsonl, under its stage's name
    phases = {json.loads(line)["phase"] for line in (tmp_path / "first" / "metrics.jsonl").open()}
    assert phases == {"distil", "distil_2", "baseline"}
    final = Path(str(report["highlights"]["final model"]))  # type: ignore[index]
    model = AutoModelForCausalLM.from_pretrained(final)  # plain transformers, torchao installed
    assert "quantization_config" in json.loads((final / "config.json").read_text())
    assert model.config.hidden_size == 16 and model.config.num_hidden_layers == 3
    # the same config again: nothing trains, every stage is reused and reports the same numbers
    code, out = run_cli(["run", str(config), "--run-dir", str(tmp_path / "second")])
    assert code == 0, out
    again = _rows(_report(tmp_path / "second"))
    assert {again[n]["status"] for n in names} == {"reused"}
    assert again["baseline (scratch, same shape)"]["status"] == "reused"
    for n in names:
        assert again[n]["perplexity"] == rows[n]["perplexity"], n


def test_lora_kd_on_the_teachers_own_generations(lm: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel

    from distil.models.lm import load_causal_lm

    stages: list[dict[str, object]] = [
        {"stage": "prune", "method": {"num_layers": 2}},
        {"stage": "distil", "lora": {"rank": 2, "keep_adapters": True}},
    ]
    self_data = {
        "prompts": {"source": {"train": [str(lm["pc"])]}, "limit": 8},
        "generation": {"max_new_tokens": 6, "batch_size": 4},
        "shard_size": 4,
    }
    config = _lm_config(
        lm, tmp_path, stages, distillation={"self_data": self_data}, eval={"baseline": False}
    )
    code, out = run_cli(["run", str(config), "--run-dir", str(tmp_path / "run")])
    assert code == 0, out
    mode = (tmp_path / "run" / "mode.txt").read_text()
    assert "#78" in mode and "LoRA distillation: adapters r=2" in mode
    generated = list((tmp_path / "store" / "self-data").glob("*/manifest.json"))
    assert len(generated) == 1
    assert json.loads(generated[0].read_text())["counts"]["records"] == 8
    report = _report(tmp_path / "run")
    details = {s["name"]: s for s in report["details"]["stages"]}  # type: ignore[index]
    lora = details["distil"]["details"]
    assert lora["mode"] == "lora" and 0 < lora["trainable_parameters"] < lora["total_parameters"]
    # the kept adapters on the stage's input give the merged model's logits
    stage_dir = Path(details["distil"]["folder"])
    base = load_causal_lm(Path(details["prune"]["folder"]) / "model")
    with_adapters = PeftModel.from_pretrained(base, str(stage_dir / "extras" / "adapter")).eval()
    merged = load_causal_lm(stage_dir / "model")
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            with_adapters(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-4
        )


def test_cnn_pruned_distilled_and_static_int8(tmp_path: Path) -> None:
    from distil.config.classifier import ClassifierDataSection
    from distil.data.classification import load_data

    data = load_data(ClassifierDataSection.model_validate({"source": {"builtin": "digits"}}))
    x, y = torch.from_numpy(data.train.images).float(), torch.from_numpy(data.train.labels)
    torch.manual_seed(0)
    teacher = SmallCNN(1, 10, channels=[8, 16])
    opt = torch.optim.AdamW(teacher.parameters(), 3e-3)
    for _ in range(60):  # a teacher that knows something, in about a second
        idx = torch.randint(0, len(y), (64,))
        loss = torch.nn.functional.cross_entropy(teacher(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    weights = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(weights))
    config = {
        "recipe": "compress",
        "source": {
            "kind": "classifier",
            "model": {"zoo": "cnn", "kwargs": {"channels": [8, 16]}, "weights": str(weights)},
        },
        "store": str(tmp_path / "store"),
        "stages": [
            {"stage": "prune", "method": {"channels": [4, 8]}},
            {"stage": "distil"},
            {"stage": "quantise", "method": "static_pt2e", "calibration": {"num_examples": 32}},
            {"stage": "export"},
        ],
        "distillation": {"data": {"source": {"builtin": "digits"}}},
        "train": {"batch_size": 32, "max_steps": 12, "checkpoint_every": 6},
        "measure": {"batch_sizes": [1, 4], "compiled": [False], "repeats": 1, "warmup": 1},
        "run": {"log_with": []},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    code, out = run_cli(["run", str(path), "--run-dir", str(tmp_path / "run")])
    assert code == 0, out
    rows = _rows(_report(tmp_path / "run"))
    teacher_row = rows["teacher (source)"]
    assert teacher_row["accuracy"] > 0.5  # type: ignore[operator]
    for name in ("prune (prune)", "distil (distil)", "quantise (quantise)"):
        assert isinstance(rows[name]["accuracy"], float), name
        assert rows[name]["latency_b4_eager_ms"] is not None, name
    assert rows["baseline (scratch, same shape)"]["params"] == rows["distil (distil)"]["params"]
    program = next((tmp_path / "store" / "stages").glob("02-quantise-*/model/model.pt2"))
    # runs without distil, in a fresh process that imports only torch and torchao's PT2E ops
    code = (
        "import sys, torch, torchao.quantization.pt2e\n"
        "m = torch.export.load(sys.argv[1]).module()\n"
        "print(tuple(m(torch.zeros(3, 1, 8, 8)).shape))"
    )
    fresh = subprocess.run(
        [sys.executable, "-c", code, str(program)], capture_output=True, text=True, check=False
    )
    assert fresh.stdout.strip().endswith("(3, 10)"), fresh.stderr[-2000:]
    # another quantise method: prune and distil are reused, quantise and export run
    config["stages"][2] = {"stage": "quantise", "method": "int8_weights"}  # type: ignore[index]
    path.write_text(yaml.safe_dump(config))
    code_, out = run_cli(["run", str(path), "--run-dir", str(tmp_path / "int8-weights")])
    assert code_ == 0, out
    again = _rows(_report(tmp_path / "int8-weights"))
    assert [again[n]["status"] for n in ("prune (prune)", "distil (distil)")] == ["reused"] * 2
    assert again["quantise (quantise)"]["status"] == "ran"
    assert again["quantise (quantise)"]["size_bytes"] < 0.6 * rows["distil (distil)"]["size_bytes"]  # type: ignore[operator]
    assert (
        abs(again["quantise (quantise)"]["accuracy"] - rows["distil (distil)"]["accuracy"]) < 0.05
    )  # type: ignore[operator]


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "distil", *args]


def test_killed_inside_a_distil_stage_resumes_its_checkpoint(
    lm: dict[str, Path], tmp_path: Path
) -> None:
    stages: list[dict[str, object]] = [
        {"stage": "prune", "method": {"num_layers": 2, "depth_importance": "uniform"}},
        {"stage": "distil", "overrides": {"train.max_steps": 16, "train.batch_size": 2}},
    ]
    killed = _lm_config(lm, tmp_path / "killed", stages, eval={"baseline": False})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        _cli(["run", str(killed)]), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    work = tmp_path / "killed" / "store" / "work"
    deadline = time.time() + 120
    while (
        time.time() < deadline
        and len(list(work.glob("01-distil-*/student/checkpoints/step-*"))) < 2
    ):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list((tmp_path / "killed" / "store" / "stages").glob("01-distil-*")), "finished"
    resumed = subprocess.run(_cli(["run", str(killed)]), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full = _lm_config(lm, tmp_path / "full", stages, eval={"baseline": False})
    code, out = run_cli(["run", str(full)])
    assert code == 0, out
    a, b = (
        next((tmp_path / run / "store" / "stages").glob("01-distil-*"))
        for run in ("killed", "full")
    )
    summary = json.loads((a / "logs" / "summary.json").read_text())
    assert summary["resumed_at_step"] > 0
    assert (
        json.loads((a / "stage.json").read_text())["output_fingerprint"]
        == json.loads((b / "stage.json").read_text())["output_fingerprint"]
    )
    wa, wb = (
        load_file(str(a / "model" / "model.safetensors")),
        load_file(str(b / "model" / "model.safetensors")),
    )
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
