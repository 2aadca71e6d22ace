"""diffusion_train and diffusion_distill end to end on scikit-learn's 8x8 digits with a tiny UNet:
run folders, model folders that `distil sample` reads, reports with grids, each distillation
method, the checks that stop a bad config before training."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from distil.diffusion.metrics import load_feature_classifier
from distil.diffusion.model import ModelKind, load_diffusion_model
from tests.helpers import run_cli

TINY_MODEL = [
    "data.dataset=digits",
    "data.image_size=8",
    "data.train_limit=256",
    "data.test_limit=120",
    "model.image_size=8",
    "model.block_out_channels=[8,16]",
    "model.norm_num_groups=4",
    "run.log_with=[]",
]
TINY_EVAL = [
    "eval.num_images=40",
    "eval.batch_size=20",
    "eval.kid_subsets=2",
    "eval.kid_subset_size=20",
    "eval.grid_per_class=2",
]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    run = tmp_path_factory.mktemp("diffusion") / "teacher"
    code, out = run_cli(
        [
            "run",
            "diffusion_train",
            *TINY_MODEL,
            *TINY_EVAL,
            "train.max_steps=6",
            "train.batch_size=32",
            "train.warmup_steps=2",
            "train.checkpoint_every=3",
            "classifier.channels=[8,16]",
            "classifier.training.epochs=1",
            "classifier.training.batch_size=32",
            "eval.samplers=[{kind: ddim, steps: 4}, {kind: truncated_karras, steps: 4, guidance_scale: 2.0}]",
            "--run-dir",
            str(run),
        ]
    )
    assert code == 0, out
    yield run


def test_train_writes_model_classifier_and_report(teacher_run: Path) -> None:
    _, card = load_diffusion_model(teacher_run)  # finds model/final
    assert card.kind is ModelKind.UNET and card.num_classes == 10 and card.sampling.steps == 64
    assert card.notes["trained_by"] == "diffusion_train"
    _, info = load_feature_classifier(teacher_run / "classifier" / "final")
    assert info.image_size == 8 and 0.0 <= info.test_accuracy <= 1.0
    report = json.loads((teacher_run / "report.json").read_text())
    rows = report["table"]["rows"]
    assert [r.get("label") for r in rows] == ["ddim-4", "truncated_karras-4", None]
    assert rows[0]["nfe_per_image"] == 4 and rows[1]["nfe_per_image"] == 8  # CFG at 2: two rows
    assert rows[2]["model"] == "real images (floor)" and rows[2]["num_images"] == 40
    figures = [f["file"] for f in report["figures"]]
    assert figures[0] == "samples/distance_vs_nfe.png"
    assert all((teacher_run / f).is_file() for f in figures)
    assert "Figures" in (teacher_run / "report.md").read_text()
    assert "data:image/png;base64" in (teacher_run / "report.html").read_text()
    metrics = [
        json.loads(line) for line in (teacher_run / "metrics.jsonl").read_text().splitlines()
    ]
    assert {m["phase"] for m in metrics} >= {"classifier", "model"}
    assert any("denoise/weighted" in m for m in metrics if m["phase"] == "model")


def _distill(
    teacher_run: Path, run: Path, *args: str, config: str = "diffusion_distill"
) -> tuple[int, str]:
    return run_cli(
        [
            "run",
            config,
            f"teacher.path={teacher_run}",
            *[a for a in TINY_MODEL if not a.startswith("model.")],
            *TINY_EVAL,
            "train.max_steps=3",
            "train.batch_size=16",
            "train.checkpoint_every=2",
            "eval.reference={kind: ddim, steps: 4}",
            *args,
            "--run-dir",
            str(run),
        ]
    )


def test_progressive_stages_halve_the_steps(teacher_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "pd"
    code, out = _distill(teacher_run, run, "method.teacher_steps=4", "method.final_steps=1")
    assert code == 0, out
    for steps in (2, 1):
        _, card = load_diffusion_model(run / f"stage-{steps}" / "final")
        assert card.sampling.steps == steps and card.notes["distilled_by"] == "progressive"
    _, card = load_diffusion_model(run)  # student/final: the last stage
    assert card.sampling.steps == 1
    rows = json.loads((run / "report.json").read_text())["table"]["rows"]
    names = [(r["model"], r.get("nfe_per_image")) for r in rows]
    assert names == [
        ("teacher (reference)", 4),
        ("PD student (2 steps)", 2),
        ("PD student (1 steps)", 1),
        ("teacher", 2),
        ("teacher", 1),
        ("real images (floor)", None),
    ]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"stage-2", "stage-1"} <= {m["phase"] for m in metrics}


CONFIGS = {
    "guidance": "diffusion_distill-guidance",
    "consistency": "diffusion_distill-consistency",
    "adapter_guidance": "diffusion_distill-adapter",
}


@pytest.mark.parametrize(
    ("kind", "extra", "student", "nfe"),
    [
        ("guidance", ["eval.student_steps=[2]", "eval.guidance_scale=2.0"], "GD student", 2),
        (
            "consistency",
            ["eval.student_steps=[1,2]", "eval.track_every=2", "eval.track_images=20"],
            "CD student",
            1,
        ),
        (
            "adapter_guidance",
            [
                "eval.student_steps=[2]",
                "eval.guidance_scale=2.0",
                "method.trajectories=6",
                "method.trajectory_sampler={kind: ddim, steps: 3}",
            ],
            "AGD student",
            2,
        ),
    ],
)
def test_guided_methods(
    teacher_run: Path, tmp_path: Path, kind: str, extra: list[str], student: str, nfe: int
) -> None:
    run = tmp_path / kind
    code, out = _distill(teacher_run, run, *extra, config=CONFIGS[kind])
    assert code == 0, out
    rows = json.loads((run / "report.json").read_text())["table"]["rows"]
    first_student = next(r for r in rows if r["model"] == student)
    assert first_student["nfe_per_image"] == nfe  # one pass per step, guidance included
    _, card = load_diffusion_model(run)
    assert card.notes["distilled_by"] == kind
    if kind == "consistency":
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        tracked = [m for m in metrics if "track/fd_lcm2" in m]
        assert [m["step"] for m in tracked] == [2, 3]
    if kind == "adapter_guidance":
        assert (run / "trajectories.safetensors").is_file()
        assert card.kind is ModelKind.ADAPTER_UNET
    code, out = run_cli(["sample", str(run), "--per-class", "1"])
    assert code == 0, out


def test_bad_configs_stop_before_training(teacher_run: Path, tmp_path: Path) -> None:
    code, out = run_cli(
        ["validate", "diffusion_distill", "method.teacher_steps=48", "method.final_steps=4"]
    )
    assert code == 2 and "power of two" in out
    code, out = run_cli(["validate", "diffusion_train", "model.image_size=8"])
    assert code == 2 and "data.image_size" in out
    code, out = _distill(teacher_run, tmp_path / "bad", "data.image_size=16")
    assert code == 2 and "data.image_size=8" in out
    code, out = run_cli(
        ["validate", "diffusion_train", "eval.samplers=[{kind: truncated_karras, steps: 7}]"]
    )
    assert code == 2 and "pinned" in out


def test_resume_restores_the_ema_bit_for_bit(teacher_run: Path, tmp_path: Path) -> None:
    """The EMA rides in the phase checkpoints: resuming from step 3 of 6 exports the same EMA."""
    import shutil

    from safetensors.torch import load_file

    resumed = tmp_path / "resumed"
    shutil.copytree(teacher_run, resumed)
    shutil.rmtree(resumed / "model" / "final")
    shutil.rmtree(resumed / "model" / "checkpoints" / "step-6")
    config = (teacher_run / "config.resolved.yaml").read_text()
    (tmp_path / "config.yaml").write_text(config)
    code, out = run_cli(
        ["run", str(tmp_path / "config.yaml"), "--run-dir", str(resumed), "--resume"]
    )
    assert code == 0, out
    assert "resumed from step-3" in " ".join(out.split())
    first = load_file(str(teacher_run / "model" / "final" / "model.safetensors"))
    again = load_file(str(resumed / "model" / "final" / "model.safetensors"))
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
