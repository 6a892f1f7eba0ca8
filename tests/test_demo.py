"""`secura demo` end to end on Ray Train: a clean console, and a summary that prints the matrices' numbers."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.metrics import AccuracyMatrix

ROOT = Path(__file__).resolve().parents[1]
LABELS = {"secura": 0.08, "lora": 0.003}
RAY_NOISE = ("TrainingReport(", "Failed to query", "Ray Train Controller", "Running Dataset", "\x1b[", "INFO mlflow")


def demo_config(tmp_path: Path) -> Path:
    """configs/demo-compare.yaml, shortened: two tasks, a few steps, a short pretraining."""
    data = yaml.safe_load((ROOT / "configs" / "demo-compare.yaml").read_text())
    data["base"] = str(ROOT / "configs" / "demo.yaml")
    data["overrides"] = {"tasks": ["jobs", "sentiment"], "train.steps_per_task": 6, "train.log_every": 3,
                         "train.checkpoint_every": 0, "eval.test_limit": 8, "eval.probe_limit": 8,
                         "model.pretrain.steps": 20}
    assert {m["label"]: m["lrs"] for m in data["methods"]} == {k: [v] for k, v in LABELS.items()}
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def summary_rows(stdout: str) -> dict[str, list[str]]:
    """The side-by-side table's rows, by method label."""
    lines = stdout.split("side by side", 1)[1].splitlines()[2:]
    return {cells[0]: cells for cells in (line.split() for line in lines) if cells and cells[0] in LABELS}


def printed_matrix(stdout: str, label: str) -> list[list[float]]:
    block = stdout.split(f"== {label} (lr ", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    return [[float(cell) for cell in line.split()[-3:]] for line in block]  # jobs, sentiment, facts-probe


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "SECURA_CL_CACHE": str(tmp_path / "cache"), "SECURA_VERBOSE": "0"}
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "demo", str(demo_config(tmp_path)),
                           "--output-dir", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp_path / "out", proc.stdout, proc.stderr


def test_the_console_holds_our_lines_only(demo_run):
    _, stdout, stderr = demo_run
    console = stdout + stderr  # progress and our log lines go to stderr, the summary to stdout
    for noise in RAY_NOISE:
        assert noise not in console, noise
    # One line per evaluation (two tasks and a probe: 3 sets): the base model once, shared by both
    # methods, then after each of the two stages of each method.
    assert console.count("evaluated 3 sets") == 1 + 2 * 2
    assert console.count("): acc ") == 2 * 2
    assert "figure: " in stdout and "View run" not in console
    out = demo_run[0]
    assert stdout.splitlines()[-1] == f"MLflow: sqlite:///{out}/mlflow.db (UI: secura ui --output-dir {out})"


def test_the_first_pages_of_the_ui_answer_which_method_kept_more(demo_run):
    """The experiment's and the summary run's description: the runs side by side; each run's: its matrix;
    the saved view; short names, one colour per method, artifacts beside the store, no empty Default."""
    from mlflow import MlflowClient

    from pipelines.ui_view import VIEW_ID, read_view

    out, stdout, _ = demo_run
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    (experiment,) = client.search_experiments()
    (summary,) = client.search_runs([experiment.experiment_id], "tags.`secura.kind` = 'demo'")
    note = experiment.tags["mlflow.note.content"]
    assert summary.info.run_name == "demo: demo" and summary.data.tags["mlflow.note.content"] == note
    verdict = next(line for line in stdout.splitlines() if line.startswith("probe kept: "))
    assert f"**Verdict:** {verdict}" in note
    parents = {r.data.tags["secura.label"]: r for r in client.search_runs([experiment.experiment_id],
                                                                           "tags.`secura.demo` = 'demo'")
               if "mlflow.parentRunId" not in r.data.tags and r.data.tags.get("secura.kind") != "demo"}
    assert {label: r.info.run_name for label, r in parents.items()} == {
        label: f"{label} lr={lr:g} seed=0" for label, lr in LABELS.items()}
    assert len({r.data.tags["mlflow.runColor"] for r in parents.values()}) == 2
    for label, run in parents.items():
        assert f"| {run.info.run_name} |" in note and "Accuracy matrix" in run.data.tags["mlflow.note.content"]
        assert run.info.artifact_uri.startswith((out / "mlartifacts").as_uri())
        assert run.info.run_id in run.info.artifact_uri
    view = read_view(experiment.tags[f"mlflow.sharedViewState.{VIEW_ID}"])
    assert {c["metricKey"] for c in view["compareRunCharts"]} >= {"probe_retention", "score/jobs", "score/sentiment"}


def test_the_summary_prints_the_accuracy_matrices(demo_run):
    out, stdout, _ = demo_run
    rows = summary_rows(stdout)
    assert set(rows) == set(LABELS)
    for label, lr in LABELS.items():
        matrix = AccuracyMatrix.from_csv((out / "runs" / label / f"lr{lr:g}" / "seed0" / "accuracy_matrix.csv")
                                         .read_text())
        grid = [matrix[stage, task] for stage in range(len(matrix.tasks) + 1) for task in matrix.columns]
        assert sum(printed_matrix(stdout, label), []) == pytest.approx(grid, abs=5e-4)
        summary = matrix.summary()
        diagonal = [matrix[j, task] for j, task in enumerate(matrix.tasks, start=1)]
        cells = rows[label]
        assert float(cells[1]) == lr
        assert float(cells[2]) == pytest.approx(sum(diagonal) / len(diagonal), abs=5e-4)
        assert cells[3] == f"({min(diagonal):.3f})"
        printed = [float(c) for c in cells[4:8]]
        expected = [summary.get(key, math.nan) for key in ("acc", "bwt", "forgetting", "probe_retention")]
        assert printed == pytest.approx(expected, abs=5e-4)
    assert (out / "demo.png").stat().st_size > 0
