"""Fuzzing ``distil validate``: whatever the config file and the overrides hold, it either says
"ok" or prints a clean error (exit code 2), never a traceback (issue 13 item 8).

Hypothesis draws YAML documents built from distil's real keys and arbitrary values, raw text
and raw bytes as config files, and dotted overrides with arbitrary values; the ``@example``s
are the crashes found by hand before this test existed. ``DISTIL_FUZZ_EXAMPLES=2000`` runs a
longer hunt (the default keeps the unit tier fast).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from distil.cli import app, shipped_configs
from distil.config.loading import load_yaml
from distil.recipes import RECIPES, load_recipe

runner = CliRunner()
KEYS = [
    "recipe",
    "command",
    "seed",
    "run",
    "train",
    "lr",
    "epochs",
    "batch_size",
    "data",
    "dataset",
    "train_limit",
    "teacher",
    "student",
    "model",
    "zoo",
    "hf",
    "kwargs",
    "kd",
    "kd_weight",
    "kd_temperature",
    "divergence",
    "eval",
    "baseline",
    "log_with",
    "device",
]
RECIPE_VALUES = ["classifier_kd", "lm_kd", "encoder_kd", "lm_pretrain", "nope"]
DOTTED = [
    "train.lr",
    "train.epochs",
    "seed",
    "recipe",
    "command",
    "data.dataset",
    "data.train_limit",
    "teacher.model.kwargs.channels",
    "kd.divergence",
    "kd.kd_temperature",
    "run.log_with",
    "student.model",
    "train",
]
TRICKY_VALUES = [
    "._",
    "!!float abc",
    "!!int x",
    "!!binary ###",
    "&a [*a]",
    "[",
    "{a: [",
    "- - -",
    "null",
    ".inf",
    "-.nan",
    "1e309",
    "[classifier_kd]",
    "{x: 1}",
    "0x1G",
    "'",
    "\x00",
    "[" * 400 + "]" * 400,
]

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(RECIPE_VALUES)
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=25,
)
documents = st.fixed_dictionaries(
    {"recipe": st.sampled_from(RECIPE_VALUES) | values},
    optional={"command": st.sampled_from(["generate", "cache"]) | values},
).flatmap(
    lambda head: st.dictionaries(st.sampled_from(KEYS), values, max_size=6).map(
        lambda rest: {**rest, **head}
    )
)
override_values = st.sampled_from(TRICKY_VALUES) | st.text(max_size=16)
overrides = st.lists(
    st.tuples(st.sampled_from(DOTTED) | st.text(max_size=10), override_values).map(
        lambda kv: f"{kv[0]}={kv[1]}"
    )
    | st.text(max_size=12),
    max_size=4,
)


def _dotted_keys(data: Any, prefix: str = "") -> list[str]:
    if not isinstance(data, dict):
        return [prefix]
    keys = [prefix] if prefix else []
    for k, v in data.items():
        keys += _dotted_keys(v, f"{prefix}.{k}" if prefix else str(k))
    return keys


def _model_keys(model: Any, prefix: str = "", depth: int = 0) -> list[str]:
    """Every dotted field name of a pydantic config model (through unions and optionals)."""
    from pydantic import BaseModel

    keys: list[str] = []
    for name, field in getattr(model, "model_fields", {}).items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        stack = [field.annotation]
        while stack and depth < 4:
            ann = stack.pop()
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                keys += _model_keys(ann, f"{dotted}.", depth + 1)
            stack.extend(getattr(ann, "__args__", ()) or ())
    return keys


SHIPPED = sorted(shipped_configs())
# every dotted key of every shipped config and recipe schema, so overrides reach each validator
SHIPPED_KEYS = sorted(
    {k for name in SHIPPED for k in _dotted_keys(load_yaml(shipped_configs()[name]))}
    | {k for name in RECIPES for k in _model_keys(load_recipe(name).Config)}
)
yaml_values = values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip())


def _validate_spec(spec: str, extra: list[str]) -> None:
    result = runner.invoke(app, ["validate", spec, *extra])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"traceback for {spec} {extra}: {result.exception!r}") from (
            result.exception
        )
    assert result.exit_code in (0, 2), result.output


def _validate(path: Path, extra: list[str]) -> None:
    result = runner.invoke(app, ["validate", str(path), *extra])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(
            f"traceback for {path.read_bytes()[:300]!r} {extra}: {result.exception!r}"
        ) from result.exception
    assert result.exit_code in (0, 2), result.output
    if result.exit_code == 2:  # distil's "error: ..." or click's usage error ("-x=1" is an option)
        assert "error" in result.output.lower(), result.output


FUZZ = settings(
    max_examples=int(os.environ.get("DISTIL_FUZZ_EXAMPLES", "30")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(document=documents, extra=overrides)
@example(document={"recipe": ["classifier_kd"]}, extra=[])
@example(document={"recipe": "classifier_kd", "command": ["generate"]}, extra=[])
@example(document={"command": {"generate": 1}}, extra=[])
@example(document={"recipe": "classifier_kd"}, extra=["train.lr=._"])
@example(document={"recipe": "classifier_kd"}, extra=["train.lr=!!float abc"])
@example(document={"recipe": "classifier_kd"}, extra=["teacher.model.kwargs.x=&a [*a]"])
@example(document={"recipe": "classifier_kd"}, extra=["a" + ".a" * 600 + "=1"])
def test_validate_never_raises_on_yaml_documents(
    tmp_path: Path, document: dict[str, Any], extra: list[str]
) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")
    _validate(path, extra)


@FUZZ
@given(text=st.text(max_size=200) | st.sampled_from(TRICKY_VALUES))
@example(text="train:\n  lr: !!float abc\n")
@example(text="recipe: classifier_kd\ntrain:\n  lr: ._\n")
@example(text="a: " + "[" * 500 + "]" * 500)
@example(text="a:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 500)))
@example(text="recipe: classifier_kd\nteacher:\n  model: {zoo: cnn, kwargs: &a {x: *a}}\n")
def test_validate_never_raises_on_raw_text(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _validate(path, [])


@FUZZ
@given(raw=st.binary(max_size=200))
@example(raw=b"recipe: classifier_kd\n# caf\xe9\n")
@example(raw=b"\xff\xfe\x00r\x00e")
def test_validate_never_raises_on_raw_bytes(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(raw)
    _validate(path, [])


@FUZZ
@given(
    spec=st.sampled_from(SHIPPED),
    extra=st.lists(
        st.tuples(
            st.sampled_from(SHIPPED_KEYS),
            st.sampled_from(TRICKY_VALUES) | yaml_values | st.text(max_size=12),
        ).map(lambda kv: f"{kv[0]}={kv[1]}"),
        min_size=1,
        max_size=3,
    ),
)
def test_validate_never_raises_on_overrides_of_shipped_configs(spec: str, extra: list[str]) -> None:
    _validate_spec(spec, extra)
