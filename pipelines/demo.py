"""`secura demo`: one stream trained with each of a few methods, and a side-by-side summary (`make demo`).

The config is a comparison YAML (pipelines/compare.py) with one learning rate
per method and one seed: the same stream, steps and seed for every method,
each at a rate that learns the tasks. Every run goes to
``<output_dir>/runs/<label>/…`` with one MLflow store and experiment, so the
UI compares them (artifacts beside the store, each under its run); running the
demo again starts new runs in the same folders. The summary prints what the
numbers say, whichever method they favour; a run ``demo: <name>`` and the
experiment's description hold the same side-by-side table.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from pipelines.compare import Comparison, load_compare
from pipelines.console import format_matrix
from pipelines.run import RunResult, log
from pipelines.run_report import COLOR_TAG, NOTE_TAG, label_tags, markdown_table
from pipelines.ui_view import VIEW_NAME

SUMMARY_KEYS = ("acc", "bwt", "forgetting", "probe_retention")
SUMMARY_COLOR = "#7f7f7f"  # the summary run has no series: grey, apart from the methods' colours


def check_demo(comparison: Comparison) -> None:
    if len(comparison.spec.seeds) != 1 or any(len(m.lrs) != 1 for m in comparison.spec.methods):
        raise ValueError(f"{comparison.spec.name}: a demo runs one learning rate per method and one seed; "
                         f"use `secura compare` for grids")


def run_demo(comparison: Comparison) -> dict[str, tuple[float, RunResult, float]]:
    """Each method's run, in the order of the config: label → (lr, result, wall seconds)."""
    from pipelines.preprocess import link_shared_shards, prepare_shared_shards
    from pipelines.run import init_ray, run_continual

    init_ray()
    first = comparison.plans[0]
    prepare_shared_shards(first.config, first.config.load_stream(comparison.config_dir),
                          comparison.output_dir)
    results = {}
    for index, plan in enumerate(comparison.plans, start=1):
        log(f"demo {index}/{len(comparison.plans)}: {plan.label} (lr {plan.lr:g})")
        link_shared_shards(comparison.output_dir, plan.run_dir)
        started = time.time()
        result = run_continual(plan.config, config_dir=comparison.config_dir,
                               parent_tags={"secura.demo": comparison.spec.name, "secura.demo.label": plan.label,
                                            **label_tags(comparison.labels, plan.label)})
        results[plan.label] = (plan.lr, result, time.time() - started)
    return results


def new_task_accuracies(result: RunResult) -> list[float]:
    """R[j, j]: each task right after it was trained (what the model learned)."""
    matrix = result.matrix
    return [matrix[j, task] for j, task in enumerate(matrix.tasks, start=1)]


def summary_text(results: dict[str, tuple[float, RunResult, float]], figure: Path) -> str:
    lines = []
    for label, (lr, result, wall) in results.items():
        lines += [f"\n== {label} (lr {lr:g}, {wall:.0f} s) ==", format_matrix(result.matrix)]
    header = ["method", "lr", "new-task acc (min)", "ACC", "BWT", "forgetting", "probe retention"]
    rows = []
    for label, (lr, result, _) in results.items():
        diagonal = new_task_accuracies(result)
        summary = result.summary
        rows.append([label, f"{lr:g}", f"{sum(diagonal) / len(diagonal):.3f} ({min(diagonal):.3f})",
                     *(f"{summary.get(key, math.nan):.3f}" for key in SUMMARY_KEYS)])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines.append("\nside by side (new-task acc: each task right after training it; retention: of the facts probe)")
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    lines.append(verdict(results))
    lines.append(f"\nfigure: {figure}")
    return "\n".join(lines)


def verdict(results: dict[str, tuple[float, RunResult, float]]) -> str:
    """One sentence from the numbers: which method kept more of the probe, and did both learn."""
    retention = {label: r.summary.get("probe_retention", math.nan) for label, (_, r, _) in results.items()}
    ranked = sorted(retention, key=lambda label: retention[label], reverse=True)
    kept = ", ".join(f"{label} {retention[label]:.2f}" for label in ranked)
    learned = [label for label, (_, r, _) in results.items() if min(new_task_accuracies(r)) >= 0.85]
    learning = ("every method learned every task (≥ 0.85 right after training it)" if len(learned) == len(results)
                else f"learned every task (≥ 0.85): {', '.join(learned) or 'none'}")
    return f"probe kept: {kept}; {learning}"


def demo_note(name: str, seed: int, results: dict[str, tuple[float, RunResult, float]]) -> str:
    """The demo's summary run's (and the experiment's) description: the runs side by side and the verdict."""
    rows = []
    for label, (lr, result, _) in results.items():
        diagonal = new_task_accuracies(result)
        rows.append([f"{label} lr={lr:g} seed={seed}", f"{sum(diagonal) / len(diagonal):.3f} ({min(diagonal):.3f})",
                     *(f"{result.summary.get(key, math.nan):.3f}" for key in SUMMARY_KEYS)])
    table = markdown_table(["run", "new-task acc (min)", "ACC", "BWT", "forgetting", "probe retention"], rows)
    return "\n\n".join([f"**Demo `{name}`**: one stream, each method at a learning rate that learns its tasks "
                         "(new-task acc: each task right after training it; retention: of the probe)", table,
                         f"**Verdict:** {verdict(results)}",
                         "Each run's description holds its accuracy matrix; stage by stage, the saved view "
                         f"*{VIEW_NAME}* (Views menu) charts `probe_retention`, `forgetting`, `acc` and every "
                         "`score/<task>` of these runs (docs/ui.md)."]) + "\n"


def log_demo_summary(comparison: Comparison, results: dict[str, tuple[float, RunResult, float]],
                     figure: Path) -> None:
    """A run ``demo: <name>`` beside the method runs (not their parent, so the chart view shows those
    directly), holding the side-by-side note and figure; the experiment's description is the same note."""
    from pipelines.run_report import provenance_tags
    from pipelines.tracking import Tracker
    from pipelines.ui_view import view_tag

    name, experiment = comparison.spec.name, comparison.plans[0].config.experiment
    note = demo_note(name, comparison.spec.seeds[0], results)
    with Tracker(comparison.tracking_uri, output_dir=comparison.output_dir) as tracker:
        tracker.start_parent(experiment, f"demo: {name}", params={"demo": name, "methods": ",".join(results)},
                             tags={"secura.demo": name, "secura.kind": "demo", NOTE_TAG: note,
                                   COLOR_TAG: SUMMARY_COLOR} | provenance_tags())
        tracker.log_artifact(figure, parent=True)
        matrix = next(iter(results.values()))[1].matrix
        view = view_tag(matrix.tasks, matrix.probes)
        tracker.set_experiment_tags(experiment, {NOTE_TAG: note, view[0]: view[1]})


def demo_command(args: argparse.Namespace) -> int:
    """``secura demo [CONFIG] [--output-dir DIR]``."""
    from pipelines.plots import plot_side_by_side

    comparison = load_compare(args.config, output_dir=args.output_dir)
    check_demo(comparison)
    results = run_demo(comparison)
    figure = plot_side_by_side({label: result.matrix for label, (_, result, _) in results.items()},
                               comparison.output_dir / "demo.png")
    log_demo_summary(comparison, results, figure)
    from pipelines.tracking import store_line

    print(summary_text(results, figure))
    print(store_line(comparison.tracking_uri, comparison.output_dir))
    return 0
