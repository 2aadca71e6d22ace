"""The command line: recipes, cp, validate; and the recipe table kept in sync with README and configs."""

from __future__ import annotations

from pathlib import Path

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
