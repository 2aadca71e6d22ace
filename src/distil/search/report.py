"""The study report: ``STUDY/report.{json,md,html}`` with the Pareto front of quality against
cost, parameter importances, the search history with its pruned trials, the trial table, the
noise-aware selection, the final test, and the capacity-gap check of ``distil advise``; plus
``distil compare`` over the best trials' and the selection's run folders.

Everything is drawn from the study's storage and files, so ``distil search --stage report``
rewrites it at any time, also while workers still run.
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from distil.errors import DistilError
from distil.evaluation.report import fmt, make_table, md_table
from distil.search.config import Direction
from distil.search.select import BEST_FILE, FINAL_FILE, SELECT_FILE
from distil.search.space import decode_params, describe
from distil.search.stats import pareto_front
from distil.search.study import StudyContext, origin_of, require_optuna, spent

logger = logging.getLogger(__name__)

COMPARE_TOP = 12  # trials put side by side by `distil compare` (more would not fit a table)


def _short_key(key: str) -> str:
    """``student.model.kwargs.hidden`` → ``hidden``; ``kd.kd_temperature`` → ``kd_temperature``."""
    return key.rsplit(".", 1)[-1]


def _shown(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, list | dict) else value


def trial_rows(ctx: StudyContext, trials: Sequence[Any]) -> list[dict[str, Any]]:
    """One row per trial: number, the trial it continues, state, values, costs, parameters."""
    rows = []
    for t in trials:
        metrics = t.user_attrs.get("metrics") or {}
        inter = t.intermediate_values
        last_step = max(inter) if inter else None
        duration = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        row: dict[str, Any] = {
            "trial": t.number,
            "origin": origin_of(t),
            "state": t.state.name.lower() + (" (resumed)" if t.user_attrs.get("resumed") else ""),
            "seconds": duration,
            "last_step": last_step,
            "last_intermediate": None if last_step is None else inter[last_step],
        }
        for i, objective in enumerate(ctx.search.objectives):
            row[objective.metric] = (
                t.values[i] if t.values is not None else metrics.get(objective.metric)
            )
        for cost in ctx.search.costs:
            row[cost.metric] = metrics.get(cost.metric)
        for key, value in decode_params(t.params, ctx.search.space).items():
            row[key] = _shown(value)
        rows.append(row)
    return rows


def front_points(
    ctx: StudyContext, rows: Sequence[Mapping[str, Any]]
) -> tuple[list[dict[str, Any]], list[int], list[Direction], list[str]]:
    """Completed trials with the first objective and the first cost, and the Pareto front over
    them (indices into the returned rows)."""
    axes = [ctx.search.objectives[0], (ctx.search.costs or ctx.search.objectives[1:])[0]]
    names = [a.metric for a in axes]
    done = [
        dict(r)
        for r in rows
        if r["state"].startswith("complete")
        and all(isinstance(r.get(n), int | float) and math.isfinite(r[n]) for n in names)
    ]
    directions = [a.direction for a in axes]
    front = pareto_front([[float(r[n]) for n in names] for r in done], directions)
    return done, front, directions, names


def importances(ctx: StudyContext, trials: Sequence[Any]) -> dict[str, float] | str:
    """fANOVA importance of each searched key for the first objective over completed search
    trials, or the reason it cannot be computed."""
    optuna = require_optuna()
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(done) < 3:
        return f"importances need at least 3 completed trials (have {len(done)})"
    copy = optuna.create_study(directions=[d.value for d in ctx.search.directions])
    copy.add_trials(done)
    try:
        values = optuna.importance.get_param_importances(
            copy,
            evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
            target=lambda t: t.values[0],
        )
    except (RuntimeError, ValueError) as exc:
        return f"importances could not be computed: {exc}"
    return {k: float(v) for k, v in values.items()}


def capacity_gap_check(
    ctx: StudyContext,
    trials: Sequence[Any],
    rows: Sequence[Mapping[str, Any]],
    select: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """``distil advise``'s capacity-gap rule (best student ≈ teacher params / ratio) against the
    student sizes the search found best: the best search trial's, the selection winner's (when
    selection ran), and the best first-objective value reached at each size tried."""
    from distil.planning.advise import CAPACITY_GAP_RATIO
    from distil.search.objectives import read_report

    objective = ctx.search.objectives[0]
    best = _best_row(rows, objective.metric, objective.direction)
    if best is None:
        return None
    run_dir = ctx.trial_dir(int(best["origin"]))
    try:
        report = read_report(run_dir)
    except DistilError:  # a missing report only drops this section
        return None
    table = (report.get("cost") or {}).get("table") or {}
    roles = report.get("roles") or {}
    by_model = {r.get("model"): r for r in table.get("rows", [])}
    teacher = (by_model.get(roles.get("teacher")) or {}).get("params")
    student = (by_model.get(roles.get("student")) or {}).get("params")
    if not isinstance(teacher, int) or not isinstance(student, int):
        return None
    predicted = teacher / CAPACITY_GAP_RATIO
    done = [
        r
        for r in rows
        if r["state"].startswith("complete")
        and isinstance(r.get("student params"), int | float)
        and isinstance(r.get(objective.metric), int | float)
        and math.isfinite(r[objective.metric])
    ]
    pick = max if objective.direction is Direction.maximize else min
    by_size: dict[int, dict[str, Any]] = {}
    for size in sorted({int(r["student params"]) for r in done}):
        at = [r for r in done if int(r["student params"]) == size]
        by_size[size] = {"trials": len(at), "best": pick(r[objective.metric] for r in at)}
    out: dict[str, Any] = {
        "teacher_params": teacher,
        "ratio": CAPACITY_GAP_RATIO,
        "predicted_best_student_params": predicted,
        "search_best_student_params": student,
        "search_best_trial": best["trial"],
        "factor": student / predicted,
        "student_sizes_tried": sorted(by_size),
        "best_by_size": {str(k): v for k, v in by_size.items()},
        "text": (
            f"advise predicts the best student near teacher/{CAPACITY_GAP_RATIO:g} = {predicted:,.0f} params; "
            f"the search's best trial ({best['trial']}) has {student:,} params, {student / predicted:.2g}x that"
        ),
    }
    winner = (select or {}).get("winner")
    if winner is not None:
        row = next((r for r in rows if r["trial"] == winner.get("number")), None)
        winner_size = None if row is None else row.get("student params")
        if isinstance(winner_size, int | float):
            out["winner_student_params"] = int(winner_size)
            out["winner_factor"] = winner_size / predicted
            out["text"] += (
                f"; the selection winner (trial {winner['origin']}) has {int(winner_size):,} params, "
                f"{winner_size / predicted:.2g}x"
            )
    return out


def _best_row(
    rows: Sequence[Mapping[str, Any]], metric: str, direction: Direction
) -> Mapping[str, Any] | None:
    done = [
        r
        for r in rows
        if r["state"].startswith("complete")
        and isinstance(r.get(metric), int | float)
        and math.isfinite(r[metric])
    ]
    if not done:
        return None
    pick = max if direction is Direction.maximize else min
    return pick(done, key=lambda r: r[metric])


# ---------------------------------------------------------------------------------------------
# Plots


def pareto_plot(
    done: Sequence[Mapping[str, Any]],
    front: Sequence[int],
    names: Sequence[str],
    label_key: str | None,
) -> bytes:
    """Every completed trial as a dot (quality vs cost), the front joined and labelled."""
    from distil.evaluation.plots import ROLE_COLORS, new_figure, to_png

    fig = new_figure(7.0, 4.4)
    ax = fig.subplots()
    xs = [float(r[names[1]]) for r in done]
    ys = [float(r[names[0]]) for r in done]
    ax.scatter(xs, ys, s=14, color="#b0b8bf", label="completed trial", zorder=2)
    fx = [xs[i] for i in front]
    fy = [ys[i] for i in front]
    order = sorted(range(len(front)), key=lambda j: fx[j])
    ax.plot(
        [fx[j] for j in order],
        [fy[j] for j in order],
        "-o",
        color=ROLE_COLORS["student"],
        markersize=5,
        label="Pareto front",
        zorder=3,
    )
    for i in front:
        text = f"t{done[i]['trial']}" + (
            f" {done[i].get(label_key)}" if label_key and done[i].get(label_key) is not None else ""
        )
        ax.annotate(text, (xs[i], ys[i]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    if xs and min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(names[1], fontsize=9)
    ax.set_ylabel(names[0], fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(True, alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    return to_png(fig)


def history_plot(rows: Sequence[Mapping[str, Any]], metric: str, direction: Direction) -> bytes:
    """The first objective per trial (pruned trials at their last intermediate value) and the
    best so far."""
    from distil.evaluation.plots import ROLE_COLORS, new_figure, to_png

    fig = new_figure(7.0, 3.4)
    ax = fig.subplots()
    best: list[tuple[int, float]] = []
    current: float | None = None
    for r in sorted(rows, key=lambda r: r["trial"]):
        value = r.get(metric)
        if r["state"].startswith("complete") and isinstance(value, int | float):
            ax.scatter([r["trial"]], [value], s=16, color=ROLE_COLORS["student"], zorder=3)
            better = current is None or (
                value > current if direction is Direction.maximize else value < current
            )
            current = float(value) if better else current
        elif r["state"].startswith("pruned") and isinstance(r.get("last_intermediate"), float):
            ax.scatter(
                [r["trial"]], [r["last_intermediate"]], s=16, marker="x", color="#d62728", zorder=3
            )
        if current is not None:
            best.append((r["trial"], current))
    if best:
        ax.step(
            [b[0] for b in best],
            [b[1] for b in best],
            where="post",
            color="#2ca02c",
            label="best so far",
        )
    ax.scatter([], [], s=16, color=ROLE_COLORS["student"], label="completed")
    ax.scatter([], [], s=16, marker="x", color="#d62728", label="pruned (last intermediate value)")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial", fontsize=9)
    ax.set_ylabel(metric, fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    ax.grid(True, alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    return to_png(fig)


def intermediate_plot(trials: Sequence[Any], series: str) -> bytes | None:
    """Every trial's intermediate curve: completed ones in blue, pruned ones in red."""
    from distil.evaluation.plots import ROLE_COLORS, new_figure, to_png

    curves = [
        (t.state.name, sorted(t.intermediate_values.items()))
        for t in trials
        if t.intermediate_values
    ]
    if not curves:
        return None
    fig = new_figure(7.0, 3.4)
    ax = fig.subplots()
    for state, points in curves:
        color = ROLE_COLORS["student"] if state == "COMPLETE" else "#d62728"
        ax.plot(
            [p[0] for p in points], [p[1] for p in points], color=color, alpha=0.45, linewidth=1
        )
    ax.plot([], [], color=ROLE_COLORS["student"], label="completed")
    ax.plot([], [], color="#d62728", label="pruned / other")
    ax.set_xlabel("step", fontsize=9)
    ax.set_ylabel(series, fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    ax.grid(True, alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    return to_png(fig)


def importance_plot(values: Mapping[str, float]) -> bytes:
    from distil.evaluation.plots import ROLE_COLORS, new_figure, to_png

    names = list(values)
    fig = new_figure(6.5, 0.4 * len(names) + 0.9)
    ax = fig.subplots()
    ax.barh(names, [values[n] for n in names], color=ROLE_COLORS["student"])
    ax.invert_yaxis()
    ax.set_xlabel("fANOVA importance (share of the objective's variance)", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(True, axis="x", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    return to_png(fig)


# ---------------------------------------------------------------------------------------------
# The report


def build_report(ctx: StudyContext, study: Any) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The study report as a dict (``report.json``) and its plots as PNG bytes."""
    trials = study.get_trials(deepcopy=False)
    rows = trial_rows(ctx, trials)
    states = [t.state.name for t in trials]
    use = spent(study)
    objective = ctx.search.objectives[0]
    done, front, directions, names = front_points(ctx, rows)
    shape_key = next((k for k in ctx.search.space if k.startswith("student.")), None)
    select = _read_json(ctx.root / SELECT_FILE)
    final = _read_json(ctx.root / FINAL_FILE)
    imp = importances(ctx, trials)
    report: dict[str, Any] = {
        "title": f"distil search: {ctx.recipe} ({ctx.search.study_name})",
        "study": str(ctx.root),
        "storage": ctx.storage_url,
        "states": {s.lower(): states.count(s) for s in sorted(set(states))},
        "retried": sorted({r["origin"] for r in rows if r["origin"] != r["trial"]}),
        "spent": {
            "trials": use.trials,
            "wall_time_s": use.wall_time_s,
            "examples": use.examples,
            "tokens": use.tokens,
        },
        "budget": ctx.search.budget.model_dump(mode="json"),
        "space": {k: describe(v) for k, v in ctx.search.space.items()},
        "objectives": [o.model_dump(mode="json") for o in ctx.search.objectives],
        "costs": [c.model_dump(mode="json") for c in ctx.search.costs],
        "pareto": {
            "axes": names,
            "directions": [d.value for d in directions],
            "front": [done[i] for i in front],
            "distinct_student_sizes": len(
                {done[i].get("student params") for i in front if done[i].get("student params")}
            ),
        },
        "importances": imp,
        "trials": rows,
        "select": select,
        "final": final,
        "capacity_gap": capacity_gap_check(ctx, trials, rows, select),
    }
    images: dict[str, bytes] = {}
    if done:
        images["pareto"] = pareto_plot(done, front, names, shape_key)
    if rows:
        images["history"] = history_plot(rows, objective.metric, objective.direction)
    if ctx.search.intermediate is not None:
        curves = intermediate_plot(trials, ctx.search.intermediate.series)
        if curves is not None:
            images["intermediate"] = curves
    if isinstance(imp, dict) and imp:
        images["importances"] = importance_plot(imp)
    return report, images


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _trial_table(ctx: StudyContext, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    cols = [("trial", "trial"), ("origin", "run folder"), ("state", "state")]
    cols += [(o.metric, o.metric) for o in ctx.search.objectives]
    cols += [(c.metric, c.metric) for c in ctx.search.costs]
    cols += [(k, _short_key(k)) for k in ctx.search.space]
    cols += [("last_step", "last step"), ("seconds", "s")]
    return make_table(cols, [dict(r) for r in rows])


def _selection_table(select: Mapping[str, Any]) -> dict[str, Any]:
    rows = []
    for c in select.get("candidates", []):
        interval = c.get("interval") or {}
        rows.append(
            {
                "trial": c["origin"],
                "flash": c["score"],
                "mean": interval.get("mean"),
                "sd": interval.get("sd"),
                "ci": None
                if interval.get("low") is None
                else f"{interval['low']:.4g} .. {interval['high']:.4g}",
                "scores": ", ".join(f"{s:.4g}" for s in c.get("scores", [])),
                "values": ", ".join(f"{_short_key(k)}={_shown(v)}" for k, v in c["values"].items()),
            }
        )
    return make_table(
        [
            ("trial", "trial"),
            ("flash", "flash score"),
            ("mean", "mean over seeds"),
            ("sd", "sd"),
            ("ci", "CI"),
            ("scores", "per seed"),
            ("values", "configuration"),
        ],
        rows,
    )


def _final_table(final: Mapping[str, Any]) -> dict[str, Any]:
    rows = []
    for name in ("best", "reference", "difference"):
        part = final.get(name)
        if not part:
            continue
        rows.append(
            {
                "run": {
                    "best": "winner (best.yaml)",
                    "reference": "reference",
                    "difference": "winner − reference (paired)",
                }[name],
                "mean": part["mean"],
                "sd": part["sd"],
                "ci": None
                if part.get("low") is None
                else f"{part['low']:.4g} .. {part['high']:.4g}",
                "scores": ", ".join(f"{s:.4g}" for s in part.get("scores", [])),
            }
        )
    return make_table(
        [("run", "run"), ("mean", "mean"), ("sd", "sd"), ("ci", "CI"), ("scores", "per seed")], rows
    )


def headline(report: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The summary cards: what ran, what won, what the test said."""
    items: list[tuple[str, Any]] = [(state, count) for state, count in report["states"].items()]
    items.append(("trials re-run after a dead worker", len(report["retried"])))
    items.append(("busy wall time (s)", report["spent"]["wall_time_s"]))
    select = report.get("select") or {}
    winner = select.get("winner")
    if winner and winner.get("interval"):
        items.append((f"winner t{winner['origin']} mean over seeds", winner["interval"]["mean"]))
    final = report.get("final") or {}
    if final.get("difference"):
        items.append(("test: winner − reference", final["difference"]["mean"]))
    items.append(("Pareto-front student sizes", report["pareto"]["distinct_student_sizes"]))
    return items


def render_markdown(report: Mapping[str, Any], ctx: StudyContext, plots: Mapping[str, str]) -> str:
    lines = [f"# {report['title']}", ""]
    lines += [f"- **{k}**: {fmt(v)}" for k, v in headline(report)] + [""]
    select = report.get("select") or {}
    lines += ["## Winner (noise-aware selection)", ""]
    if select.get("winner"):
        lines += md_table(_selection_table(select))
        lines += [select.get("note", ""), "", f"Runnable config: `{select.get('best_yaml')}`", ""]
    else:
        lines += [select.get("reason", "selection not run yet"), ""]
    if report.get("final"):
        lines += ["## Final test (used once)", "", *md_table(_final_table(report["final"]))]
    lines += ["## Pareto front", ""]
    if "pareto" in plots:
        lines += [f"![pareto]({plots['pareto']})", ""]
    front = report["pareto"]["front"]
    if front:
        lines += md_table(_trial_table(ctx, front))
    lines += ["## Parameter importances", ""]
    imp = report["importances"]
    if isinstance(imp, dict):
        if "importances" in plots:
            lines += [f"![importances]({plots['importances']})", ""]
        lines += [f"- `{k}`: {v:.3f}" for k, v in imp.items()] + [""]
    else:
        lines += [str(imp), ""]
    gap = report.get("capacity_gap")
    if gap:
        lines += ["## Capacity gap (distil advise)", "", gap["text"], ""]
        lines += md_table(_size_table(report, gap))
    lines += ["## Search history", ""]
    lines += [f"![{n}]({plots[n]})" for n in ("history", "intermediate") if n in plots] + [""]
    lines += ["## Trials", "", *md_table(_trial_table(ctx, report["trials"]))]
    lines += ["## Space", ""] + [f"- `{k}`: {v}" for k, v in report["space"].items()] + [""]
    return "\n".join(lines)


def _size_table(report: Mapping[str, Any], gap: Mapping[str, Any]) -> dict[str, Any]:
    """The best first-objective value the search reached at each student size."""
    metric = report["objectives"][0]["metric"]
    rows = [
        {"student params": int(size), "trials": v["trials"], f"best {metric}": v["best"]}
        for size, v in (gap.get("best_by_size") or {}).items()
    ]
    return make_table(
        [
            ("student params", "student params"),
            ("trials", "trials"),
            (f"best {metric}", f"best {metric}"),
        ],
        rows,
    )


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def render_html(report: Mapping[str, Any], ctx: StudyContext, images: Mapping[str, bytes]) -> str:
    """``report.html`` in the house style (the run report's CSS, tables and embedded PNGs)."""
    from distil.evaluation.html import CSS, img, table_html

    cards = "".join(
        f'<div class="card"><div class="v">{_e(fmt(v))}</div><div class="k">{_e(k)}</div></div>'
        for k, v in headline(report)
    )
    parts: list[tuple[str, str, str]] = [
        ("summary", "Summary", f'<div class="cards">{cards}</div>')
    ]
    select = report.get("select") or {}
    if select.get("winner"):
        winner_id = select["winner"]["origin"]
        body = table_html(_selection_table(select), highlight=winner_id)
        body += f'<p class="note">{_e(select.get("note", ""))}</p>'
        best = ctx.root / BEST_FILE
        if best.is_file():
            body += f"<h3>best.yaml</h3><pre>{_e(best.read_text())}</pre>"
    else:
        body = f"<p><b>{_e(select.get('reason', 'selection not run yet'))}</b></p>"
    parts.append(("winner", "Winner", body))
    if report.get("final"):
        final = report["final"]
        note = (
            f"The test set, used once: {final['metric']['metric']} of the winner's best.yaml"
            + (
                f" and the reference {final['reference_config']}"
                if final.get("reference_config")
                else ""
            )
            + f" over seeds {final['seeds']} (overrides {final['overrides']})."
        )
        parts.append(
            (
                "final",
                "Final test",
                f'<p class="note">{_e(note)}</p>' + table_html(_final_table(final)),
            )
        )
    pareto = report["pareto"]
    body = (
        f'<p class="note">Completed trials, {_e(pareto["axes"][0])} against {_e(pareto["axes"][1])}; '
        f"{len(pareto['front'])} on the front, {pareto['distinct_student_sizes']} distinct student sizes.</p>"
    )
    if "pareto" in images:
        body += img(images["pareto"], "Pareto front")
    if pareto["front"]:
        body += table_html(_trial_table(ctx, pareto["front"]))
    parts.append(("pareto", "Pareto front", body))
    imp = report["importances"]
    if isinstance(imp, dict):
        body = img(images["importances"], "importances") if "importances" in images else ""
        body += table_html(
            make_table(
                [("key", "key"), ("importance", "importance")],
                [{"key": k, "importance": v} for k, v in imp.items()],
            )
        )
    else:
        body = f'<p class="note">{_e(imp)}</p>'
    parts.append(("importances", "Importances", body))
    gap = report.get("capacity_gap")
    if gap:
        parts.append(
            (
                "capacity",
                "Capacity gap",
                f"<p>{_e(gap['text'])}.</p>" + table_html(_size_table(report, gap)),
            )
        )
    body = "".join(img(images[n], n) for n in ("history", "intermediate") if n in images)
    parts.append(("history", "History", body or '<p class="note">no trials yet</p>'))
    parts.append(
        (
            "trials",
            "Trials",
            f'<div style="overflow-x:auto">{table_html(_trial_table(ctx, report["trials"]))}</div>',
        )
    )
    settings = {
        "space": report["space"],
        "objectives": report["objectives"],
        "costs": report["costs"],
        "budget": report["budget"],
        "spent": report["spent"],
        "storage": report["storage"],
        "trial_overrides": ctx.search.trial_overrides,
        "flash_overrides": ctx.search.flash_overrides,
        "sampler": ctx.search.sampler.model_dump(mode="json"),
        "pruner": ctx.search.pruner.model_dump(mode="json"),
        "select": ctx.search.select.model_dump(mode="json"),
    }
    parts.append(("config", "Search settings", f"<pre>{_e(json.dumps(settings, indent=1))}</pre>"))
    nav = "".join(f'<a href="#{a}">{_e(label)}</a>' for a, label, _ in parts)
    sections = "".join(
        f'<section id="{a}"><h2>{_e(label)}</h2>{body}</section>' for a, label, body in parts
    )
    title = _e(report["title"])
    meta = _e(f"study {ctx.root} · storage {report['storage']}")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{title}</title><style>{CSS}</style></head><body>"
        f'<header><h1>{title}</h1><div class="meta">{meta}</div><nav>{nav}</nav></header>'
        f"<main>{sections}</main></body></html>\n"
    )


def write_report(ctx: StudyContext, study: Any) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` (PNGs in ``plots/``) and ``report.html`` into the
    study folder, and ``compare.*`` over the best trials and the selection runs."""
    report, images = build_report(ctx, study)
    (ctx.root / "report.json").write_text(json.dumps(report, indent=1, default=str))
    plot_dir = ctx.root / "plots"
    plot_dir.mkdir(exist_ok=True)
    links = {}
    for name, png in images.items():
        (plot_dir / f"{name}.png").write_bytes(png)
        links[name] = f"plots/{name}.png"
    (ctx.root / "report.md").write_text(render_markdown(report, ctx, links))
    (ctx.root / "report.html").write_text(render_html(report, ctx, images), encoding="utf-8")
    compare_study_runs(ctx, report)
    return report


def compare_study_runs(ctx: StudyContext, report: Mapping[str, Any]) -> list[Path]:
    """``distil compare`` over the ``COMPARE_TOP`` best completed trials and every selection run,
    written to ``STUDY/compare.{json,md,html}``."""
    from distil.evaluation.compare import compare_runs, write_comparison
    from distil.search.runs import is_finished

    objective = ctx.search.objectives[0]
    done = [
        r
        for r in report["trials"]
        if r["state"].startswith("complete") and isinstance(r.get(objective.metric), int | float)
    ]
    sign = -1.0 if objective.direction is Direction.maximize else 1.0
    done.sort(key=lambda r: sign * r[objective.metric])
    dirs = [ctx.trial_dir(int(r["origin"])) for r in done[:COMPARE_TOP]]
    dirs = list(dict.fromkeys(d for d in dirs if is_finished(d)))
    dirs += sorted(
        p for p in (ctx.root / "select").glob("t*-seed*") if p.is_dir() and is_finished(p)
    )
    if len(dirs) < 2:
        return []
    try:
        return write_comparison(compare_runs(dirs), dirs, ctx.root)
    except DistilError as exc:
        logger.warning("compare over the study's runs skipped: %s", exc)
        return []
