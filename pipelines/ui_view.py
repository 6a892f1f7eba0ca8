"""A saved view of the MLflow UI's experiment page: "which method kept more", stage by stage, in one click.

MLflow 3.18 saves a view of the experiment page (its Views menu) as the experiment tag
``mlflow.sharedViewState.<id>``: JSON with the view's name and its page state, deflated and base64'd
behind ``deflate;``; the link ``#/experiments/<id>/runs?compareRunsMode=CHART&viewStateShareKey=<view>``
opens it. The state below is what that page saves, with our charts: the retention and forgetting
series first, then every task's score, then the loss over the stream-wide step. Rewriting the same id
replaces the view, so a comparison or demo run again keeps one. docs/tools/ui_screenshots.py opens it
in a real browser; when MLflow changes the layout, that script and tests/test_ui_view.py say so.
"""
from __future__ import annotations

import base64
import json
import time
import zlib
from typing import Any

VIEW_TAG_PREFIX = "mlflow.sharedViewState."
VIEW_ID = "secura-kept-more"
VIEW_NAME = "which method kept more"


def _chart(uuid: str, section: str, metric: str) -> dict[str, Any]:
    """A line chart of ``metric`` over the step, as the experiment page writes one."""
    return {"uuid": uuid, "type": "LINE", "runsCountToCompare": 10, "metricSectionId": section, "deleted": False,
            "isGenerated": False, "displayName": metric, "metricKey": metric, "lineSmoothness": 0,
            "xAxisScaleType": "linear", "scaleType": "linear", "range": {}, "xAxisKey": "step",
            "selectedXAxisMetricKey": "", "yAxisKey": "metric", "yAxisExpressions": [], "ignoreOutliers": False,
            "useGlobalXaxisKey": True, "useGlobalLineSmoothing": True}


def view_state(tasks: list[str], probes: list[str]) -> dict[str, Any]:
    """The chart view: what was kept (probe retention and score, forgetting, BWT, ACC), each task's score
    (step = stage), then the loss (step = the stream-wide training step)."""
    sections = {"secura-kept": ("what was kept, stage by stage", [
                    "probe_retention", *(f"score/{p}" for p in probes), "forgetting", "bwt", "acc"]),
                "secura-tasks": ("each task, stage by stage", [f"score/{t}" for t in tasks]),
                "secura-loss": ("training (stream-wide step)", ["loss", "stage"])}
    charts = [_chart(f"{section}-{i}", section, metric)
              for section, (_, metrics) in sections.items() for i, metric in enumerate(metrics)]
    return {
        "searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False, "startTime": "ALL",
        "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
        "selectedColumns": ["attributes.`Source`", "attributes.`Models`", "attributes.`Dataset`"],
        "columnOrder": [], "columnWidths": {}, "runsHiddenMode": "FIRST_10_RUNS",
        "compareRunCharts": charts,
        "compareRunSections": [{"uuid": uuid, "name": name, "display": True, "isReordered": False, "deleted": False,
                                "isGenerated": False} for uuid, (name, _) in sections.items()],
        "viewMaximized": False, "runListHidden": False, "isAccordionReordered": True,
        "useGroupedValuesInCharts": True, "hideEmptyCharts": True, "groupBy": None, "groupsExpanded": {},
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
        "chartsSearchFilter": "",
    }


def view_tag(tasks: list[str], probes: list[str], now_ms: int | None = None) -> tuple[str, str]:
    """The experiment tag (key, value) that saves the view."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    packed = zlib.compress(json.dumps(view_state(tasks, probes), separators=(",", ":")).encode())
    value = {"name": VIEW_NAME, "createdAt": now_ms, "updatedAt": now_ms,
             "state": "deflate;" + base64.b64encode(packed).decode("ascii")}
    return VIEW_TAG_PREFIX + VIEW_ID, json.dumps(value, separators=(",", ":"))


def read_view(value: str) -> dict[str, Any]:
    """A saved view's state back from its tag value."""
    state = json.loads(value)["state"]
    return json.loads(zlib.decompress(base64.b64decode(state.removeprefix("deflate;"))))


def view_link(experiment_id: str) -> str:
    """The UI's address of the view, after the server's root (``http://127.0.0.1:5000/``)."""
    return f"#/experiments/{experiment_id}/runs?compareRunsMode=CHART&viewStateShareKey={VIEW_ID}"
