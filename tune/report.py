"""The sweep's results for people: the trials table, trials.csv and pareto.png.

Every trial is shown: completed ones at their last stage, trials stopped early
(and failed trials that reported something) at the last stage they reached,
in their own marker and labelled with that stage; the untrained model is the
reference point every learning trial must move away from.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from tune.objective import LEARN_THEN_RETAIN, Selection, TrialRow

KINDS = {"completed": "completed", "stopped": "stopped early", "error": "failed"}
UNTRAINED = "untrained model"


def _learns_cell(selection: Selection, row: TrialRow) -> str:
    learns = selection.learns(row)
    return "?" if learns is None else "yes" if learns else "no"


def _number(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "-"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_table(rows: list[TrialRow], num_stages: int, selection: Selection) -> str:
    """One line per trial; ``*`` marks the best, ``front`` the Pareto set, ``learns`` the learning rule."""
    header = ["trial", "params", "stage", "new acc", "gain", "retention", "probe ret", "ACC", "score",
              "learns", "front", "status"]
    lines = [header]
    best_id = selection.best.trial_id if selection.best is not None else None
    for row in rows:
        params = ", ".join(f"{key}={_short(value)}" for key, value in row.params.items())
        stage = f"{row.stage}/{num_stages}" + (" (stopped early)" if row.stopped_early else "")
        status = row.status if row.error is None else f"error: {row.error[:60]}"
        lines.append([row.trial_id + (" *" if row.trial_id == best_id else ""), params, stage,
                      _number(row.new_acc), _number(row.gain), _number(row.retention),
                      _number(row.probe_retention), _number(row.acc), _number(row.score),
                      _learns_cell(selection, row), "yes" if selection.on_front(row) else "", status])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def verdict(selection: Selection, metric: str) -> str:
    """One line saying why the best is the best, or why there is none."""
    if selection.required_gain is None:
        return "no trial completed every stage: no best config"
    rule = f"a trial learns when its new-task accuracy beats the untrained model's by ≥ {selection.required_gain:.3f}"
    if selection.best is None:
        return f"no completed trial learns ({rule}): no best config; raise the learning rate or the steps per task"
    if metric == LEARN_THEN_RETAIN:
        return f"{rule}; best = the learning trial that retains most: {selection.best.trial_id}"
    return f"best by {metric}: {selection.best.trial_id} ({rule})"


def trials_csv(rows: list[TrialRow], selection: Selection) -> str:
    keys = list(dict.fromkeys(key for row in rows for key in row.params))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["trial_id", *keys, "stage", "new_acc", "base_new_acc", "gain", "retention", "probe_retention",
                     "acc", "score", "learns", "front", "best", "status", "error"])
    best_id = selection.best.trial_id if selection.best is not None else None
    for row in rows:
        writer.writerow([row.trial_id, *(row.params.get(key, "") for key in keys), row.stage, row.new_acc,
                         row.base_new_acc, row.gain, row.retention, row.probe_retention, row.acc, row.score,
                         _learns_cell(selection, row), selection.on_front(row), row.trial_id == best_id,
                         row.status, row.error or ""])
    return buffer.getvalue()


# --- the plot ------------------------------------------------------------------------


def plot_points(rows: list[TrialRow], selection: Selection, num_stages: int) -> list[dict[str, Any]]:
    """What pareto.png draws: every trial with numbers, then the untrained model.

    Each point: ``label``, ``kind`` (completed, stopped early, failed, untrained
    model), ``gain`` (x: new-task accuracy over the untrained model's on the same
    tasks, so a trial stopped after task 1 is comparable with one that ran every
    stage), ``new_acc``, ``retention`` (y), ``stage``, ``front``, ``best``,
    ``learns``. The untrained model sits at gain 0 and retention 1 (it keeps
    everything); its ``new_acc`` is its accuracy on all tasks (from the deepest trial).
    """
    best_id = selection.best.trial_id if selection.best is not None else None
    points = []
    for row in rows:
        if not row.finite:
            continue
        label = row.trial_id if row.status == "completed" else f"{row.trial_id} ({KINDS[row.status]}, " \
                                                               f"stage {row.stage}/{num_stages})"
        points.append({"label": label, "kind": KINDS[row.status], "gain": row.gain, "new_acc": row.new_acc,
                       "retention": row.retention, "stage": row.stage, "front": selection.on_front(row),
                       "best": row.trial_id == best_id, "learns": selection.learns(row)})
    deepest = max((row for row in rows if math.isfinite(row.base_new_acc)), key=lambda row: row.stage, default=None)
    if deepest is not None:
        points.append({"label": UNTRAINED, "kind": UNTRAINED, "gain": 0.0, "new_acc": deepest.base_new_acc,
                       "retention": 1.0,
                       "stage": 0, "front": False, "best": False, "learns": False})
    return points


_STYLE = {  # kind -> marker, colour
    "completed": ("o", "C0"),
    "stopped early": ("v", "C1"),
    "failed": ("X", "C3"),
    UNTRAINED: ("s", "black"),
}


def _annotate(axes, points: list[dict[str, Any]]) -> None:
    """Label every point, top to bottom; a label that would overlap one already placed moves down below it.

    Positions are in points (1/72 inch) from the axes' data transform, with a
    label's width estimated from its length, so crowded spots stay readable.
    """
    figure = axes.get_figure()
    axes.autoscale_view()
    to_points = 72.0 / figure.dpi
    placed: list[tuple[float, float, float]] = []  # left, right, baseline of each placed label
    for p in sorted(points, key=lambda p: -p["retention"]):
        x, y = (value * to_points for value in axes.transData.transform((p["gain"], p["retention"])))
        left, right, baseline = x + 6, x + 6 + 3.9 * len(p["label"]), y + 3
        for other_left, other_right, other_baseline in sorted(placed, key=lambda b: -b[2]):
            if left < other_right and other_left < right and abs(baseline - other_baseline) < 9:
                baseline = other_baseline - 9
        placed.append((left, right, baseline))
        axes.annotate(p["label"], (p["gain"], p["retention"]), fontsize=7, xytext=(6, baseline - y),
                      textcoords="offset points")


def plot_sweep(points: list[dict[str, Any]], selection: Selection, path: Path, title: str) -> Path | None:
    """Retention vs gain in new-task accuracy: every trial by kind, the Pareto front as a line, the
    learning threshold as a dotted line, the best ringed; the top axis reads the gain as the new-task
    accuracy of a trial that ran every stage. None: nothing to draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not any(point["kind"] != UNTRAINED for point in points):
        return None
    figure = Figure(figsize=(9.0, 5.5))
    axes = figure.add_subplot()
    for kind, (marker, color) in _STYLE.items():
        members = [p for p in points if p["kind"] == kind]
        if members:
            hollow = kind == UNTRAINED  # drawn around a do-nothing trial at the same spot, not over it
            axes.scatter([p["gain"] for p in members], [p["retention"] for p in members], marker=marker,
                         s=110 if hollow else 40, alpha=0.85, label=kind, zorder=3, linewidths=1.5,
                         facecolors="none" if hollow else color, edgecolors=color)
    front = sorted((p for p in points if p["front"]), key=lambda p: p["gain"])
    if front:
        axes.plot([p["gain"] for p in front], [p["retention"] for p in front], color="C0", linewidth=1.5,
                  label="Pareto front (completed)", zorder=2)
    for p in points:
        if p["best"]:
            axes.scatter([p["gain"]], [p["retention"]], marker="*", s=320, facecolors="none",
                         edgecolors="C2", linewidths=1.8, label="best (learns, retains most)", zorder=4)
    if selection.required_gain is not None:
        axes.axvline(selection.required_gain, color="grey", linestyle=":", label="learns from here")
    axes.margins(x=0.15, y=0.08)  # room for the labels of the outermost points
    _annotate(axes, points)  # after everything that sets the limits: it places labels in display space
    untrained = next((p for p in points if p["kind"] == UNTRAINED), None)
    if untrained is not None:
        base = untrained["new_acc"]
        top = axes.secondary_xaxis("top", functions=(lambda gain: gain + base, lambda acc: acc - base))
        top.set_xlabel("new-task accuracy, all tasks (completed trials)", fontsize=8)
    axes.set_xlabel("gain in new-task accuracy over the untrained model on the same tasks (mean R[j, j] − R[0, j])")
    axes.set_ylabel("retention (probe and earlier tasks)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes.set_title(title, pad=28 if untrained is not None else 6)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path
