"""The continual-learning driver: prepare shards, then stage after stage train
on Ray Train, evaluate every task and probe, and record it all in MLflow.

A journal (``<output_dir>/journal.json``, rewritten atomically after every
stage) makes ``secura run --resume`` continue at the first unfinished stage,
re-attached to the same MLflow parent run, without repeating finished stages.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipelines.config import RunConfig, load_run_config
from pipelines.console import is_verbose
from pipelines.spool import new_attempt_id
from pipelines.files import write_text_atomic

JOURNAL = "journal.json"


def log(message: str) -> None:
    print(f"[secura] {message}", file=sys.stderr, flush=True)


# --- journal -------------------------------------------------------------------------


@dataclass
class Journal:
    """What a crashed driver needs to continue: the parent run and finished stages."""

    config_hash: str
    parent_run_id: str | None = None
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # "0".."n" -> record
    finished: bool = False

    @classmethod
    def load(cls, path: Path) -> "Journal | None":
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))

    def save(self, path: Path) -> None:
        write_text_atomic(path, json.dumps(self.__dict__, indent=2, sort_keys=True))

    def done(self, stage: int) -> bool:
        return self.stages.get(str(stage), {}).get("status") == "done"


def _all_metrics(scores: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Every metric of every evaluation set (generative accuracy beside the log-likelihood score), as JSON."""
    return {name: {metric: float(value) for metric, value in metrics.items()} for name, metrics in scores.items()}


def config_fingerprint(config: RunConfig) -> str:
    """Resuming under a changed config would mix two experiments: refuse it."""
    data = config.to_dict()
    data.pop("tracking_uri", None)
    data["train"].pop("torch_threads", None)  # placement, not the experiment: `compare --parallel` sets it
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# --- Ray -----------------------------------------------------------------------------


def init_ray() -> None:
    """Attach to the cluster of a `ray job submit` (RAY_ADDRESS), else start a local Ray.

    Locally the CPU count is declared larger than the cores so that train workers
    never starve Ray Data of CPU (the 2-core deadlock in docs/ray-mlflow-notes).
    """
    import ray

    from pipelines.console import configure, ray_init_kwargs
    from pipelines.signals import stop_on_sigterm

    if ray.is_initialized():
        return
    configure()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**ray_init_kwargs())
    else:
        ray.init(address="local", num_cpus=max(4, (os.cpu_count() or 2) * 2), include_dashboard=False,
                 **ray_init_kwargs())
    stop_on_sigterm()  # ray.init replaced the handler with one that exits from wherever the driver is


def scaling_config(config: RunConfig):
    from ray.train import ScalingConfig

    s = config.scaling
    return ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=dict(s.resources_per_worker))


# --- evaluation ----------------------------------------------------------------------


def _subset(rows: list[dict], limit: int | None, seed: int) -> list[dict]:
    if limit is None or len(rows) <= limit:
        return rows
    picked = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in picked]


def load_eval_sets(config: RunConfig, stream, manifest) -> dict[str, tuple[str, list[dict]]]:
    """Every trained task's test split and every probe, as fixed seeded subsets."""
    from pipelines.preprocess import read_eval_rows

    sets: dict[str, tuple[str, list[dict]]] = {}
    for task in select_tasks(stream, config.tasks):
        rows = read_eval_rows(manifest.task(task.name).split("test").path)
        sets[task.name] = (task.type, _subset(rows, config.eval.test_limit, config.eval.seed))
    for probe in stream.probe:
        rows = read_eval_rows(manifest.task(probe.name).split("test").path)
        sets[probe.name] = (probe.type, _subset(rows, config.eval.probe_limit, config.eval.seed))
    return sets


class Evaluator:
    """Loads the base model once in the driver and scores it with any stage's adapter."""

    def __init__(self, config: RunConfig, eval_sets: dict[str, tuple[str, list[dict]]]) -> None:
        from pipelines.models import load_tokenizer

        self.config = config
        self.eval_sets = eval_sets
        self.tokenizer = load_tokenizer(config.model_config_obj())
        self.last_drift: dict[str, float] = {}

    def _device(self):
        import torch

        return torch.device("cuda" if self.config.scaling.use_gpu and torch.cuda.is_available() else "cpu")

    def score(self, state_dir: Path | None) -> dict[str, dict[str, float]]:
        import torch

        from pipelines.evaluate import evaluate_tasks
        from pipelines.train import BaseModels, load_stage_state
        from secura.methods import build_method

        if self.config.eval.num_replicas > 0:
            return self._score_distributed(state_dir)
        if self.config.train.torch_threads:  # the in-process share of the machine, as the trainer uses
            torch.set_num_threads(self.config.train.torch_threads)
        model = BaseModels.fresh(self.config)  # a copy: wrapping and M1 loads change the model in place
        if state_dir is not None:
            method = build_method(self.config.method_config_obj())
            model = method.wrap(model)
            load_stage_state(state_dir, method, model, rank=0)
        model.to(self._device()).eval()
        self.last_drift = _drift_summary(model) if state_dir is not None else {}
        started = time.time()
        scores = evaluate_tasks(
            model, self.tokenizer, self.eval_sets, batch_size=self.config.eval.batch_size,
            device=self._device(), max_new_tokens=self.config.eval.max_new_tokens,
            progress=log if is_verbose() else False, generative=self.config.eval.generative,
            generative_max_new_tokens=self.config.eval.generative_max_new_tokens,
            precision=self.config.train.precision,
        )
        items = sum(len(rows) for _, rows in self.eval_sets.values())
        log(f"evaluated {len(self.eval_sets)} sets ({items} items) in {time.time() - started:.1f}s")
        return scores

    def _score_distributed(self, state_dir: Path | None) -> dict[str, dict[str, float]]:
        """Ray Data batch inference: one model replica per actor, so evaluation scales with the cluster."""
        from pipelines.distributed_eval import StageModelLoader, evaluate_tasks_distributed

        return evaluate_tasks_distributed(
            StageModelLoader(self.config.to_dict(), str(state_dir) if state_dir else None), self.eval_sets,
            num_replicas=self.config.eval.num_replicas, use_gpu=self.config.scaling.use_gpu,
            batch_size=self.config.eval.batch_size, tokenizer=self.tokenizer,
            max_new_tokens=self.config.eval.max_new_tokens, generative=self.config.eval.generative,
            generative_max_new_tokens=self.config.eval.generative_max_new_tokens,
            precision=self.config.train.precision,
        )


def base_model_scores(config: RunConfig, evaluator: Evaluator, manifest_path: str) -> dict[str, dict[str, float]]:
    """Stage 0: the base model's scores, computed once per model and evaluation set.

    Every run of a comparison or sweep scores the same base model on the same
    items (about a quarter of a short run's evaluation time), so the scores are
    kept next to the shards they were computed from, keyed by everything they
    depend on. Remote shard stores are not cached into.
    """
    from pipelines.precision import resolve_precision

    key_data = {"model": config.model, "eval": config.eval.model_dump(), "eval_sets": evaluator.eval_sets,
                "use_gpu": config.scaling.use_gpu,
                "precision": resolve_precision(config.train.precision, evaluator._device()),
                "seed": config.seed if config.model_config_obj().source == "tiny" else None}
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True, default=str).encode()).hexdigest()[:20]
    cache = None if "://" in manifest_path else Path(manifest_path).parent / "base-scores" / f"{key}.json"
    if cache is not None and cache.is_file():
        log(f"stage 0: base model scores from {cache}")
        return json.loads(cache.read_text())
    log("stage 0: evaluating the base model")
    scores = evaluator.score(None)
    if cache is not None:
        write_text_atomic(cache, json.dumps(scores, sort_keys=True))
    return scores


def _drift_summary(model) -> dict[str, float]:
    """Per-layer ΔW spectral/Frobenius norms relative to the base weight, mean and max over layers
    (the paper's drift analysis). Adapter-held updates only: under M1 the merged part lives in the
    base weight and is not counted."""
    from pipelines.analysis import adapter_drift, summarize_drift

    return summarize_drift(adapter_drift(model))


# --- training: the stream's stages, in a worker group or in this process ----------------


class StageFailed(RuntimeError):
    """A stage ended with an error that a retry cannot fix (reported by the trainer as ``fatal``)."""


class StreamTraining:
    """The stream's remaining stages, trained on demand; `wait_for(stage)` returns its final state's folder.

    Ray Train: one `TorchTrainer` (one worker group) trains every remaining
    stage in a background thread while the driver evaluates finished ones. It
    is launched as soon as Ray is up, so its start-up (worker processes,
    imports, the base model) overlaps the driver's own (shards, MLflow, the
    base model's scores); `plan()` then tells it which stages to train.
    Local: the same loop in this process, one stage per `wait_for`.
    Either way the stage's final checkpoint is copied to
    ``<output_dir>/stages/NN-task`` for evaluation and the journal.
    """

    def __init__(self, config: RunConfig, output_dir: Path, progress) -> None:
        self.config = config
        self.output_dir = output_dir
        self.progress = progress
        self.local = config.scaling.backend == "local"
        self.plan_uri = _join(config.storage_path or str(output_dir), f"plans/{new_attempt_id()}.json")
        self.store = None
        self.sink = None
        self._local_stream = None
        self._thread = None
        self._error: BaseException | None = None
        if not self.local:
            self._launch()

    def plan(self, stages: list, checkpoint_root: str, sink) -> None:
        """The stages to train, where their checkpoints go and where reports go (unblocks the workers)."""
        from pipelines.checkpoints import CheckpointStore
        from pipelines.train import stage_dicts, write_plan

        self.store = CheckpointStore(checkpoint_root)
        self.store.latest()  # verified here, so a rejected checkpoint is warned about on this console
        self.sink = sink
        self.stages = stages
        self.loop_plan = {"stages": stage_dicts(stages), "checkpoint_root": checkpoint_root, "sink": sink.to_dict()}
        if not self.local:
            sink.progress_path.unlink(missing_ok=True)  # what an earlier attempt reported is not this one's
            write_plan(self.plan_uri, self.loop_plan)

    def cancel(self) -> None:
        """Stop a launched worker group at its next report (the driver failed, or finished early)."""
        from pipelines.train import write_plan

        if self._thread is not None and self._thread.is_alive():
            write_plan(f"{self.plan_uri}.cancel", {"cancel": True})
            if self.store is None:
                write_plan(self.plan_uri, {"cancel": True})

    def wait_for(self, stage) -> Path:
        target = self.output_dir / "stages" / f"{stage.index:02d}-{stage.task}"
        ref = self.store.final(stage.index)
        if ref is None:
            ref = self._train_local(stage) if self.local else self._wait_ray(stage)
        return self.store.download(ref, target)

    # --- local ---------------------------------------------------------------------------

    def _train_local(self, stage):
        from pipelines.train import LocalContext, train_stream

        if self._local_stream is None:
            device = "cuda" if self.config.scaling.use_gpu else "cpu"
            self._ctx = LocalContext(device=device, on_report=self._on_local_report)
            self._local_stream = train_stream({"run": self.config.to_dict(), **self.loop_plan}, self._ctx)
        for ref in self._local_stream:
            if ref.stage == stage.index:
                return ref
        self._raise_reported(self._ctx.last_metrics, stage)

    def _on_local_report(self, metrics: dict[str, Any]) -> None:
        self.sink(metrics)
        self.progress.update(metrics)

    # --- Ray Train -----------------------------------------------------------------------

    def _launch(self) -> None:
        import threading

        from ray.train import FailureConfig, RunConfig as TrainRunConfig
        from ray.train.torch import TorchTrainer

        from pipelines.train import train_loop_per_worker

        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"run": self.config.to_dict(), "plan": self.plan_uri},
            scaling_config=scaling_config(self.config),
            run_config=TrainRunConfig(
                # checkpoints live in the run's own store (pipelines/checkpoints.py), so Ray's run state is
                # per attempt: a new driver never restores another attempt's worker state
                name=f"stream-{Path(self.plan_uri).stem}",
                storage_path=_join(self.config.storage_path or str(self.output_dir), "ray"),
                failure_config=FailureConfig(max_failures=self.config.scaling.max_failures),
            ),
        )

        def fit() -> None:
            try:
                trainer.fit()
            except BaseException as error:  # noqa: BLE001 - re-raised in the driver's thread
                self._error = error

        self._thread = threading.Thread(target=fit, name="secura-train", daemon=True)
        self._thread.start()

    def _wait_ray(self, stage):
        while True:
            ref = self.store.final(stage.index)
            if ref is not None:
                return ref
            self._show_progress()
            if not self._thread.is_alive():
                ref = self.store.final(stage.index)
                if ref is not None:
                    return ref
                if self._error is not None:
                    raise worker_failure(self._error)
                self._raise_reported(self._last_report(), stage)
            self._thread.join(0.5)

    def _last_report(self) -> dict[str, Any]:
        try:
            return json.loads(self.sink.progress_path.read_text())
        except (OSError, ValueError):
            return {}

    def _show_progress(self) -> None:
        self.progress.update(self._last_report())

    def _raise_reported(self, metrics: dict[str, Any], stage) -> None:
        from pipelines.train import NonFiniteLossError

        if metrics.get("nonfinite"):
            raise NonFiniteLossError(
                f"stage {stage.index} ({stage.task}): loss became {metrics.get('loss')} at step {metrics.get('step')}; "
                f"lower train.lr or enable train.max_grad_norm")
        if metrics.get("fatal"):
            raise StageFailed(f"stage {stage.index} ({stage.task}): {metrics['fatal']}")
        raise StageFailed(f"stage {stage.index} ({stage.task}) finished without its final checkpoint")

    def close(self) -> None:
        """Wait for the worker group to end (it has, once every stage was waited for)."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise worker_failure(self._error)


def worker_failure(error: BaseException) -> BaseException:
    """Ray Train's `WorkerGroupError` reads "Training failed due to worker errors:" and a traceback per worker:
    the first failing worker's exception, type and message, makes the one-line error."""
    failures = getattr(error, "worker_failures", None)
    if not failures:
        return error
    rank = min(failures)
    cause = failures[rank]
    cause = getattr(cause, "_base_exc", None) or cause  # Ray's UserExceptionWithTraceback wraps the worker's own
    message = next((line for line in str(cause).splitlines() if line.strip()), "")
    failed = StageFailed(f"worker {rank} failed: {type(cause).__name__}: {message}" if message
                         else f"worker {rank} failed: {type(cause).__name__}")
    failed.__cause__ = error
    return failed


def stage_spec(entry, index: int):
    """What the trainer needs of a task's manifest entry."""
    from pipelines.train import StageSpec

    validation = entry.splits.get("validation")
    return StageSpec(index=index, task=entry.name, train_path=entry.split("train").path,
                     train_rows=entry.split("train").rows, task_type=entry.type,
                     validation_path=validation.path if validation else None)


def checkpoint_root(config: RunConfig, output_dir: Path, run_key: str) -> str:
    """The run's own checkpoint folder: a new run never sees another run's state."""
    base = config.storage_path or str(output_dir)
    return _join(base, f"checkpoints/{run_key.replace('/', '_')}")


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


# --- the run -------------------------------------------------------------------------


@dataclass
class RunResult:
    parent_run_id: str
    matrix: Any
    summary: dict[str, float]
    output_dir: Path


StageCallback = Callable[[int, dict[str, float]], None]


def _open_journal(output_dir: Path, fingerprint: str, resume: bool) -> Journal:
    journal_path = output_dir / JOURNAL
    journal = Journal.load(journal_path)
    if journal and journal.finished and not resume:
        archived = output_dir / f"journal-{journal.parent_run_id}.json"
        os.replace(journal_path, archived)
        log(f"{output_dir} held a finished run (its journal is now {archived.name}); starting a new run")
        journal = None
    if journal and not resume:
        raise ValueError(f"{output_dir} holds an unfinished run ({journal_path}); pass --resume to continue "
                         f"it, or choose another output_dir")
    if journal and journal.config_hash != fingerprint:
        raise ValueError(f"--resume: the config differs from the one that started {output_dir}; "
                         f"resume with the same config or use a new output_dir")
    return journal or Journal(config_hash=fingerprint)


def run_continual(config: RunConfig, *, resume: bool = False, on_stage_end: StageCallback | None = None,
                  parent_tags: dict[str, str] | None = None, config_dir: str | Path | None = None,
                  offline: bool = False) -> RunResult:
    """Train the stream stage after stage; evaluate and track after every stage.

    ``on_stage_end(stage, summary)`` is called after each stage's evaluation
    (sweeps report to Ray Tune there); ``parent_tags`` are added to the MLflow
    parent run (a sweep nests its trials with ``mlflow.parentRunId``); a relative
    stream path is resolved against ``config_dir`` (the run YAML's folder).
    ``offline`` keeps every tracking event in the run's spool (``secura sync``
    sends them later). Everything that can be checked without training (the
    tracking store, the method against the model's layers, every stream file)
    is checked before Ray starts.
    """
    from pipelines.corda import resolve_corda_samples
    from pipelines.preflight import check_method_fits_model
    from pipelines.tracking import Tracker, resolve_tracking_uri

    from pipelines.folder_lock import folder_lock

    config = resolve_corda_samples(config, config_dir)  # workers read CorDA's samples: an absolute, checked path
    output_dir = Path(config.output_dir).resolve()
    with folder_lock(output_dir, "secura run"):  # its journal, states and SQLite store are this run's alone
        journal = _open_journal(output_dir, config_fingerprint(config), resume)
        check_method_fits_model(config)
        planned = _plan_stream(config, output_dir, config_dir)
        tracker = Tracker(resolve_tracking_uri(config.tracking_uri, output_dir), output_dir=output_dir,
                          offline=offline)
        with tracker:
            return _run(config, journal, tracker, output_dir, on_stage_end, parent_tags, planned)


def _plan_stream(config: RunConfig, output_dir: Path, config_dir: str | Path | None):
    """Every stream file read and validated (or its shard found cached) before Ray starts: a bad input fails
    in seconds."""
    from pipelines.preprocess import plan_stream

    stream = config.load_stream(config_dir)
    select_tasks(stream, config.tasks)
    return plan_stream(stream, config.model_config_obj(), config.storage_path or str(output_dir))


def _run(config: RunConfig, journal: Journal, tracker, output_dir: Path, on_stage_end: StageCallback | None,
         parent_tags: dict[str, str] | None, planned) -> RunResult:
    from pipelines.console import StageProgress

    init_ray()
    progress = StageProgress(len(config.tasks or []) or None)
    training = StreamTraining(config, output_dir, progress)  # on Ray Train its workers start up meanwhile
    try:
        return _run_stages(config, journal, tracker, output_dir, on_stage_end, parent_tags, training, progress,
                           planned)
    finally:
        training.cancel()


def _run_stages(config: RunConfig, journal: Journal, tracker, output_dir: Path, on_stage_end: StageCallback | None,
                parent_tags: dict[str, str] | None, training: StreamTraining, progress, planned) -> RunResult:
    from pipelines.metrics import AccuracyMatrix
    from pipelines.preprocess import prepare_stream
    from pipelines.run_report import (LABEL_TAG, log_base_scores, log_run_end, log_run_start, log_stage,
                                      parent_params, run_identity, run_name)
    from pipelines.spool import tracking_folder
    from pipelines.train import ReportSink

    journal_path = output_dir / JOURNAL
    stream = planned.stream
    tasks = select_tasks(stream, config.tasks)
    method_name = str(config.method.get("name"))
    log(f"stream {stream.name}: {len(tasks)} tasks ({', '.join(t.name for t in tasks)}), "
        f"{len(stream.probe)} probe(s); method {method_name}")
    manifest = prepare_stream(stream, config.model_config_obj(), config.storage_path or str(output_dir),
                              planned=planned)
    evaluator = Evaluator(config, load_eval_sets(config, stream, manifest))

    identity = run_identity(config, stream)
    journal.parent_run_id = tracker.start_parent(
        config.experiment, run_name(identity, (parent_tags or {}).get(LABEL_TAG)), params=parent_params(config, stream),
        tags={**identity, **(parent_tags or {})}, run_id=journal.parent_run_id,
    )
    journal.save(journal_path)
    log_run_start(tracker, config, stream, manifest)

    matrix = AccuracyMatrix([t.name for t in tasks], [p.name for p in stream.probe])
    for stage_key, record in journal.stages.items():
        for name, score in record.get("scores", {}).items():
            matrix.record(int(stage_key), name, score)

    stages = [stage_spec(manifest.task(t.name), i) for i, t in enumerate(tasks, start=1)]
    remaining = [s for s in stages if not journal.done(s.index)]
    for stage in stages:
        if journal.done(stage.index):
            log(f"stage {stage.index} ({stage.task}): done in an earlier attempt, skipped")
    root = checkpoint_root(config, output_dir, journal.parent_run_id)
    progress.num_stages = len(tasks)
    offsets = stream_step_offsets(config, stages, training.local)
    training.plan(remaining, root, ReportSink(tracking_folder(output_dir), journal.parent_run_id,
                                              output_dir / "progress.json", offsets))

    if not journal.done(0):
        scores = base_model_scores(config, evaluator, manifest.path)
        _record(matrix, 0, scores)
        log_base_scores(tracker, scores, matrix)
        journal.stages["0"] = {"status": "done", "scores": {k: v["score"] for k, v in scores.items()},
                               "metrics": _all_metrics(scores)}
        journal.save(journal_path)
    for stage in remaining:
        started = time.time()
        steps = f"{offsets[stage.index] + 1}-{offsets[stage.index + 1]}"
        stage_run = tracker.start_stage(stage.index, stage.task, {**identity, "task": stage.task, "stage": stage.index,
                                                                  "stream_steps": steps}, tags=identity)
        tracker.log_metrics({"stage": stage.index}, step=offsets[stage.index] + 1, parent=True)  # a boundary
        journal.stages[str(stage.index)] = {"status": "running", "run_id": stage_run}
        journal.save(journal_path)
        progress.start(stage.index, stage.task, stage.train_rows)
        try:
            state_dir = training.wait_for(stage)
        except BaseException:
            progress.close()
            tracker.end_stage("FAILED")
            raise
        progress.close()
        scores = evaluator.score(state_dir)
        _record(matrix, stage.index, scores)
        summary = matrix.summary(stage.index)
        log_stage(tracker, matrix, stage.index, scores, state_dir, output_dir,
                  evaluator.last_drift | {"stage_seconds": time.time() - started}, identity)
        tracker.end_stage("FINISHED")
        journal.stages[str(stage.index)] = {"status": "done", "run_id": stage_run, "state_dir": str(state_dir),
                                            "scores": {k: v["score"] for k, v in scores.items()},
                                            "metrics": _all_metrics(scores), "drift": dict(evaluator.last_drift)}
        journal.save(journal_path)
        log(f"stage {stage.index} ({stage.task}): " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if "/" not in k))
        if on_stage_end is not None:
            on_stage_end(stage.index, summary)
    training.close()

    summary = matrix.summary()
    write_text_atomic(output_dir / "accuracy_matrix.csv", matrix.to_csv())
    log_run_end(tracker, matrix, output_dir, config, state_dir if remaining else None)
    tracker.end_parent("FINISHED")
    journal.finished = True
    journal.save(journal_path)
    _drop_checkpoints(root)
    log("final: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    return RunResult(journal.parent_run_id, matrix, summary, output_dir)


def stream_step_offsets(config: RunConfig, stages: list, local: bool) -> dict[int, int]:
    """Stage index → training steps of the stream before it (and the stream's total under ``len + 1``): the
    stream-wide step that puts every stage's loss on one axis. Planned steps: a stage stopped early leaves a gap."""
    from pipelines.train import steps_for_stage

    world = 1 if local else config.scaling.num_workers
    offsets, total = {}, 0
    for stage in sorted(stages, key=lambda s: s.index):
        offsets[stage.index] = total
        total += steps_for_stage(config.train.model_dump(), stage.train_rows, world)
    offsets[len(stages) + 1] = total
    return offsets


def _drop_checkpoints(root: str) -> None:
    """A finished run keeps its stage states in ``stages/``; the resume checkpoints are no longer needed."""
    from pipelines.checkpoints import CheckpointStore

    store = CheckpointStore(root)
    store.fs.delete_dir(store.base)


def select_tasks(stream, names: list[str] | None) -> list:
    if names is None:
        return list(stream.tasks)
    by_name = {t.name: t for t in stream.tasks}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"tasks: {missing} not in stream {stream.name!r} (has {sorted(by_name)})")
    return [by_name[n] for n in names]


def _record(matrix, stage: int, scores: dict[str, dict[str, float]]) -> None:
    for name, metrics in scores.items():
        matrix.record(stage, name, metrics["score"])


def run_command(args: argparse.Namespace) -> int:
    config = load_run_config(args.config, overrides=args.set)
    updates = {}
    if args.tracking_uri:
        updates["tracking_uri"] = args.tracking_uri
    if args.output_dir:
        updates["output_dir"] = args.output_dir
    config = config.model_copy(update=updates)
    result = run_continual(config, resume=args.resume, config_dir=Path(args.config).resolve().parent,
                           offline=args.offline)
    print_summary(result, config.tracking_uri, offline=args.offline)
    return 0


def print_summary(result: RunResult, tracking_uri: str | None = None, *, offline: bool = False) -> None:
    """The accuracy matrix as a table, the stream's metrics, the outputs and where the tracking went, on stdout."""
    from pipelines.console import format_matrix
    from pipelines.tracking import resolve_tracking_uri, store_line

    print(f"\naccuracy matrix (rows: after each stage; columns: tasks, then probes)\n{format_matrix(result.matrix)}\n")
    print("  ".join(f"{k} {v:.3f}" for k, v in result.summary.items() if "/" not in k))
    print(f"outputs: {result.output_dir}")
    print(store_line(resolve_tracking_uri(tracking_uri, result.output_dir), result.output_dir, offline=offline))


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import main as cli_main

    return cli_main(["run", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
