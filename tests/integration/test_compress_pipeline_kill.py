"""The pipeline survives SIGKILL: between two stages, and in the middle of a stage, each in a real
subprocess; the resumed run reuses what was published and ends with the same outputs as a run
that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from distil.compress.artifacts import load_model, save_float_model
from distil.compress.config import ModelKind, PipelineConfig
from distil.compress.export import save_zoo_classifier
from distil.compress.pipeline import PipelineHooks, StageContext, run_pipeline
from distil.models.classifier import SmallCNN

SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path

    from distil.compress.artifacts import load_model, save_float_model
    from distil.compress.config import ModelKind, PipelineConfig
    from distil.compress.pipeline import PipelineHooks, run_pipeline

    config_path, kill = sys.argv[1], sys.argv[2]
    config = PipelineConfig.model_validate(json.loads(Path(config_path).read_text()))

    def copy_student(ctx):
        # a distil stage that does not train: it checkpoints, may be killed, and resumes
        marker = ctx.work_dir / "step"
        resumed = marker.is_file()
        marker.write_text("1")
        (ctx.output_dir / "half-written.bin").write_bytes(b"x" * 100)
        if kill == "inside:distil":
            os.kill(os.getpid(), signal.SIGKILL)
        (ctx.output_dir / "half-written.bin").unlink()
        loaded = load_model(ModelKind.classifier, ctx.input_dir)
        save_float_model(loaded, loaded.module, ctx.output_dir)
        return {"resumed": resumed}

    def after(record):
        if kill == f"after:{record.name}":
            os.kill(os.getpid(), signal.SIGKILL)

    report = run_pipeline(config, PipelineHooks(distillers={"copy": copy_student}, after_stage=after))
    print(json.dumps({r.name: r.status.value for r in report.stages}))
    """
)


def _config(source: Path, out: Path) -> dict[str, object]:
    return {
        "source": {"kind": "classifier", "folder": str(source)},
        "output_dir": str(out),
        "stages": [
            {"stage": "prune", "method": {"kind": "cnn_channels", "ratio": 0.5}},
            {"stage": "distil", "recipe": "copy"},
            {"stage": "quantise", "scheme": "int8_weight_only"},
            {"stage": "export"},
        ],
        "measure": {"latency": False},
    }


def _run(script: Path, config: Path, kill: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(script), str(config), kill],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )


def test_killed_between_and_inside_stages_then_resumed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = tmp_path / "teacher"
    save_zoo_classifier(
        SmallCNN(1, 4, channels=(8, 16)),
        source,
        zoo="cnn",
        kwargs={"channels": [8, 16]},
        in_shape=(1, 8, 8),
        num_classes=4,
    )
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(_config(source, tmp_path / "out")))
    stages = tmp_path / "out" / "stages"

    first = _run(script, config, "after:prune")  # SIGKILL between prune and distil
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert sorted(p.name.split("-")[1] for p in stages.iterdir()) == ["prune"]

    second = _run(script, config, "inside:distil")  # SIGKILL with a half-written distil output
    assert second.returncode == -signal.SIGKILL, second.stderr[-2000:]
    assert any(p.name.startswith(".tmp-01-distil") for p in stages.iterdir())
    assert not any(p.name.startswith("01-distil") for p in stages.iterdir())

    third = _run(script, config, "none")
    assert third.returncode == 0, third.stderr[-2000:]
    statuses = json.loads(third.stdout.strip().splitlines()[-1])
    assert statuses == {"prune": "reused", "distil": "ran", "quantise": "ran", "export": "ran"}
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["stages"][1]["details"] == {"resumed": True}  # its checkpoint survived the kill
    assert not any(p.name.startswith(".tmp-") for p in stages.iterdir())

    # the same pipeline never interrupted, in this process: the same output fingerprints
    def copy_student(ctx: StageContext) -> dict[str, object]:
        loaded = load_model(ModelKind.classifier, ctx.input_dir)
        save_float_model(loaded, loaded.module, ctx.output_dir)
        return {"resumed": False}

    clean = run_pipeline(
        PipelineConfig.model_validate(_config(source, tmp_path / "clean")),
        PipelineHooks(distillers={"copy": copy_student}),
    )
    assert [s.output_fingerprint for s in clean.stages] == [
        s["output_fingerprint"] for s in report["stages"]
    ]
