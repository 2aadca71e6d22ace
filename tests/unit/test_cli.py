"""The command line: recipes, cp, validate; and the recipe table kept in sync with README and configs."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from distil.cli import CONFIG_COMMANDS, app, shipped_configs
from distil.config.loading import load_yaml
from distil.recipes import RECIPES

runner = CliRunner()
README = Path(__file__).resolve().parents[2] / "README.md"


def test_recipes_lists_every_recipe_and_its_configs() -> None:
    result = runner.invoke(app, ["recipes"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for name in RECIPES:
        assert name in result.output
    for cfg_name, path in shipped_configs().items():
        data = load_yaml(path)
        assert data.get("recipe") in RECIPES or data.get("command") in CONFIG_COMMANDS, cfg_name


def test_readme_documents_every_recipe_and_command() -> None:
    text = README.read_text()
    for name in RECIPES:
        assert f"`{name}`" in text, f"README does not document recipe {name}"
    for command in app.registered_commands:
        name = command.name or (command.callback.__name__ if command.callback else "")
        assert f"distil {name}" in text, f"README does not document `distil {name}`"


def test_cp_copies_a_config_that_runs_through_validate(tmp_path: Path) -> None:
    dest = tmp_path / "mine.yaml"
    result = runner.invoke(app, ["cp", "classifier_kd", str(dest)])
    assert result.exit_code == 0, result.output
    assert dest.read_text() == shipped_configs()["classifier_kd"].read_text()
    result = runner.invoke(app, ["validate", str(dest), "train.lr=1e-3"])
    assert result.exit_code == 0 and "valid classifier_kd config" in result.output
    again = runner.invoke(app, ["cp", "classifier_kd", str(dest)])
    assert again.exit_code == 2 and "exists" in again.output


def test_validate_reports_all_problems_and_exits_2() -> None:
    result = runner.invoke(app, ["validate", "classifier_kd", "train.lr=-1", "train.epocs=3"])
    assert result.exit_code == 2
    assert "train.lr" in result.output and "did you mean 'train.epochs'" in result.output


def test_unknown_config_name_suggests_the_close_one() -> None:
    result = runner.invoke(app, ["validate", "classifer_kd"])
    assert result.exit_code == 2 and "Did you mean 'classifier_kd'" in result.output


def test_readme_cache_workflow_trains_from_the_folder_distil_cache_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distil.cli import load_config

    monkeypatch.chdir(tmp_path)  # the shipped lm_kd reads the built-in teacher's folder
    (tmp_path / "runs" / "lm-teacher").mkdir(parents=True)

    lines = [line.split("#")[0].split() for line in README.read_text().splitlines()]
    cache_args = next(w[3:] for w in lines if w[:3] == ["distil", "cache", "lm_kd"])
    run_args = next(
        w[3:]
        for w in lines
        if w[:3] == ["distil", "run", "lm_kd"] and any(a.startswith("teacher.cache") for a in w)
    )
    _, cfg, _ = load_config("lm_kd", cache_args)  # what `distil cache` writes to
    run = dict(a.split("=", 1) for a in run_args)
    assert run["teacher.cache.path"] == cfg.teacher.cache.path
    # the settings that decide the cached dataset are the same on both lines (else: refused)
    cache = dict(a.split("=", 1) for a in cache_args)
    assert {k: v for k, v in cache.items() if k.startswith("data.")} == {
        k: v for k, v in run.items() if k.startswith("data.")
    }
    # the README says how long the unbounded cache takes and how to bound it
    assert "data.train_limit" in cache
    text = " ".join(README.read_text().split())
    assert "Unbounded, `distil cache lm_kd` runs the teacher over the whole" in text
    assert "about 40 minutes" in text and "`data.train_limit=N` bounds it" in text


def _help(*args: str) -> str:
    result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return " ".join(result.output.replace("│", " ").split())


def test_help_texts_say_what_they_mean() -> None:
    main = _help()
    assert "MNIST" in main and "digits, CNN" not in main  # the default job is MNIST-5k
    cache = _help("cache")
    assert "distil cache CONFIG [overrides]" in cache  # brackets not eaten as Rich markup
    assert "[teacher.cache.k=8 ...]" in cache and "inspect PATH [--verify]" in cache
    generate = _help("generate")
    assert "resumable shards that `lm_kd` trains on" in generate  # one paragraph, no stray break


def test_version_option_prints_the_version() -> None:
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"distil {version('distil')}"


def test_readme_validate_sample_matches_the_output() -> None:
    text = README.read_text()
    block = text.split("$ distil validate ", 1)[1].split("```", 1)[0]
    command, *expected = block.strip().splitlines()
    result = runner.invoke(app, ["validate", *command.split()], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    got = [line.rstrip() for line in result.output.strip().splitlines()]
    assert len(got) == len(expected)
    for want, line in zip(expected, got, strict=True):
        head, _, tail = want.partition("...")  # the README shortens long lists with ...
        assert line.startswith(head.rstrip()) and line.endswith(tail.strip()), (want, line)
