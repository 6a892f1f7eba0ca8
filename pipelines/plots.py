"""PNG plots for runs, sweeps and benchmarks.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so plotting
never touches global backend state and works in headless Ray workers.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipelines.files import atomic_path
from pipelines.metrics import AccuracyMatrix


def _save(figure: Figure, path: str | Path) -> Path:
    """Written beside, then renamed: a full disk leaves the old plot, and an error naming the file."""
    path = Path(path)
    FigureCanvasAgg(figure)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
    return path


def draw_accuracy_matrix(axes, matrix: AccuracyMatrix, title: str | None = None):
    """Heatmap of R[stage, task/probe] on ``axes``, each recorded cell annotated; probes right of a line."""
    values = np.array(matrix.to_rows(), dtype=float)
    stages, columns = values.shape
    low = min(0.0, float(np.nanmin(values))) if np.isfinite(values).any() else 0.0
    high = max(1.0, float(np.nanmax(values))) if np.isfinite(values).any() else 1.0
    image = axes.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=low, vmax=high, aspect="auto")
    for i in range(stages):
        for j in range(columns):
            if not math.isnan(values[i, j]):
                dark = (values[i, j] - low) / (high - low) < 0.6
                axes.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8,
                          color="white" if dark else "black")
    axes.set_xticks(range(columns), matrix.tasks + [f"probe:{p}" for p in matrix.probes], rotation=45, ha="right")
    axes.set_yticks(range(stages), ["base"] + [f"after {i}: {t}" for i, t in enumerate(matrix.tasks, 1)])
    if matrix.probes:
        axes.axvline(len(matrix.tasks) - 0.5, color="white", linewidth=2)
    axes.set_xlabel("evaluated on")
    axes.set_ylabel("stage")
    axes.set_title(title or "accuracy matrix")
    return image


def plot_accuracy_matrix(matrix: AccuracyMatrix, path: str | Path, *, title: str | None = None) -> Path:
    """Heatmap of R[stage, task/probe] as a PNG."""
    stages, columns = matrix.num_stages, len(matrix.columns)
    figure = Figure(figsize=(max(4.0, 0.9 * columns + 2.0), max(3.0, 0.45 * stages + 1.5)))
    axes = figure.add_subplot()
    figure.colorbar(draw_accuracy_matrix(axes, matrix, title), ax=axes, label="score")
    return _save(figure, path)


def draw_retention(axes, matrix: AccuracyMatrix, title: str | None = None) -> None:
    """Probe retention (each probe and their mean) and average seen-task accuracy vs stage, on ``axes``."""
    last = matrix.last_stage
    stages = list(range(last + 1))
    retention = [matrix.probe_retention(stage) for stage in stages]
    for probe in matrix.probes:
        axes.plot(stages, [r[probe] for r in retention], marker="o", alpha=0.5, label=f"retention: {probe}")
    if len(matrix.probes) > 1:
        mean = [float(np.mean(list(r.values()))) for r in retention]
        axes.plot(stages, mean, marker="o", linewidth=2.5, label="retention: mean")
    if last >= 1:
        axes.plot(range(1, last + 1), matrix.acc_curve(), marker="s", linestyle="--", label="avg seen-task accuracy")
    axes.set_xticks(stages, ["base"] + [str(s) for s in stages[1:]])
    axes.set_xlabel("stage")
    axes.set_ylabel("retention / accuracy")
    axes.set_ylim(0.0, 1.05)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    axes.set_title(title or "retention vs stage")


def plot_retention(matrix: AccuracyMatrix, path: str | Path, *, title: str | None = None) -> Path:
    """Probe retention and average seen-task accuracy vs stage as a PNG."""
    figure = Figure(figsize=(6.0, 4.0))
    draw_retention(figure.add_subplot(), matrix, title)
    return _save(figure, path)


def plot_side_by_side(matrices: Mapping[str, AccuracyMatrix], path: str | Path) -> Path:
    """One column per method: its retention curve above its accuracy matrix (the demo's figure)."""
    count = len(matrices)
    figure = Figure(figsize=(6.0 * count, 9.0))
    for index, (label, matrix) in enumerate(matrices.items()):
        draw_retention(figure.add_subplot(2, count, index + 1), matrix, f"{label}: retention vs stage")
        draw_accuracy_matrix(figure.add_subplot(2, count, count + index + 1), matrix, f"{label}: accuracy matrix")
    figure.tight_layout()
    return _save(figure, path)


def pareto_front(points: Sequence[Mapping[str, Any]]) -> list[int]:
    """Indices of the points no other point beats on both retention and plasticity (higher is better)."""
    def dominated(i: int) -> bool:
        a = points[i]
        return any(
            b["retention"] >= a["retention"] and b["plasticity"] >= a["plasticity"]
            and (b["retention"] > a["retention"] or b["plasticity"] > a["plasticity"])
            for b in points
        )

    return [i for i in range(len(points)) if not dominated(i)]


def plot_frontier(
    points: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    title: str | None = None,
    xlabel: str = "plasticity (new-task accuracy)",
    ylabel: str = "probe retention",
) -> Path:
    """Retention vs plasticity, one colour per ``group``, each group's Pareto front as a line.

    Points are dicts with ``label``, ``retention``, ``plasticity``, ``group``
    and optionally ``retention_ci`` / ``plasticity_ci`` (half-widths, drawn as
    error bars: methods are compared at matched plasticity with intervals).
    """
    figure = Figure(figsize=(9.0, 5.5))
    axes = figure.add_subplot()
    groups = list(dict.fromkeys(str(p.get("group", "")) for p in points))
    # Past ten methods the default colour cycle repeats: take tab20 and vary the marker too.
    palette = [f"C{i}" for i in range(10)] if len(groups) <= 10 else list(colormaps["tab20"].colors)
    markers = "os^DvPX<>p"
    for index, group in enumerate(groups):
        color, marker = palette[index % len(palette)], markers[index % len(markers)]
        members = [p for p in points if str(p.get("group", "")) == group]
        x = [p["plasticity"] for p in members]
        y = [p["retention"] for p in members]
        axes.errorbar(x, y, xerr=[p.get("plasticity_ci", 0.0) for p in members],
                      yerr=[p.get("retention_ci", 0.0) for p in members],
                      fmt=marker, color=color, alpha=0.8, capsize=2, label=group or None)
        front = sorted((members[i] for i in pareto_front(members)), key=lambda p: p["plasticity"])
        axes.plot([p["plasticity"] for p in front], [p["retention"] for p in front], color=color, linewidth=1.5)
        for p in members:
            axes.annotate(str(p.get("label", "")), (p["plasticity"], p["retention"]), fontsize=7,
                          xytext=(3, 3), textcoords="offset points")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if any(groups):
        axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes.set_title(title or "retention vs plasticity")
    return _save(figure, path)
