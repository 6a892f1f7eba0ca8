"""The MLflow tracker against a temporary SQLite store (one store per module: schema creation takes ~5 s)."""
from __future__ import annotations

import logging
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipelines.tracking import (
    ATTEMPT_TAG,
    PARENT_TAG,
    STAGE_TAG,
    Tracker,
    TrackingError,
    flatten_params,
    resolve_tracking_uri,
    ui_argv,
    ui_command,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """An output folder whose SQLite store already has its schema."""
    output_dir = tmp_path_factory.mktemp("tracking")
    Tracker(None, output_dir)
    return output_dir


def test_resolve_tracking_uri(tmp_path):
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:////{str(tmp_path.resolve()).lstrip('/')}/mlflow.db"
    for uri in ("http://mlflow:5000", "https://x.example/mlflow", "postgresql://u@h/db", "sqlite:////a/b.db"):
        assert resolve_tracking_uri(uri, tmp_path) == uri


@dataclass
class Adapter:
    k: int = 8
    r: int = 4


def test_flatten_params():
    flat = flatten_params({"method": {"name": "secura", "adapter": Adapter()}, "lr": 1e-3, "targets": ["q", "v"],
                           "empty": {}, "bad key!": 1})
    assert flat == {"method.name": "secura", "method.adapter.k": "8", "method.adapter.r": "4", "lr": "0.001",
                    "targets": "['q', 'v']", "empty": "{}", "bad key_": "1"}


def test_parent_and_nested_stage_runs(store, tmp_path):
    params = {"method": {"name": "secura", "adapter": {"k": 8}}, "seed": 0}
    with Tracker(None, store) as tracker:
        parent = tracker.start_parent("demo/secura", "demo-secura-0", params, {"stream": "demo"})
        for stage, task in enumerate(["agnews", "sst2"], 1):
            with tracker.stage(stage, task, {"task": task, "train": {"steps": 3}}) as run_id:
                assert tracker.run_id == run_id != parent
                tracker.log_metrics({"loss": 1.0 / stage, "eval/agnews.score": 0.5, "skipped": None}, step=stage)
                tracker.log_dict({"task": task}, "stage.json")
            tracker.log_metrics({"acc": 0.5 + stage / 10}, step=stage, parent=True)
        (tmp_path / "matrix.csv").write_text("stage,agnews\n0,0.5\n")
        tracker.log_artifact(tmp_path / "matrix.csv", "tables")
        tracker.log_text("hello", "notes/readme.txt")

    runs = tracker.find_runs("demo/secura")
    assert len(runs) == 3
    parent_run = tracker.client.get_run(parent)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.params["method.adapter.k"] == "8"
    assert parent_run.data.tags["stream"] == "demo"
    assert [m.value for m in tracker.client.get_metric_history(parent, "acc")] == pytest.approx([0.6, 0.7])

    children = tracker.find_runs("demo/secura", f"tags.`{PARENT_TAG}` = '{parent}'")
    assert sorted(c.data.tags[STAGE_TAG] for c in children) == ["1", "2"]
    first = next(c for c in children if c.data.tags[STAGE_TAG] == "1")
    assert first.info.status == "FINISHED" and first.info.run_name == "stage-1-agnews"
    assert first.data.params == {"task": "agnews", "train.steps": "3"}
    assert first.data.metrics == {"loss": 1.0, "eval/agnews.score": 0.5}

    # Artifacts land under the explicit artifact location in the output folder.
    experiment = tracker.client.get_experiment(parent_run.info.experiment_id)
    assert experiment.artifact_location == (store / "mlartifacts" / "demo_secura").as_uri()
    artifacts = store / "mlartifacts" / "demo_secura" / parent / "artifacts"
    assert (artifacts / "tables" / "matrix.csv").read_text().startswith("stage,agnews")
    assert (artifacts / "notes" / "readme.txt").read_text() == "hello"
    assert (store / "mlartifacts" / "demo_secura" / first.info.run_id / "artifacts" / "stage.json").is_file()


def test_resume_reattaches_without_duplicating(store):
    tracker = Tracker(None, store)
    parent = tracker.start_parent("resume", "r-0", {"seed": 0})
    with tracker.stage(1, "a"):
        tracker.log_metrics({"loss": 1.0}, step=1)
    with pytest.raises(RuntimeError, match="worker died"):
        with tracker.stage(2, "b"):
            raise RuntimeError("worker died")
    tracker.end_parent("FAILED")
    failed_stage = tracker.find_runs("resume", f"tags.`{STAGE_TAG}` = '2'")[0]
    assert failed_stage.info.status == "FAILED"

    resumed = Tracker(None, store)
    assert resumed.start_parent("resume", "r-0", {"seed": 0, "resumed": True}, run_id=parent) == parent
    assert resumed.start_stage(2, "b") == failed_stage.info.run_id
    resumed.log_metrics({"loss": 0.5}, step=2)
    resumed.end_parent()

    runs = resumed.find_runs("resume")
    assert len(runs) == 3  # parent + two stages, none duplicated
    assert {r.info.status for r in runs} == {"FINISHED"}
    parent_run = resumed.client.get_run(parent)
    assert parent_run.data.tags[ATTEMPT_TAG] == "2"
    assert parent_run.data.params == {"seed": "0", "resumed": "True"}
    with pytest.raises(TrackingError, match="not in experiment"):
        Tracker(None, store).start_parent("other", "x", run_id=parent)


def test_bad_uri_fails_at_start(tmp_path):
    with pytest.raises(TrackingError, match="bogus://"):
        Tracker("bogus://nowhere", tmp_path)


def test_transient_logging_error_only_warns(store, caplog, monkeypatch):
    tracker = Tracker(None, store)
    tracker.start_parent("flaky", "f-0")

    def broken(*args, **kwargs):
        raise ConnectionError("tracking server went away")

    monkeypatch.setattr(tracker.client, "log_batch", broken)
    with caplog.at_level(logging.WARNING, logger="pipelines.tracking"):
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.log_metrics({"loss": "not a number"})
    assert "went away" in caplog.text and "not a number" in caplog.text
    monkeypatch.undo()
    tracker.end_parent()


def test_ui_command_line(tmp_path):
    argv = ui_argv(tmp_path, 5123)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "5123"
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert argv[1:4] == ["-m", "mlflow", "ui"]
    # No store yet: a clear message, no server started.
    assert ui_command(Namespace(output_dir=str(tmp_path / "empty"), port=5123)) == 1
