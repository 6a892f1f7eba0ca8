"""A durable tracking spool: every MLflow call of a run is first an event in a local file.

Writers (the driver, the Ray Train controller's callback, an in-process stage)
append JSON lines to their own file under ``<output_dir>/tracking/spool/``;
that costs microseconds and never blocks training. A `Drainer` thread
replays the events into MLflow in order, records how far it got
(``tracking/drained.json``), and when MLflow is unavailable it waits and
retries while the spool keeps everything. ``secura sync OUTPUT_DIR`` (or the
next run or resume in that folder) replays what is left.

Replays are idempotent: a run is created once per key (``runs`` in the state),
and a metric is logged at most once per (run, key, step), so a resumed stage
that recomputes a step never logs it twice. Metrics carry the attempt that
produced them: once a later attempt of a stage has started from step ``s``,
what an earlier attempt (an orphaned or restarted worker) logged after ``s``
is discarded.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipelines.files import write_text_atomic, writing

log = logging.getLogger(__name__)

SPOOL = "spool"
STATE = "drained.json"
ARTIFACTS = "artifacts"
METRICS_PER_BATCH = 1000
PARAMS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000  # MLflow 3's limit on a param value


def tracking_folder(output_dir: str | Path) -> Path:
    return Path(output_dir).expanduser().resolve() / "tracking"


class SpoolWriter:
    """Appends events to one file of the spool; each event is one ``write`` of one line (O_APPEND)."""

    def __init__(self, folder: str | Path, writer: str) -> None:
        self.folder = Path(folder)
        self.writer = writer
        self.path: Path | None = None  # chosen by the first append, in the process that writes
        self._fd: int | None = None
        self._lock = threading.Lock()

    def append(self, op: str, key: str, **fields: Any) -> None:
        line = (json.dumps({"op": op, "key": key, **fields}, default=str) + "\n").encode()
        with self._lock:
            if self._fd is None:
                (self.folder / SPOOL).mkdir(parents=True, exist_ok=True)
                # one file per writing process (a restarted worker gets its own), sortable by creation so
                # the drainer replays older writers first
                self.path = self.folder / SPOOL / f"{time.time_ns():020d}-{self.writer}-{os.getpid()}.jsonl"
                with writing(self.path):
                    self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            with writing(self.path):
                end = os.lseek(self._fd, 0, os.SEEK_END)
                try:
                    while line:  # a nearly full disk may take part of a line
                        line = line[os.write(self._fd, line):]
                except OSError:
                    os.ftruncate(self._fd, end)  # an event is whole or absent, never a torn line
                    raise

    def stage_file(self, source: str | Path, name: str | None = None) -> str:
        """A copy of ``source`` (file or folder) inside the spool, so later changes to it do not matter."""
        source = Path(source)
        target = self.folder / ARTIFACTS / uuid.uuid4().hex / (name or source.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        if source.is_dir():
            shutil.copytree(source, tmp)
        else:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
        return str(target)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None

    def __getstate__(self) -> dict[str, Any]:  # travels to Ray Train workers without its file
        return {"folder": self.folder, "writer": self.writer}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.folder, self.writer, self.path = state["folder"], state["writer"], None
        self._fd, self._lock = None, threading.Lock()


class TrackingUnavailable(RuntimeError):
    """MLflow refused or did not answer; the events stay in the spool."""


def _metric_id(name: str, step: int) -> str:
    return f"{name}@{step}"


def new_attempt_id() -> str:
    """Time-ordered, so a later attempt compares greater."""
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:6]}"


class Drainer:
    """Replays a spool folder into MLflow; `drain()` once, or `start()` a background thread."""

    def __init__(self, folder: str | Path, tracking_uri: str) -> None:
        self.folder = Path(folder)
        self.tracking_uri = tracking_uri
        self._client = None
        self._state = self._load_state()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self.last_error: str | None = None
        self._warned = False
        self._seen: dict[str, set[str]] = {}  # the logged (metric, step) ids of each run, as a set

    # --- state -------------------------------------------------------------------------

    def _load_state(self) -> dict[str, Any]:
        path = self.folder / STATE
        state = json.loads(path.read_text()) if path.is_file() else {}
        state.setdefault("offsets", {})
        state.setdefault("runs", {})
        state.setdefault("logged", {})
        state.setdefault("attempts", {})
        state.setdefault("params", {})
        state.setdefault("models", {})
        return state

    def _save_state(self) -> None:
        write_text_atomic(self.folder / STATE, json.dumps(self._state, sort_keys=True))

    def run_id(self, key: str) -> str | None:
        """The MLflow id of a spooled run, once it exists there."""
        return self._state["runs"].get(key)

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.tracking_uri)
        return self._client

    # --- reading -----------------------------------------------------------------------

    def _files(self) -> list[Path]:
        folder = self.folder / SPOOL
        return sorted(folder.glob("*.jsonl")) if folder.is_dir() else []

    def _new_lines(self, path: Path) -> list[tuple[int, dict[str, Any]]]:
        """Complete lines after the saved offset, with the offset just past each (a torn last line waits)."""
        offset = self._state["offsets"].get(path.name, 0)
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
        lines = []
        for raw in data.split(b"\n")[:-1]:
            offset += len(raw) + 1
            if raw.strip():
                try:
                    lines.append((offset, json.loads(raw)))
                except ValueError:
                    log.warning("tracking spool %s: an unreadable line at byte %d was skipped", path, offset)
        return lines

    def pending(self) -> int:
        """Events not yet in MLflow."""
        return sum(len(self._new_lines(p)) for p in self._files())

    # --- replay ------------------------------------------------------------------------

    def drain(self) -> int:
        """Replay every complete event; returns how many were applied. Raises `TrackingUnavailable`."""
        with self._lock:
            return self._drain()

    def _drain(self) -> int:
        applied = 0
        pending = {p: self._new_lines(p) for p in self._files()}
        for lines in pending.values():  # later attempts supersede earlier ones before anything is logged
            for _, event in lines:
                if event["op"] == "attempt":  # an attempt's earliest start (a parent sees one per stage)
                    chain = self._state["attempts"].setdefault(event["key"], {})
                    chain[event["attempt"]] = min(chain.get(event["attempt"], int(event["from_step"])),
                                                  int(event["from_step"]))
        progress = True
        while progress:
            progress = False
            for path, lines in pending.items():
                while lines:
                    offset, event = lines[0]
                    if not self._ready(event):
                        break  # its run is declared in another writer's file: come back after that one
                    batch = self._metrics_run(lines) if event["op"] == "metrics" else [event]
                    try:
                        if event["op"] == "metrics":
                            self._log_metrics(event["key"], batch)
                        else:
                            self._apply(event)
                    except Exception as error:  # noqa: BLE001 - any store error leaves the event spooled
                        self._save_state()
                        first_line = (str(error).splitlines() or [""])[0]
                        raise TrackingUnavailable(f"{type(error).__name__}: {first_line}") from error
                    offset, _ = lines[len(batch) - 1]
                    del lines[:len(batch)]
                    self._state["offsets"][path.name] = offset
                    applied += len(batch)
                    progress = True
        self._save_state()
        return applied

    def _ready(self, event: dict[str, Any]) -> bool:
        if event["op"] == "run":
            parent = event.get("parent")
            return parent is None or parent in self._state["runs"]
        return event["op"] == "attempt" or event["key"] in self._state["runs"]

    @staticmethod
    def _metrics_run(lines: list[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
        """The consecutive metrics events of one run at the head of ``lines``: one store call for all of them."""
        key = lines[0][1]["key"]
        batch = []
        for _, event in lines:
            if event["op"] != "metrics" or event["key"] != key:
                break
            batch.append(event)
        return batch

    def _apply(self, event: dict[str, Any]) -> None:
        op, key = event["op"], event["key"]
        if op == "run":
            self._create_run(event)
        elif op == "params":
            self._log_params(key, event["params"])
        elif op == "tags":
            for name, value in event["tags"].items():
                self.client.set_tag(self._state["runs"][key], name, str(value))
        elif op == "artifact":
            self._log_artifact(key, event)
        elif op == "table":
            self._log_table(key, event)
        elif op == "inputs":
            self._log_inputs(key, event["datasets"])
        elif op == "model":
            self._log_model(key, event)
        elif op == "end":
            self.client.set_terminated(self._state["runs"][key], event["status"])
        elif op != "attempt":
            log.warning("tracking spool: unknown event %r skipped", op)

    def _create_run(self, event: dict[str, Any]) -> None:
        from mlflow.tracking.context.registry import resolve_tags

        key = event["key"]
        runs = self._state["runs"]
        if key in runs:
            self.client.update_run(runs[key], status="RUNNING")
            return
        if event.get("run_id"):  # created by the driver while MLflow was reachable
            runs[key] = event["run_id"]
            return
        experiment_id = self._experiment(event["experiment"], event.get("artifact_location"))
        tags = dict(event.get("tags") or {})
        if event.get("parent"):
            tags["mlflow.parentRunId"] = runs[event["parent"]]
        existing = self.client.search_runs([experiment_id], filter_string=f"tags.`secura.key` = '{key}'",
                                           max_results=1)
        if existing:  # created by an earlier replay whose state was lost
            runs[key] = existing[0].info.run_id
            return
        run = self.client.create_run(experiment_id, run_name=event.get("name"),
                                     tags=resolve_tags({**tags, "secura.key": key}))
        runs[key] = run.info.run_id

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _log_metrics(self, key: str, events: list[dict[str, Any]]) -> None:
        """Consecutive metrics events of one run, in batches of up to METRICS_PER_BATCH metrics.

        An event of a superseded attempt (a later attempt restarted from an earlier step and
        recomputed it) is dropped, and each (metric, step) is logged once.
        """
        from mlflow.entities import Metric

        chain = self._state["attempts"].get(key, {})
        logged = self._state["logged"].setdefault(key, [])
        seen = self._seen.setdefault(key, set(logged))
        metrics = []
        for event in events:
            step, attempt = int(event.get("step") or 0), event.get("attempt")
            if attempt is not None and any(other > attempt and step > start for other, start in chain.items()):
                continue
            for name, value in event["metrics"].items():
                if _metric_id(name, step) not in seen:
                    seen.add(_metric_id(name, step))
                    metrics.append(Metric(name, float(value), int(event["ts"]), step))
        for start in range(0, len(metrics), METRICS_PER_BATCH):
            chunk = metrics[start:start + METRICS_PER_BATCH]
            try:
                self.client.log_batch(self._state["runs"][key], metrics=chunk, synchronous=True)
            except Exception:
                self._seen[key] = set(logged)  # the unsent rest is sent again by the next drain
                raise
            logged.extend(_metric_id(m.key, m.step) for m in chunk)

    def _log_params(self, key: str, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        done = self._state["params"].setdefault(key, {})
        new = {k: str(v)[:MAX_PARAM_LENGTH] for k, v in params.items() if k not in done}
        changed = sorted(k for k, v in params.items() if k in done and done[k] != str(v)[:MAX_PARAM_LENGTH])
        if changed:
            log.warning("params %s already logged with other values on run %s; kept the old ones", changed, key)
        items = list(new.items())
        for start in range(0, len(items), PARAMS_PER_BATCH):
            batch = [Param(k, v) for k, v in items[start:start + PARAMS_PER_BATCH]]
            self.client.log_batch(self._state["runs"][key], params=batch, synchronous=True)
        done.update(new)

    def _log_artifact(self, key: str, event: dict[str, Any]) -> None:
        path = Path(event["path"])
        run_id = self._state["runs"][key]
        if not path.exists():
            log.warning("tracking spool: artifact %s is gone; not logged", path)
            return
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), event.get("artifact_path"))
        else:
            self.client.log_artifact(run_id, str(path), event.get("artifact_path"))

    def _log_table(self, key: str, event: dict[str, Any]) -> None:
        """``MlflowClient.log_table``'s layout (a pandas "split" JSON, listed in the run's
        ``mlflow.loggedArtifacts`` tag), but replacing the file: the client's own call appends to an
        existing one, so a replayed event would double its rows."""
        import pandas as pd
        from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

        run_id = self._state["runs"][key]
        folder, _, name = event["artifact_file"].rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            pd.DataFrame(event["data"]).to_json(path, orient="split", index=False)
            self.client.log_artifact(run_id, str(path), folder or None)
        listed = json.loads(self.client.get_run(run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
        entry = {"path": event["artifact_file"], "type": "table"}
        if entry not in listed:
            self.client.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps([*listed, entry]))

    def _log_inputs(self, key: str, datasets: list[dict[str, Any]]) -> None:
        """MLflow keeps one dataset per (name, digest) and one input per (dataset, run): replays add nothing."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [DatasetInput(Dataset(**item["dataset"]), [InputTag(k, str(v)) for k, v in item["tags"].items()])
                  for item in datasets]
        self.client.log_inputs(self._state["runs"][key], datasets=inputs)

    def _log_model(self, key: str, event: dict[str, Any]) -> None:
        """A LoggedModel of the run (created once per run and name), its ``MLmodel`` written now that its id
        is known, its files, READY, and the run's output at ``step``."""
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus
        from mlflow.models import Model

        folder = Path(event["path"])
        if not folder.is_dir():
            log.warning("tracking spool: model folder %s is gone; not logged", folder)
            return
        run_id = self._state["runs"][key]
        ref = f"{key}#{event['name']}"
        model = self._logged_model(run_id, ref, event)
        if model.status == LoggedModelStatus.READY:
            return
        mlmodel = Model(artifact_path=model.artifact_location, run_id=run_id, model_id=model.model_id,
                        model_uuid=model.model_id)
        mlmodel.add_flavor(event["flavor"], **event["conf"])
        mlmodel.save(str(folder / "MLmodel"))
        self.client.log_model_artifacts(model.model_id, str(folder))
        self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=int(event.get("step") or 0))])
        self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)

    def _logged_model(self, run_id: str, ref: str, event: dict[str, Any]):
        models = self._state["models"]
        if ref in models:
            return self.client.get_logged_model(models[ref])
        experiment_id = self.client.get_run(run_id).info.experiment_id
        found = self.client.search_logged_models([experiment_id], filter_string=f"tags.`secura.key` = '{ref}'",
                                                 max_results=1)  # created by a replay whose state was lost
        model = found[0] if found else self.client.create_logged_model(
            experiment_id, name=event["name"], source_run_id=run_id, params=event.get("params") or None,
            tags={"secura.key": ref})
        models[ref] = model.model_id
        return model

    # --- the background thread ---------------------------------------------------------

    def start(self, interval: float = 1.0) -> "Drainer":
        self._thread = threading.Thread(target=self._loop, args=(interval,), name="secura-tracking", daemon=True)
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def _loop(self, interval: float) -> None:
        delay = interval
        while not self._stop.is_set():
            try:
                self.drain()
                self.last_error, delay = None, interval
            except TrackingUnavailable as error:
                if not self._warned:
                    log.warning("MLflow at %s is unavailable (%s); events are kept in %s and sent when it "
                                "answers", self.tracking_uri, error, self.folder / SPOOL)
                    self._warned = True
                self.last_error, delay = str(error), min(delay * 2, 30.0)
            except OSError as error:  # this folder cannot be written (a full disk): retrying would not help
                self.last_error = str(error)
                log.warning("tracking stopped: %s; the events stay in %s (`secura sync` sends them once there "
                            "is room)", error, self.folder / SPOOL)
                return
            self._wake.wait(delay)
            self._wake.clear()

    def stop_thread(self, timeout: float = 30.0) -> None:
        """Stop the background thread (after the replay it is in, within ``timeout``)."""
        if self._thread is not None:
            self._stop.set()
            self._wake.set()
            self._thread.join(timeout)
            self._thread = None

    def stop(self, timeout: float = 30.0) -> int:
        """Stop the thread after a last replay within ``timeout``; returns the events still spooled."""
        self.stop_thread(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.drain()
                break
            except TrackingUnavailable as error:
                self.last_error = str(error)
                time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
            except OSError as error:  # a full disk: the spool keeps what is left
                self.last_error = str(error)
                break
        return self.pending()
