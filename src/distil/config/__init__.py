"""Typed configuration: pydantic v2 models, YAML files and dotted command-line overrides."""

from distil.config.base import StrictModel
from distil.config.loading import (
    ConfigError,
    apply_overrides,
    load_yaml,
    parse_override,
    validate_config,
)

__all__ = [
    "ConfigError",
    "StrictModel",
    "apply_overrides",
    "load_yaml",
    "parse_override",
    "validate_config",
]
