"""distil search end to end: the worker loop with in-process trials (a resumed study draws what an
uninterrupted one draws, a dead worker's trial resumes its own folder, every trial pruned), and
the CLI on tiny digits runs (``kill -9`` of a worker then resume, two workers sharing one SQLite
file, a study where every trial is pruned)."""

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
        "objectives": ["maximize:student test accuracy"],
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
        return TrialOutcome([score], {"student test accuracy": score, "student params": 10.0})


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

    straight = params(tmp_path / "a", [6])
    resumed = params(tmp_path / "b", [2, 4, 6])
    assert len(straight) == 6 and straight == resumed


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

    ctx = study_ctx(
        tmp_path, 3, pruner={"type": "median"}, intermediate={"series": "test_accuracy"}
    )
    Worker(ctx, QuadraticRunner(prune=True)).run()
    study = open_study(ctx)
    assert [t.state.name for t in study.get_trials()] == ["PRUNED"] * 3
    record = select_winner(ctx, study, parallel=1)
    assert record["winner"] is None and "3 pruned" in record["reason"]
    report = write_report(ctx, study)
    assert report["states"] == {"pruned": 3} and not (tmp_path / "best.yaml").exists()
    html = (tmp_path / "report.html").read_text()
    assert 'id="winner"' in html and "no search trial completed" in html


# --- the CLI on tiny digits runs -------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CNN teacher's weights (random: the mechanics of a search do not need a good one)."""
    import torch

    from distil.data.classification import load_digits
    from distil.models.classifier import build_classifier, save_model

    folder = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    built = build_classifier(
        zoo="cnn", hf=None, factory=None, kwargs={"channels": [8, 16]}, data=load_digits(0.25, 0)
    )
    save_model(built, folder)
    return folder / "model.safetensors"


def study_config(root: Path, teacher: Path, search: dict[str, Any], epochs: int = 2) -> Path:
    config = {
        "recipe": "classifier_kd",
        "data": {"dataset": "digits"},
        "teacher": {
            "model": {"zoo": "cnn", "kwargs": {"channels": [8, 16]}},
            "checkpoint": str(teacher),
        },
        "student": {"model": {"zoo": "mlp", "kwargs": {"hidden": [16]}}},
        "train": {"epochs": epochs, "batch_size": 64, "lr": 0.003, "checkpoint_every": 5},
        "eval": {"baseline": False, "throughput_batch": 32},
        "run": {"log_with": [], "cpu_threads": 1},
        "search": {
            "space": {
                "kd.kd_temperature": "uniform(1, 4)",
                "student.model.kwargs.hidden": [[8], [16]],
            },
            "objectives": ["maximize:student test accuracy"],
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
        time.sleep(0.2)


def has_checkpoint(run_dir: Path) -> bool:
    return any((run_dir / "student" / "checkpoints").glob("step-*"))


def load_trials(
    study_dir: Path, storage: str | None = None, name: str = "distil-search"
) -> list[Any]:
    url = storage or f"sqlite:///{study_dir / 'study.db'}"
    return optuna.load_study(study_name=name, storage=url).get_trials()


def test_kill_9_mid_trial_then_resume_keeps_completed_trials_and_resumes_the_stale_one(
    tmp_path: Path, teacher: Path
) -> None:
    config = study_config(tmp_path, teacher, {"budget": {"trials": 2}}, epochs=3)
    study_dir = tmp_path / "study"
    argv = [
        sys.executable,
        "-m",
        "distil",
        "search",
        str(config),
        "--study-dir",
        str(study_dir),
        "--stage",
        "search",
    ]
    with open(tmp_path / "first.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(
                lambda: (
                    (study_dir / "trials/0000/report.json").is_file()
                    and has_checkpoint(study_dir / "trials/0001")
                )
            )
        finally:
            proc.send_signal(signal.SIGKILL)  # the worker; its trial's run dies with it
            proc.wait()
    before = {t.number: t.state.name for t in load_trials(study_dir)}
    assert before == {0: "COMPLETE", 1: "RUNNING"}

    code, out = run_cli(["search", "--study-dir", str(study_dir), "--stage", "search"])
    assert code == 0, out
    trials = load_trials(study_dir)
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[0].values == pytest.approx(
        [
            json.loads((study_dir / "trials/0000/report.json").read_text())["summary"][
                "student test accuracy"
            ]
        ]
    )
    retry = trials[2]
    assert retry.user_attrs["origin"] == 1 and retry.params == trials[1].params
    assert retry.user_attrs["resumed"] is True
    assert sorted(p.name for p in (study_dir / "trials").iterdir() if p.is_dir()) == [
        "0000",
        "0001",
    ]
    summary = json.loads((study_dir / "trials/0001/student/summary.json").read_text())
    assert summary["resumed_at_step"] > 0  # continued from its checkpoint, not started over
    assert "--resume" in (study_dir / "trials/0001.log").read_text()


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
def test_two_workers_share_one_storage_and_one_survives_a_kill(
    tmp_path: Path, teacher: Path, storage: str | None
) -> None:
    name = f"test-{tmp_path.name}-{os.getpid()}"  # a server keeps studies between test runs
    extra: dict[str, Any] = {"budget": {"trials": 2}, "workers": 2, "study_name": name}
    if storage is not None:
        extra["storage"] = storage
    config = study_config(tmp_path, teacher, extra, epochs=3)
    study_dir = tmp_path / "study"
    argv = [
        sys.executable,
        "-m",
        "distil",
        "search",
        str(config),
        "--study-dir",
        str(study_dir),
        "--stage",
        "search",
    ]
    with open(tmp_path / "coordinator.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        wait_for(
            lambda: (
                has_checkpoint(study_dir / "trials/0000")
                or has_checkpoint(study_dir / "trials/0001")
            )
        )
        running = {  # a running trial that has checkpointed, and its worker
            t.number: t.user_attrs["worker"]["pid"]
            for t in load_trials(study_dir, storage, name)
            if t.state.name == "RUNNING"
            and "worker" in t.user_attrs
            and has_checkpoint(study_dir / "trials" / f"{t.number:04d}")
        }
        victim_trial, victim = next(iter(running.items()))
        os.kill(victim, signal.SIGKILL)  # its run dies with it (PR_SET_PDEATHSIG)
        time.sleep(1.0)
        # A tiny run may have written its report just before the kill: then the retry only
        # measures it; otherwise it must resume the folder.
        finished_at_kill = (study_dir / "trials" / f"{victim_trial:04d}" / "report.json").is_file()
        assert proc.wait(timeout=180) == 0
    trials = load_trials(study_dir, storage, name)
    states = {t.number: t.state.name for t in trials}
    assert states[victim_trial] == "FAIL"
    retries = [
        t for t in trials if t.user_attrs.get("origin") == victim_trial and t.number != victim_trial
    ]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE"
    assert retries[0].user_attrs["run_dir"] == str(study_dir / "trials" / f"{victim_trial:04d}")
    assert retries[0].user_attrs["resumed"] or finished_at_kill
    assert sum(s == "COMPLETE" for s in states.values()) == 2
    pids = {t.user_attrs["worker"]["pid"] for t in trials}
    assert len(pids) == 2  # both workers ran trials against the one storage
    assert "its trial is re-queued" in (tmp_path / "coordinator.log").read_text()


def test_every_trial_pruned_ends_with_a_report_and_no_winner(tmp_path: Path, teacher: Path) -> None:
    config = study_config(
        tmp_path,
        teacher,
        {
            "budget": {"trials": 2},
            "pruner": {"type": "threshold", "lower": 2.0},  # accuracy never reaches 2: prune all
            "intermediate": {"series": "test_accuracy"},
            "select": {"top_k": 2, "seeds": [0, 1]},
        },
    )
    study_dir = tmp_path / "study"
    code, out = run_cli(["search", str(config), "--study-dir", str(study_dir)])
    assert code == 0, out
    assert "no winner: no search trial completed (2 trials: 2 pruned)" in out
    assert [t.state.name for t in load_trials(study_dir)] == ["PRUNED", "PRUNED"]
    report = json.loads((study_dir / "report.json").read_text())
    assert report["states"] == {"pruned": 2} and report["select"]["winner"] is None
    assert not (study_dir / "best.yaml").exists() and (study_dir / "report.html").is_file()
    assert not (study_dir / "trials/0000/report.json").exists()  # stopped after its first epoch


class TwoObjectiveRunner:
    """Quality rises with the student's width and so does its size: a real trade-off."""

    def __call__(self, trial: Any, values: dict[str, Any], run_dir: Path) -> Any:
        from distil.search.study import TrialOutcome

        width = sum(values["hidden"])
        quality = 1 - 1 / width - 0.01 * abs(values["kd.kd_temperature"] - 3)
        return TrialOutcome(
            [quality, float(width)], {"student test accuracy": quality, "student params": width}
        )


def test_a_multi_objective_study_reports_its_pareto_front(tmp_path: Path) -> None:
    from distil.search.report import write_report
    from distil.search.study import Worker, open_study

    ctx = study_ctx(
        tmp_path, 6, objectives=["maximize:student test accuracy", "minimize:student params"]
    )
    Worker(ctx, TwoObjectiveRunner()).run()
    study = open_study(ctx)
    assert len(study.directions) == 2
    report = write_report(ctx, study)
    front = report["pareto"]["front"]
    assert front and report["pareto"]["axes"] == ["student test accuracy", "student params"]
    widths = [json.loads(r["hidden"]) for r in front]
    assert len({sum(w) for w in widths}) == len(front)  # one point per size on this front
    assert {t.number for t in study.best_trials} >= {r["trial"] for r in front}


def test_the_final_test_runs_once(tmp_path: Path) -> None:
    from distil.search.select import final_test

    ctx = study_ctx(tmp_path, 1, final={"seeds": [0, 1]})
    stored = {"metric": {"metric": "student test accuracy"}, "best": {"mean": 0.9}}
    (tmp_path / "final.json").write_text(json.dumps(stored))
    assert final_test(ctx, None, parallel=1) == stored  # read back, nothing re-run
    (tmp_path / "final.json").unlink()
    with pytest.raises(DistilError, match="named no winner"):
        final_test(ctx, None, parallel=1)
