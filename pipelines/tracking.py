"""MLflow tracking: one parent run per (stream, method, seed), one nested run per stage.

All calls go through an explicit `MlflowClient` bound to one tracking URI, never
MLflow's process-global "active run", so a Ray worker, a test, or a second
tracker in the same process cannot log into the wrong run.

Failure policy: starting (bad URI, missing run to resume) fails loudly; logging
metrics, params, artifacts and ending runs only warn, so a transient tracking
error never kills hours of training.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking.context.registry import resolve_tags

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
STAGE_TAG = "secura.stage"
TASK_TAG = "secura.task"
ATTEMPT_TAG = "secura.attempt"
STATUSES = ("FINISHED", "FAILED", "KILLED")
MAX_PARAM_LENGTH = 6000  # MLflow 3's limit on a param value
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
REMOTE_SCHEMES = ("http://", "https://", "databricks")


class TrackingError(RuntimeError):
    """The tracking store cannot be used (bad URI, unreachable server, unknown run)."""


def resolve_tracking_uri(uri: str | None, output_dir: str | Path) -> str:
    """The given URI, else ``MLFLOW_TRACKING_URI`` (set on clusters), else the embedded
    default ``sqlite:////<abs output_dir>/mlflow.db``.

    Absolute, because a relative SQLite path would follow each process's working
    directory (Ray workers run elsewhere).
    """
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return "sqlite:///" + str(Path(output_dir).expanduser().resolve() / "mlflow.db")


def is_remote(uri: str) -> bool:
    """A tracking server that stores artifacts itself (no local artifact root to choose)."""
    return uri.startswith(REMOTE_SCHEMES)


def sanitize_key(key: str) -> str:
    """A metric/param name MLflow accepts (letters, digits, ``_ - . / : space``)."""
    return re.sub(r"[^/\w.\- :]", "_", key)


def flatten_params(params: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, str]:
    """Nested mappings/dataclasses as ``{"method.adapter.k": "8"}`` (values as strings, truncated)."""
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        params = dataclasses.asdict(params)
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        text = str(value)
        if len(text) > MAX_PARAM_LENGTH:
            log.warning("param %s truncated to %d characters", name, MAX_PARAM_LENGTH)
            text = text[:MAX_PARAM_LENGTH]
        flat[sanitize_key(name)] = text
    return flat


def _status(status: str) -> str:
    status = status.upper()
    if status not in STATUSES:
        raise ValueError(f"run status {status!r} is not one of {STATUSES}")
    return status


def _status_of(error: BaseException | None) -> str:
    if error is None:
        return "FINISHED"
    return "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"


class Tracker:
    """A parent run with nested stage runs in one experiment, on one tracking store.

    ``with Tracker(uri, output_dir) as t:`` ends the parent run on exit (FAILED
    or KILLED if an exception escapes); ``with t.stage(i, task, params):`` does
    the same for a stage. ``log_*`` write to the active stage run, or to the
    parent with ``parent=True`` (run-level summaries, ``step`` = stage).
    """

    def __init__(
        self, tracking_uri: str | None = None, output_dir: str | Path = ".", *, artifact_root: str | None = None
    ) -> None:
        self.output_dir = Path(output_dir).expanduser().resolve()
        self.tracking_uri = resolve_tracking_uri(tracking_uri, self.output_dir)
        self.artifact_root = artifact_root
        try:
            self.client = MlflowClient(tracking_uri=self.tracking_uri)
            self.client.search_experiments(max_results=1)
        except Exception as error:
            raise TrackingError(f"MLflow tracking URI {self.tracking_uri!r} is not usable: {error}") from error
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.stage_run_id: str | None = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: Any) -> None:
        if self.parent_run_id:
            self.end_parent(_status_of(error))

    @property
    def run_id(self) -> str:
        """The run that ``log_*`` write to: the active stage, else the parent."""
        run_id = self.stage_run_id or self.parent_run_id
        if run_id is None:
            raise RuntimeError("no active run: call start_parent first")
        return run_id

    # --- experiments and runs ---------------------------------------------------------

    def _artifact_location(self, experiment: str) -> str | None:
        """Explicit for local stores, so artifacts never land in a worker's ./mlruns."""
        folder = re.sub(r"[^\w.-]", "_", experiment)
        if self.artifact_root:
            return f"{self.artifact_root.rstrip('/')}/{folder}"
        if is_remote(self.tracking_uri):
            return None
        return (self.output_dir / "mlartifacts" / folder).as_uri()

    def ensure_experiment(self, name: str) -> str:
        """The id of experiment ``name``, created (or restored, if deleted) as needed."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self.client.create_experiment(name, artifact_location=self._artifact_location(name))
            except MlflowException:
                experiment = self.client.get_experiment_by_name(name)  # created concurrently
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            self.client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    def _reattach(self, run: Run) -> None:
        attempt = int(run.data.tags.get(ATTEMPT_TAG, "1")) + 1
        self.client.update_run(run.info.run_id, status="RUNNING")
        self.client.set_tag(run.info.run_id, ATTEMPT_TAG, str(attempt))

    def start_parent(
        self,
        experiment: str,
        run_name: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        *,
        run_id: str | None = None,
    ) -> str:
        """Create the parent run, or re-attach to ``run_id`` (resume) instead of duplicating it."""
        if self.parent_run_id:
            raise RuntimeError(f"parent run {self.parent_run_id} is already active")
        try:
            self.experiment_id = self.ensure_experiment(experiment)
            if run_id:
                run = self.client.get_run(run_id)
                if run.info.experiment_id != self.experiment_id:
                    raise TrackingError(f"run {run_id} is not in experiment {experiment!r}")
                self._reattach(run)
            else:
                run = self.client.create_run(self.experiment_id, run_name=run_name, tags=resolve_tags(dict(tags or {})))
        except MlflowException as error:
            raise TrackingError(f"cannot start the parent run on {self.tracking_uri}: {error}") from error
        self.parent_run_id = run.info.run_id
        if run_id and tags:
            self._quietly("set_tags", self._set_tags, run_id, tags)
        self._quietly("log_params", self._log_params, self.parent_run_id, params or {}, run.data.params)
        return self.parent_run_id

    def start_stage(self, stage_index: int, task_name: str, params: Mapping[str, Any] | None = None) -> str:
        """A nested run for stage ``stage_index``; an existing one (resume) is re-attached."""
        if self.parent_run_id is None:
            raise RuntimeError("start_parent before start_stage")
        if self.stage_run_id:
            raise RuntimeError(f"stage run {self.stage_run_id} is still active: end_stage first")
        try:
            existing = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and tags.`{STAGE_TAG}` = '{stage_index}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if existing:
                run = existing[0]
                self._reattach(run)
            else:
                tags = {PARENT_TAG: self.parent_run_id, STAGE_TAG: str(stage_index), TASK_TAG: task_name}
                run = self.client.create_run(
                    self.experiment_id, run_name=f"stage-{stage_index}-{task_name}", tags=resolve_tags(tags)
                )
        except MlflowException as error:
            raise TrackingError(f"cannot start the run of stage {stage_index}: {error}") from error
        self.stage_run_id = run.info.run_id
        self._quietly("log_params", self._log_params, self.stage_run_id, params or {}, run.data.params)
        return self.stage_run_id

    def end_stage(self, status: str = "FINISHED") -> None:
        """End the active stage run (no-op if none, so it is safe in ``finally``)."""
        if self.stage_run_id:
            self._quietly("end_stage", self.client.set_terminated, self.stage_run_id, _status(status))
            self.stage_run_id = None

    def end_parent(self, status: str = "FINISHED") -> None:
        """End the active stage (same status) and the parent run."""
        self.end_stage(status)
        if self.parent_run_id:
            self._quietly("end_parent", self.client.set_terminated, self.parent_run_id, _status(status))
            self.parent_run_id = None

    @contextmanager
    def stage(self, stage_index: int, task_name: str, params: Mapping[str, Any] | None = None) -> Iterator[str]:
        """``start_stage`` … ``end_stage``, with FAILED/KILLED if the body raises."""
        run_id = self.start_stage(stage_index, task_name, params)
        try:
            yield run_id
        except BaseException as error:
            self.end_stage(_status_of(error))
            raise
        self.end_stage("FINISHED")

    def find_runs(self, experiment: str, filter_string: str = "", *, max_results: int = 1000) -> list[Run]:
        """Runs of ``experiment`` matching an MLflow filter string, newest first ([] if no experiment)."""
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return []
        return list(self.client.search_runs(
            [found.experiment_id], filter_string=filter_string,
            order_by=["attributes.start_time DESC"], max_results=max_results,
        ))

    # --- logging (warns, never raises) --------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, *, parent: bool = False) -> None:
        """Numeric values only (None is skipped); names are sanitised for MLflow."""
        run_id = self._target(parent)
        timestamp = int(time.time() * 1000)
        entries = []
        for key, value in metrics.items():
            try:
                if value is not None:
                    entries.append(Metric(sanitize_key(key), float(value), timestamp, step or 0))
            except (TypeError, ValueError):
                log.warning("metric %s=%r is not a number; not logged", key, value)
        for start in range(0, len(entries), METRICS_PER_BATCH):
            chunk = entries[start : start + METRICS_PER_BATCH]
            self._quietly("log_metrics", self.client.log_batch, run_id, metrics=chunk, synchronous=True)

    def log_params(self, params: Mapping[str, Any], *, parent: bool = False) -> None:
        """Flattened params; a key already logged with another value is skipped with a warning."""
        run_id = self._target(parent)
        self._quietly("log_params", lambda: self._log_params(run_id, params, self.client.get_run(run_id).data.params))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None, *, parent: bool = False) -> None:
        """A file or a whole folder, under ``artifact_path`` in the run's artifacts."""
        run_id = self._target(parent)
        log_fn = self.client.log_artifacts if Path(path).is_dir() else self.client.log_artifact
        self._quietly("log_artifact", log_fn, run_id, str(path), artifact_path)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str, *, parent: bool = False) -> None:
        """A JSON (or YAML, by extension) artifact."""
        self._quietly("log_dict", self.client.log_dict, self._target(parent), dict(data), artifact_file)

    def log_text(self, text: str, artifact_file: str, *, parent: bool = False) -> None:
        self._quietly("log_text", self.client.log_text, self._target(parent), text, artifact_file)

    def _target(self, parent: bool) -> str:
        if parent:
            if self.parent_run_id is None:
                raise RuntimeError("no parent run: call start_parent first")
            return self.parent_run_id
        return self.run_id

    def _log_params(self, run_id: str, params: Mapping[str, Any], existing: Mapping[str, str]) -> None:
        flat = flatten_params(params)
        changed = sorted(key for key, value in flat.items() if key in existing and existing[key] != value)
        if changed:
            log.warning("params %s already logged with other values on run %s; kept the old ones", changed, run_id)
        new = [Param(key, value) for key, value in flat.items() if key not in existing]
        for start in range(0, len(new), PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=new[start : start + PARAMS_PER_BATCH], synchronous=True)

    def _set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, str(value))

    @staticmethod
    def _quietly(action: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as error:  # a tracking hiccup must not kill training
            log.warning("MLflow %s failed, continuing without it: %s", action, error)


# --- the local UI ---------------------------------------------------------------------


def ui_argv(output_dir: str | Path, port: int = 5000, tracking_uri: str | None = None) -> list[str]:
    """The ``mlflow ui`` command line for a run folder's store, bound to localhost only."""
    uri = resolve_tracking_uri(tracking_uri, output_dir)
    return [sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", uri]


def ui_command(args: Any) -> int:
    """``secura ui``: serve the local store of ``args.output_dir`` on ``args.port`` until Ctrl-C.

    Reads ``args.output_dir``, ``args.port`` and optionally ``args.tracking_uri``.
    """
    tracking_uri = getattr(args, "tracking_uri", None)
    uri = resolve_tracking_uri(tracking_uri, args.output_dir)
    if is_remote(uri):
        print(f"runs are tracked on the server {uri}: open it in a browser")
        return 0
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        print(f"no MLflow store at {uri}: run a stream with --output-dir {args.output_dir} first", file=sys.stderr)
        return 1
    print(f"MLflow UI for {uri} on http://127.0.0.1:{args.port} (Ctrl-C to stop)")
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    try:
        return subprocess.call(ui_argv(args.output_dir, args.port, tracking_uri), env=env)
    except KeyboardInterrupt:
        return 0
