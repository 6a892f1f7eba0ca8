"""The MLflow tracker against a temporary SQLite store (one store per module: schema creation takes ~5 s)."""
from __future__ import annotations

import time
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
    sync_command,
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
    assert first.info.status == "FINISHED" and first.info.run_name == "stage 1: agnews"
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
    tracker.close()
    failed_stage = tracker.find_runs("resume", f"tags.`{STAGE_TAG}` = '2'")[0]
    assert failed_stage.info.status == "FAILED"

    resumed = Tracker(None, store)
    assert resumed.start_parent("resume", "r-0", {"seed": 0, "resumed": True}, run_id=parent) == parent
    stage = resumed.start_stage(2, "b")
    resumed.log_metrics({"loss": 0.5}, step=2)
    resumed.end_parent()
    resumed.close()
    assert resumed.mlflow_id(stage) == failed_stage.info.run_id

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


def test_an_unreachable_server_fails_in_seconds_naming_the_uri(tmp_path):
    """A closed port used to hang in MLflow's retry loop after Ray start and shard preparation."""
    started = time.monotonic()
    with pytest.raises(TrackingError, match=r"http://127\.0\.0\.1:9 .*--offline"):
        Tracker("http://127.0.0.1:9", tmp_path)
    assert time.monotonic() - started < 15


def test_an_mlflow_outage_loses_nothing_and_never_blocks(store, monkeypatch, tmp_path):
    """While the store refuses every call, logging returns at once; afterwards sync sends each step once."""
    out = tmp_path / "run"
    tracker = Tracker(store_uri(store), out)
    parent = tracker.start_parent("outage", "o-0")

    def down(*args, **kwargs):
        raise ConnectionError("database is locked")

    monkeypatch.setattr(tracker.drainer.client, "log_batch", down)
    started = time.monotonic()
    with tracker.stage(1, "a") as stage:
        for step in range(1, 201):
            tracker.log_metrics({"loss": 1.0 / step}, step=step)
    assert time.monotonic() - started < 2.0, "logging waited for the store"
    tracker.end_parent()
    assert tracker.close(timeout=1) > 0, "the events are kept while the store is down"
    monkeypatch.undo()

    assert sync_command(Namespace(output_dir=str(out), tracking_uri=store_uri(store))) == 0
    assert sync_command(Namespace(output_dir=str(out), tracking_uri=store_uri(store))) == 0  # idempotent
    run_id = tracker.mlflow_id(stage) or Tracker(store_uri(store), out).drainer.run_id(stage)
    history = tracker.client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 201))
    assert tracker.client.get_run(parent).info.status == "FINISHED"


def test_offline_runs_are_created_by_sync(store, tmp_path):
    out = tmp_path / "offline"
    tracker = Tracker(store_uri(store), out, offline=True)
    parent = tracker.start_parent("offline", "x-0", {"seed": 3})
    assert parent.startswith("offline-")
    with tracker.stage(1, "a"):
        tracker.log_metrics({"loss": 2.0}, step=1)
    tracker.end_parent()
    tracker.close()
    assert tracker.find_runs("offline") == []
    sync_command(Namespace(output_dir=str(out), tracking_uri=store_uri(store)))
    runs = tracker.find_runs("offline")
    assert len(runs) == 2
    top = next(r for r in runs if PARENT_TAG not in r.data.tags)
    assert top.data.params == {"seed": "3"} and top.info.status == "FINISHED"


def test_a_superseded_attempt_is_discarded_and_no_step_is_logged_twice(store, tmp_path):
    """A worker restarted from its step-20 checkpoint recomputes steps 21-40; an orphan keeps logging."""
    from pipelines.spool import SpoolWriter, new_attempt_id, tracking_folder

    out = tmp_path / "attempts"
    tracker = Tracker(store_uri(store), out, offline=True)
    tracker.start_parent("attempts", "a-0")
    stage = tracker.start_stage(1, "a")
    worker = SpoolWriter(tracking_folder(out), "train")
    first, second = new_attempt_id(), new_attempt_id()
    worker.append("attempt", stage, attempt=first, from_step=0)
    for step in (10, 20, 30):
        worker.append("metrics", stage, metrics={"loss": float(step)}, step=step, ts=step, attempt=first)
    worker.append("attempt", stage, attempt=second, from_step=20)
    for step in (30, 40):
        worker.append("metrics", stage, metrics={"loss": step + 0.5}, step=step, ts=100 + step, attempt=second)
    worker.append("metrics", stage, metrics={"loss": 99.0}, step=40, ts=999, attempt=first)  # the orphan
    tracker.end_parent()
    tracker.close()
    sync_command(Namespace(output_dir=str(out), tracking_uri=store_uri(store)))
    run_id = Tracker(store_uri(store), out, offline=True).drainer.run_id(stage)
    history = sorted((m.step, m.value) for m in tracker.client.get_metric_history(run_id, "loss"))
    assert history == [(10, 10.0), (20, 20.0), (30, 30.5), (40, 40.5)]


def test_the_loss_is_one_curve_over_the_stream_wide_step_on_the_parent(store, tmp_path):
    """Stage N's step s is logged at offset(N) + s on its stage run and on the parent; a later attempt that
    restarted mid-stage 2 (then went on to stage 3) supersedes the orphaned first attempt from its restart on."""
    from pipelines.spool import new_attempt_id, tracking_folder
    from pipelines.train import ReportSink

    out = tmp_path / "stream-steps"
    tracker = Tracker(store_uri(store), out, offline=True)
    parent = tracker.start_parent("stream-steps", "s-0")
    stages = []
    for index, task in enumerate("abc", 1):
        stages.append(tracker.start_stage(index, task))
        tracker.end_stage()
    sink = ReportSink(**ReportSink(tracking_folder(out), parent, out / "progress.json", {1: 0, 2: 30, 3: 60}).to_dict())
    first, second = new_attempt_id(), new_attempt_id()

    def report(attempt: str, stage: int, step: int) -> None:
        loss = 30 * (stage - 1) + step + (attempt == second) / 2  # the stream-wide step, + 0.5 for the second
        sink({"stage": stage, "step": step, "attempt": attempt, "loss": loss})

    sink({"event": "attempt", "stage": 1, "attempt": first, "from_step": 0})
    for step in (10, 20, 30):
        report(first, 1, step)
    sink({"event": "attempt", "stage": 2, "attempt": first, "from_step": 0})
    for step in (10, 20):
        report(first, 2, step)
    sink({"event": "attempt", "stage": 2, "attempt": second, "from_step": 10})
    for step in (20, 30):
        report(second, 2, step)
    sink({"event": "attempt", "stage": 3, "attempt": second, "from_step": 0})
    report(second, 3, 10)
    tracker.end_parent()
    tracker.close()
    sync_command(Namespace(output_dir=str(out), tracking_uri=store_uri(store)))
    drainer = Tracker(store_uri(store), out, offline=True).drainer
    history = sorted((m.step, m.value) for m in tracker.client.get_metric_history(drainer.run_id(parent), "loss"))
    assert history == [(10, 10.0), (20, 20.0), (30, 30.0), (40, 40.0), (50, 50.5), (60, 60.5), (70, 70.5)]
    stage_1 = tracker.client.get_metric_history(drainer.run_id(stages[0]), "loss")
    assert sorted(m.step for m in stage_1) == [10, 20, 30]


def store_uri(store: Path) -> str:
    return f"sqlite:///{store.resolve()}/mlflow.db"


def test_ui_command_line(tmp_path):
    argv = ui_argv(tmp_path, 5123)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "5123"
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert argv[1:4] == ["-m", "mlflow", "ui"]
    # No store yet: a clear message, no server started.
    assert ui_command(Namespace(output_dir=str(tmp_path / "empty"), port=5123)) == 1
