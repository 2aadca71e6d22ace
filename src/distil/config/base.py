"""The base of every config model: frozen, unknown keys forbidden."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A config section. Frozen so a resolved config cannot drift during a run; unknown keys
    are errors so a typo never silently falls back to a default."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)
