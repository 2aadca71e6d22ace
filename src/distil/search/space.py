"""Search-space distributions: parsed from ``loguniform(1, 8)``-style text or YAML mappings,
sampled through an Optuna trial, and turned into the dotted overrides a ``distil run`` takes.

A distribution is written one of three ways, in the YAML ``search.space`` or after ``--space``:

- ``loguniform(1e-4, 1e-2)``, ``uniform(0, 1)``, ``int(1, 4)``, ``int(16, 256, log)``,
  ``int(8, 64, step=8)``, ``categorical(forward_kl, reverse_kl)``;
- a YAML list, which is categorical: ``[forward_kl, reverse_kl]``, or for student shapes
  ``[[32], [64], [64, 32]]``;
- a mapping: ``{type: loguniform, low: 1, high: 8}``.

Optuna stores categorical choices only as ``None``/bool/int/float/str, so a list or mapping choice
(a student shape) is stored as its JSON text and decoded again when the override is built.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, model_validator

from distil.config.base import StrictModel
from distil.config.loading import safe_load

if TYPE_CHECKING:
    import optuna


class FloatDistribution(StrictModel):
    """A real number, uniform in ``[low, high]`` or in its logarithm (``loguniform``)."""

    type: Literal["loguniform", "uniform"]
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> FloatDistribution:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0 (got {self.low}); use uniform for 0")
        return self


class IntDistribution(StrictModel):
    """An integer in ``[low, high]`` (both included), every ``step``, optionally log-spaced."""

    type: Literal["int"]
    low: int
    high: int
    step: int = Field(default=1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> IntDistribution:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and (self.low < 1 or self.step != 1):
            raise ValueError("int(..., log) needs low >= 1 and step 1")
        return self


class CategoricalDistribution(StrictModel):
    """One of ``choices``; a choice may be any YAML value, e.g. a student shape ``[64, 32]``."""

    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct(self) -> CategoricalDistribution:
        encoded = [encode_choice(c) for c in self.choices]
        if len(set(encoded)) != len(encoded):
            raise ValueError(f"choices repeat a value: {self.choices}")
        return self


Distribution = Annotated[
    FloatDistribution | IntDistribution | CategoricalDistribution, Field(discriminator="type")
]

_CALL = re.compile(r"^\s*([A-Za-z_]+)\s*\((.*)\)\s*$", re.S)
_ALIASES = {
    "loguniform": "loguniform",
    "log_uniform": "loguniform",
    "uniform": "uniform",
    "int": "int",
    "categorical": "categorical",
    "choice": "categorical",
}


def parse_distribution(spec: Any) -> Any:
    """Text, list or mapping → the mapping form the distribution models validate.

    Args:
        spec: ``"loguniform(1, 8)"``, ``"int(16, 256, log)"``, ``"int(8, 64, step=8)"``,
            ``"[a, b]"`` or a list (categorical), or an already-typed mapping (returned as is).

    Returns:
        ``{"type": ..., ...}``; anything unrecognised is returned unchanged so that pydantic
        reports it against the key.

    Raises:
        ValueError: If the text names an unknown distribution or its arguments do not fit.
    """
    if isinstance(spec, Mapping | FloatDistribution | IntDistribution | CategoricalDistribution):
        return spec
    if isinstance(spec, list):
        return {"type": "categorical", "choices": spec}
    if not isinstance(spec, str):
        return spec
    text = spec.strip()
    if text.startswith("["):
        choices = safe_load(text)
        if not isinstance(choices, list):
            raise ValueError(f"{spec!r}: a categorical list must be a YAML list like [a, b]")
        return {"type": "categorical", "choices": choices}
    match = _CALL.match(text)
    if match is None:
        raise ValueError(
            f"{spec!r} is not a distribution; write loguniform(LOW, HIGH), uniform(LOW, HIGH), "
            "int(LOW, HIGH[, log][, step=N]), categorical(A, B, ...) or a list [A, B, ...]"
        )
    name, inner = match.group(1).lower(), match.group(2)
    kind = _ALIASES.get(name)
    if kind is None:
        raise ValueError(
            f"{spec!r}: unknown distribution {name!r}; known: loguniform, uniform, int, categorical"
        )
    args = safe_load(f"[{inner}]") or []
    if kind == "categorical":
        return {"type": "categorical", "choices": list(args)}
    positional = [a for a in args if not (isinstance(a, str) and "=" in a) and a != "log"]
    named = dict(a.split("=", 1) for a in args if isinstance(a, str) and "=" in a)
    if len(positional) != 2:
        raise ValueError(f"{spec!r}: {kind} takes two bounds, LOW and HIGH")
    out: dict[str, Any] = {"type": kind, "low": positional[0], "high": positional[1]}
    if kind == "int":
        out["log"] = "log" in args or named.pop("log", "false").lower() == "true"
        if "step" in named:
            out["step"] = int(named.pop("step"))
    if named:
        raise ValueError(f"{spec!r}: unknown argument(s) {sorted(named)}")
    return out


def parse_space_item(text: str) -> tuple[str, Any]:
    """``"kd.kd_temperature=loguniform(1, 8)"`` → ``("kd.kd_temperature", {...})``.

    Raises:
        ValueError: If there is no ``=`` or the key is empty.
    """
    key, sep, spec = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(
            f"--space {text!r} must look like dotted.key=DISTRIBUTION, e.g. kd.kd_temperature=loguniform(1, 8)"
        )
    return key, parse_distribution(spec)


def encode_choice(value: Any) -> Any:
    """A categorical choice as Optuna can store it: scalars unchanged, lists/maps as JSON text."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return json.dumps(value, sort_keys=True)


def decode_choice(stored: Any, choices: list[Any]) -> Any:
    """The original choice whose stored form is ``stored``."""
    for choice in choices:
        if encode_choice(choice) == stored:
            return choice
    raise KeyError(f"{stored!r} is not one of {choices}")


DistributionModel = FloatDistribution | IntDistribution | CategoricalDistribution


def suggest(trial: optuna.trial.Trial, space: Mapping[str, DistributionModel]) -> dict[str, Any]:
    """Draw one value per key through the trial (the sampler decides); decoded config values."""
    values: dict[str, Any] = {}
    for key, dist in space.items():
        if isinstance(dist, FloatDistribution):
            values[key] = trial.suggest_float(
                key, dist.low, dist.high, log=dist.type == "loguniform"
            )
        elif isinstance(dist, IntDistribution):
            values[key] = trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            stored = trial.suggest_categorical(key, [encode_choice(c) for c in dist.choices])
            values[key] = decode_choice(stored, dist.choices)
    return values


def decode_params(
    params: Mapping[str, Any], space: Mapping[str, DistributionModel]
) -> dict[str, Any]:
    """A finished trial's stored params → config values (categorical JSON text decoded)."""
    out: dict[str, Any] = {}
    for key, stored in params.items():
        dist = space.get(key)
        out[key] = (
            decode_choice(stored, dist.choices)
            if isinstance(dist, CategoricalDistribution)
            else stored
        )
    return out


def to_overrides(values: Mapping[str, Any]) -> list[str]:
    """Config values → ``key=value`` overrides that ``distil run`` parses back to the same values
    (JSON is valid YAML flow, so lists, strings and floats round-trip)."""
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def probe_values(dist: DistributionModel) -> list[Any]:
    """Values that, applied to the base config, show whether every draw can be valid: both bounds
    of a range and every categorical choice (``distil validate`` checks each)."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, IntDistribution):
        return [dist.low, dist.high]
    return [dist.low, dist.high if math.isfinite(dist.high) else dist.low]


def describe(dist: DistributionModel) -> str:
    """The distribution as written on the command line."""
    if isinstance(dist, CategoricalDistribution):
        return "categorical(" + ", ".join(json.dumps(c) for c in dist.choices) + ")"
    if isinstance(dist, IntDistribution):
        extra = (", log" if dist.log else "") + (f", step={dist.step}" if dist.step != 1 else "")
        return f"int({dist.low}, {dist.high}{extra})"
    return f"{dist.type}({dist.low:g}, {dist.high:g})"
