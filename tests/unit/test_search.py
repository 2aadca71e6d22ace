"""distil search: space parsing, the search section's checks, objectives from reports, budget
accounting, Pareto fronts and intervals (the worker loop is in tests/integration/test_search.py)."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Any

import pytest

from distil.config.loading import ConfigError, parse_override, validate_config
from distil.search.budget import TrialRecord, busy_seconds, exhausted, usage
from distil.search.config import (
    BudgetSection,
    Direction,
    SearchSection,
    check_space_against_config,
    parse_duration,
    reads_test_split,
)
from distil.search.objectives import (
    MetricMissing,
    available_metrics,
    intermediate_points,
    metric_value,
    processed,
)
from distil.search.space import (
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    decode_choice,
    encode_choice,
    parse_distribution,
    parse_space_item,
    to_overrides,
)
from distil.search.stats import mean_interval, paired_difference, pareto_front

optuna = pytest.importorskip("optuna")


def section(**extra: Any) -> SearchSection:
    data: dict[str, Any] = {
        "space": {"kd.kd_temperature": "loguniform(1, 8)"},
        "objectives": ["maximize:student test accuracy"],
        "budget": {"trials": 3},
    }
    data.update(extra)
    return SearchSection.model_validate(data)


# --- space -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("loguniform(1, 8)", {"type": "loguniform", "low": 1, "high": 8}),
        ("uniform(0, 0.5)", {"type": "uniform", "low": 0, "high": 0.5}),
        ("int(1, 4)", {"type": "int", "low": 1, "high": 4, "log": False}),
        ("int(16, 256, log)", {"type": "int", "low": 16, "high": 256, "log": True}),
        ("int(8, 64, step=8)", {"type": "int", "low": 8, "high": 64, "log": False, "step": 8}),
        (
            "categorical(forward_kl, reverse_kl)",
            {"type": "categorical", "choices": ["forward_kl", "reverse_kl"]},
        ),
        ("[[32], [64, 32]]", {"type": "categorical", "choices": [[32], [64, 32]]}),
        ("choice(1, 2.5)", {"type": "categorical", "choices": [1, 2.5]}),
    ],
)
def test_parse_distribution_text(text: str, expected: dict[str, Any]) -> None:
    assert parse_distribution(text) == expected


def test_parse_space_item_and_student_shapes() -> None:
    key, dist = parse_space_item("student.model.kwargs.hidden=[[32],[64],[64,32]]")
    assert key == "student.model.kwargs.hidden"
    model = CategoricalDistribution.model_validate(dist)
    assert model.choices == [[32], [64], [64, 32]]
    for bad in ("no_equals", "=uniform(0,1)", "a..b=uniform(0,1)"):
        with pytest.raises(ValueError, match="dotted.key=DISTRIBUTION"):
            parse_space_item(bad)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gaussian(0, 1)", "unknown distribution 'gaussian'"),
        ("uniform(1)", "two bounds"),
        ("int(1, 4, stride=2)", "unknown argument"),
        ("between 1 and 8", "not a distribution"),
    ],
)
def test_parse_distribution_errors_name_the_fix(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_distribution(text)


def test_distribution_models_check_bounds() -> None:
    with pytest.raises(ValueError, match="low > 0"):
        FloatDistribution.model_validate({"type": "loguniform", "low": 0, "high": 1})
    with pytest.raises(ValueError, match="below high"):
        IntDistribution.model_validate({"type": "int", "low": 4, "high": 4})
    with pytest.raises(ValueError, match="repeat"):
        CategoricalDistribution.model_validate({"type": "categorical", "choices": [[1], [1]]})


def test_choices_round_trip_through_optuna_storage_and_overrides() -> None:
    choices: list[Any] = [[32], [64, 32], "forward_kl", 0.5, None, {"a": 1}]
    for choice in choices:
        stored = encode_choice(choice)
        assert stored is None or isinstance(stored, bool | int | float | str)
        assert decode_choice(stored, choices) == choice
    values = {
        "student.model.kwargs.hidden": [64, 32],
        "train.lr": 0.00123,
        "kd.divergence": "reverse_kl",
    }
    assert dict(parse_override(o) for o in to_overrides(values)) == values


# --- the section -----------------------------------------------------------------------------


def test_section_parses_text_forms() -> None:
    s = section(
        costs=["minimize:student params"],
        space={"train.lr": "loguniform(1e-4, 1e-2)", "kd.divergence": ["forward_kl", "reverse_kl"]},
        budget={"wall_time": "1h30m"},
    )
    assert isinstance(s.space["train.lr"], FloatDistribution)
    assert isinstance(s.space["kd.divergence"], CategoricalDistribution)
    assert s.objectives[0].metric == "student test accuracy"
    assert s.directions == [Direction.maximize]
    assert s.costs[0].direction is Direction.minimize
    assert s.budget.wall_time == 5400


def test_parse_duration() -> None:
    assert parse_duration("90s") == 90 and parse_duration("30m") == 1800
    assert (
        parse_duration("1h") == 3600 and parse_duration(12) == 12 and parse_duration("2.5") == 2.5
    )
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"budget": {}}, "give the search a budget"),
        ({"pruner": {"type": "median"}}, "needs search.intermediate"),
        (
            {
                "objectives": ["max:student test accuracy", "min:student params"],
                "pruner": {"type": "median"},
                "intermediate": {"series": "test_accuracy"},
            },
            "one objective",
        ),
        ({"trial_overrides": ["kd.kd_temperature=2"]}, "searched and also fixed"),
        ({"trial_overrides": ["novalue"]}, "must look like key.sub=value"),
        ({"select": {"seeds": [0, 0]}}, "seeds repeat"),
        ({"pruner": {"type": "threshold"}, "intermediate": {"series": "x"}}, "lower, upper"),
        (
            {"objectives": ["max:table.student.val_accuracy"], "final": {"seeds": [0]}},
            "reads the validation split",
        ),
    ],
)
def test_section_validation_names_the_problem(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        section(**extra)


def test_choosing_on_the_test_split_is_named() -> None:
    on_test = section(
        pruner={"type": "median"}, intermediate={"series": "test_accuracy"}, final={"seeds": [0]}
    )
    assert reads_test_split(on_test) == [
        "objective 'student test accuracy'",
        "intermediate series 'test_accuracy'",
    ]
    on_validation = section(
        objectives=["max:table.student.val_accuracy"],
        pruner={"type": "median"},
        intermediate={"series": "val_accuracy"},
        final={"metric": "max:student test accuracy"},
    )
    assert reads_test_split(on_validation) == []


def test_space_is_checked_against_the_recipe_at_every_bound_and_choice() -> None:
    from distil.recipes.classifier_kd import Config

    def validate(data: dict[str, Any]) -> object:
        return validate_config(Config, data)

    good = section(
        space={
            "kd.kd_weight": "uniform(0.1, 0.9)",
            "student.model.kwargs.hidden": [[16], [32, 16]],
        }
    )
    base = {"recipe": "classifier_kd", "student": {"model": {"zoo": "mlp", "kwargs": {}}}}
    check_space_against_config(good, base, validate)
    bad = section(space={"kd.kd_weight": "uniform(0.5, 2)", "kd.kd_temprature": "uniform(1, 2)"})
    with pytest.raises(ConfigError) as info:
        check_space_against_config(bad, base, validate)
    text = "\n".join(info.value.problems)
    assert "search.space.kd.kd_weight=2" in text and "less than or equal to 1" in text
    assert "kd.kd_temprature" in text and "did you mean 'kd.kd_temperature'" in text


# --- objectives ------------------------------------------------------------------------------

REPORT: dict[str, Any] = {
    "roles": {"teacher": "teacher", "student": "student (KD)"},
    "summary": {"student test accuracy": 0.91, "student params": 2410, "gap closed": None},
    "cost": {
        "table": {
            "columns": [
                {"key": "model", "label": "model"},
                {"key": "latency_b1_ms", "label": "ms"},
            ],
            "rows": [
                {"model": "teacher", "latency_b1_ms": 0.5},
                {"model": "student (KD)", "latency_b1_ms": 0.02},
            ],
        }
    },
    "table": {  # the headline table: rows may hold keys no column shows (classifier_kd's val_accuracy)
        "columns": [{"key": "model", "label": "model"}, {"key": "accuracy", "label": "test acc"}],
        "rows": [
            {"model": "teacher", "accuracy": 0.95},
            {"model": "student (KD)", "accuracy": 0.91, "val_accuracy": 0.93, "agree": True},
        ],
    },
}


def test_metric_value_reads_summary_labels_and_table_paths() -> None:
    assert metric_value(REPORT, "student test accuracy") == 0.91
    assert metric_value(REPORT, "student params") == 2410.0
    assert metric_value(REPORT, "cost.student.latency_b1_ms") == 0.02
    assert metric_value(REPORT, "cost.teacher.latency_b1_ms") == 0.5
    assert math.isnan(metric_value(REPORT, "gap closed"))
    assert metric_value(REPORT, "table.student.val_accuracy") == 0.93
    assert "table.student.val_accuracy" in available_metrics(REPORT)
    assert "table.student.agree" not in available_metrics(REPORT)  # not a number
    with pytest.raises(MetricMissing, match="did you mean 'student test accuracy'"):
        metric_value(REPORT, "student test acuracy")
    with pytest.raises(MetricMissing, match="did you mean 'table.student.val_accuracy'"):
        metric_value(REPORT, "table.student.val_acuracy")
    with pytest.raises(MetricMissing):
        metric_value(REPORT, "table.teacher.val_accuracy")  # the teacher's row has none


def test_intermediate_points_filter_phase_and_keep_the_last_row_per_step() -> None:
    rows = [
        {"phase": "teacher", "step": 10, "val_accuracy": 0.9},
        {"phase": "student", "step": 10, "val_accuracy": 0.5},
        {"phase": "student", "step": 10, "loss": 1.0},
        {"phase": "student", "step": 20, "val_accuracy": 0.6},
        {"phase": "student", "step": 20, "val_accuracy": 0.65},  # logged again after a resume
        {"phase": "student", "step": 30, "val_accuracy": float("nan")},
    ]
    points = intermediate_points(rows, "val_accuracy", phase="student", step_key="step")
    assert points == [(10, 0.5), (20, 0.65)]
    assert intermediate_points(rows, "val_accuracy", phase=None, step_key="step")[0] == (10, 0.5)


def test_processed_sums_the_phases(tmp_path: Path) -> None:
    for phase, data in (("student", {"samples": 640}), ("teacher", {"samples": 100, "tokens": 7})):
        (tmp_path / phase).mkdir()
        (tmp_path / phase / "summary.json").write_text(json.dumps(data))
    assert processed(tmp_path) == {"examples": 740, "tokens": 7}


# --- budget ----------------------------------------------------------------------------------

T0 = dt.datetime(2026, 1, 1, 12, 0, 0)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def test_busy_seconds_is_the_union_of_intervals() -> None:
    assert busy_seconds([]) == 0
    assert busy_seconds([(at(0), at(10)), (at(5), at(12))]) == 12  # parallel workers overlap
    assert busy_seconds([(at(0), at(10)), (at(100), at(110))]) == 20  # a pause costs nothing
    assert busy_seconds([(at(0), at(30)), (at(5), at(10)), (at(40), at(41))]) == 31


def test_usage_counts_a_retried_trial_once_but_all_of_its_time() -> None:
    records = [
        TrialRecord(0, "COMPLETE", at(0), at(10), examples=100),
        TrialRecord(1, "FAIL", at(10), at(14)),  # its worker was killed
        TrialRecord(2, "COMPLETE", at(20), at(30), examples=100, retry_of=1),
        TrialRecord(3, "RUNNING", at(30), None),
        TrialRecord(4, "WAITING", None, None, retry_of=3),
    ]
    spent = usage(records, now=at(35))
    assert spent.trials == 3  # 0, 1 (with its retry 2), 3 (with its queued retry 4)
    assert spent.wall_time_s == 10 + 4 + 10 + 5
    assert spent.examples == 200
    assert exhausted(BudgetSection(trials=3), spent) == ["trials: 3 of 3"]
    assert exhausted(BudgetSection(trials=4, wall_time=30), spent) == []
    assert exhausted(BudgetSection(wall_time=29, examples=200), spent) == [
        "wall time: 29 s of 29 s",
        "examples: 200 of 200",
    ]


# --- stats -----------------------------------------------------------------------------------


def test_pareto_front_respects_directions_and_skips_nan() -> None:
    maxmin = [Direction.maximize, Direction.minimize]
    points = [[0.9, 100], [0.95, 400], [0.85, 50], [0.8, 200], [0.95, 500], [math.nan, 1]]
    assert pareto_front(points, maxmin) == [1, 0, 2]
    assert pareto_front([[1.0, 1.0], [1.0, 1.0]], maxmin) == [0, 1]
    assert pareto_front(points, [Direction.minimize, Direction.minimize]) == [3, 2]


def test_mean_interval_matches_the_t_distribution() -> None:
    interval = mean_interval([1.0, 2.0, 3.0], 0.95)
    assert interval.mean == 2 and interval.sd == 1 and interval.n == 3
    assert interval.half_width == pytest.approx(4.302652729911275 / math.sqrt(3))
    one = mean_interval([0.5])
    assert one.low == -math.inf and one.high == math.inf
    diff = paired_difference([0.93, 0.94, 0.92], [0.92, 0.93, 0.91])
    assert diff.mean == pytest.approx(0.01) and diff.sd == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        mean_interval([])


# --- command-line flags and `distil validate` ------------------------------------------------


def test_flags_add_to_the_yaml_section() -> None:
    from distil.search.command import SearchFlags

    yaml_section = {"space": {"train.lr": "loguniform(1e-4, 1e-2)"}, "budget": {"trials": 5}}
    flags = SearchFlags(
        space=["kd.kd_temperature=uniform(1, 4)", "train.lr=loguniform(1e-3, 1e-2)"],
        objectives=["min:student ECE (15 bins)"],
        wall_time="10m",
        workers=2,
    )
    merged = SearchSection.model_validate(flags.apply(yaml_section))
    assert set(merged.space) == {"train.lr", "kd.kd_temperature"}
    assert merged.space["train.lr"].low == 1e-3  # type: ignore[union-attr]
    assert merged.budget.trials == 5 and merged.budget.wall_time == 600
    assert merged.objectives[0].direction is Direction.minimize and merged.workers == 2
    with pytest.raises(ConfigError, match="dotted.key=DISTRIBUTION"):
        SearchFlags(space=["kd.kd_temperature"]).apply({})


def test_validate_checks_a_search_section(tmp_path: Path) -> None:
    from tests.helpers import run_cli

    config = tmp_path / "study.yaml"
    config.write_text(
        "recipe: classifier_kd\n"
        "search:\n"
        "  space:\n"
        "    kd.kd_temperature: loguniform(1, 8)\n"
        "    student.model.kwargs.hidden: [[16], [32, 16]]\n"
        "  objectives: [maximize:student test accuracy]\n"
        "  budget: {wall_time: 30m}\n"
    )
    code, out = run_cli(["validate", str(config)])
    assert code == 0 and "with a valid search: section" in out, out
    code, out = run_cli(["validate", str(config), "search.budget={}", "search.select.top_k=-1"])
    assert code == 2 and "give the search a budget" in out and "select.top_k" in out, out
