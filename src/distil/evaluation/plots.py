"""Report plots as PNG bytes: reliability diagrams, confusion matrices, per-class bars, training
time, training curves, speculative-decoding acceptance by position and block efficiency by γ.

Figures are built with ``matplotlib.figure.Figure`` and rendered by the Agg canvas directly, so
nothing here touches pyplot's global state or needs a display; matplotlib is imported only
when a report is drawn.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from distil.evaluation.report import phase_order, series_by_phase

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 110
MAX_CLASSES_PLOTTED = 30  # beyond this a per-class bar chart or confusion matrix is unreadable
SMOOTH_ABOVE = 60  # series with more points get a moving average over the faint raw line

# One colour per role or phase, the same in every plot of a report.
ROLE_COLORS = {"teacher": "#4d4d4d", "student": "#1f77b4", "baseline": "#ff7f0e"}
EXTRA_COLORS = ("#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")


def color_for(name: str, index: int = 0) -> str:
    """The colour of a role, phase or model name (``"student (KD)"`` takes the student's)."""
    head = name.split(" ")[0].split("/")[0].lower()
    return ROLE_COLORS.get(head, EXTRA_COLORS[index % len(EXTRA_COLORS)])


def new_figure(width: float, height: float) -> Figure:
    """A figure drawn by the Agg canvas (no pyplot, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def to_png(fig: Figure) -> bytes:
    """Render a figure to PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _style(ax: Axes) -> None:
    ax.grid(True, alpha=0.3, linewidth=0.6)
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(labelsize=8)


def reliability_plot(
    reliability: Mapping[str, Mapping[str, Any]], ece: Mapping[str, float] | None = None
) -> bytes:
    """One reliability diagram per model: accuracy per confidence bin against the diagonal, the
    bin's mean confidence as a tick, and the number of examples per bin below.

    Args:
        reliability: ``{model: {"bin_edges", "confidence", "accuracy", "count"}}``.
        ece: ``{model: ECE}`` for the panel titles.
    """
    models = list(reliability)
    fig = new_figure(3.3 * len(models), 4.2)
    axes = fig.subplots(
        2, len(models), squeeze=False, gridspec_kw={"height_ratios": [3, 1]}, sharex=True
    )
    for i, model in enumerate(models):
        ax, hist = axes[0][i], axes[1][i]
        bins = reliability[model]
        edges = bins["bin_edges"]
        width = edges[1] - edges[0]
        color = color_for(model, i)
        filled = [j for j, k in enumerate(bins["count"]) if k > 0]
        lefts = [edges[j] for j in filled]
        acc = [bins["accuracy"][j] for j in filled]
        conf = [bins["confidence"][j] for j in filled]
        ax.bar(
            lefts,
            acc,
            width=width,
            align="edge",
            color=color,
            alpha=0.8,
            edgecolor="white",
            label="accuracy",
        )
        # The bin's mean confidence as a black tick: its distance to the bar top is the bin's
        # miscalibration (tick above the bar = over-confident).
        ax.hlines(
            conf,
            [x + 0.1 * width for x in lefts],
            [x + 0.9 * width for x in lefts],
            color="black",
            linewidth=1.6,
            label="mean confidence",
        )
        ax.plot([0, 1], [0, 1], "--", color="#888", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        title = model if ece is None or model not in ece else f"{model} — ECE {ece[model]:.3f}"
        ax.set_title(title, fontsize=9)
        _style(ax)
        hist.bar(
            edges[:-1],
            bins["count"],
            width=width,
            align="edge",
            color=color,
            alpha=0.6,
            edgecolor="white",
        )
        hist.set_xlabel("confidence (top-1 probability)", fontsize=8)
        _style(hist)
        if i == 0:
            ax.set_ylabel("accuracy", fontsize=9)
            ax.legend(fontsize=7, loc="upper left", frameon=False)
            hist.set_ylabel("examples", fontsize=8)
    return to_png(fig)


def confusion_plot(labels: Sequence[str], matrices: Mapping[str, Sequence[Sequence[int]]]) -> bytes:
    """Row-normalised confusion matrices side by side (true class on rows)."""
    import numpy as np

    models = list(matrices)
    n = len(labels)
    annotate = n <= 12
    side = 3.0 if n <= 12 else 4.2
    fig = new_figure(side * len(models) + 0.6, side + 0.5)
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    image = None
    for ax, model in zip(axes, models, strict=True):
        counts = np.asarray(matrices[model], dtype=float)  # (C, C)
        rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        ax.set_title(model, fontsize=9)
        ticks = range(n)
        ax.set_xticks(
            list(ticks), [str(x) for x in labels], fontsize=7, rotation=90 if n > 12 else 0
        )
        ax.set_yticks(list(ticks), [str(x) for x in labels], fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        if annotate:
            for r in range(n):
                for c in range(n):
                    if counts[r, c]:
                        ax.text(
                            c,
                            r,
                            f"{int(counts[r, c])}",
                            ha="center",
                            va="center",
                            fontsize=6,
                            color="white" if rates[r, c] > 0.5 else "#333",
                        )
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8, label="fraction of the true class")
    return to_png(fig)


def per_class_ylim(values: Mapping[str, Sequence[float | None]]) -> tuple[float, float] | None:
    """The y range of a per-class plot: from 0 (bars that start elsewhere exaggerate small
    differences), to 1 for shares and accuracies, else Matplotlib's choice (None)."""
    finite = [v for vs in values.values() for v in vs if v is not None and math.isfinite(v)]
    if finite and min(finite) >= 0 and max(finite) <= 1:
        return 0.0, 1.0
    return None


def per_class_plot(
    labels: Sequence[str], values: Mapping[str, Sequence[float | None]], metric: str
) -> bytes:
    """Grouped bars of a per-class metric, one colour per model."""
    models = list(values)
    n = len(labels)
    fig = new_figure(max(6.0, 0.45 * n * max(len(models), 1) / 1.5), 3.0)
    ax = fig.subplots()
    width = 0.8 / max(len(models), 1)
    for i, model in enumerate(models):
        xs = [c + (i - (len(models) - 1) / 2) * width for c in range(n)]
        ys = [v if v is not None else math.nan for v in values[model]]
        ax.bar(xs, ys, width=width, label=model, color=color_for(model, i))
    ax.set_xticks(range(n), [str(x) for x in labels], fontsize=8, rotation=90 if n > 15 else 0)
    ax.set_ylabel(metric, fontsize=9)
    limits = per_class_ylim(values)
    if limits is not None:
        ax.set_ylim(*limits)
    ax.legend(
        fontsize=8, frameon=False, ncols=len(models), loc="lower center", bbox_to_anchor=(0.5, 1.0)
    )
    _style(ax)
    return to_png(fig)


def training_time_plot(phases: Mapping[str, float]) -> bytes:
    """Horizontal bars: wall time of each training phase."""
    names = list(phases)
    fig = new_figure(6.0, 0.45 * len(names) + 0.9)
    ax = fig.subplots()
    bars = ax.barh(
        names, [phases[p] for p in names], color=[color_for(p, i) for i, p in enumerate(names)]
    )
    ax.bar_label(bars, labels=[f"{phases[p]:.1f} s" for p in names], fontsize=8, padding=3)
    ax.invert_yaxis()
    ax.set_xlabel("wall time (s)", fontsize=9)
    ax.margins(x=0.15)
    _style(ax)
    return to_png(fig)


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    out: list[float] = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def line(
    ax: Axes, points: Sequence[tuple[int, float]], color: str, label: str, style: str = "-"
) -> None:
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    if len(points) == 1 or (len(points) <= 30 and style == "o"):
        ax.plot(
            xs,
            ys,
            marker="o",
            markersize=3.5,
            linestyle="-",
            color=color,
            label=label,
            linewidth=1.2,
        )
    elif len(points) > SMOOTH_ABOVE:
        ax.plot(xs, ys, style, color=color, alpha=0.2, linewidth=0.7)
        ax.plot(
            xs,
            _moving_average(ys, max(5, len(ys) // 40)),
            style,
            color=color,
            label=label,
            linewidth=1.4,
        )
    else:
        ax.plot(xs, ys, style, color=color, label=label, linewidth=1.2)


def _log_if_wide(ax: Axes, values: Sequence[float]) -> None:
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > 30:
        ax.set_yscale("log")


def _is_loss(key: str) -> bool:
    return key.endswith(("/raw", "/weighted")) or "loss" in key


def curve_plots(metrics_rows: Sequence[Mapping[str, Any]]) -> dict[str, bytes]:
    """Training curves from ``metrics.jsonl`` rows.

    Returns:
        ``curves-loss`` (each loss component, raw solid and weighted dashed, one panel per
        phase), ``curves-optim`` (learning rate and gradient norm), ``curves-eval`` (every other
        series, e.g. test accuracy, one panel each); a figure is left out when it has no data.
    """
    data = series_by_phase(metrics_rows)
    phases = [p for p in phase_order(metrics_rows) if p in data]
    out: dict[str, bytes] = {}
    loss_phases = [p for p in phases if any(_is_loss(k) for k in data[p])]
    if loss_phases:
        fig = new_figure(max(4.0 * len(loss_phases), 6.0), 3.4)
        axes = fig.subplots(1, len(loss_phases), squeeze=False)[0]
        for ax, phase in zip(axes, loss_phases, strict=True):
            keys = [k for k in data[phase] if _is_loss(k)]
            components = list(dict.fromkeys(k.rsplit("/", 1)[0] for k in keys))
            values: list[float] = []
            for i, comp in enumerate(components):
                color = EXTRA_COLORS[i % len(EXTRA_COLORS)] if i else ROLE_COLORS["student"]
                for suffix, style in (("raw", "-"), ("weighted", "--")):
                    key = (
                        f"{comp}/{suffix}"
                        if f"{comp}/{suffix}" in data[phase]
                        else (comp if suffix == "raw" and comp in data[phase] else None)
                    )
                    if key is None:
                        continue
                    line(ax, data[phase][key], color, key, style)
                    values += [v for _, v in data[phase][key]]
            _log_if_wide(ax, values)
            ax.set_title(f"{phase}: loss components", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.legend(fontsize=7, frameon=False)
            _style(ax)
        out["curves-loss"] = to_png(fig)
    optim = [k for k in ("lr", "grad_norm") if any(k in data[p] for p in phases)]
    if optim:
        fig = new_figure(4.5 * len(optim), 3.0)
        axes = fig.subplots(1, len(optim), squeeze=False)[0]
        for ax, key in zip(axes, optim, strict=True):
            values = []
            for i, phase in enumerate(phases):
                if key in data[phase]:
                    line(ax, data[phase][key], color_for(phase, i), phase)
                    values += [v for _, v in data[phase][key]]
            if key == "grad_norm":
                _log_if_wide(ax, values)
            ax.set_title(
                {"lr": "learning rate", "grad_norm": "gradient norm (before clipping)"}[key],
                fontsize=9,
            )
            ax.set_xlabel("step", fontsize=8)
            ax.legend(fontsize=7, frameon=False)
            _style(ax)
        out["curves-optim"] = to_png(fig)
    # Values logged once per phase (wall time, token counts) are no curve: the report's table of
    # last values shows them.
    other = list(
        dict.fromkeys(
            k
            for p in phases
            for k in data[p]
            if not _is_loss(k) and k not in ("lr", "grad_norm") and len(data[p][k]) > 1
        )
    )
    if other:
        cols = min(len(other), 3)
        rows = math.ceil(len(other) / cols)
        fig = new_figure(4.5 * cols, 3.0 * rows)
        axes = fig.subplots(rows, cols, squeeze=False).flatten()
        for ax, key in zip(axes, other, strict=False):
            for i, phase in enumerate(phases):
                if key in data[phase]:
                    line(ax, data[phase][key], color_for(phase, i), phase, "o")
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.legend(fontsize=7, frameon=False)
            _style(ax)
        for ax in axes[len(other) :]:
            ax.set_visible(False)
        out["curves-eval"] = to_png(fig)
    return out


def acceptance_by_position_plot(
    by_position: Mapping[str, Mapping[str, Sequence[float | None]]], alpha: Mapping[str, float]
) -> bytes:
    """Speculative decoding: acceptance of the j-th draft token of a round, given the ones
    before it were accepted, one line per γ and one panel per decoding mode; the dashed line is
    α measured on the target's text (the i.i.d. model puts every point on it).

    Args:
        by_position: ``{mode: {γ: [acceptance at j = 1..γ]}}`` (``None`` where no round got there).
        alpha: ``{mode: α}``.
    """
    modes = list(by_position)
    fig = new_figure(4.2 * len(modes), 3.2)
    axes = fig.subplots(1, len(modes), squeeze=False)[0]
    for ax, mode in zip(axes, modes, strict=True):
        for i, (gamma, values) in enumerate(by_position[mode].items()):
            points = [(j + 1, v) for j, v in enumerate(values) if v is not None]
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="o",
                markersize=3.5,
                linewidth=1.2,
                color=EXTRA_COLORS[i % len(EXTRA_COLORS)],
                label=f"γ={gamma}",
            )
        if mode in alpha:
            ax.axhline(alpha[mode], linestyle="--", color="#4d4d4d", linewidth=1, label="α")
        longest = max((len(v) for v in by_position[mode].values()), default=1)
        ax.set_xticks(range(1, longest + 1))
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("position j of the draft token in its round", fontsize=8)
        ax.set_title(f"{mode}: acceptance given 1..j-1 accepted", fontsize=9)
        ax.legend(fontsize=7, frameon=False)
        _style(ax)
    return to_png(fig)


def block_efficiency_plot(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """Speculative decoding: τ measured (markers) and predicted from α (line) against γ, one
    colour per decoding mode; rows are the ``speculative`` table rows (``mode``, ``gamma``,
    ``tau``, ``tau_predicted``)."""
    fig = new_figure(4.6, 3.2)
    ax = fig.subplots()
    modes = list(dict.fromkeys(str(r["mode"]) for r in rows))
    for i, mode in enumerate(modes):
        mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["gamma"])
        color = EXTRA_COLORS[i % len(EXTRA_COLORS)]
        gammas = [r["gamma"] for r in mine]
        ax.plot(
            gammas,
            [r["tau_predicted"] for r in mine],
            "--",
            color=color,
            linewidth=1.1,
            label=f"{mode}: from α",
        )
        measured = [(r["gamma"], r["tau"]) for r in mine if r.get("tau") is not None]
        ax.plot(
            [m[0] for m in measured],
            [m[1] for m in measured],
            "o",
            color=color,
            markersize=5,
            label=f"{mode}: measured",
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(
        sorted({r["gamma"] for r in rows}), [str(g) for g in sorted({r["gamma"] for r in rows})]
    )
    ax.set_xlabel("γ (draft tokens per round)", fontsize=8)
    ax.set_ylabel("τ (tokens per target call)", fontsize=8)
    ax.set_title("block efficiency by γ", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    _style(ax)
    return to_png(fig)


def report_plots(
    report: Mapping[str, Any], metrics_rows: Sequence[Mapping[str, Any]]
) -> dict[str, bytes]:
    """Every plot a report has data for, by name: ``per_class``, ``reliability``,
    ``confusion``, ``training_time`` and the ``curves-*`` figures."""
    out: dict[str, bytes] = {}
    quality = report.get("quality") or {}
    per_class = quality.get("per_class")
    if per_class and len(per_class["labels"]) <= MAX_CLASSES_PLOTTED:
        out["per_class"] = per_class_plot(
            per_class["labels"],
            per_class["values"],
            per_class.get("metric", quality.get("primary", "")),
        )
    fidelity = report.get("fidelity") or {}
    if fidelity.get("reliability"):
        ece = {r["model"]: r["ece"] for r in fidelity["table"]["rows"] if r.get("ece") is not None}
        out["reliability"] = reliability_plot(fidelity["reliability"], ece)
    confusion = fidelity.get("confusion")
    if confusion and len(confusion["labels"]) <= MAX_CLASSES_PLOTTED:
        out["confusion"] = confusion_plot(confusion["labels"], confusion["matrices"])
    training = (report.get("cost") or {}).get("training")
    if training and training.get("phases"):
        out["training_time"] = training_time_plot(training["phases"])
    out.update(curve_plots(metrics_rows))
    speculative = report.get("speculative")
    if speculative:
        out["speculative_position"] = acceptance_by_position_plot(
            speculative["by_position"], speculative["alpha"]
        )
        out["speculative_tau"] = block_efficiency_plot(speculative["table"]["rows"])
    if report.get("monitor"):
        from distil.evaluation.hacking import monitor_plot

        png = monitor_plot(metrics_rows)
        if png is not None:
            out["monitor"] = png
    return out
