"""`secura sweep`: Ray Tune over any run-config keys (SECURA's k, r, s, m, ρ, d, lr, merge interval, ...).

One trial is one `run_continual` on the stream with the trial's values. It
reports after every stage (``stage`` is ASHA's time axis, so a bad trial can be
stopped after its first task), and every report carries both new-task accuracy
and retention: the method is judged on a retention-vs-plasticity frontier, not
on one number (docs/secura-method.md §8). The best configuration is the one
that learns and, among those, retains most (tune/objective.py). In MLflow the
sweep is a run, each trial's run is nested under it and each stage under the
trial. At the end the driver prints a table of every trial, draws them all,
and writes the best trial's config (``best_run.yaml``) and the Pareto set's
(``pareto.yaml``, ``pareto/<trial>.yaml``) as run YAMLs that ``secura run``
accepts unchanged.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipelines.console import is_verbose
from pipelines.config import RunConfig, dump_run_config, parse_run_config, read_base_run
from pipelines.files import read_yaml, write_text_atomic
from pipelines.preprocess import link_shared_shards, prepare_shared_shards
from pipelines.run_report import LABEL_TAG
from tune.objective import LEARN_THEN_RETAIN, LearningRule, Selection, TrialRow, select, trial_metrics
from tune.report import format_table, plot_points, plot_sweep, trials_csv, verdict
from tune.space import (
    Dimension,
    check_against,
    check_search,
    parse_points,
    parse_space,
    set_dotted,
    to_tune,
    with_values,
)

SWEEP_STATE = "sweep.json"
TUNE_DIR = "tune"
TRIALS_DIR = "trials"
BEST_RUN = "best_run.yaml"
PARETO = "pareto.yaml"
PARETO_DIR = "pareto"
REPORTS = "reports.jsonl"
PARENT_TAG = "mlflow.parentRunId"
SWEEP_TAG = "secura.sweep"
TRIAL_TAG = "secura.trial_id"
TRIAL_STATUS_TAG = "secura.trial_status"


def log(message: str) -> None:
    from pipelines.run import log as run_log

    run_log(f"sweep: {message}")


# --- the sweep YAML --------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SchedulerSpec(_Strict):
    type: Literal["asha"] = "asha"
    grace_period: int = Field(1, ge=1, description="stages every trial runs before ASHA may stop it")
    reduction_factor: float = Field(2.0, gt=1, description="about 1/reduction_factor of trials pass each rung")


class LearningSpec(_Strict):
    """When a trial counts as learning: gain = new-task accuracy − the untrained model's on the same tasks."""

    fraction_of_best: float = Field(0.5, ge=0, le=1, description="gain ≥ this × the best completed trial's gain")
    min_gain: float = Field(0.0, ge=0, le=1, description="and gain ≥ this (accuracy, 0..1); always gain > 0")


class OptunaSpec(_Strict):
    sampler: Literal["nsga2", "tpe"] | None = Field(None, description="default: nsga2 for two objectives, tpe for one")
    population_size: int | None = Field(None, ge=2, description="NSGA-II's generation size (Optuna's default 50)")


class SweepSpec(_Strict):
    """What a sweep YAML may hold; the run-config side is checked separately against ``base``."""

    name: str = "sweep"
    base: str | dict[str, Any] = Field(description="a run YAML (relative to the sweep YAML) or an inline run config")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted keys every trial sets")
    space: dict[str, Any]
    points_to_evaluate: list[Any] | None = Field(None, description="whole points tried before the search samples")
    search: Literal["random", "grid", "optuna", "hyperopt"] = "random"
    optuna: OptunaSpec | None = None
    num_samples: int = Field(1, ge=1, description="trials (random/optuna/hyperopt), or repeats of the whole grid")
    max_concurrent: int | None = Field(None, ge=1, description="upper bound; the cluster may allow fewer")
    seed: int = 0
    metric: Literal["learn_then_retain", "acc", "probe_retention", "score"] = LEARN_THEN_RETAIN
    learning: LearningSpec = Field(default_factory=LearningSpec)
    probe_weight: float = Field(0.5, ge=0, le=1, description="retention = w·probe + (1−w)·earlier-task retention")
    weights: dict[str, float] | None = Field(None, description="score = w·acc + (1−w)·probe_retention")
    mode: Literal["max"] = "max"
    scheduler: SchedulerSpec | None = None
    resources_per_trial: dict[str, float] = Field(default_factory=lambda: {"CPU": 1.0})
    reserve_cpus: float = Field(1.0, ge=0, description="CPUs kept free for Ray Data")
    max_failures: int = Field(0, ge=0, description="retries of a failed trial (each resumes its run)")
    output_dir: str = "runs/sweep"
    tracking_uri: str | None = None
    experiment: str | None = Field(None, description="default: the base run's experiment")

    @field_validator("scheduler", mode="before")
    @classmethod
    def _none_scheduler(cls, value: Any) -> Any:
        return None if value in ("none", "None", False) else value

    @field_validator("resources_per_trial")
    @classmethod
    def _resources(cls, value: dict[str, float]) -> dict[str, float]:
        out = {key.upper(): float(amount) for key, amount in value.items()}
        unknown = sorted(set(out) - {"CPU", "GPU"})
        if unknown:
            raise ValueError(f"only CPU and GPU can be given, got {unknown}")
        if out.get("CPU", 0) <= 0:
            raise ValueError("a trial needs some CPU (Ray Tune refuses 0): give CPU > 0")
        return out

    @model_validator(mode="after")
    def _search(self) -> "SweepSpec":
        if self.optuna is not None and self.search != "optuna":
            raise ValueError(f"optuna: only used by search: optuna (search is {self.search})")
        if self.search == "hyperopt" and self.metric == LEARN_THEN_RETAIN:
            raise ValueError("search: hyperopt optimises one number; metric learn_then_retain has two objectives "
                             "(new-task accuracy, retention): use search: optuna or random, or metric: score")
        if self.points_to_evaluate and self.search == "grid":
            raise ValueError("points_to_evaluate: a grid already enumerates its points; use search: random or optuna")
        return self

    @model_validator(mode="after")
    def _weights(self) -> "SweepSpec":
        if self.weights is None:
            return self
        if self.metric != "score":
            raise ValueError(f"weights: only used by metric: score (metric is {self.metric})")
        unknown = sorted(set(self.weights) - {"acc", "probe_retention"})
        if unknown or not self.weights:
            raise ValueError(f"weights: keys must be acc and/or probe_retention, got {sorted(self.weights)}")
        if any(not 0 <= w <= 1 for w in self.weights.values()):
            raise ValueError(f"weights: each weight must lie in [0, 1], got {self.weights}")
        if len(self.weights) == 2 and not math.isclose(sum(self.weights.values()), 1.0):
            raise ValueError(f"weights: acc + probe_retention must be 1, got {self.weights}")
        return self

    @property
    def weight_acc(self) -> float:
        """w in score = w·acc + (1−w)·retention (0.5 unless given)."""
        weights = self.weights or {}
        if "acc" in weights:
            return weights["acc"]
        return 1.0 - weights.get("probe_retention", 0.5)


@dataclass
class Sweep:
    """A validated sweep: the spec, the base run config every trial starts from, the space."""

    spec: SweepSpec
    base: dict[str, Any]  # the run config after `overrides`, as a validated plain dict
    dimensions: list[Dimension]
    points: list[dict[str, Any]]  # points_to_evaluate, checked
    output_dir: Path
    tracking_uri: str
    experiment: str
    config_dir: Path  # the base run YAML's folder: relative stream paths are read from there, as by `secura run`

    def fingerprint(self) -> str:
        """Resuming under a changed sweep would mix two searches: refuse it."""
        data = {"spec": self.spec.model_dump(mode="json", exclude={"output_dir", "tracking_uri"}), "base": self.base}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _format_error(source: str, err: ValidationError) -> str:
    return "\n".join(
        f"{source}: {'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg'].removeprefix('Value error, ')}"
        for e in err.errors()
    )


def parse_sweep(data: Any, *, source: str = "<sweep>", base_dir: Path = Path("."),
                output_dir: str | None = None, tracking_uri: str | None = None) -> Sweep:
    """Validate a sweep mapping; relative ``base`` paths are read from ``base_dir`` (the sweep YAML's folder)."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as err:
        raise ValueError(_format_error(source, err)) from None
    if output_dir:
        spec.output_dir = output_dir
    if tracking_uri:
        spec.tracking_uri = tracking_uri
    base, config_dir = _load_base(spec, base_dir)
    dimensions = parse_space(spec.space)
    check_search(dimensions, spec.search)
    check_against(base, dimensions)
    points = parse_points(spec.points_to_evaluate, dimensions, base)
    _check_package(spec.search)
    run = parse_run_config(base, source="base")
    if run.scaling.backend == "local" and run.scaling.use_gpu and not spec.resources_per_trial.get("GPU"):
        raise ValueError(f"{source}: scaling.backend local trains inside the trial, so with use_gpu the trial "
                         f"needs a GPU: set resources_per_trial: {{CPU: 1, GPU: 1}}")
    out = Path(spec.output_dir).expanduser().resolve()
    from pipelines.tracking import resolve_tracking_uri

    return Sweep(spec=spec, base=base, dimensions=dimensions, points=points, output_dir=out,
                 tracking_uri=resolve_tracking_uri(spec.tracking_uri, out),
                 experiment=spec.experiment or run.experiment, config_dir=config_dir)


def _load_base(spec: SweepSpec, base_dir: Path) -> tuple[dict[str, Any], Path]:
    """The base run config after ``overrides``, and the folder its relative paths are read from."""
    data, config_dir = read_base_run(spec.base, base_dir)
    for key, value in spec.overrides.items():
        try:
            set_dotted(data, key, value)
        except ValueError as err:
            raise ValueError(f"overrides.{key}: {err}") from None
    source = "base" if isinstance(spec.base, dict) else str(base_dir / spec.base)
    return parse_run_config(data, source=source).to_dict(), config_dir


def _check_package(search: str) -> None:
    if search in ("optuna", "hyperopt") and importlib.util.find_spec(search) is None:
        raise ValueError(f"search: {search} needs the {search} package, which is not installed "
                         f"(pip install {search}); or use search: random")


def load_sweep(path: str | Path, *, output_dir: str | None = None, tracking_uri: str | None = None) -> Sweep:
    path = Path(path)
    data = read_yaml(path, "sweep config")
    return parse_sweep(data, source=str(path), base_dir=path.parent, output_dir=output_dir,
                       tracking_uri=tracking_uri)


# --- resources -------------------------------------------------------------------------


def trial_need(run: RunConfig, resources_per_trial: dict[str, float]) -> dict[str, float]:
    """CPU/GPU one trial holds while it runs: itself, plus its TorchTrainer's workers on ray_train.

    The workers are scheduled outside the trial's reservation, which Tune
    cannot see: unless the concurrency counts them, trials can take every CPU
    and leave their own trainers (and Ray Data) waiting forever.
    """
    need = {"CPU": resources_per_trial.get("CPU", 1.0), "GPU": resources_per_trial.get("GPU", 0.0)}
    if run.scaling.backend == "ray_train":
        worker = run.scaling.resources_per_worker
        need["CPU"] += run.scaling.num_workers * worker.get("CPU", 1.0)
        need["GPU"] += run.scaling.num_workers * worker.get("GPU", 1.0 if run.scaling.use_gpu else 0.0)
    return need


def plan_concurrency(cluster: dict[str, float], need: dict[str, float], reserve_cpus: float,
                     requested: int | None) -> int:
    """How many trials run at once: what fits next to ``reserve_cpus`` for Ray Data, capped by ``requested``."""
    cpus = cluster.get("CPU", 0.0) - reserve_cpus
    if need["CPU"] > cpus + 1e-9:
        raise ValueError(f"a trial needs {need['CPU']:g} CPUs but the cluster has {cluster.get('CPU', 0.0):g} with "
                         f"{reserve_cpus:g} kept for Ray Data (reserve_cpus): lower resources_per_trial, the "
                         f"trainer's workers, or reserve_cpus")
    fits = math.floor(cpus / need["CPU"] + 1e-9)
    if need.get("GPU", 0) > 0:
        gpus = cluster.get("GPU", 0.0)
        if need["GPU"] > gpus + 1e-9:
            raise ValueError(f"a trial needs {need['GPU']:g} GPUs but the cluster has {gpus:g}")
        fits = min(fits, math.floor(gpus / need["GPU"] + 1e-9))
    if requested is not None and requested > fits:
        log(f"max_concurrent {requested} lowered to {fits}: a trial needs {need}, the cluster has {cluster}")
    return min(fits, requested) if requested is not None else fits


# --- one trial (runs in a Ray Tune trial actor) -----------------------------------------


@dataclass(frozen=True)
class TrialPlan:
    """Everything a trial needs besides its sampled values; small, sent to every trial."""

    base: dict[str, Any]
    sweep_name: str
    sweep_dir: str
    tracking_uri: str
    experiment: str
    sweep_run_id: str
    weight_acc: float
    probe_weight: float
    tasks: tuple[str, ...]
    probes: tuple[str, ...]
    config_dir: str

    @property
    def num_stages(self) -> int:
        return len(self.tasks)


def plain(value: Any) -> Any:
    """Search algorithms may hand out numpy scalars; YAML and MLflow want Python ones."""
    import numpy as np

    return value.item() if isinstance(value, np.generic) else value


def trial_config(plan: TrialPlan, params: dict[str, Any], trial_id: str) -> RunConfig:
    data = with_values(plan.base, {key: plain(value) for key, value in params.items()})
    data.update(name=f"{plan.sweep_name}-{trial_id}", output_dir=str(Path(plan.sweep_dir) / TRIALS_DIR / trial_id),
                tracking_uri=plan.tracking_uri, experiment=plan.experiment,
                storage_path=trial_storage(data, trial_id))
    return parse_run_config(data, source=f"trial {trial_id}")


def trial_storage(run: dict[str, Any], trial_id: str) -> str | None:
    """Where a trial keeps shards and Ray Train checkpoints.

    None (the trial's output_dir, whose shards folder links to the sweep's) unless
    the base names a storage_path. Then trials share it for the shards (content-
    addressed, safe to share), except on ray_train, where every run writes its
    checkpoints under ``<storage_path>/ray/stage-NN-task``: those trials get their
    own sub-path, or concurrent trials would write into one another's checkpoints.
    """
    base = run.get("storage_path")
    if base is None or run["scaling"]["backend"] != "ray_train":
        return base
    return f"{base.rstrip('/')}/{TRIALS_DIR}/{trial_id}"


def journal_matrix(run_dir: Path, plan: TrialPlan):
    """The run's accuracy matrix so far, from its journal (written before ``on_stage_end`` is called).

    ``on_stage_end`` hands over the summary only; the learning rule needs the
    diagonal and the untrained model's row, which the journal holds.
    """
    from pipelines.metrics import AccuracyMatrix
    from pipelines.run import JOURNAL, Journal

    matrix = AccuracyMatrix(list(plan.tasks), list(plan.probes))
    journal = Journal.load(run_dir / JOURNAL)
    for stage, record in (journal.stages if journal else {}).items():
        for name, score in record.get("scores", {}).items():
            matrix.record(int(stage), name, score)
    return matrix


def run_trial(params: dict[str, Any], plan: TrialPlan) -> None:
    """The Tune trainable: one continual run, a `ray.tune.report` after every stage.

    The last stage is reported only after `run_continual` has returned: Tune
    ends a trial as soon as ASHA says stop, and ASHA says stop to every trial
    at its last stage (max_t), which would cut off the run's final metrics and
    leave its MLflow run open. A restarted trial (``max_failures``, or
    ``--resume`` after the driver died) finds its run's journal, replays the
    stages it already reported, and resumes the run where it stopped.
    """
    from ray import tune as ray_tune

    from pipelines.run import JOURNAL, run_continual

    trial_id = ray_tune.get_context().get_trial_id()
    config = trial_config(plan, params, trial_id)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.storage_path is None:
        link_shared_shards(Path(plan.sweep_dir), out)
    reports = out / REPORTS
    resume = (out / JOURNAL).exists()
    earlier = [json.loads(line) for line in reports.read_text().splitlines()] if resume and reports.exists() else []
    final = [m for m in earlier if m["stage"] >= plan.num_stages]
    for metrics in earlier:
        if metrics["stage"] < plan.num_stages:
            ray_tune.report(metrics)

    def on_stage_end(stage: int, summary: dict[str, float]) -> None:
        metrics = trial_metrics(journal_matrix(out, plan), stage, weight_acc=plan.weight_acc,
                                probe_weight=plan.probe_weight)
        with reports.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if stage < plan.num_stages:
            ray_tune.report(metrics)
        else:
            final.append(metrics)

    # the trial names its run (`trial <id> lr=<lr> seed=<seed>`): its other hyperparameters differ too
    tags = {PARENT_TAG: plan.sweep_run_id, SWEEP_TAG: plan.sweep_name, TRIAL_TAG: trial_id,
            LABEL_TAG: f"trial {trial_id}"}
    run_continual(config, resume=resume, on_stage_end=on_stage_end, parent_tags=tags, config_dir=plan.config_dir)
    if final:
        ray_tune.report(final[-1])


# --- results ---------------------------------------------------------------------------


@dataclass
class SweepResult:
    sweep_run_id: str
    trials: list[TrialRow]
    selection: Selection
    best_config_path: Path | None
    output_dir: Path
    table: str = field(repr=False, default="")

    @property
    def best(self) -> TrialRow | None:
        return self.selection.best


def _error_line(error: BaseException) -> str:
    """``Type: first line`` of what the trial raised (Ray wraps it, traceback included, in a RayTaskError)."""
    cause = getattr(error, "cause", None) or error
    first = next((line.strip() for line in str(cause).splitlines() if line.strip()), "")
    return f"{type(cause).__name__}: {first}" if first else type(cause).__name__


def collect_trials(results, num_stages: int) -> list[TrialRow]:
    """One row per trial of a Tune ``ResultGrid``; stopped = no error but fewer stages than the stream has."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        if result.error is not None:
            status = "error"
        else:
            status = "completed" if int(metrics.get("stage", 0)) >= num_stages else "stopped"
        params = {key: plain(value) for key, value in (result.config or {}).items()}
        error = _error_line(result.error) if result.error is not None else None
        rows.append(TrialRow.from_metrics(str(metrics["trial_id"]), params, status, metrics, error))
    return sorted(rows, key=lambda row: row.trial_id)


def rerun_config(sweep: Sweep, row: TrialRow, name: str, output_dir: Path) -> RunConfig:
    """The base run with a trial's values, in its own output dir so ``secura run`` starts afresh.

    A relative stream YAML path is made absolute: ``secura run`` reads it from
    the run YAML's folder, which for best_run.yaml is the sweep's output dir.
    """
    data = with_values(sweep.base, row.params)
    data.update(name=name, output_dir=str(output_dir))
    stream = data.get("stream")
    if isinstance(stream, str) and (sweep.config_dir / stream).is_file():
        data["stream"] = str((sweep.config_dir / stream).resolve())
    return parse_run_config(data, source=f"trial {row.trial_id}")


def best_run_config(sweep: Sweep, best: TrialRow) -> RunConfig:
    return rerun_config(sweep, best, f"{sweep.spec.name}-best", sweep.output_dir / "best")


def write_pareto(sweep: Sweep, selection: Selection) -> Path:
    """``pareto.yaml``: the Pareto set, each entry with its numbers and its full run config (``run``), also
    written as ``pareto/<trial>.yaml`` for ``secura run``."""
    out = sweep.output_dir
    entries = []
    for row in selection.front:
        config = rerun_config(sweep, row, f"{sweep.spec.name}-{row.trial_id}", out / PARETO_DIR / row.trial_id)
        path = out / PARETO_DIR / f"{row.trial_id}.yaml"
        write_text_atomic(path, dump_run_config(config))
        entries.append({"trial_id": row.trial_id, "new_acc": row.new_acc, "gain": row.gain,
                        "retention": row.retention, "probe_retention": row.probe_retention,
                        "learns": selection.learns(row), "best": row is selection.best,
                        "config": str(path), "run": config.to_dict()})
    header = (f"# The Pareto set of sweep {sweep.spec.name}: completed trials no other beats on both new-task\n"
              f"# accuracy and retention. Run one with: secura run {out / PARETO_DIR}/<trial_id>.yaml\n")
    path = out / PARETO
    write_text_atomic(path, header + yaml.safe_dump(entries, sort_keys=False))
    return path


# --- the driver ------------------------------------------------------------------------


def _search_alg(sweep: Sweep, concurrency: int, num_stages: int):
    from tune.search import search_algorithm

    spec = sweep.spec
    return search_algorithm(spec.search, metric=spec.metric, seed=spec.seed, concurrency=concurrency,
                            num_stages=num_stages, points=sweep.points,
                            sampler=spec.optuna.sampler if spec.optuna else None,
                            population_size=spec.optuna.population_size if spec.optuna else None)


def check_scheduler(spec: SweepSpec, num_stages: int) -> None:
    if spec.scheduler is not None and spec.scheduler.grace_period >= num_stages:
        raise ValueError(f"scheduler.grace_period ({spec.scheduler.grace_period}) must be below the number of "
                         f"stages ({num_stages}), or ASHA can never stop a trial")


def _scheduler(spec: SweepSpec, num_stages: int):
    if spec.scheduler is None:
        return None
    from tune.search import asha

    return asha(spec.metric, num_stages, spec.scheduler.grace_period, spec.scheduler.reduction_factor)


def _tuner(sweep: Sweep, plan: TrialPlan, concurrency: int, num_stages: int, resume: bool):
    from ray import tune as ray_tune

    spec = sweep.spec
    resources = {key.lower(): amount for key, amount in spec.resources_per_trial.items() if amount}
    trainable = ray_tune.with_resources(ray_tune.with_parameters(run_trial, plan=plan), resources)
    path = sweep.output_dir / TUNE_DIR
    if resume and ray_tune.Tuner.can_restore(str(path)):
        log(f"resuming the Tune experiment in {path} (unfinished and errored trials run again)")
        return ray_tune.Tuner.restore(str(path), trainable, resume_errored=True)
    return ray_tune.Tuner(
        trainable,
        param_space=to_tune(sweep.dimensions),
        # metric and mode live on the searcher and the scheduler (tune/search.py): the searcher may have two.
        tune_config=ray_tune.TuneConfig(num_samples=spec.num_samples,
                                        search_alg=_search_alg(sweep, concurrency, num_stages),
                                        scheduler=_scheduler(spec, num_stages)),
        run_config=ray_tune.RunConfig(
            name=TUNE_DIR, storage_path=str(sweep.output_dir), verbose=1 if is_verbose() else 0,
            failure_config=ray_tune.FailureConfig(max_failures=spec.max_failures, fail_fast=False),
            callbacks=[] if is_verbose() else [_trial_lines(num_stages, spec.num_samples)],
        ),
    )


def _trial_lines(num_stages: int, num_trials: int):
    """One line per trial stage and per trial end: the sweep's progress when Tune's own tables are off."""
    from ray.tune import Callback

    class TrialLines(Callback):
        ended = 0

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            if "new_acc" in result:
                log(f"trial {trial.trial_id} stage {result.get('stage', '?')}/{num_stages}: "
                    f"new-task acc {result['new_acc']:.3f}, retention {result.get('retention', math.nan):.3f}")

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self.ended += 1
            log(f"trial {trial.trial_id} ended ({self.ended} of {num_trials} trials)")

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self.ended += 1
            log(f"trial {trial.trial_id} failed ({self.ended} of {num_trials} trials; its error is in the table below)")

    return TrialLines()


def _sweep_params(sweep: Sweep, concurrency: int, num_stages: int) -> dict[str, Any]:
    spec = sweep.spec
    return {
        "sweep": {"name": spec.name, "search": spec.search, "metric": spec.metric, "weight_acc": spec.weight_acc,
                  "learning": spec.learning.model_dump(), "probe_weight": spec.probe_weight,
                  "optuna": spec.optuna.model_dump() if spec.optuna else "default",
                  "points_to_evaluate": len(sweep.points),
                  "num_samples": spec.num_samples, "concurrency": concurrency, "seed": spec.seed,
                  "scheduler": spec.scheduler.model_dump() if spec.scheduler else "none",
                  "stages": num_stages, "base": spec.base if isinstance(spec.base, str) else "inline"},
        "space": {dim.key: dim.describe() for dim in sweep.dimensions},
    }


def _close_trial_runs(tracker, experiment: str, sweep_run_id: str, rows: list[TrialRow]) -> None:
    """A stopped or failed trial is killed mid-run and leaves its MLflow runs RUNNING: end them truthfully.

    A trial rejected before its run started (a parameter the model cannot take)
    gets a FAILED run holding its parameters and error, so every trial shows in the UI.
    """
    tracker.flush()
    for row in rows:
        status = "FAILED" if row.status == "error" else "KILLED"
        runs = tracker.find_runs(experiment, f"tags.`{PARENT_TAG}` = '{sweep_run_id}' and "
                                             f"tags.`{TRIAL_TAG}` = '{row.trial_id}'")
        if not runs and row.status == "error":
            _record_rejected_trial(tracker, experiment, sweep_run_id, row)
        for run in runs:
            tracker.client.set_tag(run.info.run_id, TRIAL_STATUS_TAG, row.status)
            stages = tracker.find_runs(experiment, f"tags.`{PARENT_TAG}` = '{run.info.run_id}' and "
                                                   f"attributes.status = 'RUNNING'")
            for open_run in [run, *stages]:
                if open_run.info.status == "RUNNING":
                    tracker.client.set_terminated(open_run.info.run_id, status)


def _record_rejected_trial(tracker, experiment: str, sweep_run_id: str, row: TrialRow) -> None:
    client = tracker.client
    run = client.create_run(client.get_experiment_by_name(experiment).experiment_id,
                            run_name=f"trial-{row.trial_id}",
                            tags={PARENT_TAG: sweep_run_id, TRIAL_TAG: row.trial_id, TRIAL_STATUS_TAG: row.status,
                                  "secura.error": (row.error or "")[:5000]})
    for key, value in row.params.items():
        client.log_param(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, "FAILED")


def _load_state(sweep: Sweep, resume: bool) -> dict[str, Any]:
    path = sweep.output_dir / SWEEP_STATE
    if not path.exists():
        return {}
    if not resume:
        raise ValueError(f"{sweep.output_dir} already holds a sweep ({path}); pass --resume to continue it, "
                         f"or choose another output_dir")
    state = json.loads(path.read_text())
    if state.get("fingerprint") != sweep.fingerprint():
        raise ValueError(f"--resume: the sweep config differs from the one that started {sweep.output_dir}; "
                         f"resume with the same config or use a new output_dir")
    return state


def run_sweep(sweep: Sweep, *, resume: bool = False) -> SweepResult:
    """Run (or resume) the sweep; failed trials are reported in the table, never fatal."""
    import ray

    from pipelines.run import init_ray, select_tasks
    from pipelines.run_report import provenance_tags
    from pipelines.tracking import Tracker

    spec = sweep.spec
    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    state = _load_state(sweep, resume)
    base_run = parse_run_config(sweep.base, source="base")
    stream = base_run.load_stream(sweep.config_dir)
    tasks = [task.name for task in select_tasks(stream, base_run.tasks)]
    num_stages = len(tasks)
    if spec.metric in ("score", "probe_retention") and not stream.probe:
        raise ValueError(f"metric: {spec.metric} needs probe retention, but the stream has no probe; use metric: acc")
    if spec.metric == LEARN_THEN_RETAIN and not stream.probe and num_stages < 2:
        raise ValueError("metric: learn_then_retain needs something to retain: a probe or at least two tasks")
    check_scheduler(spec, num_stages)

    init_ray()
    # Trials resolve relative paths (stream YAMLs, model folders) like `secura run` does, not from a trial dir.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    need = trial_need(base_run, spec.resources_per_trial)
    concurrency = plan_concurrency(ray.cluster_resources(), need, spec.reserve_cpus, spec.max_concurrent)
    log(f"{num_stages} stages per trial; a trial needs {need}; {concurrency} trial(s) at once")
    if base_run.storage_path is None or base_run.scaling.backend == "local":
        prepare_shared_shards(base_run, stream, sweep.output_dir)  # else each trial has its own storage path

    with Tracker(sweep.tracking_uri, output_dir=sweep.output_dir) as tracker:
        sweep_run_id = tracker.start_parent(
            sweep.experiment, f"sweep:{spec.name}", params=_sweep_params(sweep, concurrency, num_stages),
            tags={SWEEP_TAG: spec.name, "secura.kind": "sweep", **provenance_tags()}, run_id=state.get("sweep_run_id"),
        )
        state = {"fingerprint": sweep.fingerprint(), "sweep_run_id": sweep_run_id}
        write_text_atomic(sweep.output_dir / SWEEP_STATE, json.dumps(state, indent=2))
        tracker.log_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), "sweep/sweep.yaml", parent=True)
        plan = TrialPlan(base=sweep.base, sweep_name=spec.name, sweep_dir=str(sweep.output_dir),
                         tracking_uri=sweep.tracking_uri, experiment=sweep.experiment, sweep_run_id=sweep_run_id,
                         weight_acc=spec.weight_acc, probe_weight=spec.probe_weight, tasks=tuple(tasks),
                         probes=tuple(probe.name for probe in stream.probe), config_dir=str(sweep.config_dir))
        results = _tuner(sweep, plan, concurrency, num_stages, resume).fit()
        rows = collect_trials(results, num_stages)
        _close_trial_runs(tracker, sweep.experiment, sweep_run_id, rows)
        return _report(sweep, tracker, sweep_run_id, rows, num_stages)


def _report(sweep: Sweep, tracker, sweep_run_id: str, rows: list[TrialRow], num_stages: int) -> SweepResult:
    """Table, CSV, plot, best config and Pareto set, on disk and on the sweep's MLflow run."""
    out = sweep.output_dir
    spec = sweep.spec
    selection = select(rows, spec.metric, LearningRule(spec.learning.fraction_of_best, spec.learning.min_gain))
    table = format_table(rows, num_stages, selection)
    print(f"\nsweep {spec.name}: {len(rows)} trials, metric {spec.metric} (* = best)\n{table}\n"
          f"{verdict(selection, spec.metric)}\n", flush=True)
    csv_text = trials_csv(rows, selection)
    write_text_atomic(out / "trials.csv", csv_text)
    tracker.log_artifact(out / "trials.csv", "sweep", parent=True)
    records = list(csv.DictReader(io.StringIO(csv_text)))
    tracker.log_table({key: [r[key] for r in records] for key in (records[0] if records else {})},
                      "sweep/trials.json", parent=True)
    tracker.set_tags({"secura.verdict": verdict(selection, spec.metric)[:5000]}, parent=True)
    tracker.log_text(table + "\n", "sweep/trials.txt", parent=True)
    plot = plot_sweep(plot_points(rows, selection, num_stages), selection, out / "pareto.png",
                      title=f"sweep {spec.name}: retention vs gain in new-task accuracy, every trial")
    if plot is not None:
        tracker.log_artifact(plot, "sweep", parent=True)
    if selection.front:
        tracker.log_artifact(write_pareto(sweep, selection), "sweep", parent=True)
    counts = {status: sum(row.status == status for row in rows) for status in ("completed", "stopped", "error")}
    counts["learning"] = sum(bool(selection.learns(row)) for row in rows if row.status == "completed")
    counts["front"] = len(selection.front)
    tracker.log_metrics({f"trials/{key}": count for key, count in counts.items()}, parent=True)
    best, best_path = selection.best, None
    if best is not None:
        best_path = out / BEST_RUN
        write_text_atomic(best_path, dump_run_config(best_run_config(sweep, best)))
        tracker.log_artifact(best_path, "sweep", parent=True)
        tracker.log_metrics({f"best/{key}": value for key in ("new_acc", "gain", "retention", "probe_retention",
                                                              "acc", "score")
                             if math.isfinite(value := getattr(best, key))}, parent=True)
        tracker.set_tags({"secura.best_trial_id": best.trial_id}, parent=True)
        log(f"best trial {best.trial_id}: new-task accuracy {best.new_acc:.3f} (untrained {best.base_new_acc:.3f}), "
            f"retention {best.retention:.3f}; run it with: secura run {best_path}")
    return SweepResult(sweep_run_id, rows, selection, best_path, out, table)


def sweep_command(args: argparse.Namespace) -> int:
    """``secura sweep SWEEP.yaml [--resume] [--tracking-uri URI] [--output-dir DIR]``."""
    from pipelines.folder_lock import folder_lock

    config = load_sweep(args.config, output_dir=args.output_dir, tracking_uri=args.tracking_uri)
    with folder_lock(config.output_dir, "secura sweep"):  # each trial's run holds its own folder too
        result = run_sweep(config, resume=args.resume)
    return 0 if result.best is not None else 1
