"""MLflow tracking: one parent run per (stream, method, seed), one nested run per stage.

All calls go through an explicit `MlflowClient` bound to one tracking URI, never
MLflow's process-global "active run", so a Ray worker, a test, or a second
tracker in the same process cannot log into the wrong run.

Failure policy: starting (bad URI, unreachable server, missing run to resume)
fails in seconds with the URI named; everything after goes through a durable
spool (pipelines/spool.py), so an unavailable store never blocks or kills
training and nothing logged is lost.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking.context.registry import resolve_tags

from pipelines.spool import MAX_PARAM_LENGTH

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
STAGE_TAG = "secura.stage"
TASK_TAG = "secura.task"
ATTEMPT_TAG = "secura.attempt"
DEFAULT_EXPERIMENT_ID = "0"
FAILURE_TAG = "secura.failure"
STATUSES = ("FINISHED", "FAILED", "KILLED")
REMOTE_SCHEMES = ("http://", "https://", "databricks")
RESERVE_BYTES = 64 << 10  # kept free in the run's folder for the spool's last events, should the disk fill up


class TrackingError(RuntimeError):
    """The tracking store cannot be used (bad URI, unreachable server, unknown run)."""


@dataclasses.dataclass
class StageDefaults:
    """What every stage run gets from its parent when `Tracker.start_stage` creates it, beside its own
    params and tags and its name ``stage N: <task>``: the parent's identity and its task's datasets."""

    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    inputs: dict[str, list[tuple[Any, str]]] = dataclasses.field(default_factory=dict)  # task: [(dataset, context)]


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


def local_store_folder(uri: str, output_dir: str | Path) -> Path:
    """The folder of a SQLite store's file (where its artifacts go beside it), else ``output_dir``."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).expanduser().resolve().parent
    return Path(output_dir).expanduser().resolve()


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
    # Ctrl-C, or a controller that stopped the run (Ray Tune stops a trial with sys.exit(0)).
    return "KILLED" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "FAILED"


def check_reachable(tracking_uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, before Ray starts, when the store cannot be used; the error names the URI.

    A server is asked once with a short timeout and no retries (MLflow's own
    client would retry for minutes); a local store is opened (SQLite creates
    its schema on first use).
    """
    from mlflow import MlflowClient

    hint = "start it, fix --tracking-uri, or pass --offline to keep the events locally and `secura sync` later"
    if is_remote(tracking_uri) and not tracking_uri.startswith("databricks"):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout).close()
        except urllib.error.HTTPError:
            pass  # it answered (an auth proxy may refuse /health); the client call below decides
        except (OSError, ValueError) as error:
            raise TrackingError(f"MLflow tracking server {tracking_uri} is not reachable ({error}): {hint}") from None
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(timeout, 10))))
    try:
        MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - any failure here means the store is unusable
        raise TrackingError(f"MLflow tracking URI {tracking_uri!r} is not usable ({error}): {hint}") from None


class Tracker:
    """A parent run with nested stage runs in one experiment, written through a durable spool.

    Every call appends an event to ``<output_dir>/tracking/spool`` and returns
    at once; a background `Drainer` sends the events to MLflow, retrying while
    the store is unavailable, so tracking never blocks or kills training and
    nothing is lost (``secura sync`` replays what is left). Runs are named by
    keys: the parent's is its MLflow run id (created at start, while the store
    is known to answer) or, with ``offline=True``, a local ``offline-…`` key;
    a stage's is ``<parent key>/stage-<N>``.

    ``with Tracker(uri, output_dir) as t:`` ends the parent run on exit (FAILED
    or KILLED if an exception escapes) and waits a bounded time for the spool
    to drain; ``with t.stage(i, task, params):`` does the same for a stage.
    """

    def __init__(
        self, tracking_uri: str | None = None, output_dir: str | Path = ".", *, artifact_root: str | None = None,
        offline: bool = False,
    ) -> None:
        from pipelines.spool import Drainer, SpoolWriter, tracking_folder

        self.output_dir = Path(output_dir).expanduser().resolve()
        self.tracking_uri = resolve_tracking_uri(tracking_uri, self.output_dir)
        self.artifact_root = artifact_root
        self.offline = offline
        if not offline:
            check_reachable(self.tracking_uri)
        self.folder = tracking_folder(self.output_dir)
        self.spool = SpoolWriter(self.folder, "driver")
        self.drainer = Drainer(self.folder, self.tracking_uri)
        if not offline:
            self.drainer.start()
        self._client = None
        self.experiment: str | None = None
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.stage_run_id: str | None = None
        self.stage_defaults = StageDefaults()

    def __enter__(self) -> "Tracker":
        from pipelines.files import writing

        with writing(self._reserve):
            self._reserve.parent.mkdir(parents=True, exist_ok=True)
            self._reserve.write_bytes(bytes(RESERVE_BYTES))
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: Any) -> None:
        if error is not None:
            self.drainer.stop_thread(10.0)  # on a full disk, the reserve's room is for the events that end the run
        self._reserve.unlink(missing_ok=True)
        try:
            if self.parent_run_id:
                self.end_parent(_status_of(error), reason=f"{type(error).__name__}: {error}" if error else None)
        finally:
            self.close()

    @property
    def _reserve(self) -> Path:
        return self.folder / f"reserve-{os.getpid()}"

    @property
    def client(self) -> MlflowClient:
        """A direct client, for queries (`find_runs`) and for what must exist at once (experiments)."""
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def run_id(self) -> str:
        """The key that ``log_*`` write to: the active stage, else the parent."""
        run_id = self.stage_run_id or self.parent_run_id
        if run_id is None:
            raise RuntimeError("no active run: call start_parent first")
        return run_id

    def mlflow_id(self, key: str) -> str | None:
        """The MLflow run id of a key, once the spool has created it there."""
        return key if not key.startswith("offline-") and "/" not in key else self.drainer.run_id(key)

    # --- experiments and runs ---------------------------------------------------------

    def _artifact_location(self, experiment: str) -> str | None:
        """Explicit for local stores, so artifacts never land in a worker's ./mlruns: beside a SQLite store's
        file (every run of a comparison or demo sharing it keeps its artifacts under its own run id there, not
        in whichever run folder came first), else under the output dir."""
        folder = re.sub(r"[^\w.-]", "_", experiment)
        if self.artifact_root:
            return f"{self.artifact_root.rstrip('/')}/{folder}"
        if is_remote(self.tracking_uri):
            return None
        return (local_store_folder(self.tracking_uri, self.output_dir) / "mlartifacts" / folder).as_uri()

    def ensure_experiment(self, name: str) -> str:
        """The id of experiment ``name``, created (or restored, if deleted) now."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                created = self.client.create_experiment(name, artifact_location=self._artifact_location(name))
            except MlflowException:
                experiment = self.client.get_experiment_by_name(name)  # created concurrently
                if experiment is None:
                    raise
            else:
                self._drop_empty_default()
                return created
        if experiment.lifecycle_stage == "deleted":
            self.client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    def set_experiment_tags(self, experiment: str, tags: Mapping[str, str]) -> None:
        """Experiment tags: its description (``mlflow.note.content``, the page's first lines in the UI) and
        saved views (`pipelines.ui_view`). A store that refuses them costs a warning: they are rebuilt
        from the runs every time."""
        try:
            experiment_id = self.ensure_experiment(experiment)
            for key, value in tags.items():
                self.client.set_experiment_tag(experiment_id, key, value)
        except MlflowException as error:
            log.warning("the tags of experiment %r were not set: %s", experiment, error)

    def _drop_empty_default(self) -> None:
        """A new SQLite store comes with an empty "Default" experiment that the UI would list first: deleted
        when it holds no run (a server's is left alone: it is not ours)."""
        if not self.tracking_uri.startswith("sqlite:"):
            return
        try:
            default = self.client.get_experiment(DEFAULT_EXPERIMENT_ID)
            if default.lifecycle_stage == "active" and not self.client.search_runs(
                    [DEFAULT_EXPERIMENT_ID], run_view_type=3, max_results=1):  # ViewType.ALL
                self.client.delete_experiment(DEFAULT_EXPERIMENT_ID)
        except MlflowException as error:
            log.debug("Default experiment left as it is: %s", error)

    def start_parent(
        self,
        experiment: str,
        run_name: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        *,
        run_id: str | None = None,
    ) -> str:
        """Create the parent run, or re-attach to ``run_id`` (a key from an earlier start) on resume."""
        if self.parent_run_id:
            raise RuntimeError(f"parent run {self.parent_run_id} is already active")
        self.experiment = experiment
        tags = {k: str(v) for k, v in (tags or {}).items()}
        if run_id and not self.offline:
            self.flush()  # what the earlier attempt left spooled (its end, its failure) lands before the re-attach
        if self.offline:
            key = run_id or f"offline-{uuid.uuid4().hex}"
            self.spool.append("run", key, experiment=experiment, name=run_name, tags=tags,
                              artifact_location=self._artifact_location(experiment))
        else:
            key = self._start_online(experiment, run_name, tags, run_id)
        self.parent_run_id = key
        self.spool.append("params", key, params=flatten_params(params or {}))
        if run_id:
            self.spool.append("tags", key, tags=tags)
        self.drainer.wake()
        return key

    def _start_online(self, experiment: str, run_name: str, tags: dict[str, str], run_id: str | None) -> str:
        try:
            self.experiment_id = self.ensure_experiment(experiment)
            if run_id and not run_id.startswith("offline-"):
                run = self.client.get_run(run_id)
                if run.info.experiment_id != self.experiment_id:
                    raise TrackingError(f"run {run_id} is not in experiment {experiment!r}")
                attempt = int(run.data.tags.get(ATTEMPT_TAG, "1")) + 1
                self.client.update_run(run_id, status="RUNNING")
                self.client.set_tag(run_id, ATTEMPT_TAG, str(attempt))
                if FAILURE_TAG in run.data.tags:  # the failed attempt's reason moves to its history
                    self.client.set_tag(run_id, f"{FAILURE_TAG}.attempt-{attempt - 1}", run.data.tags[FAILURE_TAG])
                    self.client.delete_tag(run_id, FAILURE_TAG)
                key = run_id
            elif run_id:  # an offline run resumed online: the spool creates it, then continues it
                key = run_id
            else:
                key = self.client.create_run(self.experiment_id, run_name=run_name, tags=resolve_tags(tags)).info.run_id
        except MlflowException as error:
            raise TrackingError(f"cannot start the parent run on {self.tracking_uri}: {error}") from error
        self.spool.append("run", key, run_id=None if key.startswith("offline-") else key, experiment=experiment,
                          name=run_name, tags=tags, artifact_location=self._artifact_location(experiment))
        return key

    def start_stage(self, stage_index: int, task_name: str, params: Mapping[str, Any] | None = None,
                    tags: Mapping[str, str] | None = None) -> str:
        """The nested run of stage ``stage_index`` (created, or re-attached on resume, by the spool)."""
        if self.parent_run_id is None:
            raise RuntimeError("start_parent before start_stage")
        if self.stage_run_id:
            raise RuntimeError(f"stage run {self.stage_run_id} is still active: end_stage first")
        key = stage_key(self.parent_run_id, stage_index)
        defaults = self.stage_defaults
        all_tags = {**defaults.tags, STAGE_TAG: str(stage_index), TASK_TAG: task_name,
                    **{k: str(v) for k, v in (tags or {}).items()}}
        self.spool.append("run", key, parent=self.parent_run_id, experiment=self.experiment,
                          name=f"stage {stage_index}: {task_name}", tags=all_tags,
                          artifact_location=self._artifact_location(self.experiment or ""))
        self.spool.append("params", key, params=flatten_params({**defaults.params, **(params or {})}))
        self.stage_run_id = key
        for dataset, context in defaults.inputs.get(task_name, ()):
            self.log_input(dataset, context)
        return key

    def end_stage(self, status: str = "FINISHED") -> None:
        """End the active stage run (no-op if none, so it is safe in ``finally``)."""
        if self.stage_run_id:
            self.spool.append("end", self.stage_run_id, status=_status(status))
            self.stage_run_id = None

    def end_parent(self, status: str = "FINISHED", reason: str | None = None) -> None:
        """End the active stage (same status) and the parent run; a failure's reason becomes a tag."""
        self.end_stage(status)
        if self.parent_run_id:
            if reason:
                self.spool.append("tags", self.parent_run_id, tags={FAILURE_TAG: reason[:5000]})
            self.spool.append("end", self.parent_run_id, status=_status(status))
            self.parent_run_id = None
        self.drainer.wake()

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

    def flush(self, timeout: float = 30.0) -> int:
        """Send what is spooled now (for readers that query MLflow next); returns the events left."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.drainer.drain()
                return 0
            except Exception as error:  # noqa: BLE001 - the spool keeps the events
                if time.monotonic() >= deadline:
                    log.warning("MLflow did not take the spooled events (%s); they stay in %s", error, self.folder)
                    return self.drainer.pending()
                time.sleep(1.0)

    def close(self, timeout: float = 30.0) -> int:
        """Send what is spooled (waiting at most ``timeout``); returns the events left for `secura sync`."""
        self.spool.close()
        left = self.drainer.stop(timeout) if not self.offline else self.drainer.pending()
        if left:
            why = "offline" if self.offline else f"MLflow unavailable: {self.drainer.last_error}"
            log.warning("%d tracking event(s) kept in %s (%s); send them with: secura sync %s",
                        left, self.folder, why, self.output_dir)
        return left

    # --- logging (spooled: never raises for the store's sake) ------------------------

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, *, parent: bool = False,
                    attempt: str | None = None) -> None:
        """Numeric values only (None is skipped); names are sanitised for MLflow."""
        values = {}
        for key, value in metrics.items():
            try:
                if value is not None:
                    values[sanitize_key(key)] = float(value)
            except (TypeError, ValueError):
                log.warning("metric %s=%r is not a number; not logged", key, value)
        if values:
            self.spool.append("metrics", self._target(parent), metrics=values, step=step or 0,
                              ts=int(time.time() * 1000), attempt=attempt)

    def log_params(self, params: Mapping[str, Any], *, parent: bool = False) -> None:
        """Flattened params; a key already logged with another value is kept with a warning."""
        self.spool.append("params", self._target(parent), params=flatten_params(params))

    def set_tags(self, tags: Mapping[str, Any], *, parent: bool = False) -> None:
        self.spool.append("tags", self._target(parent), tags={k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None, *, parent: bool = False) -> None:
        """A file or a whole folder, under ``artifact_path`` in the run's artifacts (copied into the spool now)."""
        try:
            staged = self.spool.stage_file(path)
        except OSError as error:
            log.warning("artifact %s not logged: %s", path, error)
            return
        self.spool.append("artifact", self._target(parent), path=staged, artifact_path=artifact_path)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str, *, parent: bool = False) -> None:
        """A JSON (or YAML, by extension) artifact."""
        import json

        import yaml

        is_yaml = artifact_file.endswith((".yaml", ".yml"))
        text = yaml.safe_dump(dict(data), sort_keys=False) if is_yaml else json.dumps(dict(data), indent=2)
        self.log_text(text, artifact_file, parent=parent)

    def log_text(self, text: str, artifact_file: str, *, parent: bool = False) -> None:
        folder, _, name = artifact_file.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(text)
            self.log_artifact(path, folder or None, parent=parent)

    def log_table(self, data: Mapping[str, Sequence[Any]], artifact_file: str, *, parent: bool = False) -> None:
        """Columns of equal length as a table the MLflow UI shows (``MlflowClient.log_table``'s layout,
        a ``.json`` file); logging the same file again replaces it."""
        self.spool.append("table", self._target(parent), data={k: list(v) for k, v in data.items()},
                          artifact_file=artifact_file)

    def log_input(self, dataset: Any, context: str | None = None, tags: Mapping[str, str] | None = None, *,
                  parent: bool = False) -> None:
        """A dataset the run used (``mlflow.log_input``): an `mlflow.data` dataset and its context (train, test)."""
        input_tags = {**({"mlflow.data.context": context} if context else {}), **(tags or {})}
        self.spool.append("inputs", self._target(parent), datasets=[{"dataset": dataset.to_dict(), "tags": input_tags}])

    def log_model(self, folder: str | Path, name: str, flavor: str, conf: Mapping[str, Any], *,
                  params: Mapping[str, Any] | None = None, step: int = 0, parent: bool = False) -> None:
        """A folder as an MLflow model of the run: a LoggedModel ``name`` (the run's Models tab) holding the
        folder's files and an ``MLmodel`` file with flavour ``flavor`` configured by ``conf`` (JSON values).

        The folder is copied into the spool now; the model's id exists once the spool has created it.
        """
        try:
            staged = self.spool.stage_file(folder)
        except OSError as error:
            log.warning("model %s not logged: %s", folder, error)
            return
        self.spool.append("model", self._target(parent), path=staged, name=name, flavor=flavor, conf=dict(conf),
                          params=flatten_params(params or {}), step=step)

    def _target(self, parent: bool) -> str:
        if parent:
            if self.parent_run_id is None:
                raise RuntimeError("no parent run: call start_parent first")
            return self.parent_run_id
        return self.run_id


def stage_key(parent_key: str, stage_index: int) -> str:
    return f"{parent_key}/stage-{stage_index}"


def sync_command(args: Any) -> int:
    """``secura sync OUTPUT_DIR``: send a run folder's spooled tracking events to MLflow."""
    from pipelines.spool import Drainer, TrackingUnavailable, tracking_folder

    folder = tracking_folder(args.output_dir)
    if not (folder / "spool").is_dir():
        raise FileNotFoundError(f"{args.output_dir}: no tracking spool (tracking/spool) in this folder")
    uri = resolve_tracking_uri(args.tracking_uri, args.output_dir)
    check_reachable(uri)
    drainer = Drainer(folder, uri)
    try:
        sent = drainer.drain()
    except TrackingUnavailable as error:
        raise TrackingError(f"MLflow at {uri} failed while syncing ({error}); run `secura sync` again") from None
    print(f"sent {sent} tracking event(s) from {folder} to {uri}; {drainer.pending()} left")
    return 0


# --- the local UI ---------------------------------------------------------------------


def store_line(tracking_uri: str, output_dir: str | Path, *, offline: bool = False) -> str:
    """The console's one line on where a run's tracking went, with a command that opens it."""
    if offline:
        return (f"MLflow: offline, the events are kept in {tracking_folder_of(output_dir)}; send them with "
                f"`secura sync {output_dir}`")
    if is_remote(tracking_uri):
        return f"MLflow: {tracking_uri} (open it in a browser)"
    if tracking_uri == resolve_tracking_uri(None, local_store_folder(tracking_uri, output_dir)):
        return f"MLflow: {tracking_uri} (UI: secura ui --output-dir {local_store_folder(tracking_uri, output_dir)})"
    return f"MLflow: {tracking_uri} (UI: secura ui --tracking-uri {tracking_uri})"


def tracking_folder_of(output_dir: str | Path) -> Path:
    from pipelines.spool import tracking_folder

    return tracking_folder(Path(output_dir).expanduser().resolve())


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
