"""distil search end to end: the worker loop with in-process trials (a resumed study draws what an
uninterrupted one draws, a dead worker's trial resumes its own folder, every trial pruned), and
the CLI on tiny digits runs chosen on a validation split (two workers sharing one SQLite file, one
of them killed with ``kill -9`` and its trial resumed by the other; a study where every trial is
pruned)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from distil.errors import DistilError
from distil.search.config import SearchSection
from tests.helpers import run_cli

optuna = pytest.importorskip("optuna")

pytestmark = pytest.mark.filterwarnings(
    "ignore:Heartbeat of storage is supposed to be used with Study.optimize"
)


def section(**extra: Any) -> SearchSection:
    data: dict[str, Any] = {
        "space": {"kd.kd_temperature": "loguniform(1, 8)"},
        "objectives": ["maximize:table.student.val_accuracy"],
        "budget": {"trials": 3},
    }
    data.update(extra)
    return SearchSection.model_validate(data)


# --- the worker loop, with trials run in-process ---------------------------------------------


class QuadraticRunner:
    """A trial whose objective is a known function of its values (no subprocess)."""

    def __init__(self, prune: bool = False) -> None:
        self.prune = prune
        self.calls: list[tuple[int, Path, dict[str, Any]]] = []

    def __call__(self, trial: Any, values: dict[str, Any], run_dir: Path) -> Any:
        from distil.search.study import TrialOutcome

        self.calls.append((trial.number, run_dir, values))
        score = -((values["kd.kd_temperature"] - 3.0) ** 2) + len(values["hidden"])
        if self.prune:
            trial.report(score, 1)
            raise optuna.TrialPruned("always")
        return TrialOutcome([score], {"table.student.val_accuracy": score, "student params": 10.0})


def study_ctx(root: Path, trials: int, **extra: Any) -> Any:
    from distil.search.study import prepare

    s = section(
        space={"kd.kd_temperature": "uniform(1, 8)", "hidden": [[16], [32, 16], [64, 32, 16]]},
        budget={"trials": trials},
        sampler={"startup_trials": 2},
        **extra,
    )
    return prepare(root, "classifier_kd", {"recipe": "classifier_kd"}, s)


def test_a_resumed_study_draws_what_an_uninterrupted_one_draws(tmp_path: Path) -> None:
    from distil.search.study import Worker

    def params(root: Path, stops: list[int]) -> list[dict[str, Any]]:
        for stop in stops:
            ctx = study_ctx(root, stop)  # each stop is a new session on the same folder
            Worker(ctx, QuadraticRunner()).run()
        study = optuna.load_study(study_name="distil-search", storage=ctx.storage_url)
        return [t.params for t in study.get_trials()]

    straight = params(tmp_path / "a", [4])
    resumed = params(tmp_path / "b", [1, 3, 4])  # stopped while random, then while TPE
    assert len(straight) == 4 and straight == resumed


def test_a_dead_workers_trial_is_requeued_and_resumes_its_own_folder(tmp_path: Path) -> None:
    from distil.search.study import Worker, open_study, reap_dead_local_workers, worker_identity

    ctx = study_ctx(tmp_path, 2)
    study = open_study(ctx)
    trial = study.ask()
    trial.suggest_float("kd.kd_temperature", 1, 8)
    trial.suggest_categorical("hidden", ["[16]", "[32, 16]", "[64, 32, 16]"])
    trial.report(0.25, 5)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    identity = {**worker_identity(trial.number), "pid": gone.pid, "start_ticks": None}
    trial.set_user_attr("worker", identity)
    trial.set_user_attr("origin", trial.number)
    trial.set_user_attr("run_dir", str(ctx.trial_dir(trial.number)))
    assert reap_dead_local_workers(study) == [0]
    states = [t.state.name for t in study.get_trials()]
    assert states == ["FAIL", "WAITING"]
    retry = study.get_trials()[1]
    assert retry.user_attrs["origin"] == 0 and retry.intermediate_values == {5: 0.25}
    assert retry.params == study.get_trials()[0].params
    runner = QuadraticRunner()
    Worker(ctx, runner).run()
    numbers = [(number, run_dir.name) for number, run_dir, _ in runner.calls]
    assert numbers[0] == (1, "0000")  # the retry runs in the dead trial's folder
    assert [t.state.name for t in study.get_trials()] == ["FAIL", "COMPLETE", "COMPLETE"]


def test_a_live_worker_is_not_reaped(tmp_path: Path) -> None:
    from distil.search.study import (
        open_study,
        reap_dead_local_workers,
        worker_alive,
        worker_identity,
    )

    ctx = study_ctx(tmp_path, 1)
    study = open_study(ctx)
    trial = study.ask()
    trial.set_user_attr("worker", worker_identity(trial.number))
    assert worker_alive(worker_identity(0)) is True
    assert worker_alive({"host": "elsewhere", "pid": 1}) is None
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # exits; not waited for yet
    wait_for(
        lambda: Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    )
    assert worker_alive({**worker_identity(0), "pid": zombie.pid, "start_ticks": None}) is False
    zombie.wait()
    assert reap_dead_local_workers(study) == []


def test_every_trial_pruned_names_no_winner_and_still_reports(tmp_path: Path) -> None:
    from distil.search.report import write_report
    from distil.search.select import select_winner
    from distil.search.study import Worker, open_study

    ctx = study_ctx(tmp_path, 3, pruner={"type": "median"}, intermediate={"series": "val_accuracy"})
    Worker(ctx, QuadraticRunner(prune=True)).run()
    study = open_study(ctx)
    assert [t.state.name for t in study.get_trials()] == ["PRUNED"] * 3
    record = select_winner(ctx, study, parallel=1)
    assert record["winner"] is None and "3 pruned" in record["reason"]
    report = write_report(ctx, study)
    assert report["states"] == {"pruned": 3} and not (tmp_path / "best.yaml").exists()
    html = (tmp_path / "report.html").read_text()
    assert 'id="winner"' in html and "no search trial completed" in html


def test_a_metric_missing_from_the_report_stops_the_search_at_the_first_trial(
    tmp_path: Path,
) -> None:
    from distil.search.objectives import metric_value
    from distil.search.study import TrialOutcome, Worker

    def runner(trial: Any, values: dict[str, Any], run_dir: Path) -> TrialOutcome:
        report = {"summary": {"student test accuracy": 0.9}}
        return TrialOutcome([metric_value(report, "table.student.val_accuracy")], {})

    ctx = study_ctx(tmp_path, 3)
    with pytest.raises(DistilError, match="trial 0: metric 'table.student.val_accuracy'"):
        Worker(ctx, runner).run()
    trials = optuna.load_study(study_name="distil-search", storage=ctx.storage_url).get_trials()
    assert [t.state.name for t in trials] == ["FAIL"]  # not repeated in trials 1 and 2


# --- the CLI on tiny digits runs -------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MLP teacher's weights (random: the mechanics of a search do not need a good one)."""
    import torch

    from distil.config.sources import ZooModel
    from distil.data.classification import load_digits
    from distil.models.classifier import build_classifier, save_model

    folder = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    built = build_classifier(ZooModel(zoo="mlp", kwargs={"hidden": [16]}), load_digits(0.25, 0))
    save_model(built, folder)
    return folder / "model.safetensors"


def study_config(
    root: Path, teacher: Path, search: dict[str, Any], *, epochs: int = 1, batch_size: int = 64
) -> Path:
    """The shipped digits job, shrunk: a loaded tiny teacher, a tiny student, no baseline, a
    validation split that trials are chosen on (the test split is never read by the search)."""
    config = {
        "recipe": "classifier_kd",
        "data": {"source": {"builtin": "digits"}, "validation_fraction": 0.2},
        "teacher": {
            "model": {"zoo": "mlp", "kwargs": {"hidden": [16]}, "weights": str(teacher)},
            "train": False,
        },
        "student": {"model": {"zoo": "mlp", "kwargs": {"hidden": [8]}}},
        "train": {"epochs": epochs, "batch_size": batch_size, "lr": 0.003, "checkpoint_every": 5},
        "eval": {"baseline": False, "throughput_batch": 16},
        "run": {"log_with": [], "cpu_threads": 1},
        "search": {
            "space": {
                "kd.kd_temperature": "uniform(1, 4)",
                "student.model.kwargs.hidden": [[8], [16]],
            },
            "objectives": ["maximize:table.student.val_accuracy"],
            "heartbeat_interval": 1,
            "grace_period": 3,
            "select": {"top_k": 0},
            **search,
        },
    }
    path = root / "search.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def wait_for(check: Callable[[], bool], timeout: float = 120.0) -> None:
    end = time.time() + timeout
    while not check():
        assert time.time() < end, "timed out"
        time.sleep(0.1)


def has_checkpoint(run_dir: Path) -> bool:
    return any((run_dir / "student" / "checkpoints").glob("step-*"))


def wait_for_victim(
    study_dir: Path, storage: str | None, name: str, ready: Callable[[int], bool]
) -> tuple[int, int]:
    """A running trial for which ``ready`` holds, and its worker's pid (both read again after
    the storage, which is slow on a loaded machine: the run may have moved on meanwhile)."""
    end = time.time() + 120
    while time.time() < end:
        if ready(0) or ready(1):
            for t in load_trials(study_dir, storage, name):
                if t.state.name == "RUNNING" and "worker" in t.user_attrs and ready(t.number):
                    return t.number, int(t.user_attrs["worker"]["pid"])
        time.sleep(0.1)
    raise AssertionError("no trial was caught mid-training")


def load_trials(
    study_dir: Path, storage: str | None = None, name: str = "distil-search"
) -> list[Any]:
    url = storage or f"sqlite:///{study_dir / 'study.db'}"
    return optuna.load_study(study_name=name, storage=url).get_trials()


POSTGRES = os.environ.get(
    "DISTIL_TEST_POSTGRES_URL"
)  # e.g. postgresql+psycopg2://postgres@127.0.0.1:5432/distil_search


@pytest.mark.parametrize(
    "storage",
    [
        None,
        pytest.param(
            POSTGRES,
            marks=pytest.mark.skipif(
                POSTGRES is None, reason="set DISTIL_TEST_POSTGRES_URL to a PostgreSQL database"
            ),
        ),
    ],
    ids=["sqlite", "postgres"],
)
def test_kill_9_of_a_worker_loses_no_completed_trial_and_its_trial_resumes(
    tmp_path: Path, teacher: Path, storage: str | None
) -> None:
    """Two workers on one storage; one is killed (-9) while its trial's run is mid-training
    with a checkpoint: that run dies with it, the other worker re-runs the trial by resuming
    the same folder, and the completed trial is kept. Then the winner is named and best.yaml
    validates."""
    name = f"test-{tmp_path.name}-{os.getpid()}"  # a server keeps studies between test runs
    extra: dict[str, Any] = {"budget": {"trials": 2}, "workers": 2, "study_name": name}
    if storage is not None:
        extra["storage"] = storage
    # Small batches make the student phase long enough (68 steps) to be killed inside it.
    config = study_config(tmp_path, teacher, extra, batch_size=16)
    study_dir = tmp_path / "study"
    argv = [sys.executable, "-m", "distil", "search", str(config), "--study-dir", str(study_dir)]
    argv += ["--stage", "search"]

    def mid_training(number: int) -> bool:
        run_dir = study_dir / "trials" / f"{number:04d}"
        return has_checkpoint(run_dir) and not (run_dir / "student" / "final").exists()

    with open(tmp_path / "coordinator.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            victim_trial, victim = wait_for_victim(study_dir, storage, name, mid_training)
            os.kill(victim, signal.SIGKILL)  # its run dies with it (PR_SET_PDEATHSIG)
            victim_dir = study_dir / "trials" / f"{victim_trial:04d}"
            # On a loaded machine the run may have finished training between the check and the
            # kill; then its retry resumes a finished phase instead of a checkpoint.
            trained_at_kill = (victim_dir / "student" / "final").exists()
            assert proc.wait(timeout=180) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    trials = load_trials(study_dir, storage, name)
    states = {t.number: t.state.name for t in trials}
    assert states[victim_trial] == "FAIL"
    assert sum(s == "COMPLETE" for s in states.values()) == 2 and len(trials) == 3
    retry = next(t for t in trials if t.user_attrs.get("origin") == victim_trial and t.number > 1)
    assert retry.state.name == "COMPLETE" and retry.params == trials[victim_trial].params
    assert retry.user_attrs["run_dir"] == str(study_dir / "trials" / f"{victim_trial:04d}")
    assert retry.user_attrs["resumed"] is True
    summary = json.loads((victim_dir / "student" / "summary.json").read_text())
    assert summary["resumed_at_step"] > 0 or trained_at_kill  # from its checkpoint, not anew
    assert "--resume" in victim_dir.with_name(victim_dir.name + ".log").read_text()
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2  # both workers ran trials
    assert "its trial is re-queued" in (tmp_path / "coordinator.log").read_text()
    # Trials are measured on the validation split, not the test split.
    for t in trials:
        if t.state.name == "COMPLETE":
            report = json.loads((Path(t.user_attrs["run_dir"]) / "report.json").read_text())
            student = next(r for r in report["table"]["rows"] if r["model"] == "student (KD)")
            assert t.values == [pytest.approx(student["val_accuracy"])]

    code, out = run_cli(["search", "--study-dir", str(study_dir), "--stage", "select"])
    assert code == 0 and "winner: trial" in out, out
    code, out = run_cli(["validate", str(study_dir / "best.yaml")])
    assert code == 0, out  # the winner's config runs as it is (no trial overrides in it)


def test_every_trial_pruned_ends_with_a_report_and_no_winner(tmp_path: Path, teacher: Path) -> None:
    config = study_config(
        tmp_path,
        teacher,
        {
            "budget": {"trials": 1},
            "pruner": {"type": "threshold", "lower": 2.0},  # accuracy never reaches 2: prune all
            "intermediate": {"series": "val_accuracy"},
            "select": {"top_k": 2, "seeds": [0, 1]},
        },
        epochs=40,  # an epoch takes ~60 ms here: the pruner must stop the run long before the end
    )
    study_dir = tmp_path / "study"
    code, out = run_cli(["search", str(config), "--study-dir", str(study_dir)])
    assert code == 0, out
    assert "no winner: no search trial completed (1 trials: 1 pruned)" in out
    trials = load_trials(study_dir)
    assert [t.state.name for t in trials] == ["PRUNED"]
    steps = sorted(trials[0].intermediate_values)
    assert steps[-1] == trials[0].last_step and len(steps) < 40  # stopped while training
    report = json.loads((study_dir / "report.json").read_text())
    assert report["states"] == {"pruned": 1} and report["select"]["winner"] is None
    assert not (study_dir / "best.yaml").exists() and (study_dir / "report.html").is_file()
    assert not (study_dir / "trials/0000/report.json").exists()  # stopped before its report


class TwoObjectiveRunner:
    """Quality rises with the student's width and so does its size: a real trade-off."""

    def __call__(self, trial: Any, values: dict[str, Any], run_dir: Path) -> Any:
        from distil.search.study import TrialOutcome

        width = sum(values["hidden"])
        quality = 1 - 1 / width - 0.01 * abs(values["kd.kd_temperature"] - 3)
        return TrialOutcome(
            [quality, float(width)],
            {"table.student.val_accuracy": quality, "student params": width},
        )


def test_a_multi_objective_study_reports_its_pareto_front(tmp_path: Path) -> None:
    from distil.search.report import write_report
    from distil.search.study import Worker, open_study

    ctx = study_ctx(
        tmp_path, 6, objectives=["maximize:table.student.val_accuracy", "minimize:student params"]
    )
    Worker(ctx, TwoObjectiveRunner()).run()
    study = open_study(ctx)
    assert len(study.directions) == 2
    report = write_report(ctx, study)
    front = report["pareto"]["front"]
    assert front and report["pareto"]["axes"] == ["table.student.val_accuracy", "student params"]
    widths = [json.loads(r["hidden"]) for r in front]
    assert len({sum(w) for w in widths}) == len(front)  # one point per size on this front
    assert {t.number for t in study.best_trials} >= {r["trial"] for r in front}


def test_the_final_test_runs_once(tmp_path: Path) -> None:
    from distil.search.select import final_test

    ctx = study_ctx(
        tmp_path, 1, final={"seeds": [0, 1], "metric": "maximize:student test accuracy"}
    )
    stored = {"metric": {"metric": "student test accuracy"}, "best": {"mean": 0.9}}
    (tmp_path / "final.json").write_text(json.dumps(stored))
    assert final_test(ctx, None, parallel=1) == stored  # read back, nothing re-run
    (tmp_path / "final.json").unlink()
    with pytest.raises(DistilError, match="named no winner"):
        final_test(ctx, None, parallel=1)
