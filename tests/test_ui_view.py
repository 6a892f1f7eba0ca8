"""The saved MLflow view: an experiment tag in the layout MLflow 3.18's experiment page reads back."""
from __future__ import annotations

from mlflow import MlflowClient

from pipelines.tracking import Tracker
from pipelines.ui_view import VIEW_ID, VIEW_NAME, read_view, view_link, view_tag


def test_the_view_charts_retention_first_then_every_task_then_the_loss():
    key, value = view_tag(["jobs", "creatures"], ["facts-probe"], now_ms=1)
    assert key == f"mlflow.sharedViewState.{VIEW_ID}"
    state = read_view(value)
    sections = [s["name"] for s in state["compareRunSections"]]
    assert sections == ["what was kept, stage by stage", "each task, stage by stage", "training (stream-wide step)"]
    by_section = {s["uuid"]: [c["metricKey"] for c in state["compareRunCharts"] if c["metricSectionId"] == s["uuid"]]
                  for s in state["compareRunSections"]}
    assert list(by_section.values()) == [
        ["probe_retention", "score/facts-probe", "forgetting", "bwt", "acc"],
        ["score/jobs", "score/creatures"], ["loss", "stage"]]
    assert len({c["uuid"] for c in state["compareRunCharts"]}) == len(state["compareRunCharts"])
    assert view_link("3") == f"#/experiments/3/runs?compareRunsMode=CHART&viewStateShareKey={VIEW_ID}"


def test_saving_it_again_replaces_it(tmp_path):
    tracker = Tracker(None, tmp_path)
    for tasks in (["a"], ["a", "b"]):
        tracker.set_experiment_tags("views", dict([view_tag(tasks, ["p"])]))
    tags = MlflowClient(tracker.tracking_uri).get_experiment_by_name("views").tags
    views = {k: v for k, v in tags.items() if k.startswith("mlflow.sharedViewState.")}
    key = f"mlflow.sharedViewState.{VIEW_ID}"
    assert list(views) == [key] and VIEW_NAME in views[key]
    assert [c["metricKey"] for c in read_view(next(iter(views.values())))["compareRunCharts"]][-4:-2] == [
        "score/a", "score/b"]
    tracker.close()
