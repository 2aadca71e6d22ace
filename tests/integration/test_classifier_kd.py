"""classifier_kd end to end: run folder, report, resume after SIGKILL, bad input, NaN guard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from distil.cli import app, load_config

FAST = [
    "data.source={builtin: digits}",
    "teacher.training.epochs=2",
    "teacher.model.kwargs.channels=[8,16]",
    "train.epochs=2",
    "train.checkpoint_every=5",
]

runner = CliRunner()


def _run(args: list[str]) -> tuple[int, str]:
    result = runner.invoke(app, args)
    return result.exit_code, result.output + (
        str(result.exception) if result.exception and result.exit_code not in (0, 2) else ""
    )


def test_default_job_small_writes_full_run_folder(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code, out = _run(["run", "classifier_kd", *FAST, "--run-dir", str(run_dir)])
    assert code == 0, out
    for name in (
        "config.resolved.yaml",
        "env.json",
        "metrics.jsonl",
        "report.json",
        "report.md",
        "mode.txt",
    ):
        assert (run_dir / name).is_file(), name
    assert list(run_dir.glob("classifier_kd/events.out.tfevents.*")), "no TensorBoard events"
    for phase in ("teacher", "student", "baseline"):
        assert (run_dir / phase / "final" / "model.safetensors").is_file()
        ckpts = sorted((run_dir / phase / "checkpoints").glob("step-*"))
        assert ckpts and all((c / "COMPLETE").is_file() for c in ckpts)
        assert {
            "model.safetensors",
            "optimizer.pt",
            "scheduler.pt",
            "rng.safetensors",
            "rng.json",
            "state.json",
        } <= {p.name for p in ckpts[-1].iterdir()}
    env = json.loads((run_dir / "env.json").read_text())
    assert env["packages"]["torch"] and env["devices"] == ["cpu"]
    report = json.loads((run_dir / "report.json").read_text())
    rows = {r["model"]: r for r in report["table"]["rows"]}
    assert set(rows) == {"teacher", "student (KD)", "baseline (no teacher)"}
    assert rows["teacher"]["agreement"] == 1.0
    assert rows["student (KD)"]["params"] == rows["baseline (no teacher)"]["params"] == 2410
    assert 0.5 < rows["teacher"]["accuracy"] <= 1.0
    md = (run_dir / "report.md").read_text()
    assert f"{rows['student (KD)']['accuracy']:.4g}" in md
    assert "test acc" in out  # the table printed at the end
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    student = [m for m in metrics if m["phase"] == "student" and "kd/raw" in m]
    assert student and all(np.isfinite(m["kd/weighted"]) for m in student)
    # every example seen exactly once in epoch 0 (one process)
    seen = json.loads((run_dir / "student" / "seen-epoch0-rank0.json").read_text())
    assert len(seen) == len(set(seen)) and len(seen) == (1347 // 64) * 64
    # `distil report` re-renders from report.json
    code, out = _run(["report", str(run_dir)])
    assert code == 0 and "student (KD)" in out


def test_student_labels_hides_labels_from_the_student_and_shrinks_the_baseline(
    tmp_path: Path,
) -> None:
    from distil.recipes.classifier_kd import hide_labels, labelled_subset

    _, cfg, _ = load_config("classifier_kd", [*FAST, "data.student_labels=200"])
    labels = torch.arange(1347) % 10
    keep = labelled_subset(cfg, labels)
    assert keep is not None and len(keep) == len(set(keep.tolist())) == 200
    _, other_seed, _ = load_config("classifier_kd", [*FAST, "data.student_labels=200", "seed=3"])
    again = labelled_subset(other_seed, labels)  # the same subset for every seed
    assert again is not None and torch.equal(keep, again)
    hidden = hide_labels(labels, keep)
    assert torch.equal(hidden[keep], labels[keep]) and int((hidden == -100).sum()) == 1147
    assert (
        labelled_subset(
            cfg.model_copy(update={"data": cfg.data.model_copy(update={"student_labels": 5000})}),
            labels,
        )
        is None
    )  # more than there are: every label

    run_dir = tmp_path / "run"
    code, out = _run(
        ["run", "classifier_kd", *FAST, "data.student_labels=200", "--run-dir", str(run_dir)]
    )
    assert code == 0, out
    assert "see 200 of the 1347 training labels" in " ".join(out.split())
    # the KD student reads every training example (the teacher's soft labels), the baseline
    # only the labelled ones
    student = json.loads((run_dir / "student" / "seen-epoch0-rank0.json").read_text())
    baseline = json.loads((run_dir / "baseline" / "seen-epoch0-rank0.json").read_text())
    assert len(student) == (1347 // 64) * 64 and len(baseline) == (200 // 64) * 64
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if m["phase"] == "student" and "hard_ce/raw" in m]
    # the hard CE is summed over the labelled examples only and divided by the whole batch
    assert steps and all(np.isfinite(m["kd/raw"]) and m["hard_ce/raw"] >= 0 for m in steps)


def test_mixup_drops_the_hard_target_of_a_mix_with_an_unlabelled_example() -> None:
    from distil.recipes.classifier_kd import KDStep, kd_loss_step
    from distil.teachers.models import LiveClassifierTeacher

    _, cfg, _ = load_config("classifier_kd", [*FAST, "kd.mixup_alpha=0.4"])
    torch.manual_seed(0)
    inputs = {"x": torch.randn(8, 5)}
    student, teacher = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    cpu = torch.device("cpu")
    live = LiveClassifierTeacher(teacher, inputs, device=cpu)
    ids = torch.arange(8)

    def loss(labels: torch.Tensor) -> dict[str, float]:
        torch.manual_seed(1)  # the same mix plan for each call
        ctx = KDStep(student, student, inputs, labels, cfg.kd, True, cpu, live)
        out = kd_loss_step(ctx, ids, 8.0)
        assert torch.isfinite(out.loss)
        return {k: float(v) for k, v in out.components.items()}

    hidden = loss(torch.full((8,), -100))  # no labels: the KD term alone
    assert hidden["hard_ce/raw"] == 0.0 and hidden["kd/raw"] > 0
    some = loss(torch.tensor([0, 1, 2, 0, -100, -100, -100, -100]))
    full = loss(torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    assert 0 <= some["hard_ce/raw"] < full["hard_ce/raw"]
    assert some["kd/raw"] == hidden["kd/raw"] == full["kd/raw"]  # labels never touch the KD term


def test_the_baseline_under_mixup_learns_the_mixed_labels() -> None:
    """Without a teacher the CE is against λ·y + (1 − λ)·y[perm] of the mixed images, the same
    targets the KD student's CE uses (it once read the first image's label alone)."""
    from distil.data.mixing import apply_mix, sample_mix
    from distil.losses.classifier import mixed_targets
    from distil.recipes.classifier_kd import KDStep, kd_loss_step

    _, cfg, _ = load_config("classifier_kd", [*FAST, "kd.mixup_alpha=0.4"])
    torch.manual_seed(0)
    inputs = {"x": torch.randn(8, 5)}
    student = torch.nn.Linear(5, 3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    cpu = torch.device("cpu")
    torch.manual_seed(1)
    out = kd_loss_step(
        KDStep(student, student, inputs, labels, cfg.kd, True, cpu, None), torch.arange(8), 8.0
    )
    torch.manual_seed(1)  # the same plan again, for the reference
    plan = sample_mix(8, mixup_alpha=0.4, cutmix_alpha=0.0)
    assert plan is not None and 0 < plan.lam < 1 and not torch.equal(labels, labels[plan.perm])
    mixed = apply_mix(inputs["x"], plan)
    target = mixed_targets(labels, labels[plan.perm], plan.lam, 3)
    expected = -(target * torch.log_softmax(student(mixed), dim=-1)).sum(-1).mean()
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-5)
    first_only = torch.nn.functional.cross_entropy(student(mixed), labels)
    assert float(out.loss) != pytest.approx(float(first_only), rel=1e-3)


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "distil", *args]


def test_resume_after_sigkill_gives_identical_weights(tmp_path: Path) -> None:
    args = [
        "run",
        "classifier_kd",
        "data.source={builtin: digits}",
        "teacher.training.epochs=1",
        "teacher.model.kwargs.channels=[8,16]",
        "train.epochs=12",
        "train.checkpoint_every=7",
        "eval.baseline=false",
        "run.log_with=[]",
        "student.model.kwargs.dropout=0.2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    subprocess.run(_cli([*args, "--run-dir", str(full)]), check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli([*args, "--run-dir", str(killed)]),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if len(list((killed / "student" / "checkpoints").glob("step-*"))) >= 2:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "student" / "final").exists(), "the run finished before it could be killed"
    leftover = killed / "student" / "checkpoints" / ".tmp-step-99-1"  # as a kill mid-save leaves
    leftover.mkdir()
    resumed = subprocess.run(
        _cli([*args, "--run-dir", str(killed), "--resume"]), env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "student: resumed from step-" in " ".join(resumed.stdout.split())  # says from where
    assert not leftover.exists()  # the interrupted save is cleaned, never read
    a = load_file(str(full / "student" / "final" / "model.safetensors"))
    b = load_file(str(killed / "student" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the steps replayed after the last checkpoint are logged once, not twice (issue 13, item 12)
    rows = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r.get("phase") == "student" and "lr" in r]
    assert steps == sorted(set(steps)) and len(steps) == len(
        [
            r
            for r in map(json.loads, (full / "metrics.jsonl").read_text().splitlines())
            if r.get("phase") == "student" and "lr" in r
        ]
    )


def test_ctrl_c_says_how_to_resume(tmp_path: Path) -> None:
    args = ["run", "classifier_kd", "data.source={builtin: digits}", "teacher.training.epochs=50"]
    args += ["teacher.model.kwargs.channels=[8,16]", "eval.baseline=false", "run.log_with=[]"]
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        _cli([*args, "--run-dir", str(run_dir)]),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell that starts the tests in the background (`cmd &`) makes its children ignore
        # SIGINT, and Python then installs no KeyboardInterrupt handler: give the run the default
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "metrics.jsonl").is_file():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume --run-dir" in " ".join(err.split()) and str(run_dir) in err


def test_resume_without_a_path_skips_a_start_that_failed_before_any_checkpoint(
    tmp_path: Path,
) -> None:
    from distil.training.run_dir import latest_run_dir

    good, failed = tmp_path / "classifier_kd-1", tmp_path / "classifier_kd-2"
    for folder in (good, failed):
        folder.mkdir()
        (folder / "config.resolved.yaml").write_text("recipe: classifier_kd\n")
    (good / "student" / "checkpoints" / "step-7").mkdir(parents=True)
    os.utime(good, (1, 1))  # older than the failed start
    assert latest_run_dir(str(tmp_path), "classifier_kd") == good


def test_resume_refuses_a_changed_config(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code, out = _run(
        ["run", "classifier_kd", *FAST, "eval.baseline=false", "--run-dir", str(run_dir)]
    )
    assert code == 0, out
    code, out = _run(
        [
            "run",
            "classifier_kd",
            *FAST,
            "eval.baseline=false",
            "train.lr=0.1",
            "--run-dir",
            str(run_dir),
            "--resume",
        ]
    )
    assert code == 2 and "differs" in out and "train" in out


def _csv(path: Path, labels: list[int], n: int = 40, nan_at: int | None = None) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        pixels = rng.random(16).round(3).tolist()
        if nan_at is not None and i % nan_at == nan_at - 1:
            pixels[0] = float("nan")
        rows.append({"pixels": json.dumps(pixels), "label": labels[i % len(labels)]})
    frame = pd.DataFrame(rows)
    frame["pixels"] = frame["pixels"].map(json.loads)
    frame.to_json(path, orient="records", lines=True)
    return path


def test_bad_inputs_stop_before_training(tmp_path: Path) -> None:
    cases = {
        "missing file": (
            [
                f"data.source={{train: [{tmp_path / 'none.csv'}]}}",
                "data.image_column=pixels",
            ],
            "none.csv' does not exist",  # caught by the config, before any work
        ),
        "teacher without weights": (["teacher.train=false"], "zoo teacher has no weights"),
        "teacher checkpoint of another shape": (
            ["teacher.train=false", f"teacher.model.weights={tmp_path / 'w.safetensors'}"],
            "does not fit the model",
        ),
    }
    from safetensors.torch import save_file

    save_file({"head.weight": torch.zeros(3, 3)}, str(tmp_path / "w.safetensors"))
    header_only = tmp_path / "empty.csv"
    header_only.write_text("pixels,label\n")
    cases["empty dataset"] = (
        [f"data.source={{train: [{header_only}]}}", "data.image_column=pixels"],
        "empty",
    )
    for name, (overrides, expected) in cases.items():
        code, out = _run(
            [
                "run",
                "classifier_kd",
                *FAST,
                *overrides,
                "--run-dir",
                str(tmp_path / name.replace(" ", "_")),
            ]
        )
        assert code == 2, (name, out)
        assert expected in out, (name, out)


def test_teacher_with_other_number_of_classes_is_refused(tmp_path: Path) -> None:
    data = _csv(tmp_path / "d.jsonl", labels=[0, 1, 2])
    code, out = _run(
        [
            "run",
            "classifier_kd",
            *FAST,
            f"data.source={{train: [{data}]}}",
            "data.image_column=pixels",
            "teacher.train=false",
            "teacher.model.factory=tests.integration.factories:five_class_mlp",
            "teacher.model.zoo=null",
            "teacher.model.kwargs={}",
            "--run-dir",
            str(tmp_path / "r"),
        ]
    )
    assert code == 2
    assert "teacher outputs 5 classes but the dataset has 3" in out


def test_nan_loss_stops_with_step_batch_and_last_good_checkpoint(tmp_path: Path) -> None:
    data = _csv(
        tmp_path / "d.jsonl", labels=[0, 1], n=64, nan_at=10
    )  # every 10th example has a NaN pixel
    run_dir = tmp_path / "r"
    code, out = _run(
        [
            "run",
            "classifier_kd",
            f"data.source={{train: [{data}]}}",
            "data.image_column=pixels",
            "data.test_fraction=0.1",
            "teacher.training.batch_size=8",
            "teacher.training.epochs=1",
            "teacher.model.zoo=mlp",
            "teacher.model.kwargs={}",
            "teacher.train=true",
            "--run-dir",
            str(run_dir),
        ]
    )
    assert code == 2, out
    assert "teacher: the loss is nan at step" in out and "batch" in out
    assert list((run_dir / "teacher" / "last-good").glob("step-*/COMPLETE"))
