"""Model factories that tests name as ``tests.integration.factories:NAME`` (the module:factory path)."""

from __future__ import annotations

from typing import Any

from torch import nn


def five_class_mlp(num_classes: int, input_shape: Any = None, **_: Any) -> nn.Module:
    """Ignores ``num_classes`` on purpose: a teacher whose head does not fit the data."""
    del num_classes
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
