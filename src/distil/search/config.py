"""The ``search:`` section of a config (or ``distil search`` options): what to vary, what to
optimise, how much to spend, where the study lives, and how the winner is chosen.

Every check that only reads the config is a validator here, so ``distil validate`` catches it;
the checks that need the recipe (each space key and value applied to the base config) are in
:func:`check_space_against_config`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from distil.config.base import StrictModel
from distil.config.loading import ConfigError, apply_overrides, parse_override
from distil.search.space import Distribution, parse_distribution, probe_values


class Direction(str, Enum):
    maximize = "maximize"
    minimize = "minimize"


_DIRECTION_WORDS = {
    "max": "maximize",
    "maximize": "maximize",
    "maximise": "maximize",
    "min": "minimize",
    "minimize": "minimize",
    "minimise": "minimize",
}


def _objective_from_text(value: Any) -> Any:
    """``"maximize:student test accuracy"`` (or ``max:``/``min:``) → an objective mapping."""
    if not isinstance(value, str):
        return value
    head, sep, rest = value.partition(":")
    if sep and head.strip().lower() in _DIRECTION_WORDS:
        return {"metric": rest.strip(), "direction": _DIRECTION_WORDS[head.strip().lower()]}
    return {"metric": value.strip()}


class Metric(StrictModel):
    """A number read from each trial's report.

    ``metric`` is a label of the report's ``summary`` (what ``distil compare`` shows, e.g.
    ``student test accuracy``, ``student params``, ``train wall time s``) or a path
    ``PART.ROLE.KEY`` into a report table (``cost.student.latency_b1_ms``).
    """

    metric: str = Field(min_length=1)
    direction: Direction = Direction.maximize


MetricSpec = Annotated[Metric, BeforeValidator(_objective_from_text)]


_DURATION = re.compile(
    r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*$"
)


def parse_duration(value: Any) -> Any:
    """``"30m"``, ``"1h30m"``, ``"90s"`` or a number of seconds → seconds (float)."""
    if value is None or isinstance(value, int | float):
        return value
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match and any(match.groups()):
            h, m, s = (float(g) if g else 0.0 for g in match.groups())
            return 3600 * h + 60 * m + s
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError(f"{value!r} is not a duration; write seconds or e.g. 90s, 30m, 1h30m")


Seconds = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]


class BudgetSection(StrictModel):
    """When the search stage stops starting trials (the first limit reached wins; trials already
    running finish). Retries of a killed worker's trial always run, whatever the budget."""

    trials: int | None = Field(
        default=None, ge=1, description="trials started (a retried trial counts once)"
    )
    wall_time: Seconds | None = Field(
        default=None,
        description="busy wall time: the length of the union of all trials' run intervals, so "
        "parallel workers share it and a pause between sessions costs nothing (e.g. 30m)",
    )
    examples: int | None = Field(
        default=None, ge=1, description="training examples processed, summed over finished trials"
    )
    tokens: int | None = Field(
        default=None, ge=1, description="training tokens processed (LM recipes), summed"
    )

    @model_validator(mode="after")
    def _some_limit(self) -> BudgetSection:
        if all(v is None for v in (self.trials, self.wall_time, self.examples, self.tokens)):
            raise ValueError(
                "give the search a budget: trials, wall_time (e.g. 30m), examples or tokens"
            )
        return self


class SamplerName(str, Enum):
    tpe = "tpe"
    random = "random"


class SamplerSection(StrictModel):
    """How trials' values are drawn. The sampler is rebuilt before every trial with a seed derived
    from ``seed`` and the trial number, so a resumed study draws what an uninterrupted one would."""

    name: SamplerName = SamplerName.tpe
    seed: int = 0
    startup_trials: int = Field(
        default=8, ge=0, description="random draws before TPE models the results"
    )
    multivariate: bool = Field(default=True, description="TPE models the parameters jointly")


class NoPruner(StrictModel):
    type: Literal["none"] = "none"


class MedianPruner(StrictModel):
    """Stop a trial whose intermediate value is worse than the median of earlier trials' at the
    same step."""

    type: Literal["median"]
    startup_trials: int = Field(default=4, ge=0, description="trials that are never pruned")
    warmup_steps: int = Field(default=0, ge=0, description="steps before pruning is considered")


class HyperbandPruner(StrictModel):
    """Hyperband over successive-halving brackets (steps are the intermediate ``step_key``)."""

    type: Literal["hyperband"]
    min_resource: int = Field(default=1, ge=1)
    max_resource: int | Literal["auto"] = "auto"
    reduction_factor: int = Field(default=3, ge=2)


class ThresholdPruner(StrictModel):
    """Stop a trial whose intermediate value leaves ``[lower, upper]``."""

    type: Literal["threshold"]
    lower: float | None = None
    upper: float | None = None
    warmup_steps: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _a_bound(self) -> ThresholdPruner:
        if self.lower is None and self.upper is None:
            raise ValueError("threshold pruner: give lower, upper or both")
        return self


PrunerSection = Annotated[
    NoPruner | MedianPruner | HyperbandPruner | ThresholdPruner, Field(discriminator="type")
]


class IntermediateSection(StrictModel):
    """The series of ``metrics.jsonl`` reported to the pruner while a trial trains."""

    series: str = Field(min_length=1, description="e.g. val_accuracy")
    phase: str | None = Field(default="student", description="rows of this phase only")
    step_key: str = Field(default="step", description="the row field used as the step")


class SelectSection(StrictModel):
    """Noise-aware selection: the ``top_k`` distinct candidates of the search stage re-run at
    full length (without ``flash_overrides``) once per seed; the winner has the best mean."""

    top_k: int = Field(default=3, ge=0, description="0: name the best search trial directly")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    seed_key: str = Field(default="seed", description="the config key that holds the seed")
    confidence: float = Field(default=0.95, gt=0, lt=1)

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds repeat: {seeds}")
        return seeds


class FinalSection(StrictModel):
    """The test set, used once at the end: the winner's exported config (``best.yaml``) and a
    ``reference`` config run once per seed, compared on ``metric``. Its result is kept in
    ``final.json`` and never recomputed."""

    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    metric: MetricSpec | None = Field(
        default=None,
        description="e.g. maximize:student test accuracy (default: the first objective)",
    )
    reference: str | None = Field(
        default=None,
        description="config to compare with (file or shipped name), e.g. the shipped default",
    )
    overrides: list[str] = Field(
        default_factory=list, description="applied to the winner's and the reference's runs"
    )


class SearchSection(StrictModel):
    """The ``search:`` section: see ``docs/search.md``."""

    space: dict[str, Annotated[Distribution, BeforeValidator(parse_distribution)]] = Field(
        min_length=1, description="dotted config key -> distribution"
    )
    objectives: list[MetricSpec] = Field(
        min_length=1,
        description="what the sampler optimises, e.g. maximize:table.student.val_accuracy",
    )
    costs: list[MetricSpec] = Field(
        default_factory=lambda: [Metric(metric="student params", direction=Direction.minimize)],
        description="recorded for every trial and drawn against the first objective (the Pareto front)",
    )
    budget: BudgetSection
    study_name: str = "distil-search"
    storage: str | None = Field(
        default=None, description="database URL; default sqlite:///STUDY_DIR/study.db"
    )
    heartbeat_interval: int = Field(default=10, ge=1, description="seconds between heartbeats")
    grace_period: int = Field(
        default=60, ge=2, description="a trial without a heartbeat this long is stale"
    )
    max_retry: int = Field(default=2, ge=0, description="re-runs of one stale trial")
    workers: int = Field(default=1, ge=1, description="worker processes on this machine")
    sampler: SamplerSection = SamplerSection()
    pruner: PrunerSection = NoPruner()
    intermediate: IntermediateSection | None = None
    trial_overrides: list[str] = Field(
        default_factory=list,
        description="applied to every search and selection run, not to best.yaml (e.g. a "
        "validation split, a trained teacher's weights, eval.baseline=false)",
    )
    flash_overrides: list[str] = Field(
        default_factory=list,
        description="applied to search-stage trials only: short 'flash' runs that rank candidates (e.g. train.epochs=5)",
    )
    select: SelectSection = SelectSection()
    final: FinalSection | None = None

    @field_validator("trial_overrides", "flash_overrides")
    @classmethod
    def _overrides_parse(cls, value: list[str]) -> list[str]:
        for text in value:
            try:
                parse_override(text)
            except ConfigError as exc:
                raise ValueError("; ".join(exc.problems)) from exc
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SearchSection:
        if not isinstance(self.pruner, NoPruner):
            if self.intermediate is None:
                raise ValueError(
                    f"pruner {self.pruner.type!r} needs search.intermediate: the metrics.jsonl series "
                    "to report while a trial trains (e.g. {series: val_accuracy, phase: student})"
                )
            if len(self.objectives) > 1:
                raise ValueError(
                    "Optuna's pruners work on one objective; with several objectives set pruner: {type: none} "
                    "(costs are recorded and drawn without being optimised)"
                )
        fixed = {parse_override(t)[0] for t in [*self.trial_overrides, *self.flash_overrides]}
        both = sorted(fixed & set(self.space))
        if both:
            raise ValueError(
                f"{both} are searched and also fixed by trial/flash overrides; keep one"
            )
        first = self.objectives[0].metric
        if self.final is not None and self.final.metric is None and "val" in first.lower():
            raise ValueError(
                f"final.metric: the first objective {first!r} reads the validation split, which "
                "best.yaml and the reference do not carve out; name the test metric the final "
                "test compares, e.g. final: {metric: 'maximize:student test accuracy'}"
            )
        if self.select.seed_key in self.space:
            raise ValueError(f"select.seed_key {self.select.seed_key!r} is also searched")
        return self

    @property
    def directions(self) -> list[Direction]:
        return [o.direction for o in self.objectives]


def reads_test_split(section: SearchSection) -> list[str]:
    """What in the section chooses trials by a test-split number (an objective, or the series
    the pruner follows, whose name says ``test``). Choosing on the test split makes the final
    test optimistic; the validation split (e.g. classifier_kd's ``data.validation_fraction`` with
    ``table.student.val_accuracy`` and ``val_accuracy``) keeps it honest."""
    found = [f"objective {o.metric!r}" for o in section.objectives if "test" in o.metric.lower()]
    if section.intermediate is not None and "test" in section.intermediate.series.lower():
        found.append(f"intermediate series {section.intermediate.series!r}")
    return found


def check_space_against_config(
    section: SearchSection,
    base: Mapping[str, Any],
    validate: Callable[[dict[str, Any]], object],
) -> None:
    """Apply every space key at each probe value (both bounds, every choice), and the trial and
    flash overrides, to the base config and validate the result with the recipe's model, so a
    misspelt key or an impossible value is caught before any trial runs.

    Args:
        section: The validated search section.
        base: The base config mapping (without ``search``).
        validate: Validates a full config mapping; raises ``ConfigError`` on problems.

    Raises:
        ConfigError: Listing every key and value that makes the config invalid.
    """
    import json

    from distil.search.space import to_overrides

    problems: list[str] = []
    fixed = [*section.trial_overrides, *section.flash_overrides]
    for key, dist in section.space.items():
        for value in probe_values(dist):
            overrides = [*fixed, *to_overrides({key: value})]
            try:
                validate(apply_overrides(base, overrides))
            except ConfigError as exc:
                problems += [
                    f"search.space.{key}={json.dumps(value)}: {p}"
                    for p in exc.problems
                    if p not in problems
                ]
    if problems:
        raise ConfigError(sorted(set(problems)), source="search space")
