"""After the search stage: noise-aware selection of a winner, its runnable YAML, and the final
test that is run once.

Flash trials rank candidates cheaply but noisily (one seed, short runs). The ``top_k`` distinct
candidates are re-run at full length once per seed (``STUDY/select/tNNNN-seedS``); the winner is
the best mean, reported with its Student-t interval, and whether that interval clears the
runner-up's is said rather than assumed. Every run is a run folder: a stopped selection resumes.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from distil.config.loading import apply_overrides
from distil.errors import DistilError
from distil.search.config import Direction, Metric
from distil.search.objectives import metric_value, read_report
from distil.search.runs import RunSpec, is_finished, run_all
from distil.search.space import decode_params, to_overrides
from distil.search.stats import Interval, mean_interval, paired_difference
from distil.search.study import (
    NO_PLOTS,
    StudyContext,
    origin_of,
    require_optuna,
    trial_overrides,
)

logger = logging.getLogger(__name__)

SELECT_FILE = "select.json"
FINAL_FILE = "final.json"
BEST_FILE = "best.yaml"


@dataclass(frozen=True)
class Candidate:
    """A completed search trial: its ``origin`` number, decoded ``values`` and flash score."""

    origin: int
    number: int
    values: dict[str, Any]
    score: float


def _better(direction: Direction) -> float:
    return -1.0 if direction is Direction.maximize else 1.0


def candidates(ctx: StudyContext, trials: Sequence[Any], k: int) -> list[Candidate]:
    """The ``k`` best completed search trials on the first objective, one per distinct
    configuration (TPE may draw the same categorical combination twice)."""
    optuna = require_optuna()
    sign = _better(ctx.search.objectives[0].direction)
    done = [
        t
        for t in trials
        if t.state == optuna.trial.TrialState.COMPLETE
        and t.values is not None
        and math.isfinite(t.values[0])
    ]
    done.sort(key=lambda t: (sign * t.values[0], t.number))
    out: list[Candidate] = []
    seen: set[str] = set()
    for t in done:
        values = decode_params(t.params, ctx.search.space)
        key = json.dumps(values, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        out.append(Candidate(origin_of(t), t.number, values, float(t.values[0])))
        if len(out) == k:
            break
    return out


def selection_runs(
    ctx: StudyContext, chosen: Sequence[Candidate]
) -> list[tuple[Candidate, int, RunSpec]]:
    """One full-length run (no flash overrides) per candidate and seed."""
    sel = ctx.search.select
    out = []
    for cand in chosen:
        for seed in sel.seeds:
            overrides = [
                *trial_overrides(ctx, cand.values, flash=False),
                f"{sel.seed_key}={seed}",
            ]
            run_dir = ctx.root / "select" / f"t{cand.origin:04d}-seed{seed}"
            out.append((cand, seed, RunSpec(ctx.base_yaml, overrides, run_dir, extra_env=NO_PLOTS)))
    return out


def _interval_dict(interval: Interval) -> dict[str, Any]:
    """The interval as JSON-ready numbers (an infinite bound of a one-seed interval is ``None``)."""
    return {
        k: None if isinstance(v, float) and not math.isfinite(v) else v
        for k, v in asdict(interval).items()
    }


def select_winner(ctx: StudyContext, study: Any, parallel: int) -> dict[str, Any]:
    """Run the selection stage (skipping finished runs, resuming started ones), name the winner
    and write ``select.json`` and ``best.yaml``.

    Returns:
        The selection record (also written to ``STUDY/select.json``); ``winner`` is ``None``
        when no search trial completed (every one pruned or failed), with ``reason`` saying why.
    """
    optuna = require_optuna()
    sel = ctx.search.select
    objective = ctx.search.objectives[0]
    trials = study.get_trials(deepcopy=False)
    chosen = candidates(ctx, trials, max(sel.top_k, 1))
    if not chosen:
        states = [t.state.name for t in trials]
        record: dict[str, Any] = {
            "winner": None,
            "reason": f"no search trial completed ({len(states)} trials: "
            + ", ".join(f"{states.count(s)} {s.lower()}" for s in sorted(set(states)))
            + "); widen the space, loosen the pruner, or raise the budget",
            "candidates": [],
        }
        (ctx.root / SELECT_FILE).write_text(json.dumps(record, indent=1))
        return record
    rows: list[dict[str, Any]] = []
    if sel.top_k == 0:
        best = chosen[0]
        rows.append({**asdict(best), "seeds": [], "scores": [], "interval": None})
        winner_row = rows[0]
        note = "select.top_k is 0: the winner is the best search trial, without re-runs"
    else:
        plan = selection_runs(ctx, chosen)
        run_all([spec for _, _, spec in plan], parallel)
        for cand in chosen:
            scores, seeds, missing = [], [], []
            for c, seed, spec in plan:
                if c is not cand:
                    continue
                if is_finished(spec.run_dir):
                    scores.append(metric_value(read_report(spec.run_dir), objective.metric))
                    seeds.append(seed)
                else:
                    missing.append(str(spec.run_dir))
            interval = (
                mean_interval(scores, sel.confidence)
                if scores and all(map(math.isfinite, scores))
                else None
            )
            rows.append(
                {
                    **asdict(cand),
                    "seeds": seeds,
                    "scores": scores,
                    "failed_runs": missing,
                    "interval": None if interval is None else _interval_dict(interval),
                }
            )
        ranked = [r for r in rows if r["interval"] is not None]
        if not ranked:
            raise DistilError(
                "every selection run failed; see the logs under " + str(ctx.root / "select")
            )
        sign = _better(objective.direction)
        ranked.sort(key=lambda r: sign * r["interval"]["mean"])
        winner_row = ranked[0]
        note = _separation_note(ranked, objective)
    best_yaml = write_best_yaml(ctx, winner_row, objective)
    record = {
        "winner": winner_row,
        "objective": objective.model_dump(mode="json"),
        "candidates": rows,
        "note": note,
        "best_yaml": str(best_yaml),
        "states": {s.name: sum(1 for t in trials if t.state == s) for s in optuna.trial.TrialState},
    }
    (ctx.root / SELECT_FILE).write_text(json.dumps(record, indent=1, default=str))
    return record


def _separation_note(ranked: Sequence[Mapping[str, Any]], objective: Metric) -> str:
    """Whether the winner's interval clears the runner-up's mean, in words."""
    first = ranked[0]["interval"]
    if len(ranked) == 1:
        return f"one candidate: {first['mean']:.4g} over {first['n']} seeds"
    second = ranked[1]["interval"]
    low, high = first["low"], first["high"]
    if low is None or high is None:
        return "one seed per candidate: the ranking is within seed noise, not measured"
    clear = (
        second["mean"] < low if objective.direction is Direction.maximize else second["mean"] > high
    )
    return (
        f"winner t{ranked[0]['origin']:04d} mean {first['mean']:.4g} (CI {low:.4g}..{high:.4g}); runner-up "
        f"t{ranked[1]['origin']:04d} mean {second['mean']:.4g} "
        + (
            "lies outside the winner's interval"
            if clear
            else "lies inside it: the two are not separated by this many seeds"
        )
    )


def _bound(value: float | None) -> str:
    return "unbounded" if value is None else f"{value:.4g}"


def best_config(ctx: StudyContext, values: Mapping[str, Any]) -> dict[str, Any]:
    """The base config with the winner's values: what the user runs (no trial or flash overrides)."""
    return apply_overrides(ctx.base, to_overrides(values))


def write_best_yaml(ctx: StudyContext, winner: Mapping[str, Any], objective: Metric) -> Path:
    path = ctx.root / BEST_FILE
    interval = winner.get("interval")
    score = (
        f"{objective.metric} {interval['mean']:.4g} over seeds {winner['seeds']} "
        f"({100 * ctx.search.select.confidence:.0f}% CI {_bound(interval['low'])}..{_bound(interval['high'])})"
        if interval
        else f"{objective.metric} {winner['score']:.4g} (one flash run)"
    )
    header = (
        f"# distil search winner: trial {winner['origin']} of {ctx.root}\n"
        f"# {score}, measured with the study's trial overrides: {ctx.search.trial_overrides}\n"
        f"# run it: distil run {path}\n"
    )
    path.write_text(header + yaml.safe_dump(best_config(ctx, winner["values"]), sort_keys=False))
    return path


def final_test(ctx: StudyContext, reference: Path | None, parallel: int) -> dict[str, Any]:
    """The test set, once: ``best.yaml`` and ``reference`` (when given) run once per final seed,
    compared on the final metric with a paired interval. A stored ``final.json`` is returned as
    is: the test set is not consulted twice.

    Raises:
        DistilError: If there is no ``best.yaml`` (no winner) or the section is missing.
    """
    path = ctx.root / FINAL_FILE
    if path.is_file():
        stored: dict[str, Any] = json.loads(path.read_text())
        logger.info("final test already run; reading %s", path)
        return stored
    final = ctx.search.final
    if final is None:
        raise DistilError("the study has no search.final section")
    best = ctx.root / BEST_FILE
    if not best.is_file():
        raise DistilError(
            f"{best} is missing: the study named no winner, so there is nothing to test"
        )
    metric = final.metric or ctx.search.objectives[0]
    seed_key = ctx.search.select.seed_key
    specs: dict[str, list[tuple[int, RunSpec]]] = {"best": []}
    if reference is not None:
        specs["reference"] = []
    for seed in final.seeds:
        for name, config in (("best", best), ("reference", reference)):
            if config is None:
                continue
            specs[name].append(
                (
                    seed,
                    RunSpec(
                        config,
                        [*final.overrides, f"{seed_key}={seed}"],
                        ctx.root / "final" / f"{name}-seed{seed}",
                    ),
                )
            )
    run_all([s for runs in specs.values() for _, s in runs], parallel)
    result: dict[str, Any] = {
        "metric": metric.model_dump(mode="json"),
        "seeds": final.seeds,
        "reference_config": None if reference is None else str(reference),
        "overrides": final.overrides,
        "runs": {},
    }
    scores: dict[str, list[float]] = {}
    for name, runs in specs.items():
        values = []
        for seed, spec in runs:
            if not is_finished(spec.run_dir):
                raise DistilError(f"final run {spec.run_dir} failed; see {spec.log}")
            values.append(metric_value(read_report(spec.run_dir), metric.metric))
            result["runs"][f"{name}-seed{seed}"] = values[-1]
        scores[name] = values
        result[name] = _interval_dict(mean_interval(values, ctx.search.select.confidence))
        result[name]["scores"] = values
    if "reference" in scores:
        diff = paired_difference(scores["best"], scores["reference"], ctx.search.select.confidence)
        result["difference"] = _interval_dict(diff)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result
