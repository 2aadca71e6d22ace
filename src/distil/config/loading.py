"""Loading configs: YAML (``safe_load``) plus dotted overrides, validated all at once.

Every problem is reported together, each naming its dotted key, with a "did you mean" for
unknown keys, so a user fixes a config in one pass instead of one error per run.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from distil.errors import DistilError

ModelT = TypeVar("ModelT", bound=BaseModel)


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``3e-4`` as a float (YAML 1.1 wants ``3.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


MAX_DEPTH = 32  # a distil config nests about 5 levels; far deeper is a mistake or an attack


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` semantics (no object construction) with YAML 1.2-style floats.

    Raises:
        yaml.YAMLError: Also for what PyYAML lets escape as other exceptions: a tag whose value
            does not convert (``!!float abc``, a ``ValueError``), and nesting so deep that the
            parser runs out of stack (``RecursionError``).
    """
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        raise
    except (ValueError, TypeError, OverflowError) as exc:
        raise yaml.YAMLError(f"a tagged value does not convert: {exc}") from exc
    except RecursionError as exc:
        raise yaml.YAMLError(
            "nested too deeply for the YAML parser (a distil config nests about 5 levels)"
        ) from exc


def check_depth(data: Any, limit: int = MAX_DEPTH, *, at: tuple[str, ...] = ()) -> None:
    """Refuse data nested deeper than ``limit`` or referring to itself (a YAML alias cycle
    like ``&a [*a]``), before anything walks it recursively.

    Args:
        data: Parsed YAML.
        limit: Deepest nesting allowed, counted from ``at``.
        at: The dotted key ``data`` sits under (an override's key), for the message.

    Raises:
        ConfigError: Naming the dotted key where the limit is crossed.
    """
    stack: list[tuple[Any, tuple[str, ...], frozenset[int]]] = [(data, at, frozenset())]
    while stack:
        node, path, parents = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        where = ".".join(path) or "<root>"
        if id(node) in parents:
            raise ConfigError(
                [f"{where}: refers to itself (a YAML alias cycle); write the value out"]
            )
        if len(path) - len(at) >= limit:
            raise ConfigError(
                [f"{where}: nested more than {limit} levels deep; a distil config needs about 5"]
            )
        items = node.items() if isinstance(node, dict) else enumerate(node)
        inner = parents | {id(node)}
        stack.extend((child, (*path, str(key)), inner) for key, child in items)


class ConfigError(DistilError):
    """A config that cannot be used; ``problems`` holds one line per dotted key."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} has {len(problems)} problem(s):\n{lines}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load``; a missing or malformed file is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            [f"file not found: {p} (check the path, or list recipes with `distil recipes`)"]
        )
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [f"{p}: not UTF-8 text (byte {exc.start}: {exc.reason}); save the file as UTF-8"]
        ) from exc
    try:
        data = safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{p}: not valid YAML: {exc}"]) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{p}: top level must be a mapping of keys, got {type(data).__name__}"])
    check_depth(data)
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``train.lr=3e-4`` into a dotted key and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError([f"override {text!r} must look like key.sub=value (e.g. train.lr=3e-4)"])
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError([f"override {text!r} has an empty key part"])
    if len(key.split(".")) > MAX_DEPTH:
        raise ConfigError([f"override {key[:60]!r}...: more than {MAX_DEPTH} key parts"])
    try:
        value = safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not YAML: the text itself, which validation then judges
    check_depth(value, at=tuple(key.split(".")))
    return key, value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each dotted override set (intermediate maps created)."""
    out: dict[str, Any] = copy.deepcopy(dict(data))
    problems: list[str] = []
    for text in overrides:
        key, value = parse_override(text)
        node: dict[str, Any] = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
            if not isinstance(child, dict):
                problems.append(f"{'.'.join(parts[: i + 1])}: is a value, cannot set {key}")
                break
            node = child
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems, source="overrides")
    return out


def _allowed_keys(model: type[BaseModel], loc: tuple[str | int, ...]) -> list[str]:
    """The field names valid at ``loc`` (the parent of an unknown key), for "did you mean"."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        current = _model_in_annotation(annotation)
        if current is None:
            return []
    fields = getattr(current, "model_fields", None)
    return list(fields) if fields else []


def _model_in_annotation(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in_annotation(arg)
        if found is not None:
            return found
    return None


def format_validation_error(exc: ValidationError, model: type[BaseModel]) -> list[str]:
    """One line per problem, each starting with its dotted key, sorted by key."""
    problems: list[str] = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc) or "<root>"
        if err["type"] == "extra_forbidden":
            name = str(loc[-1])
            allowed = _allowed_keys(model, loc[:-1])
            close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.5)
            hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?" if close else ""
            valid = f" (valid here: {', '.join(sorted(allowed))})" if allowed and not close else ""
            problems.append(f"{dotted}: unknown key{hint}{valid}")
        else:
            msg = err["msg"]
            if err["type"] == "missing":
                msg = "required key is missing"
            got = err.get("input")
            shown = "" if err["type"] == "missing" or isinstance(got, dict) else f" (got {got!r})"
            problems.append(f"{dotted}: {msg}{shown}")
    return sorted(problems, key=lambda p: p.partition(":")[0])  # by dotted key, stable


def validate_config(model: type[ModelT], data: Mapping[str, Any], source: str = "config") -> ModelT:
    """Validate ``data`` against ``model``, the files it names included (they must exist); raise
    one ConfigError listing every problem."""
    try:
        return model.model_validate(dict(data), context={"check_paths": True})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model), source=source) from exc
