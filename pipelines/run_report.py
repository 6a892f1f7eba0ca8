"""What a continual run records in MLflow beyond per-step metrics: its config, its data, each
stage's scores and artifacts, and the whole stream's story on the parent run."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.config import RunConfig, dump_run_config


def flat_scores(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"eval/{task}/{metric}": value for task, metrics in scores.items() for metric, value in metrics.items()}


def log_run_start(tracker, config: RunConfig, stream, manifest) -> None:
    """On the parent run, once it exists: the config that rebuilds the run."""
    tracker.log_text(dump_run_config(config), "config/run.yaml", parent=True)


def log_base_scores(tracker, scores: dict[str, dict[str, float]], matrix) -> None:
    """Stage 0, the untrained model, on the parent run."""
    tracker.log_metrics(flat_scores(scores) | matrix.summary(0), step=0, parent=True)


def log_stage(tracker, matrix, stage: int, scores: dict[str, dict[str, float]], state_dir: Path, output_dir: Path,
              extra: dict[str, Any]) -> None:
    """On the stage's run: its scores, the matrix so far and its plots, the adapter; the summary on the parent."""
    from pipelines.plots import plot_accuracy_matrix, plot_retention

    summary = matrix.summary(stage)
    tracker.log_metrics(flat_scores(scores) | summary | extra, step=stage)
    plots = output_dir / "plots"
    plots.mkdir(exist_ok=True)
    tracker.log_artifact(state_dir / "adapter.safetensors", "adapter")
    tracker.log_text(matrix.to_csv(), "accuracy_matrix.csv")
    plot_accuracy_matrix(matrix, plots / "accuracy_matrix.png")
    plot_retention(matrix, plots / "retention_curve.png")
    tracker.log_artifact(plots / "accuracy_matrix.png", "plots")
    tracker.log_artifact(plots / "retention_curve.png", "plots")
    tracker.log_metrics(summary, step=stage, parent=True)


def log_run_end(tracker, matrix, output_dir: Path, config: RunConfig, final_state_dir: Path | None) -> None:
    """On the parent run, after the last stage: the final metrics."""
    tracker.log_metrics({f"final/{k}": v for k, v in matrix.summary().items()}, parent=True)
