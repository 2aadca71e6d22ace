"""Issue 21's study: ``distil search`` over the default job (classifier_kd on MNIST-5k) for 30
minutes of busy wall time, with a worker killed mid-study and the whole study killed and
resumed, the top candidates re-run over seeds, then the test set used once.

Protocol (the search never reads a test-split number):

1. Two teachers, each the default job's teacher (seed 0): one trained on the trials' training
   part (``data.validation_fraction``: a stratified share of the 3,750 training images held out
   for validation), one on the whole training split for the final stage.
2. Search: trials carve the same validation split, load the first teacher
   (``teacher.train=false``), skip the baseline, and run ``--flash-epochs`` of the default 30
   epochs; the objective is the student's validation accuracy (``table.student.val_accuracy``),
   the median pruner follows the per-epoch ``val_accuracy``; two workers for ``--budget`` of busy
   wall time. After ``--kill-worker-at`` seconds, the first worker whose trial is mid-training
   with a checkpoint gets ``kill -9``; at ``--kill-study-at`` the whole study does; then it is
   resumed with ``distil search --study-dir``. Trial states around each kill are recorded.
3. Selection: the top ``--top-k`` re-run at full length with seeds 0, 1, 2 (validation still).
4. Final, once: ``best.yaml`` (the shipped default plus the winner's values) and the shipped
   default, seeds 0, 1, 2, both with the second teacher, on the test split.
5. ``distil advise classifier_kd``: its capacity-gap student size against the search's.

    nohup nice -n 10 env OMP_NUM_THREADS=1 PYTHONPATH=src \\
        python bench/search_classifier_kd.py --out runs/search-study > log 2>&1 &

Writes ``bench/results/search_classifier_kd.{json,md}`` (times, load averages, process CPU time,
trial states around each kill, selection, final test, accuracy by student size, advise's check).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"

SPACE = {
    "kd.kd_temperature": "loguniform(1, 8)",
    "kd.kd_weight": "uniform(0.1, 0.95)",
    "kd.divergence": ["forward_kl", "reverse_kl", "generalized_jsd", "total_variation"],
    "kd.mixup_alpha": "uniform(0, 0.4)",
    "student.model.kwargs.hidden": [
        [16],
        [32],
        [64],
        [128],
        [256],
        [64, 32],
        [128, 64],
        [256, 128],
    ],
    "train.lr": "loguniform(5e-4, 1e-2)",
}


def rel(text: str) -> str:
    return text.replace(str(ROOT) + "/", "")


def sh(argv: list[str], log: Path) -> int:
    with open(log, "ab") as f:
        return subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, check=False).returncode


def distil(*args: str) -> list[str]:
    return [sys.executable, "-m", "distil", *args]


class LoadSampler:
    """/proc/loadavg every ``every`` seconds, in a thread."""

    def __init__(self, every: float = 30.0) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._every = every
        self._t0 = time.time()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(
                (round(time.time() - self._t0), float(Path("/proc/loadavg").read_text().split()[0]))
            )
            self._stop.wait(self._every)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        values = [v for _, v in self.samples] or [0.0]
        return {"mean": sum(values) / len(values), "max": max(values), "samples": self.samples}


def states(db: Path) -> dict[int, dict[str, Any]]:
    """Trial number -> state, origin and resumed flag, read straight from the SQLite file."""
    con = sqlite3.connect(db, timeout=60)
    try:
        rows = con.execute("SELECT trial_id, number, state FROM trials").fetchall()
        attrs = con.execute(
            "SELECT trial_id, key, value_json FROM trial_user_attributes"
        ).fetchall()
    finally:
        con.close()
    by_id: dict[int, dict[str, Any]] = {tid: {"number": n, "state": s} for tid, n, s in rows}
    for tid, key, value in attrs:
        if key in ("origin", "resumed"):
            by_id[tid][key] = json.loads(value)
        if key == "worker":
            by_id[tid]["pid"] = json.loads(value).get("pid")
    return {v["number"]: v for v in by_id.values()}


def shipped(config: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(
        (ROOT / "src" / "distil" / "configs" / f"{config}.yaml").read_text()
    )
    return data


def teacher_run(out: Path, log: Path, config: str, name: str, overrides: list[str]) -> Path:
    """The default job's teacher (seed 0), trained once and reused: ``name/teacher/final``."""
    weights = out / name / "teacher" / "final" / "model.safetensors"
    if not weights.is_file():
        run_dir = out / name
        argv = distil("run", config, *overrides, "eval.baseline=false", "train.epochs=1")
        argv += ["run.log_with=[]", "--run-dir", str(run_dir)]
        if (run_dir / "config.resolved.yaml").is_file():
            argv.append("--resume")
        code = sh(argv, log)
        assert code == 0 and weights.is_file(), f"teacher run {name} failed; see {log}"
    return weights


def study_yaml(
    out: Path, search_teacher: Path, final_teacher: Path, args: argparse.Namespace
) -> Path:
    base = shipped(args.config)
    seeds = [int(s) for s in args.seeds.split(",")]
    budget = {"trials": args.trials} if args.trials else {"wall_time": args.budget}
    base["search"] = {
        "space": SPACE,
        "objectives": ["maximize:table.student.val_accuracy"],
        "costs": ["minimize:student params", "minimize:cost.student.latency_b1_ms"],
        "budget": budget,
        "workers": args.workers,
        "heartbeat_interval": 10,
        "grace_period": 60,
        "sampler": {"name": "tpe", "seed": 0, "startup_trials": 10},
        "pruner": {"type": "median", "startup_trials": 6, "warmup_steps": 100},
        "intermediate": {"series": "val_accuracy", "phase": "student"},
        "trial_overrides": [
            f"data.validation_fraction={args.validation_fraction}",
            "teacher.train=false",
            f"teacher.model.weights={search_teacher}",
            "eval.baseline=false",
            "run.log_with=[]",
        ],
        "flash_overrides": [f"train.epochs={args.flash_epochs}"],
        "select": {"top_k": args.top_k, "seeds": seeds},
        "final": {
            "seeds": seeds,
            "metric": "maximize:student test accuracy",
            "reference": args.config,
            "overrides": [
                "teacher.train=false",
                f"teacher.model.weights={final_teacher}",
                "eval.baseline=false",
                "run.log_with=[]",
            ],
        },
    }
    path = out / "study.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


def mid_training(study: Path, origin: int) -> bool:
    """The trial's run has a student checkpoint and has not finished training."""
    run_dir = study / "trials" / f"{origin:04d}" / "student"
    return any((run_dir / "checkpoints").glob("step-*")) and not (run_dir / "final").exists()


def become_subreaper() -> None:
    """Orphaned descendants (a killed study's workers and runs) are re-parented to this process,
    so their CPU time is counted in RUSAGE_CHILDREN once reaped."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER


def reap_orphans() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def worker_pids(coordinator: int) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-P", str(coordinator)], capture_output=True, text=True, check=False
    ).stdout
    return [int(p) for p in out.split()]


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default="classifier_kd", help="shipped classifier_kd config")
    parser.add_argument("--budget", default="30m", help="busy wall time of the search stage")
    parser.add_argument("--trials", type=int, default=None, help="a trial budget instead")
    parser.add_argument("--flash-epochs", type=int, default=5)
    parser.add_argument("--validation-fraction", type=float, default=0.2)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-worker-at", type=float, default=480.0)
    parser.add_argument("--kill-study-at", type=float, default=900.0)
    args = parser.parse_args()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    become_subreaper()
    log = out / "bench.log"
    load = LoadSampler()
    record: dict[str, Any] = {"load_at_start": Path("/proc/loadavg").read_text().strip()}
    cpu: dict[str, float] = {}
    t0 = time.time()
    fraction = f"data.validation_fraction={args.validation_fraction}"
    search_teacher = teacher_run(out, log, args.config, "teacher-run", [fraction])
    final_teacher = teacher_run(out, log, args.config, "teacher-full", [])
    record["prepare_s"], cpu["prepare"] = time.time() - t0, cpu_s()
    config = study_yaml(out, search_teacher, final_teacher, args)
    study = out / "study"
    db = study / "study.db"

    t1 = time.time()
    search = distil("search", str(config), "--study-dir", str(study), "--stage", "search")
    events: list[dict[str, Any]] = []
    with open(out / "search-1.log", "ab") as first_log:
        coordinator = subprocess.Popen(search, stdout=first_log, stderr=subprocess.STDOUT)
        killed_worker = killed_study = False
        while coordinator.poll() is None:
            now = time.time() - t1
            if not killed_worker and now >= args.kill_worker_at and db.is_file():
                workers = set(worker_pids(coordinator.pid))
                before = states(db)
                victims = [  # a worker whose trial is mid-training, past a checkpoint
                    info
                    for info in before.values()
                    if info["state"] == "RUNNING"
                    and info.get("pid") in workers
                    and mid_training(study, int(info.get("origin", info["number"])))
                ]
                if victims:
                    os.kill(victims[0]["pid"], signal.SIGKILL)
                    killed_worker = True
                    events.append(
                        {
                            "t": now,
                            "event": f"kill -9 one worker (trial {victims[0]['number']})",
                            "pid": victims[0]["pid"],
                            "states": before,
                        }
                    )
            if killed_worker and not killed_study and now >= args.kill_study_at:
                before = states(db)
                coordinator.send_signal(signal.SIGKILL)  # its workers and their runs die with it
                coordinator.wait()
                killed_study = True
                events.append({"t": now, "event": "kill -9 the whole study", "states": before})
                break
            time.sleep(2)
        coordinator.wait()
    time.sleep(5)
    reap_orphans()  # the killed study's workers and runs (their CPU time is counted then)
    events.append({"t": time.time() - t1, "event": "after the kills", "states": states(db)})
    code = sh(
        distil("search", "--study-dir", str(study), "--stage", "search"), out / "search-2.log"
    )
    events.append(
        {"t": time.time() - t1, "event": f"resumed search ended ({code})", "states": states(db)}
    )
    reap_orphans()
    record["search_s"], cpu["search"] = time.time() - t1, cpu_s() - cpu["prepare"]

    t2 = time.time()
    code = sh(distil("search", "--study-dir", str(study), "--stage", "select"), out / "select.log")
    record["select_s"], record["select_exit"] = time.time() - t2, code
    cpu["select"] = cpu_s() - cpu["prepare"] - cpu["search"]
    t3 = time.time()
    code = sh(distil("search", "--study-dir", str(study), "--stage", "final"), out / "final.log")
    record["final_s"], record["final_exit"] = time.time() - t3, code
    cpu["final"] = cpu_s() - sum(cpu.values())
    sh(distil("advise", args.config, "--json", str(out / "advise.json")), out / "advise.log")
    record["load"] = load.stop()
    record["children_cpu_s"] = cpu_s()
    record["cpu_s"] = cpu
    record["wall_s"] = time.time() - t0
    record["events"] = events
    record["kill_check"] = kill_check(events)
    report = json.loads((study / "report.json").read_text())
    record["report"] = {
        k: report.get(k)
        for k in ("states", "retried", "spent", "importances", "select", "final", "capacity_gap")
    }
    record["pareto_front"] = report["pareto"]
    advise_path = out / "advise.json"
    if advise_path.is_file():
        record["advise"] = json.loads(advise_path.read_text()).get("capacity_gap")
    record["args"] = {k: str(v) for k, v in vars(args).items() if k != "out"}
    RESULTS.mkdir(exist_ok=True)
    name = f"search_{args.config.replace('-', '_')}"
    (RESULTS / f"{name}.md").write_text(rel(markdown(record)))
    (RESULTS / f"{name}.json").write_text(rel(json.dumps(record, indent=1, default=str)))
    print(
        json.dumps(
            {
                k: record[k]
                for k in ("wall_s", "search_s", "select_s", "final_s", "cpu_s", "kill_check")
            },
            default=str,
        )
    )


def _pct(v: float | None) -> str:
    return "unbounded" if v is None else f"{100 * v:.2f}"


def markdown(record: dict[str, Any]) -> str:
    """The results as a Markdown page (``results/search_<config>.md``)."""
    rep = record["report"]
    cpu = record["cpu_s"]
    lines = [
        f"# distil search study: {record['args']['config']}",
        "",
        f"Arguments: `{json.dumps(record['args'])}`",
        "",
        f"Wall time {record['wall_s']:.0f} s (prepare {record['prepare_s']:.0f}, search "
        f"{record['search_s']:.0f}, select {record['select_s']:.0f}, final {record['final_s']:.0f}); "
        f"CPU time of all child processes {record['children_cpu_s']:.0f} s (prepare "
        f"{cpu['prepare']:.0f}, search {cpu['search']:.0f}, select {cpu['select']:.0f}, final "
        f"{cpu['final']:.0f}); load average at start `{record['load_at_start']}`, sampled every "
        f"30 s: mean {record['load']['mean']:.1f}, max {record['load']['max']:.1f} (2 cores; every "
        "process of the study at nice 10).",
        "",
        f"Trials: {rep['states']}; spent {rep['spent']}; trials re-run after a dead worker: "
        f"{rep['retried']}.",
        "",
        "## Kills",
        "",
        "| when (s into the search) | event | trials complete / running before |",
        "|---:|---|---|",
    ]
    for e in record["events"]:
        st = e["states"]
        done = sum(v["state"] == "COMPLETE" for v in st.values())
        running = [n for n, v in st.items() if v["state"] == "RUNNING"]
        lines.append(f"| {e['t']:.0f} | {e['event']} | {done} / {running} |")
    lines += ["", f"Check: `{json.dumps(record['kill_check'], default=str)}`", ""]
    lines += [
        "## Selection (validation split, full-length runs)",
        "",
        "| trial | flash val acc | mean val acc | 95% CI | per seed | configuration |",
        "|---:|---:|---:|---|---|---|",
    ]
    for c in rep["select"]["candidates"]:
        i = c.get("interval") or {}
        lines.append(
            f"| {c['origin']} | {100 * c['score']:.2f} | {_pct(i.get('mean'))} | "
            f"{_pct(i.get('low'))} .. {_pct(i.get('high'))} | "
            f"{', '.join(f'{100 * s:.2f}' for s in c['scores'])} | `{json.dumps(c['values'])}` |"
        )
    lines += ["", rep["select"]["note"], ""]
    final = rep.get("final")
    if final:
        lines += [
            "## Final test (used once): test accuracy %, seeds " + str(final["seeds"]),
            "",
            "| run | mean | 95% CI | per seed |",
            "|---|---:|---|---|",
        ]
        for name in ("best", "reference", "difference"):
            part = final.get(name)
            if part:
                lines.append(
                    f"| {name} | {_pct(part['mean'])} | {_pct(part['low'])} .. "
                    f"{_pct(part['high'])} | "
                    f"{', '.join(f'{100 * s:.2f}' for s in part.get('scores', []))} |"
                )
        lines.append("")
    front = record["pareto_front"]
    lines += [
        "## Pareto front (validation accuracy of flash trials vs student params)",
        "",
        "| trial | val acc % | params | hidden |",
        "|---:|---:|---:|---|",
    ]
    lines += [
        f"| {p['trial']} | {100 * p[front['axes'][0]]:.2f} | {p[front['axes'][1]]:,.0f} | "
        f"{p.get('student.model.kwargs.hidden')} |"
        for p in front["front"]
    ]
    lines += ["", f"{front['distinct_student_sizes']} distinct student sizes on the front.", ""]
    lines += ["## Importances (fANOVA)", "", f"`{json.dumps(rep['importances'])}`", ""]
    gap = rep.get("capacity_gap") or {}
    lines += ["## Capacity gap: distil advise vs the search", ""]
    if record.get("advise"):
        lines.append(f"`distil advise`: `{json.dumps(record['advise'])}`")
    lines += ["", str(gap.get("text")), ""]
    lines += ["| student params | trials | best flash val acc % |", "|---:|---:|---:|"]
    lines += [
        f"| {int(size):,} | {v['trials']} | {100 * v['best']:.2f} |"
        for size, v in (gap.get("best_by_size") or {}).items()
    ]
    lines.append("")
    return "\n".join(lines)


def kill_check(events: list[dict[str, Any]]) -> dict[str, Any]:
    """No completed trial lost; every trial running at a kill re-run (resumed) to an end."""
    final = events[-1]["states"]
    lost, stale, rerun = [], [], {}
    for event in events[:2]:
        for number, info in event["states"].items():
            if info["state"] == "COMPLETE" and final[number]["state"] != "COMPLETE":
                lost.append(number)
            # the killed worker's trial, and every trial running when the whole study was killed
            if info["state"] == "RUNNING" and event.get("pid") in (None, info.get("pid")):
                stale.append(number)
    for number in sorted(set(stale)):
        origin = final[number].get("origin", number)  # a retry that was itself killed
        retries = [v for v in final.values() if v.get("origin") == origin and v["number"] > number]
        rerun[number] = [
            {"trial": r["number"], "state": r["state"], "resumed": r.get("resumed")}
            for r in retries
        ]
    return {"completed_lost": lost, "running_at_kills": sorted(set(stale)), "re_runs": rerun}


if __name__ == "__main__":
    main()
