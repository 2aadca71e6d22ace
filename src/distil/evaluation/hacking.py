"""Teacher-hacking monitor: does the student fit the teacher on its training data while getting
worse where it matters?

"On Teacher Hacking in Language Model Distillation" (Tiapkin et al. 2025) distils an oracle into a
teacher and the teacher into a student, and watches three numbers: the *proxy* (the training
divergence to the teacher), the divergence to the teacher on held-out data, and the *golden*
divergence to the oracle. Teacher hacking is the proxy improving while the golden measure
worsens; the paper sees it with a fixed offline dataset and not with online (student-sampled)
data or diverse prompts.

:class:`Monitor` measures the held-out numbers during training (logged as ``monitor/*`` series in
``metrics.jsonl``); :func:`hacking_verdict` reads them back with the proxy and says whether the
pattern occurred; :func:`monitor_plot` draws the three curves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from distil.evaluation import lm as lm_eval
from distil.teachers.base import Teacher

PROXY = "kd/raw"  # the training divergence to the teacher, per step (metrics.jsonl)
HELD_OUT = "monitor/kl_teacher"  # KL(teacher ‖ student) on the fixed held-out set
ORACLE = "monitor/kl_oracle"  # KL(oracle ‖ student) on the same set
HELD_OUT_CE = "monitor/ce"  # the student's CE on the held-out text


@dataclass
class Monitor:
    """Held-out measurements of a student during training."""

    every: int
    batches: list[dict[str, torch.Tensor]]
    vocab_size: int
    teacher: Teacher
    oracle: Teacher | None = None

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def measure(self, model: Any) -> dict[str, float]:
        """``monitor/kl_teacher``, ``monitor/ce`` and (with an oracle) ``monitor/kl_oracle``."""
        device = next(model.parameters()).device
        m = lm_eval.held_out_metrics(
            model, self.batches, vocab_size=self.vocab_size, device=device, teacher=self.teacher
        )
        out = {HELD_OUT: m["kl_teacher_student"], HELD_OUT_CE: m["ce"]}
        if self.oracle is not None:
            o = lm_eval.held_out_metrics(
                model, self.batches, vocab_size=self.vocab_size, device=device, teacher=self.oracle
            )
            out[ORACLE] = o["kl_teacher_student"]
        return out


def monitor_series(
    rows: Sequence[Mapping[str, Any]], phase: str = "student"
) -> dict[str, list[tuple[int, float]]]:
    """The monitored series of one phase at the measurement steps, with the proxy averaged over
    the steps since the previous measurement (one number per interval, less noisy than a step)."""
    mine = [r for r in rows if r.get("phase") == phase]
    points = sorted({int(r["step"]) for r in mine if HELD_OUT in r or ORACLE in r})
    out: dict[str, list[tuple[int, float]]] = {HELD_OUT: [], ORACLE: [], HELD_OUT_CE: [], PROXY: []}
    for r in mine:
        for key in (HELD_OUT, ORACLE, HELD_OUT_CE):
            if key in r:
                out[key].append((int(r["step"]), float(r[key])))
    proxy = [(int(r["step"]), float(r[PROXY])) for r in mine if PROXY in r]
    for prev, step in zip([0, *points], points, strict=False):  # (previous measurement, this one]
        window = [v for s, v in proxy if prev < s <= step]
        if window:
            out[PROXY].append((step, sum(window) / len(window)))
    return {k: sorted(v) for k, v in out.items() if v}


def hacking_verdict(
    rows: Sequence[Mapping[str, Any]], *, tolerance: float = 0.02, phase: str = "student"
) -> dict[str, Any]:
    """Whether the proxy kept improving while the golden measure (oracle KL, else held-out KL to
    the teacher) worsened.

    The golden measure worsened when its last value is more than ``tolerance`` (relative) above
    its best; hacking is flagged when, over the same span (best step to the end), the proxy fell.

    Returns:
        ``flag`` (bool), ``measure`` (the key judged), ``best_step``, ``best``, ``last``,
        ``proxy_at_best``, ``proxy_last`` and ``text``, a sentence for the report; ``flag`` is
        None when there are fewer than three measurements.
    """
    series = monitor_series(rows, phase)
    measure = ORACLE if ORACLE in series else HELD_OUT
    golden, proxy = series.get(measure, []), dict(series.get(PROXY, []))
    if len(golden) < 3:
        return {
            "flag": None,
            "measure": measure,
            "text": "fewer than three measurements: no verdict",
        }
    best_step, best = min(golden, key=lambda p: p[1])
    last_step, last = golden[-1]
    p_best, p_last = proxy.get(best_step), proxy.get(last_step)
    worsened = last > best * (1 + tolerance)
    proxy_fell = p_best is not None and p_last is not None and p_last < p_best
    flag = bool(worsened and proxy_fell)
    name = "KL to the oracle" if measure == ORACLE else "held-out KL to the teacher"
    if flag:
        text = (
            f"teacher hacking: the training divergence kept falling ({p_best:.4g} -> {p_last:.4g}) after step "
            f"{best_step}, while the {name} rose from its best {best:.4g} to {last:.4g} (+{100 * (last / best - 1):.1f}%)"
        )
    elif worsened:
        text = f"the {name} rose from its best {best:.4g} (step {best_step}) to {last:.4g}, but the training divergence did not fall meanwhile: over-fitting or noise, not the hacking pattern"
    else:
        text = f"no teacher hacking seen: the {name} ended at {last:.4g}, within {100 * tolerance:.0f}% of its best {best:.4g} (step {best_step})"
    return {
        "flag": flag,
        "measure": measure,
        "best_step": best_step,
        "best": best,
        "last": last,
        "proxy_at_best": p_best,
        "proxy_last": p_last,
        "text": text,
    }


def monitor_plot(rows: Sequence[Mapping[str, Any]], phase: str = "student") -> bytes | None:
    """The proxy, the held-out KL to the teacher and the oracle KL over steps (PNG), or None."""
    from distil.evaluation.plots import EXTRA_COLORS, ROLE_COLORS, new_figure, to_png

    series = monitor_series(rows, phase)
    if HELD_OUT not in series and ORACLE not in series:
        return None
    fig = new_figure(6.5, 3.4)
    ax = fig.subplots()
    labels = {
        PROXY: ("training divergence to the teacher (proxy)", ROLE_COLORS["student"], "--"),
        HELD_OUT: ("held-out KL(teacher ‖ student)", ROLE_COLORS["teacher"], "-"),
        ORACLE: ("held-out KL(oracle ‖ student) (golden)", EXTRA_COLORS[0], "-"),
    }
    for key, (label, color, style) in labels.items():
        if key in series:
            xs, ys = zip(*series[key], strict=True)
            ax.plot(xs, ys, style, marker="o", markersize=3, color=color, label=label)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("nats / token", fontsize=8)
    ax.set_title(f"{phase}: teacher-hacking monitor", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    ax.grid(alpha=0.3)
    return to_png(fig)
