"""The glue behind ``distil search``: the search section from a YAML's ``search:`` plus command-line
flags, validated against the recipe; and the stages (search, select, final, report) run in order.

The recipe's validation is passed in by the CLI, so this package never imports the recipes.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from distil.config.loading import ConfigError, apply_overrides, validate_config
from distil.errors import DistilError
from distil.search.config import SearchSection, check_space_against_config, reads_test_split
from distil.search.runs import die_with_parent
from distil.search.space import parse_space_item

logger = logging.getLogger(__name__)

Validate = Callable[[dict[str, Any], str, Any], tuple[str, Any, dict[str, Any]]]


class Stage(str, Enum):
    all = "all"
    search = "search"
    select = "select"
    final = "final"
    report = "report"


@dataclass(frozen=True)
class SearchFlags:
    """Command-line additions to the ``search:`` section (each replaces the YAML's value; each
    ``--space`` item adds or replaces one key)."""

    space: list[str] = field(default_factory=list)
    objectives: list[str] = field(default_factory=list)
    costs: list[str] = field(default_factory=list)
    trials: int | None = None
    wall_time: str | None = None
    examples: int | None = None
    storage: str | None = None
    workers: int | None = None

    def apply(self, section: dict[str, Any]) -> dict[str, Any]:
        out = dict(section)
        if self.space:
            space = dict(out.get("space") or {})
            problems = []
            for item in self.space:
                try:
                    key, dist = parse_space_item(item)
                except ValueError as exc:
                    problems.append(str(exc))
                    continue
                space[key] = dist
            if problems:
                raise ConfigError(problems, source="--space")
            out["space"] = space
        if self.objectives:
            out["objectives"] = list(self.objectives)
        if self.costs:
            out["costs"] = list(self.costs)
        budget = dict(out.get("budget") or {})
        for key, value in (
            ("trials", self.trials),
            ("wall_time", self.wall_time),
            ("examples", self.examples),
        ):
            if value is not None:
                budget[key] = value
        if budget:
            out["budget"] = budget
        if self.storage is not None:
            out["storage"] = self.storage
        if self.workers is not None:
            out["workers"] = self.workers
        return out


def check_search(
    raw: dict[str, Any],
    overrides: Sequence[str],
    validate: Validate,
    *,
    source: str,
    flags: SearchFlags | None = None,
) -> tuple[str, dict[str, Any], SearchSection]:
    """Split a YAML into its base config and search section, apply overrides and flags, and
    validate both, including every space key at its bounds and choices against the recipe.

    Args:
        raw: The YAML mapping (``search:`` optional).
        overrides: Dotted overrides; ``search.*`` ones edit the search section.
        validate: The CLI's recipe validation ``(data, spec, path) -> (recipe, cfg, resolved)``.
        source: Where the config came from, for messages.
        flags: Command-line additions to the section.

    Returns:
        ``(recipe, resolved base config mapping, search section)``.

    Raises:
        ConfigError: Listing every problem.
    """
    data = apply_overrides(raw, overrides)
    section_data = data.pop("search", None) or {}
    if not isinstance(section_data, dict):
        raise ConfigError(["search: must be a mapping"], source=source)
    # The base is the resolved config (every default written out), so that an override such as
    # student.model.kwargs.hidden lands in a complete student.model, in validation, in every
    # trial and in best.yaml alike.
    recipe, _, base = validate(data, source, source)
    section_data = (flags or SearchFlags()).apply(section_data)
    section = validate_config(SearchSection, section_data, source=f"{source} (search:)")
    check_space_against_config(section, base, lambda d: validate(d, source, source))
    for what in reads_test_split(section):
        logger.warning(
            "%s reads the test split: trials are then chosen on test data and the final test "
            "is optimistic; search on a validation split (classifier_kd: "
            "data.validation_fraction in trial_overrides, objective table.student.val_accuracy, "
            "intermediate series val_accuracy)",
            what,
        )
    return recipe, base, section


def spawn_workers(root: Path, count: int, say: Callable[[str], None]) -> list[int]:
    """Run ``count`` worker processes on the study (``distil search --study-dir ROOT
    --worker-index K``: the search stage of the stored study, in that process), each logging to
    ``ROOT/worker-K.log``; wait for all.

    A worker that dies (even by ``kill -9``) only loses its trial to a retry that another worker,
    or the next ``distil search`` on the study, resumes.

    Returns:
        The workers' exit codes.
    """
    procs = []
    for k in range(count):
        log = open(root / f"worker-{k}.log", "ab")  # noqa: SIM115 - closed below
        argv = [
            sys.executable,
            "-m",
            "distil",
            "search",
            "--study-dir",
            str(root),
            "--worker-index",
            str(k),
        ]
        # A worker dies with this process (PR_SET_PDEATHSIG), as its trial's run dies with it:
        # a killed `distil search` leaves nothing running, and resuming it starts clean.
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )
        procs.append((k, proc, log))
        say(f"worker {k}: pid {procs[-1][1].pid}, log {root / f'worker-{k}.log'}")
    codes: dict[int, int] = {}
    try:
        while len(codes) < len(procs):  # poll all: a dead worker is reported (and reaped) at once
            for k, proc, log in procs:
                code = proc.poll()
                if code is None or k in codes:
                    continue
                log.close()
                codes[k] = code
                if code != 0:
                    say(
                        f"worker {k} ended with {code}"
                        + (
                            f" (signal {-code}): its trial is re-queued and resumed by another worker"
                            if code < 0
                            else ""
                        )
                    )
            time.sleep(0.5)
    finally:
        for _, proc, _ in procs:
            if proc.poll() is None:
                proc.terminate()
    return [codes[k] for k in sorted(codes)]


def _fmt(value: float | None) -> str:
    return "unbounded" if value is None else f"{value:.4g}"


def run_stages(
    ctx: Any,
    stage: Stage,
    *,
    reference: Path | None,
    say: Callable[[str], None],
    worker_index: int = 0,
) -> dict[str, Any] | None:
    """Run the requested stage(s) on a prepared study; return the report when one was written."""
    from distil.search.report import write_report
    from distil.search.select import final_test, select_winner
    from distil.search.study import SubprocessRunner, Worker, open_study, spent

    search = ctx.search
    if stage in (Stage.all, Stage.search):
        started = time.time()
        if search.workers > 1:
            open_study(ctx)  # create it once, so the workers do not race to
            spawn_workers(ctx.root, search.workers, say)
        else:

            def on_trial(trial: Any) -> None:
                value = "-" if trial.values is None else ", ".join(f"{v:.4g}" for v in trial.values)
                say(
                    f"trial {trial.number} {trial.state.name.lower()}: {value} "
                    f"{ {k: v for k, v in trial.params.items()} }"
                )

            Worker(ctx, SubprocessRunner(ctx), worker_index=worker_index, on_trial=on_trial).run()
        use = spent(open_study(ctx))
        say(
            f"search stage: {use.trials} trials, {use.wall_time_s:.0f} s busy wall time "
            f"({time.time() - started:.0f} s in this session)"
        )
    study = open_study(ctx)
    if stage in (Stage.all, Stage.select):
        record = select_winner(ctx, study, search.workers)
        winner = record.get("winner")
        if winner is None:
            say(f"no winner: {record['reason']}")
        else:
            say(f"winner: trial {winner['origin']} {winner['values']}; {record['note']}")
            say(f"best config: {record['best_yaml']}")
    if stage in (Stage.all, Stage.final) and search.final is not None:
        if (ctx.root / "best.yaml").is_file():
            result = final_test(ctx, reference, search.workers)
            diff = result.get("difference")
            say(
                f"final test ({result['metric']['metric']}): winner {result['best']['mean']:.4g}"
                + (
                    f", reference {result['reference']['mean']:.4g}, paired difference "
                    f"{diff['mean']:+.4g} (CI {_fmt(diff['low'])}..{_fmt(diff['high'])})"
                    if diff
                    else ""
                )
            )
        elif stage is Stage.final:
            raise DistilError("no best.yaml in the study: run the select stage first")
    if stage in (Stage.all, Stage.report, Stage.select, Stage.final):
        report = write_report(ctx, study)
        say(f"report: {ctx.root / 'report.html'}")
        return report
    return None
