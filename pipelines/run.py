"""The continual-learning driver: prepare shards, then stage after stage train
on Ray Train, evaluate every task and probe, and record it all in MLflow.

A journal (``<output_dir>/journal.json``, rewritten atomically after every
stage) makes ``secura run --resume`` continue at the first unfinished stage,
re-attached to the same MLflow parent run, without repeating finished stages.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipelines.config import RunConfig, dump_run_config, load_run_config
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

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=max(4, (os.cpu_count() or 2) * 2), include_dashboard=False)


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
        self._base = None  # loaded on first use, then copied per stage (a GGUF load takes ~20 s)

    def _device(self):
        import torch

        return torch.device("cuda" if self.config.scaling.use_gpu and torch.cuda.is_available() else "cpu")

    def score(self, state_dir: Path | None) -> dict[str, dict[str, float]]:
        import torch

        from pipelines.evaluate import evaluate_tasks
        from pipelines.models import load_model
        from pipelines.train import load_stage_state
        from secura.methods import build_method

        if self.config.eval.num_replicas > 0:
            return self._score_distributed(state_dir)
        if self.config.train.torch_threads:  # the in-process share of the machine, as the trainer uses
            torch.set_num_threads(self.config.train.torch_threads)
        if self._base is None:
            self._base = load_model(self.config.model_config_obj(), seed=self.config.seed)
        model = copy.deepcopy(self._base)  # wrapping and M1 loads change the model in place
        if state_dir is not None:
            method = build_method(self.config.method_config_obj())
            model = method.wrap(model)
            load_stage_state(state_dir, method, model, rank=0)
        model.to(self._device()).eval()
        self.last_drift = _drift_summary(model) if state_dir is not None else {}
        return evaluate_tasks(
            model, self.tokenizer, self.eval_sets, batch_size=self.config.eval.batch_size,
            device=self._device(), max_new_tokens=self.config.eval.max_new_tokens, progress=log,
        )


    def _score_distributed(self, state_dir: Path | None) -> dict[str, dict[str, float]]:
        """Ray Data batch inference: one model replica per actor, so evaluation scales with the cluster."""
        from pipelines.distributed_eval import StageModelLoader, evaluate_tasks_distributed

        return evaluate_tasks_distributed(
            StageModelLoader(self.config.to_dict(), str(state_dir) if state_dir else None), self.eval_sets,
            num_replicas=self.config.eval.num_replicas, use_gpu=self.config.scaling.use_gpu,
            batch_size=self.config.eval.batch_size, tokenizer=self.tokenizer,
            max_new_tokens=self.config.eval.max_new_tokens,
        )


def base_model_scores(config: RunConfig, evaluator: Evaluator, manifest_path: str) -> dict[str, dict[str, float]]:
    """Stage 0: the base model's scores, computed once per model and evaluation set.

    Every run of a comparison or sweep scores the same base model on the same
    items (about a quarter of a short run's evaluation time), so the scores are
    kept next to the shards they were computed from, keyed by everything they
    depend on. Remote shard stores are not cached into.
    """
    key_data = {"model": config.model, "eval": config.eval.model_dump(), "eval_sets": evaluator.eval_sets,
                "use_gpu": config.scaling.use_gpu,
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


# --- one stage -----------------------------------------------------------------------


def train_stage(config: RunConfig, index: int, task: str, train_path: str, train_rows: int,
                init_state_dir: Path | None, stage_run_id: str | None, tracking_uri: str,
                output_dir: Path, parent_run_id: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Run one stage and copy its final checkpoint into the output dir."""
    from pipelines.train import NonFiniteLossError, StageSpec, stage_spec_dict

    spec = StageSpec(index=index, task=task, init_state_dir=str(init_state_dir) if init_state_dir else None,
                     stage_run_id=stage_run_id, tracking_uri=tracking_uri, train_rows=train_rows)
    loop_config = {"run": config.to_dict(), "stage": stage_spec_dict(spec)}
    target = output_dir / "stages" / f"{index:02d}-{task}"
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if config.scaling.backend == "local":
        metrics, checkpoint = _fit_local(config, loop_config, train_path, output_dir / "local" / f"stage-{index:02d}")
    else:
        metrics, checkpoint = _fit_ray_train(config, loop_config, train_path, output_dir, index, task,
                                             run_key=parent_run_id or "run", download_to=tmp)
    if metrics.get("nonfinite"):
        raise NonFiniteLossError(
            f"stage {index} ({task}): loss became {metrics.get('loss')} at step {metrics.get('step')}; "
            f"lower train.lr or enable train.max_grad_norm. The last good checkpoint is kept: {checkpoint or 'none'}"
        )
    if checkpoint is None or not metrics.get("done"):
        raise RuntimeError(f"stage {index} ({task}) finished without a final checkpoint")
    if checkpoint != tmp:
        shutil.copytree(checkpoint, tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target, metrics


def _fit_local(config: RunConfig, loop_config: dict, train_path: str, root: Path) -> tuple[dict, Path | None]:
    from pipelines.train import LocalContext, run_stage

    device = "cuda" if config.scaling.use_gpu else "cpu"
    root.mkdir(parents=True, exist_ok=True)
    ctx = LocalContext(train_path, device=device, checkpoint_root=root)
    run_stage(loop_config, ctx)
    return ctx.last_metrics, ctx.last_checkpoint


def _fit_ray_train(config: RunConfig, loop_config: dict, train_path: str, output_dir: Path, index: int,
                   task: str, run_key: str, download_to: Path) -> tuple[dict, Path | None]:
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig as TrainRunConfig
    from ray.train.torch import TorchTrainer

    from pipelines.preprocess import train_dataset
    from pipelines.train import train_loop_per_worker

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling_config(config),
        datasets={"train": train_dataset(train_path)},
        # the same seed gives the same batches: runs compared over seeds must differ only by the seed
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        run_config=TrainRunConfig(
            name=f"stage-{index:02d}-{task}",
            # one folder per run (its MLflow parent id): runs sharing a bucket never mix checkpoints,
            # and a resumed run finds its own (Ray Train restores a run by name and storage path)
            storage_path=_join(config.storage_path, f"ray/{run_key}") if config.storage_path else str(output_dir / "ray"),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=config.scaling.max_failures),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        return dict(result.metrics or {}), None
    result.checkpoint.to_directory(str(download_to))  # downloads when storage_path is a bucket
    return dict(result.metrics or {}), download_to


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


def run_continual(config: RunConfig, *, resume: bool = False, on_stage_end: StageCallback | None = None,
                  parent_tags: dict[str, str] | None = None, config_dir: str | Path | None = None) -> RunResult:
    """Train the stream stage after stage; evaluate and track after every stage.

    ``on_stage_end(stage, summary)`` is called after each stage's evaluation
    (sweeps report to Ray Tune there); ``parent_tags`` are added to the MLflow
    parent run (a sweep nests its trials with ``mlflow.parentRunId``); a relative
    stream path is resolved against ``config_dir`` (the run YAML's folder).
    """
    from pipelines.metrics import AccuracyMatrix
    from pipelines.plots import plot_accuracy_matrix, plot_retention
    from pipelines.preprocess import prepare_stream
    from pipelines.streams import load_stream
    from pipelines.tracking import Tracker, resolve_tracking_uri

    output_dir = Path(config.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    journal_path = output_dir / JOURNAL
    journal = Journal.load(journal_path)
    fingerprint = config_fingerprint(config)
    if journal and not resume and journal.finished:
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
    journal = journal or Journal(config_hash=fingerprint)

    init_ray()
    stream = load_stream(config.stream, base_dir=config_dir)
    tasks = select_tasks(stream, config.tasks)
    log(f"stream {stream.name}: {len(tasks)} tasks ({', '.join(t.name for t in tasks)}), "
        f"{len(stream.probe)} probe(s); method {config.method.get('name')}")
    manifest = prepare_stream(stream, config.model_config_obj(), config.storage_path or str(output_dir))
    eval_sets = load_eval_sets(config, stream, manifest)
    evaluator = Evaluator(config, eval_sets)

    tracking_uri = resolve_tracking_uri(config.tracking_uri, output_dir)
    tracker = Tracker(tracking_uri, output_dir=output_dir)
    journal.parent_run_id = tracker.start_parent(
        config.experiment, config.run_name(stream.name), params=config.to_dict(),
        tags={"stream": stream.name, "method": str(config.method.get("name")), "seed": str(config.seed),
              **(parent_tags or {})},
        run_id=journal.parent_run_id,
    )
    journal.save(journal_path)
    tracker.log_text(dump_run_config(config), "config/run.yaml")

    matrix = AccuracyMatrix([t.name for t in tasks], [p.name for p in stream.probe])
    for stage_key, record in journal.stages.items():
        for name, score in record.get("scores", {}).items():
            matrix.record(int(stage_key), name, score)

    if not journal.done(0):
        scores = base_model_scores(config, evaluator, manifest.path)
        _record(matrix, 0, scores)
        tracker.log_metrics(_flat_scores(scores) | matrix.summary(0), step=0)
        journal.stages["0"] = {"status": "done", "scores": {k: v["score"] for k, v in scores.items()}}
        journal.save(journal_path)

    state_dir: Path | None = None
    for index, task in enumerate(tasks, start=1):
        record = journal.stages.get(str(index), {})
        if record.get("status") == "done":
            state_dir = Path(record["state_dir"])
            log(f"stage {index} ({task.name}): done in an earlier attempt, skipped")
            continue
        split = manifest.task(task.name).split("train")
        started = time.time()
        stage_run_id = tracker.start_stage(index, task.name, {"task": task.name, "stage": index})
        journal.stages[str(index)] = {"status": "running", "run_id": stage_run_id}
        journal.save(journal_path)
        log(f"stage {index}/{len(tasks)} ({task.name}): training on {split.rows} rows")
        try:
            state_dir, _ = train_stage(config, index, task.name, split.path, split.rows, state_dir,
                                       stage_run_id, tracking_uri, output_dir, journal.parent_run_id)
        except Exception:
            tracker.end_stage("FAILED")
            raise
        log(f"stage {index} ({task.name}): trained in {time.time() - started:.0f}s; evaluating")
        scores = evaluator.score(state_dir)
        _record(matrix, index, scores)
        summary = matrix.summary(index)
        tracker.log_metrics(_flat_scores(scores) | summary | evaluator.last_drift
                            | {"stage_seconds": time.time() - started}, step=index)
        _log_stage_artifacts(tracker, matrix, state_dir, output_dir, plot_accuracy_matrix, plot_retention)
        tracker.end_stage("FINISHED")
        tracker.log_metrics(summary, step=index, parent=True)
        journal.stages[str(index)] = {"status": "done", "run_id": stage_run_id, "state_dir": str(state_dir),
                                      "scores": {k: v["score"] for k, v in scores.items()}}
        journal.save(journal_path)
        log(f"stage {index} ({task.name}): " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if "/" not in k))
        if on_stage_end is not None:
            on_stage_end(index, summary)

    summary = matrix.summary()
    write_text_atomic(output_dir / "accuracy_matrix.csv", matrix.to_csv())
    tracker.log_metrics({f"final/{k}": v for k, v in summary.items()}, parent=True)
    tracker.end_parent("FINISHED")
    journal.finished = True
    journal.save(journal_path)
    print(matrix.to_csv())
    log("final: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    return RunResult(journal.parent_run_id, matrix, summary, output_dir)


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


def _flat_scores(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"eval/{task}/{metric}": value for task, metrics in scores.items() for metric, value in metrics.items()}


def _log_stage_artifacts(tracker, matrix, state_dir: Path, output_dir: Path, heatmap, retention) -> None:
    plots = output_dir / "plots"
    plots.mkdir(exist_ok=True)
    tracker.log_artifact(state_dir / "adapter.safetensors", "adapter")
    tracker.log_text(matrix.to_csv(), "accuracy_matrix.csv")
    heatmap(matrix, plots / "accuracy_matrix.png")
    retention(matrix, plots / "retention_curve.png")
    tracker.log_artifact(plots / "accuracy_matrix.png", "plots")
    tracker.log_artifact(plots / "retention_curve.png", "plots")


def run_command(args: argparse.Namespace) -> int:
    config = load_run_config(args.config, overrides=args.set)
    updates = {}
    if args.tracking_uri:
        updates["tracking_uri"] = args.tracking_uri
    if args.output_dir:
        updates["output_dir"] = args.output_dir
    config = config.model_copy(update=updates)
    run_continual(config, resume=args.resume, config_dir=Path(args.config).resolve().parent)
    return 0


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import main as cli_main

    return cli_main(["run", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
