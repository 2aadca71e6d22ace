"""The Optuna study behind ``distil search``: its folder, storage, sampler and pruner, and the
worker loop that runs trials until the budget is spent.

Crash safety, the part Optuna leaves to its users:

- **Every trial is a run folder** ``STUDY/trials/NNNN`` (NNNN = the trial's original number).
  A trial whose worker died is failed and re-queued with the same parameters (Optuna's
  ``RetryHeartbeatStaleTrialCallback``, which copies the trial's user attributes); the retry
  finds the original folder in those attributes and **resumes** it with ``distil run --resume``
  instead of starting a new, unrelated trial, and its report keeps the original number.
- **Dead workers are found two ways**: on this machine at once (the trial records its worker's
  host, pid and process start time; a pid that is gone or reused means a dead worker), on other
  machines by the storage's heartbeat after ``grace_period`` seconds.
- **A resumed study samples what an uninterrupted one would**: Optuna does not store a sampler's
  random state (its PR #4927), so the sampler is rebuilt before every trial with a seed derived
  from the study seed and the trial number. TPE is otherwise a function of the stored trials, so
  with one worker the sequence of parameters does not depend on where the study was stopped.
  MedianPruner and HyperbandPruner keep no state of their own (Hyperband's bracket is a hash of
  the study name and trial number), so they are re-derived from the storage too.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import json
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from distil.errors import DistilError
from distil.evaluation.report import PLOTS_ENV
from distil.search.budget import TrialRecord, Usage, exhausted, usage
from distil.search.config import (
    HyperbandPruner,
    MedianPruner,
    NoPruner,
    PrunerSection,
    SamplerName,
    SamplerSection,
    SearchSection,
    ThresholdPruner,
)
from distil.search.objectives import MetricMissing, metric_value, processed, read_report
from distil.search.runs import RunSpec, Watch, is_finished, start, tail, watch
from distil.search.space import suggest, to_overrides

logger = logging.getLogger(__name__)

# Trials and selection runs are measured, not read: their reports skip the plots.
NO_PLOTS = {PLOTS_ENV: "0"}
SPEC_FILE = "study.json"
BASE_FILE = "base.yaml"
# Parts of the spec that may change when a study is resumed (how much to spend, how to select
# and test); anything else would make the stored trials mean something else.
MUTABLE = (
    "budget",
    "workers",
    "select",
    "final",
    "heartbeat_interval",
    "grace_period",
    "max_retry",
)


def require_optuna() -> Any:
    """Import optuna, or say how to install it."""
    try:
        import optuna
    except ImportError as exc:  # pragma: no cover - optuna is in the dev extra
        raise DistilError("distil search needs Optuna: pip install 'distil[search]'") from exc
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


@contextlib.contextmanager
def _quiet_experimental() -> Iterator[None]:
    """Heartbeat helpers are marked experimental in Optuna; the warning says nothing we act on."""
    optuna = require_optuna()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


@dataclass(frozen=True)
class StudyContext:
    """Everything a worker needs, all of it stored in the study folder.

    Attributes:
        root: The study folder.
        recipe: The recipe the base config names.
        base: The base config mapping (the user's YAML plus overrides, without ``search``).
        search: The validated search section.
        storage_url: The database (default ``sqlite:///ROOT/study.db``).
    """

    root: Path
    recipe: str
    base: dict[str, Any]
    search: SearchSection
    storage_url: str

    @property
    def base_yaml(self) -> Path:
        return self.root / BASE_FILE

    @property
    def trials_dir(self) -> Path:
        return self.root / "trials"

    def trial_dir(self, origin: int) -> Path:
        return self.trials_dir / f"{origin:04d}"


def default_storage(root: Path) -> str:
    return f"sqlite:///{(root / 'study.db').resolve()}"


def _spec_dump(recipe: str, base: dict[str, Any], search: SearchSection) -> dict[str, Any]:
    return {"recipe": recipe, "base": base, "search": search.model_dump(mode="json")}


def prepare(root: Path, recipe: str, base: dict[str, Any], search: SearchSection) -> StudyContext:
    """Create the study folder, or check that an existing one was started with the same base
    config and search (budget, selection and the final test may change; the space, objectives,
    overrides, sampler and pruner may not).

    Raises:
        DistilError: If the folder holds a different study.
    """
    root.mkdir(parents=True, exist_ok=True)
    spec_path = root / SPEC_FILE
    new = _spec_dump(recipe, base, search)
    if spec_path.is_file():
        old = json.loads(spec_path.read_text())
        differing = [k for k in ("recipe", "base") if old.get(k) != new[k]]
        differing += [
            f"search.{k}"
            for k in sorted(set(old["search"]) | set(new["search"]))
            if k not in MUTABLE and old["search"].get(k) != new["search"].get(k)
        ]
        if differing:
            raise DistilError(
                f"{root} holds a study started with a different {', '.join(differing)}; resume it with the "
                "same config (or only `--study-dir`), or choose a new --study-dir"
            )
    spec_path.write_text(json.dumps(new, indent=1))
    (root / BASE_FILE).write_text(yaml.safe_dump(base, sort_keys=False))
    return StudyContext(
        root=root,
        recipe=recipe,
        base=base,
        search=search,
        storage_url=search.storage or default_storage(root),
    )


def load(root: Path) -> StudyContext:
    """The study stored in ``root`` (for resuming without the config, and for extra workers).

    Raises:
        DistilError: If ``root`` holds no study.
    """
    spec_path = root / SPEC_FILE
    if not spec_path.is_file():
        raise DistilError(
            f"{root} holds no study ({SPEC_FILE} missing); start one with `distil search CONFIG --study-dir {root}`"
        )
    spec = json.loads(spec_path.read_text())
    search = SearchSection.model_validate(spec["search"])
    return StudyContext(
        root=root,
        recipe=spec["recipe"],
        base=spec["base"],
        search=search,
        storage_url=search.storage or default_storage(root),
    )


def open_storage(ctx: StudyContext) -> Any:
    """The RDB storage with heartbeats; a stale trial is failed and re-queued (same parameters,
    user attributes and intermediate values) up to ``max_retry`` times."""
    optuna = require_optuna()
    url = ctx.storage_url
    engine: dict[str, Any] = (
        {"connect_args": {"timeout": 120}}  # SQLite: wait for another worker's write lock
        if url.startswith("sqlite")
        else {"pool_pre_ping": True}
    )
    with _quiet_experimental():
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine,
            heartbeat_interval=ctx.search.heartbeat_interval,
            grace_period=ctx.search.grace_period,
            heartbeat_stale_trial_callback=retry_callback(ctx.search),
        )


def retry_callback(search: SearchSection) -> Callable[[Any, Any], None]:
    """Optuna's stale-trial retry, keeping intermediate values so the pruner sees the history."""
    optuna = require_optuna()
    with _quiet_experimental():
        callback: Callable[[Any, Any], None] = optuna.storages.RetryHeartbeatStaleTrialCallback(
            max_retry=search.max_retry, inherit_intermediate_values=True
        )
    return callback


def derive_seed(seed: int, trial_number: int, worker_index: int = 0) -> int:
    """The sampler seed of one trial: a fixed function of the study seed, the trial number and
    the worker's index (two workers asking at the same moment see the same number of trials, and
    must not draw the same values)."""
    return (seed * 1_000_003 + trial_number * 7919 + worker_index * 104_729 + 12345) % (2**32)


def make_sampler(cfg: SamplerSection, seed: int) -> Any:
    optuna = require_optuna()
    if cfg.name is SamplerName.random:
        return optuna.samplers.RandomSampler(seed=seed)
    with _quiet_experimental():
        return optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=cfg.startup_trials,
            multivariate=cfg.multivariate,
        )


def make_pruner(cfg: PrunerSection) -> Any:
    optuna = require_optuna()
    if isinstance(cfg, MedianPruner):
        return optuna.pruners.MedianPruner(
            n_startup_trials=cfg.startup_trials, n_warmup_steps=cfg.warmup_steps
        )
    if isinstance(cfg, HyperbandPruner):
        return optuna.pruners.HyperbandPruner(
            min_resource=cfg.min_resource,
            max_resource=cfg.max_resource,
            reduction_factor=cfg.reduction_factor,
        )
    if isinstance(cfg, ThresholdPruner):
        return optuna.pruners.ThresholdPruner(
            lower=cfg.lower, upper=cfg.upper, n_warmup_steps=cfg.warmup_steps
        )
    assert isinstance(cfg, NoPruner)
    return optuna.pruners.NopPruner()


def open_study(ctx: StudyContext, storage: Any | None = None) -> Any:
    """Create or load the study (directions from the objectives)."""
    optuna = require_optuna()
    return optuna.create_study(
        study_name=ctx.search.study_name,
        storage=storage if storage is not None else open_storage(ctx),
        directions=[d.value for d in ctx.search.directions],
        sampler=make_sampler(ctx.search.sampler, derive_seed(ctx.search.sampler.seed, 0)),
        pruner=make_pruner(ctx.search.pruner),
        load_if_exists=True,
    )


# ---------------------------------------------------------------------------------------------
# Trials as records, and workers as identities


def origin_of(trial: Any) -> int:
    """The number of the trial this one continues (its own number unless it is a retry)."""
    return int(trial.user_attrs.get("origin", trial.number))


def records(study: Any) -> list[TrialRecord]:
    """The study's trials as the budget sees them."""
    out = []
    for t in study.get_trials(deepcopy=False):
        origin = origin_of(t)
        end = t.datetime_complete
        if t.state.name == "FAIL" and end is not None and "run_dir" in t.user_attrs:
            # A dead worker's trial is failed only when noticed (maybe a session later): it
            # stopped spending when its run stopped writing.
            metrics = Path(t.user_attrs["run_dir"]) / "metrics.jsonl"
            if metrics.is_file():
                end = min(end, dt.datetime.fromtimestamp(metrics.stat().st_mtime))
        out.append(
            TrialRecord(
                number=t.number,
                state=t.state.name,
                start=t.datetime_start,
                end=end,
                examples=int(t.user_attrs.get("examples", 0)),
                tokens=int(t.user_attrs.get("tokens", 0)),
                retry_of=origin if origin != t.number else None,
            )
        )
    return out


def spent(study: Any) -> Usage:
    return usage(records(study), dt.datetime.now())


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state first), if readable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22), which
    tells a live worker from a new process that reused its pid."""
    fields = _proc_stat(pid)
    return None if fields is None else int(fields[19])


def worker_identity(trial_number: int) -> dict[str, Any]:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "start_ticks": _start_ticks(pid),
        "trial": trial_number,
    }


def worker_alive(identity: dict[str, Any]) -> bool | None:
    """Whether the worker is alive: ``None`` when it ran on another machine (only the heartbeat
    can tell), else whether its pid exists and is still the same process."""
    if identity.get("host") != socket.gethostname():
        return None
    pid = int(identity.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _proc_stat(pid)
    if fields is not None and fields[0] in ("Z", "X"):
        return False  # killed, not yet reaped by its parent: dead all the same
    ticks = identity.get("start_ticks")
    return ticks is None or fields is None or int(fields[19]) == ticks


def reap_dead_local_workers(study: Any) -> list[int]:
    """Fail and re-queue every running trial whose worker ran on this machine and is gone.

    Returns:
        The numbers of the trials failed here.
    """
    optuna = require_optuna()
    storage = study._storage  # the trial-state API lives on the storage
    callback = storage.get_heartbeat_stale_trial_callback()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        identity = t.user_attrs.get("worker")
        if not isinstance(identity, dict) or identity.get("trial") != t.number:
            continue  # not yet claimed by its worker (or claimed by a worker of an older copy)
        if worker_alive(identity) is not False:
            continue
        try:
            if not storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        logger.warning(
            "trial %d: its worker (pid %s) is gone; re-queued to resume %s",
            t.number,
            identity.get("pid"),
            t.user_attrs.get("run_dir"),
        )
        failed.append(t.number)
        if callback is not None:
            callback(study, copy.deepcopy(storage.get_trial(t._trial_id)))
    return failed


# ---------------------------------------------------------------------------------------------
# Running one trial


class TrialFailed(DistilError):
    """A trial's run ended with an error (the trial is recorded as failed, not retried)."""


class RunKilled(DistilError):
    """A trial's run was killed by a signal while its worker lived (retried like a stale trial)."""


@dataclass(frozen=True)
class TrialOutcome:
    """What a finished trial measured: objective ``values`` in order, named ``metrics`` (the
    objectives and costs), and what it processed."""

    values: list[float]
    metrics: dict[str, float]
    examples: int = 0
    tokens: int = 0


class TrialRunner(Protocol):
    """Runs one trial's configuration in ``run_dir`` and measures it; raises
    ``optuna.TrialPruned`` when the trial's pruner says so, :class:`TrialFailed` on an error."""

    def __call__(self, trial: Any, values: dict[str, Any], run_dir: Path) -> TrialOutcome: ...


def trial_overrides(ctx: StudyContext, values: dict[str, Any], *, flash: bool) -> list[str]:
    """The overrides of one run: the fixed trial overrides, the flash ones in the search stage,
    then the trial's values."""
    fixed = ctx.search.trial_overrides + (ctx.search.flash_overrides if flash else [])
    return [*fixed, *to_overrides(values)]


def measure(ctx: StudyContext, run_dir: Path) -> TrialOutcome:
    """The objectives and costs of a finished run."""
    report = read_report(run_dir)
    names = [o.metric for o in ctx.search.objectives]
    metrics = {m.metric: metric_value(report, m.metric) for m in ctx.search.costs}
    values = [metric_value(report, n) for n in names]
    metrics.update(dict(zip(names, values, strict=True)))
    return TrialOutcome(values=values, metrics=metrics, **processed(run_dir))


@dataclass
class SubprocessRunner:
    """Runs a trial as ``distil run BASE OVERRIDES --run-dir DIR [--resume]`` and reports the
    intermediate series to the pruner as the run logs it."""

    ctx: StudyContext
    poll_s: float = 0.5

    def __call__(self, trial: Any, values: dict[str, Any], run_dir: Path) -> TrialOutcome:
        optuna = require_optuna()
        if is_finished(run_dir):  # the worker died after the run ended: only measure it
            return measure(self.ctx, run_dir)
        spec = RunSpec(
            self.ctx.base_yaml,
            trial_overrides(self.ctx, values, flash=True),
            run_dir,
            extra_env=NO_PLOTS,
        )
        follow = self.ctx.search.intermediate
        single = len(self.ctx.search.objectives) == 1
        reported = set(trial.storage.get_trial(trial._trial_id).intermediate_values)
        pruning = not isinstance(self.ctx.search.pruner, NoPruner)
        last: list[tuple[int, float]] = []

        def on_points(points: Any) -> bool:
            for step, value in points:
                if step not in reported:
                    trial.report(value, step)
                    reported.add(step)
            last[:] = points[-1:]
            return pruning and bool(trial.should_prune())

        proc, resumed = start(spec)
        trial.set_user_attr("resumed", bool(resumed) or bool(trial.user_attrs.get("resumed")))
        code, pruned = watch(
            proc,
            run_dir,
            Watch(follow.series, follow.phase, follow.step_key) if follow else None,
            on_points if follow is not None and single else None,
            self.poll_s,
        )
        if pruned:
            step, value = last[0]
            raise optuna.TrialPruned(
                f"{follow.series if follow else ''}={value:.4g} at step {step}"
            )
        if code < 0:
            raise RunKilled(f"the run was killed by signal {-code}; see {spec.log}")
        if code != 0:
            raise TrialFailed(f"the run failed (exit {code}); {spec.log} ends:\n{tail(spec.log)}")
        return measure(self.ctx, run_dir)


@dataclass
class Worker:
    """Runs trials of one study until its budget is spent and no trial is left to re-run."""

    ctx: StudyContext
    runner: TrialRunner
    worker_index: int = 0
    poll_s: float = 2.0
    on_trial: Callable[[Any], None] | None = None
    study: Any = field(default=None, init=False)
    _current: int | None = field(default=None, init=False)
    _interrupted: bool = field(default=False, init=False)
    _fatal: MetricMissing | None = field(default=None, init=False)

    def objective(self, trial: Any) -> Any:
        origin = origin_of(trial)
        run_dir = self.ctx.trial_dir(origin)
        self._current = trial.number
        trial.set_user_attr("origin", origin)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", worker_identity(trial.number))
        trial.set_user_attr("stage", "search")
        values = suggest(trial, self.ctx.search.space)
        try:
            outcome = self.runner(trial, values, run_dir)
        except RunKilled as exc:
            trial.set_user_attr("killed", str(exc))
            raise
        except MetricMissing as exc:
            # the section is wrong, not the trial: stop rather than repeat it in every trial
            self._fatal = MetricMissing(
                f"trial {trial.number}: {exc} (the run is kept in {run_dir})"
            )
            raise
        trial.set_user_attr("metrics", outcome.metrics)
        trial.set_user_attr("examples", outcome.examples)
        trial.set_user_attr("tokens", outcome.tokens)
        return outcome.values[0] if len(outcome.values) == 1 else outcome.values

    def _retry_own_trial(self) -> None:
        """Re-queue the trial this worker was running when it was interrupted or its run was
        killed, so it is resumed instead of lost."""
        optuna = require_optuna()
        if self._current is None:
            return
        trials = self.study.get_trials(deepcopy=False)
        mine = next((t for t in trials if t.number == self._current), None)
        if mine is None or mine.state != optuna.trial.TrialState.FAIL:
            return
        if "killed" not in mine.user_attrs and not self._interrupted:
            return
        retry_callback(self.ctx.search)(self.study, copy.deepcopy(mine))

    def run(self) -> list[str]:
        """Run trials until the budget is spent.

        Returns:
            The budget limits that ended the search stage.
        """
        optuna = require_optuna()
        self.study = open_study(self.ctx)
        while True:
            reap_dead_local_workers(self.study)
            with _quiet_experimental():
                optuna.storages.fail_stale_trials(self.study)
            recs = records(self.study)
            waiting = [r for r in recs if r.state == "WAITING"]
            limits = exhausted(self.ctx.search.budget, usage(recs, dt.datetime.now()))
            if limits and not waiting:
                if not any(r.state == "RUNNING" for r in recs):
                    logger.info("search budget reached: %s", "; ".join(limits))
                    return limits
                time.sleep(self.poll_s)  # another worker's trial may still go stale: wait
                continue
            self.study.sampler = make_sampler(
                self.ctx.search.sampler,
                derive_seed(self.ctx.search.sampler.seed, len(recs), self.worker_index),
            )
            self._current = None
            try:
                self.study.optimize(
                    self.objective, n_trials=1, catch=(Exception,), gc_after_trial=False
                )
            except KeyboardInterrupt:
                self._interrupted = True
                self._retry_own_trial()
                raise
            self._retry_own_trial()
            if self._fatal is not None:
                raise DistilError(
                    f"{self._fatal}; fix the search section's objectives or costs and start a "
                    "new study"
                )
            if self.on_trial is not None and self._current is not None:
                done = [
                    t for t in self.study.get_trials(deepcopy=False) if t.number == self._current
                ]
                if done:
                    self.on_trial(done[0])
