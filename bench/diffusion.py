"""Benchmark: diffusion distillation and training-free few-step sampling (issue 20).

One teacher (``distil run diffusion_train``: class-conditional 16x16 Fashion-MNIST UNet, 1.05M
parameters, v-prediction on SD 1.x's beta schedule) and four distillations of it
(``distil run diffusion_distill`` with progressive, guidance, consistency and adapter guidance),
each run through the CLI in its own process; then every row is sampled here, in one process,
from the same initial noise, and scored with the same offline metric (Fréchet and kernel
distance in the penultimate features of the classifier the teacher run trained, class
fidelity), next to the real-vs-real floor:

* the teacher with DDIM-64 (the reference), DDIM / DPM-Solver++ 2M at 4 and 8 steps, paper #1's
  training-free sampler at 4/5/6/8 steps (its early stop, and the same plus one denoising pass);
* progressive distillation at 8, 4, 2, 1 steps; consistency distillation at 1, 2, 4 steps;
* at guidance scale ``--guided-scale``: the teacher with two-pass CFG (DDIM 8/16/64), the
  guidance-distilled and the adapter-guidance students in one pass (DDIM 8/16).

Goals (issue 20): paper #1 at 8 steps within 10 % of DDIM-64's distance; PD at 4 steps within
20 % of DDIM-64 and at least 30 % better than DDIM-4; guidance distillation in one pass within
10 % of two-pass CFG at the same steps; consistency at 1-2 steps better than PD at the same NFE.

    python bench/diffusion.py --work bench/artifacts/diffusion            # hours on this CPU
    python bench/diffusion.py --work runs/diffusion-quick --quick        # minutes: digits 8x8
    python bench/diffusion.py --work runs/diffusion --teacher-steps 3000 --distill-steps 300 \
        --images 1000                                                    # ~1.5 h: the run in results

Finished runs are reused (an unfinished one is resumed), so the command can be repeated. One
JSON line per row goes to ``bench/results/diffusion.jsonl`` as it is scored; the Markdown table,
the goals, the distance-vs-NFE plot, a sample mosaic and the training curves go next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


def rel(text: str) -> str:
    """Paths in recorded text relative to the repository, never this machine's."""
    return text.replace(str(ROOT) + "/", "")


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


QUICK = {
    "data": [
        "data.dataset=digits",
        "data.image_size=8",
        "data.train_limit=512",
        "data.test_limit=300",
    ],
    "model": ["model.image_size=8", "model.block_out_channels=[8,16]", "model.norm_num_groups=4"],
    "teacher": [
        "train.max_steps=60",
        "train.batch_size=32",
        "train.warmup_steps=5",
        "train.checkpoint_every=30",
        "classifier.channels=[8,16]",
        "classifier.training.epochs=2",
        "classifier.training.batch_size=32",
    ],
    "distill": ["train.max_steps=8", "train.batch_size=16", "train.checkpoint_every=4"],
    "eval": [
        "eval.num_images=60",
        "eval.kid_subset_size=30",
        "eval.kid_subsets=5",
        "eval.grid_per_class=1",
    ],
}


def run_recipe(
    name: str, config: str, run_dir: Path, overrides: list[str], log_dir: Path
) -> dict[str, Any]:
    """``distil run CONFIG overrides --run-dir RUN_DIR`` in a fresh process (resumed when the
    folder holds an unfinished run, skipped when it has a report); returns timing facts."""
    if (run_dir / "report.json").is_file():
        print(f"[{name}] reusing {rel(str(run_dir))}", flush=True)
        return {"run": name, "reused": True}
    cmd = [sys.executable, "-m", "distil", "run", config, *overrides, "--run-dir", str(run_dir)]
    if run_dir.exists() and any(run_dir.iterdir()):
        cmd.append("--resume")
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"[{name}] {rel(' '.join(cmd))}", flush=True)
    load_before, wall = loadavg(), time.perf_counter()
    with (log_dir / f"{name}.log").open("w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - wall
    if proc.returncode != 0:
        tail = (log_dir / f"{name}.log").read_text()[-3000:]
        raise SystemExit(f"[{name}] failed (exit {proc.returncode}):\n{tail}")
    shown = ["python", *cmd[1:]]  # not this machine's interpreter path
    return {
        "run": name,
        "command": rel(" ".join(shown)),
        "wall_s": wall,
        "load_before": load_before,
        "load_after": loadavg(),
    }


def train_all(args: argparse.Namespace, work: Path) -> dict[str, Path]:
    q = QUICK if args.quick else {k: [] for k in QUICK}
    q = {k: list(v) for k, v in q.items()}
    for key, steps in (("teacher", args.teacher_steps), ("distill", args.distill_steps)):
        if steps:  # a smaller budget at full resolution: checkpoints stay about 4 per run
            q[key] += [f"train.max_steps={steps}", f"train.checkpoint_every={max(1, steps // 4)}"]
    common = ["run.log_with=[]", f"run.cpu_threads={args.threads}", *q["data"]]
    # the recipes' own reports stay small: every row that counts is scored below, in one process
    small = q["eval"] or ["eval.num_images=500", "eval.kid_subset_size=500"]
    runs = {
        "teacher": work / "teacher",
        "pd": work / "pd",
        "gd": work / "gd",
        "cd": work / "cd",
        "agd": work / "agd",
    }
    facts = [
        run_recipe(
            "teacher",
            "diffusion_train",
            runs["teacher"],
            [*common, *q["model"], *q["teacher"], *small, "eval.samplers=[{kind: ddim, steps: 8}]"],
            work / "logs",
        )
    ]
    teacher = f"teacher.path={runs['teacher']}"
    no_eval = ["eval.compare_teacher=false", *small]
    distill = [
        ("pd", "diffusion_distill", ["method.final_steps=1", "eval.student_steps=[1]"]),
        (
            "gd",
            "diffusion_distill-guidance",
            [f"eval.guidance_scale={args.guided_scale}", "eval.student_steps=[8]"],
        ),
        (
            "cd",
            "diffusion_distill-consistency",
            [
                "eval.student_steps=[2]",
                *(["eval.track_images=30", "eval.track_every=4"] if args.quick else []),
            ],
        ),
        (
            "agd",
            "diffusion_distill-adapter",
            [
                f"eval.guidance_scale={args.guided_scale}",
                "eval.student_steps=[8]",
                *(
                    ["method.trajectories=32", "method.trajectory_sampler={kind: ddim, steps: 8}"]
                    if args.quick
                    else []
                ),
            ],
        ),
    ]
    for name, config, extra in distill:
        ref = ["eval.reference={kind: ddim, steps: 8}"]  # the recipe's own report: cheap rows
        facts.append(
            run_recipe(
                name,
                config,
                runs[name],
                [*common, teacher, *q["distill"], *no_eval, *ref, *extra],
                work / "logs",
            )
        )
    (work / "runs.json").write_text(json.dumps(facts, indent=1))
    return runs


def rows_to_score(
    runs: dict[str, Path], guided: float
) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(row name, run, model folder inside it, sampler spec) in scoring order."""
    t, rows = "teacher", []
    rows.append(("teacher DDIM-64 (reference)", t, "model/final", {"kind": "ddim", "steps": 64}))
    for n in (4, 8):
        rows.append((f"teacher DDIM-{n}", t, "model/final", {"kind": "ddim", "steps": n}))
        rows.append(
            (f"teacher DPM-Solver++ 2M-{n}", t, "model/final", {"kind": "dpmpp_2m", "steps": n})
        )
    for n in (4, 5, 6, 8):
        rows.append(
            (f"teacher paper #1-{n}", t, "model/final", {"kind": "truncated_karras", "steps": n})
        )
    for n in (4, 8):
        spec = {"kind": "truncated_karras", "steps": n, "early_stop_output": "denoised"}
        rows.append((f"teacher paper #1-{n} + denoise", t, "model/final", spec))
    for n in (8, 4, 2, 1):
        rows.append((f"PD-{n}", "pd", f"stage-{n}/final", {"kind": "ddim", "steps": n}))
    for n in (1, 2, 4):
        rows.append((f"CD-{n}", "cd", "student/final", {"kind": "lcm", "steps": n}))
    g = {"guidance_scale": guided}
    for n in (64, 16, 8):
        rows.append(
            (
                f"teacher CFG DDIM-{n} (s={guided:g})",
                t,
                "model/final",
                {"kind": "ddim", "steps": n, **g},
            )
        )
    for n in (16, 8):
        rows.append(
            (
                f"GD DDIM-{n} (s={guided:g})",
                "gd",
                "student/final",
                {"kind": "ddim", "steps": n, **g},
            )
        )
        rows.append(
            (
                f"AGD DDIM-{n} (s={guided:g})",
                "agd",
                "student/final",
                {"kind": "ddim", "steps": n, **g},
            )
        )
    return rows


def group_of(name: str) -> str:
    """The line a row belongs to in the distance-vs-NFE plot."""
    for prefix, group in (
        ("teacher DDIM-64", "teacher DDIM"),
        ("teacher DDIM", "teacher DDIM"),
        ("teacher DPM", "teacher DPM-Solver++ 2M"),
        (
            "teacher paper #1",
            "teacher paper #1 (+ denoise)" if "denoise" in name else "teacher paper #1",
        ),
        ("PD", "progressive distillation"),
        ("CD", "consistency distillation"),
        ("teacher CFG", "teacher CFG (guided)"),
        ("GD", "guidance distillation (guided)"),
        ("AGD", "adapter guidance (guided)"),
    ):
        if name.startswith(prefix):
            return group
    return name


def score_all(
    args: argparse.Namespace, runs: dict[str, Path], out_jsonl: Path
) -> list[dict[str, Any]]:
    import torch

    from distil.diffusion.data import load_diffusion_images, to_unit_range
    from distil.diffusion.evaluate import score_sampler
    from distil.diffusion.metrics import classifier_features, load_feature_classifier, real_floor
    from distil.diffusion.model import load_diffusion_model
    from distil.diffusion.sampling import SamplerSpec
    from distil.diffusion.schedule import make_noise_schedule

    torch.set_num_threads(args.threads)
    q = args.quick
    data = load_diffusion_images(
        "digits" if q else "fashion-mnist",
        image_size=8 if q else 16,
        train_limit=512 if q else None,
        test_limit=300 if q else None,
    )
    classifier, info = load_feature_classifier(runs["teacher"] / "classifier" / "final")
    reference = classifier_features(classifier, to_unit_range(data.test_images))
    n = args.images
    kid = {"kid_subsets": 5 if q else 100, "kid_subset_size": min(n, 30 if q else 1000)}
    scored: list[dict[str, Any]] = []
    start_cpu = time.process_time()
    floor = real_floor(
        classifier,
        to_unit_range(data.train_images),
        data.train_labels,
        n,
        reference_features=reference,
        **kid,
    )
    floor_row = {
        "name": "real images (floor)",
        "group": "floor",
        "load": loadavg(),
        **floor.__dict__,
    }
    with out_jsonl.open("w") as f:
        f.write(json.dumps(floor_row) + "\n")
        for name, run, folder, spec in rows_to_score(runs, args.guided_scale):
            module, card = load_diffusion_model(runs[run] / folder)
            grid = args.work / "grids" / f"{len(scored):02d}.png"
            load_before = loadavg()
            score = score_sampler(
                name,
                module,
                card.kind,
                SamplerSpec.model_validate(spec),
                schedule=make_noise_schedule(card.beta_schedule, card.num_train_timesteps),
                prediction_type=card.prediction_type,
                null_class=card.null_class,
                num_classes=card.num_classes,
                image_shape=data.image_shape,
                classifier=classifier,
                reference_features=reference,
                num_images=n,
                seed=args.seed,
                batch_size=500,
                grid=grid,
                grid_per_class=2,
                **kid,
            )
            row = {
                "name": name,
                "group": group_of(name),
                **score.row(),
                "load_before": load_before,
                "load_after": loadavg(),
                "grid": rel(str(grid)),
            }
            scored.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(
                f"{name:38s} NFE {row['nfe_per_image']:5.1f}  FD {row['frechet_distance']:8.3f}  "
                f"fidelity {row['class_fidelity']:.3f}  {row['seconds_per_image'] * 1e3:7.1f} ms/image",
                flush=True,
            )
    meta = {
        "classifier_test_accuracy": info.test_accuracy,
        "images_per_row": n,
        "scoring_cpu_s": time.process_time() - start_cpu,
        "floor": floor_row,
    }
    (out_jsonl.parent / f"{out_jsonl.stem}.meta.json").write_text(json.dumps(meta, indent=1))
    return scored


def goals(rows: list[dict[str, Any]], guided: float) -> list[tuple[str, str, bool | None]]:
    by = {r["name"]: r for r in rows}

    def fd(name: str) -> float | None:
        row = by.get(name)
        return None if row is None else float(row["frechet_distance"])

    out: list[tuple[str, str, bool | None]] = []
    ref, ddim4 = fd("teacher DDIM-64 (reference)"), fd("teacher DDIM-4")
    for name in ("teacher paper #1-8", "teacher paper #1-8 + denoise"):
        v = fd(name)
        if v is not None and ref:
            out.append(
                (
                    f"{name} within 10 % of DDIM-64",
                    f"{v:.3f} vs {ref:.3f} ({v / ref:.2f}x)",
                    v <= 1.10 * ref,
                )
            )
    pd4 = fd("PD-4")
    if pd4 is not None and ref and ddim4:
        out.append(
            (
                "PD-4 within 20 % of DDIM-64",
                f"{pd4:.3f} vs {ref:.3f} ({pd4 / ref:.2f}x)",
                pd4 <= 1.20 * ref,
            )
        )
        out.append(
            (
                "PD-4 at least 30 % better than DDIM-4",
                f"{pd4:.3f} vs {ddim4:.3f} ({1 - pd4 / ddim4:+.0%})",
                pd4 <= 0.70 * ddim4,
            )
        )
    for n in (16, 8):
        for student in ("GD", "AGD"):
            s_fd, cfg_fd = (
                fd(f"{student} DDIM-{n} (s={guided:g})"),
                fd(f"teacher CFG DDIM-{n} (s={guided:g})"),
            )
            if s_fd is not None and cfg_fd:
                out.append(
                    (
                        f"{student} one pass within 10 % of two-pass CFG, DDIM-{n}",
                        f"{s_fd:.3f} vs {cfg_fd:.3f} ({s_fd / cfg_fd:.2f}x)",
                        s_fd <= 1.10 * cfg_fd,
                    )
                )
    for n in (1, 2):
        cd, pd = fd(f"CD-{n}"), fd(f"PD-{n}")
        if cd is not None and pd is not None:
            out.append((f"CD-{n} better than PD-{n}", f"{cd:.3f} vs {pd:.3f}", cd < pd))
    return out


def write_outputs(
    args: argparse.Namespace, rows: list[dict[str, Any]], runs: dict[str, Path], results: Path
) -> None:
    from distil.diffusion.evaluate import distance_vs_nfe_png

    meta = json.loads((results.parent / f"{results.stem}.meta.json").read_text())
    floor = meta["floor"]
    plot_rows = [{**r, "model": r["group"]} for r in rows]
    (results.parent / f"{results.stem}.png").write_bytes(
        distance_vs_nfe_png(plot_rows, floor=floor["frechet_distance"])
    )
    mosaic(rows, results.parent / f"{results.stem}-samples.png")
    curves(runs, results.parent / f"{results.stem}-curves.png")
    facts = json.loads((runs["teacher"].parent / "runs.json").read_text())
    lines = [
        "# Diffusion distillation and training-free few-step sampling",
        "",
        f"`python bench/diffusion.py {' '.join(sys.argv[1:])}`; {meta['images_per_row']} images per row, "
        f"seed {args.seed}, {args.threads} thread(s); metric classifier test accuracy "
        f"{meta['classifier_test_accuracy']:.4f}. FD/KID: in that classifier's penultimate features "
        "against the test set; the floor row is real training images scored the same way.",
        "",
        "| row | NFE/image | FD | FD / DDIM-64 | KID | class fidelity | class entropy | ms/image | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ref = next((r["frechet_distance"] for r in rows if r["name"].endswith("(reference)")), None)
    for r in rows:
        ratio = f"{r['frechet_distance'] / ref:.2f}" if ref else "-"
        lines.append(
            f"| {r['name']} | {r['nfe_per_image']:g} | {r['frechet_distance']:.3f} | {ratio} | "
            f"{r['kernel_distance']:.4f} | {r['class_fidelity']:.3f} | {r['marginal_entropy']:.3f} | "
            f"{r['seconds_per_image'] * 1e3:.1f} | {r['load_before']:.1f} |"
        )
    lines.append(
        f"| {floor['name']} | - | {floor['frechet_distance']:.3f} | - | {floor['kernel_distance']:.4f} | "
        f"{floor['class_fidelity']:.3f} | {floor['marginal_entropy']:.3f} | - | {floor['load']:.1f} |"
    )
    lines += ["", "## Goals (issue 20)", "", "| goal | measured | met |", "|---|---|---|"]
    for goal, measured, met in goals(rows, args.guided_scale):
        lines.append(f"| {goal} | {measured} | {'yes' if met else 'no'} |")
    lines += [
        "",
        f"![distance vs NFE]({results.stem}.png)",
        "",
        f"![samples: two per class, one line per row]({results.stem}-samples.png)",
        "",
        f"![training curves]({results.stem}-curves.png)",
        "",
        "## Runs",
        "",
        "| run | command | wall s | load before / after |",
        "|---|---|---:|---|",
    ]
    for fact in facts:
        if fact.get("reused"):
            lines.append(f"| {fact['run']} | (reused) | | |")
        else:
            lines.append(
                f"| {fact['run']} | `{fact['command']}` | {fact['wall_s']:.0f} | "
                f"{fact['load_before']:.1f} / {fact['load_after']:.1f} |"
            )
    lines += ["", f"Scoring took {meta['scoring_cpu_s']:.0f} s of process CPU time.", ""]
    (results.parent / f"{results.stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def mosaic(rows: list[dict[str, Any]], path: Path, num_classes: int = 10) -> None:
    """One line per row: its grid (two samples per class, a class per grid row) laid out as a
    single strip, titled with the row's name and distance."""
    import numpy as np
    from matplotlib.image import imread

    from distil.evaluation.plots import new_figure, to_png

    fig = new_figure(9.0, 0.62 * len(rows) + 0.4)
    for i, row in enumerate(rows):
        grid = imread(ROOT / row["grid"])  # (rows·(h+1)+1, 2·(w+1)+1), float in [0, 1]
        band = (grid.shape[0] - 1) // num_classes
        strip = np.concatenate(
            [grid[c * band : (c + 1) * band + 1] for c in range(num_classes)], axis=1
        )
        ax = fig.add_subplot(len(rows), 1, i + 1)
        ax.imshow(strip, cmap="gray", vmin=0.0, vmax=1.0, aspect="equal")
        ax.set_axis_off()
        ax.set_title(
            f"{row['name']} (FD {row['frechet_distance']:.2f})", fontsize=6, loc="left", pad=1
        )
    path.write_bytes(to_png(fig))


def curves(runs: dict[str, Path], path: Path) -> None:
    """Loss per step of every training phase, and the consistency run's tracked distance."""
    from distil.evaluation.plots import new_figure, to_png

    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for name, run in runs.items():
        metrics = run / "metrics.jsonl"
        if not metrics.is_file():
            continue
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            for key, value in row.items():
                if (key.endswith("/weighted") or key.startswith("track/fd")) and isinstance(
                    value, float
                ):
                    label = f"{name}:{row['phase']}" + (
                        " (FD, LCM-2)" if key.startswith("track") else ""
                    )
                    series.setdefault(name, {}).setdefault(label, []).append(
                        (int(row["step"]), value)
                    )
    fig = new_figure(10.0, 2.4 * len(series))
    for i, (name, lines) in enumerate(series.items()):
        ax = fig.add_subplot(len(series), 1, i + 1)
        for label, points in lines.items():
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, linewidth=0.8, label=label)
        ax.set_yscale("log")
        ax.set_title(name, fontsize=8, loc="left")
        ax.legend(fontsize=6, ncol=4)
        ax.tick_params(labelsize=6)
    path.write_bytes(to_png(fig))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=BENCH / "artifacts" / "diffusion")
    parser.add_argument("--results", type=Path, default=BENCH / "results" / "diffusion.jsonl")
    parser.add_argument(
        "--quick", action="store_true", help="digits at 8x8, tiny models: a smoke run"
    )
    parser.add_argument("--images", type=int, default=None, help="images per row (2000; quick 60)")
    parser.add_argument("--guided-scale", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--teacher-steps", type=int, default=None, help="teacher training steps (recipe: 4000)"
    )
    parser.add_argument(
        "--distill-steps",
        type=int,
        default=None,
        help="steps per distillation run and per progressive stage (recipe: 500)",
    )
    args = parser.parse_args()
    args.images = args.images or (60 if args.quick else 2000)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    args.work.mkdir(parents=True, exist_ok=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    runs = train_all(args, args.work)
    rows = score_all(args, runs, args.results)
    write_outputs(args, rows, runs, args.results)


if __name__ == "__main__":
    main()
