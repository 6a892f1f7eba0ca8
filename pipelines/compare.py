"""`secura compare`: methods × learning rates × seeds on one stream, judged on
the retention-vs-plasticity frontier (docs/secura-method.md §8).

One (method, lr) point from one seed says little: the learning rate moves
retention more than any method knob, and one seed on an 80-item probe is
±4–5 items. So every method gets its own lr grid, every point is run with
several seeds, and methods are compared (a) on their Pareto frontiers of mean
probe retention vs mean new-task accuracy and (b) on retention at matched
accuracy, with t-intervals over seeds. The issue's goals are then evaluated
from those numbers; a goal that the numbers cannot decide (too few seeds,
no point at the matched accuracy) is reported as such, never as met.

Layout under ``output_dir``: ``runs/<label>/lr<lr>/seed<seed>/`` (one
`run_continual` output dir each, plus ``compare.json``: status, wall time,
error), ``shards/`` (tokenised once, linked into every run), ``gpu-memory.json``
(with ``--gpu``: each distinct run's peak GPU memory, see `pipelines.gpu_memory`), ``mlflow.db``,
``runs.csv``, ``results.csv``, ``summary.md``, ``frontier.png``, ``frontier-forgetting.png`` and
``plots/<label>-*.png`` (mean accuracy matrix and retention curve of each
method's selected point). Each finished run also writes its result file
(`pipelines.results`) under ``results_dir`` (default ``output_dir/results``):
the tables and plots are computed from those files alone, and ``--resume``
skips every run whose file is present with its config's hash, on any machine.

In MLflow the comparison is one umbrella run (``compare:<name>``, tag
``secura.kind=compare``) with every run's parent nested under it; it holds
the results table, the files above, the goal verdicts (tags ``goal.N``) and
the matched points' numbers. Its id is kept in ``umbrella.json``, so
``--resume`` re-attaches to the same umbrella run.
"""
from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import math
import os
import statistics
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipelines.config import RunConfig, parse_run_config, read_base_run
from pipelines.files import read_yaml, write_text_atomic
from pipelines.folder_lock import folder_lock
from pipelines.gpu_memory import GIB, HEADROOM, RunMemory, measure_on_gpu, memory_key, run_bytes
from pipelines.preprocess import SHARDS, link_shared_shards, prepare_shared_shards
from pipelines.results import (Verdict, build_result, experiment_hash, read_result, result_matrix, result_path,
                               write_result)
from pipelines.run_report import NOTE_TAG, label_tags, markdown_table
from pipelines.ui_view import VIEW_NAME
from pipelines.tracking import PARENT_TAG

RECORD = "compare.json"
UMBRELLA = "umbrella.json"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # labels become directory names
Status = Literal["met", "not met", "cannot tell"]
FIELD_TEST_ITEMS = 100  # test items per task the continual-learning literature reports on


def log(message: str) -> None:
    from pipelines.run import log as run_log

    run_log(f"compare: {message}")


# --- the comparison YAML ----------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MethodEntry(_Strict):
    """One method of the comparison with its own lr grid (SECURA needs ~10× LoRA's lr)."""

    label: str = Field(pattern=NAME_PATTERN, description="names the method in tables, plots and folders")
    method: dict[str, Any] = Field(description="a run config's method section")
    lrs: list[float] = Field(min_length=1, description="learning rates of this method's grid")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted run-config keys for this method")
    more_seeds: dict[float, list[int]] = Field(
        default_factory=dict, description="seeds beyond the comparison's at some of this method's rates: a later "
        "round that adds seeds where the first round placed the method (e.g. {0.001: [1, 2]})")

    @model_validator(mode="after")
    def _positive(self) -> "MethodEntry":
        if any(lr <= 0 for lr in self.lrs) or len(set(self.lrs)) != len(self.lrs):
            raise ValueError(f"lrs: need distinct positive learning rates, got {self.lrs}")
        unknown = [lr for lr in self.more_seeds if lr not in self.lrs]
        if unknown:
            raise ValueError(f"more_seeds: {unknown} not in this method's lrs {self.lrs}")
        return self

    def seeds_at(self, lr: float, seeds: list[int]) -> list[int]:
        return seeds + [s for s in self.more_seeds.get(lr, []) if s not in seeds]


class GoalSpec(_Strict):
    """The issue's goals; which method is the claim and which are the baselines."""

    subject: str | None = Field(None, description="label the claim is about (default: first secura method)")
    baselines: list[str] | None = Field(None, description="default: every label whose method is not secura or full")
    retention_floor: float = Field(0.90, gt=0, description="probe retention the subject keeps at matched accuracy")
    item_margin: float = Field(10.0, ge=0, description="probe items kept beyond the best baseline")
    min_seeds: int = Field(3, ge=2, description="seeds a point needs before a goal can be met")


class CompareSpec(_Strict):
    name: str = Field("compare", pattern=NAME_PATTERN)
    base: str | dict[str, Any] = Field(description="a run YAML (relative to the compare YAML) or an inline run config")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted run-config keys every run sets")
    methods: list[MethodEntry] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    reference: str | None = Field(None, description="label whose best ACC sets the matched accuracy (default: lora)")
    match_fraction: float = Field(0.95, gt=0, le=1)
    accuracy: Literal["new_task", "final"] = Field(
        "new_task", description="x axis: new_task = mean R[j, j] (each task just after training it); "
        "final = ACC after the last stage")
    probe: str | None = Field(None, description="the probe whose retention is compared (default: the stream's first)")
    goals: GoalSpec = Field(default_factory=GoalSpec)
    output_dir: str = "runs/compare"
    results_dir: str | None = Field(
        None, description="where each finished run's result file goes (default: <output_dir>/results); relative "
        "paths resolve against the compare YAML's folder. Long comparisons commit theirs (docs/results/<name>/), "
        "and --resume on any machine skips the runs whose file is there")
    tracking_uri: str | None = None
    experiment: str | None = Field(None, description="default: the base run's experiment")

    @model_validator(mode="after")
    def _labels(self) -> "CompareSpec":
        labels = [m.label for m in self.methods]
        if len(set(labels)) != len(labels):
            raise ValueError(f"methods: labels must be unique, got {labels}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: must be distinct, got {self.seeds}")
        return self


@dataclass
class RunPlan:
    """One (method, lr, seed) run, its folder and its validated run config."""

    label: str
    lr: float
    seed: int
    run_dir: Path
    config: RunConfig
    result_file: Path


@dataclass
class Comparison:
    spec: CompareSpec
    plans: list[RunPlan]
    output_dir: Path
    config_dir: Path  # relative stream/data paths of the base resolve here
    tracking_uri: str
    reference: str
    subject: str | None
    baselines: list[str]
    umbrella_run_id: str | None = None  # the MLflow run every run's parent is nested under

    @property
    def labels(self) -> list[str]:
        return [m.label for m in self.spec.methods]


def _format_error(source: str, err: ValidationError) -> str:
    return "\n".join(
        f"{source}: {'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg'].removeprefix('Value error, ')}"
        for e in err.errors()
    )


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    from tune.space import set_dotted

    set_dotted(data, key, copy.deepcopy(value))


def _lr_dir(lr: float) -> str:
    return f"lr{lr:g}"


def _default_reference(spec: CompareSpec) -> str:
    for entry in spec.methods:
        if entry.method.get("name") in ("lora", "seq") and not entry.method.get("strategy"):
            return entry.label
    raise ValueError("reference: no plain LoRA method (name lora or seq) among methods; name the reference label")


def _goal_roles(spec: CompareSpec) -> tuple[str | None, list[str]]:
    names = {m.label: m.method.get("name") for m in spec.methods}
    subject = spec.goals.subject or next((label for label, name in names.items() if name == "secura"), None)
    baselines = spec.goals.baselines
    if baselines is None:
        baselines = [label for label, name in names.items() if name not in ("secura", "full")]
    for label in [subject, *baselines] if subject else baselines:
        if label not in names:
            raise ValueError(f"goals: {label!r} is not a method label ({sorted(names)})")
    return subject, [b for b in baselines if b != subject]


def parse_compare(data: Any, *, source: str = "<compare>", base_dir: Path = Path("."),
                  output_dir: str | None = None) -> Comparison:
    """Validate a comparison and build every run's config now, so a typo fails in seconds."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        spec = CompareSpec.model_validate(data)
    except ValidationError as err:
        raise ValueError(_format_error(source, err)) from None
    out = Path(output_dir or spec.output_dir).expanduser().resolve()
    results_dir = (base_dir / spec.results_dir).resolve() if spec.results_dir else out / "results"
    base, config_dir = read_base_run(spec.base, base_dir)
    for key, value in spec.overrides.items():
        _set_dotted(base, key, value)
    from pipelines.tracking import resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(spec.tracking_uri, out)
    experiment = spec.experiment or parse_run_config(base, source="base").experiment
    plans = []
    for entry in spec.methods:
        for lr in entry.lrs:
            for seed in entry.seeds_at(lr, spec.seeds):
                run_dir = out / "runs" / entry.label / _lr_dir(lr) / f"seed{seed}"
                data = copy.deepcopy(base)
                for key, value in entry.overrides.items():
                    _set_dotted(data, key, value)
                data.update(method=copy.deepcopy(entry.method), seed=seed, output_dir=str(run_dir),
                            tracking_uri=tracking_uri, experiment=experiment, name=f"{spec.name}-{entry.label}")
                _set_dotted(data, "train.lr", lr)
                config = parse_run_config(data, source=f"{source}: methods[{entry.label}] lr {lr:g} seed {seed}")
                plans.append(RunPlan(entry.label, lr, seed, run_dir, config,
                                     result_path(results_dir, entry.label, lr, seed)))
    reference = spec.reference or _default_reference(spec)
    if reference not in {m.label for m in spec.methods}:
        raise ValueError(f"{source}: reference: {reference!r} is not a method label")
    subject, baselines = _goal_roles(spec)
    return Comparison(spec, plans, out, config_dir, tracking_uri, reference, subject, baselines)


def load_compare(path: str | Path, output_dir: str | None = None) -> Comparison:
    path = Path(path)
    data = read_yaml(path, "compare config")
    return parse_compare(data, source=str(path), base_dir=path.resolve().parent, output_dir=output_dir)


# --- running -----------------------------------------------------------------------------


def _read_record(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_record(run_dir: Path, record: dict[str, Any]) -> None:
    write_text_atomic(run_dir / RECORD, json.dumps(record, indent=2, sort_keys=True))


def _run_one(comparison: Comparison, plan: RunPlan, resume: bool) -> dict[str, Any]:
    """One run; a failure is recorded in its folder and returned, never raised."""
    from pipelines.run import JOURNAL, run_continual

    previous = _read_record(plan.run_dir)
    record = {"label": plan.label, "lr": plan.lr, "seed": plan.seed, "status": "running",
              "wall_s": float(previous.get("wall_s", 0.0)) if resume else 0.0}
    if not plan.config.storage_path:
        link_shared_shards(comparison.output_dir, plan.run_dir)
    _write_record(plan.run_dir, record)
    started = time.time()
    tags = {"secura.compare": comparison.spec.name, "secura.compare.label": plan.label,
            "secura.compare.lr": f"{plan.lr:g}", **label_tags(comparison.labels, plan.label)}
    if comparison.umbrella_run_id:
        tags[PARENT_TAG] = comparison.umbrella_run_id
    try:
        result = run_continual(
            plan.config, resume=resume and (plan.run_dir / JOURNAL).exists(), config_dir=comparison.config_dir,
            parent_tags=tags,
        )
        record.update(status="finished", summary=result.summary)
    except Exception as error:  # noqa: BLE001 - one failed run must not end the comparison
        record.update(status="failed", error=f"{type(error).__name__}: {error}",
                      traceback=traceback.format_exc()[-4000:])
    record["wall_s"] += time.time() - started
    _write_record(plan.run_dir, record)
    if record["status"] == "finished":  # built where the run's files are; the driver writes it (`_keep_result`)
        record["result"] = run_result(comparison, plan, record["wall_s"])
    return record


def run_result(comparison: Comparison, plan: RunPlan, wall_s: float) -> dict[str, Any]:
    """The result file of a finished run, from its folder, its MLflow stages and the code that ran it."""
    from pipelines.metrics import AccuracyMatrix
    from pipelines.run import JOURNAL, Journal
    from pipelines.run_report import provenance_tags

    journal = Journal.load(plan.run_dir / JOURNAL)
    matrix = AccuracyMatrix.from_csv((plan.run_dir / "accuracy_matrix.csv").read_text())
    stage_metrics = {stage: record.get("metrics", {name: {"score": score}
                                                   for name, score in record.get("scores", {}).items()})
                     for stage, record in sorted(journal.stages.items(), key=lambda kv: int(kv[0]))}
    return build_result(label=plan.label, lr=plan.lr, seed=plan.seed, config=plan.config, matrix=matrix,
                        stage_metrics=stage_metrics, probe_items_total=probe_totals(plan.config, plan.run_dir, comparison.config_dir),
                        wall_s=wall_s, trainable_params=count_trainable(plan.config),
                        diagnostics=_run_diagnostics(comparison, plan.run_dir),
                        commit=provenance_tags().get("mlflow.source.git.commit"))


def _run_diagnostics(comparison: Comparison, run_dir: Path) -> dict[str, float]:
    """Drift and S-MagNorm statistics from the run's MLflow stages (none when the store is out of reach)."""
    from mlflow.tracking import MlflowClient

    from pipelines.diagnostics import run_diagnostics

    try:
        return run_diagnostics(MlflowClient(tracking_uri=comparison.tracking_uri), run_dir)
    except Exception as error:  # noqa: BLE001 - an unreachable store leaves the diagnostics empty, not the run
        log(f"{run_dir}: no drift or S-MagNorm statistics ({type(error).__name__}: {error})")
        return {}


def _keep_result(plan: RunPlan, record: dict[str, Any]) -> dict[str, Any]:
    """Write a finished run's result file (the driver holds ``results_dir``, which may be a git checkout)."""
    result = record.pop("result", None)
    if result is not None:
        write_result(plan.result_file, result)
    return record


def plan_result(plan: RunPlan) -> Verdict:
    return read_result(plan.result_file, experiment_hash(plan.config))


def _eta(durations: list[float], remaining: float) -> str:
    if not durations:
        return "ETA unknown"
    seconds = statistics.fmean(durations) * remaining
    return f"ETA {seconds / 60:.0f} min" if seconds >= 60 else f"ETA {seconds:.0f} s"


def select_plans(comparison: Comparison, only: list[str]) -> list[RunPlan]:
    """``--only``: keep the runs of these labels (or method names)."""
    if not only:
        return comparison.plans
    names = {m.label: str(m.method.get("name")) for m in comparison.spec.methods}
    unknown = [o for o in only if o not in names and o not in names.values()]
    if unknown:
        raise ValueError(f"--only {unknown}: not a method label or name ({sorted(names)})")
    return [p for p in comparison.plans if p.label in only or names[p.label] in only]


@dataclass
class Placement:
    """Where the runs go: how many at once, and what each one reserves.

    Runs are independent, so ``parallel`` of them run at once as Ray tasks (on a
    cluster: across its nodes), each with its share of the cores as torch threads:
    a small model trains faster as two one-thread processes than as one two-thread
    process on the same two cores. On GPUs a run reserves ``gpu_fraction`` of one:
    a whole GPU without a memory estimate, else 1/k for the k runs one GPU holds.
    """

    parallel: int = 1
    cpus_per_run: int = 1  # Ray's reservation and the run's torch threads
    gpu: bool = False
    gpu_fraction: float = 1.0  # of one GPU, per run (with gpu)


GPU_ENV = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}  # runs sharing a GPU fragment it less


def runs_per_gpu(memory: RunMemory) -> int:
    """How many runs of ``memory.run_bytes`` one GPU holds; a run larger than the GPU is refused."""
    if memory.run_bytes > memory.gpu_bytes:
        raise ValueError(
            f"--gpu: one run needs {memory.run_bytes / 2**30:.1f} GiB ({memory.source} peak x "
            f"{HEADROOM:g} + the CUDA context), more than a GPU's {memory.gpu_bytes / 2**30:.1f} GiB; lower "
            f"train.batch_size, or use train.precision bf16, train.gradient_checkpointing or a shorter max_length")
    return memory.gpu_bytes // memory.run_bytes


def placement(parallel: int, gpu: bool, cluster: dict[str, float], memory: RunMemory | None = None) -> Placement:
    """``--parallel`` and ``--gpu`` against what the cluster has; say what was lowered.

    With ``memory`` (one run's measured need) runs share GPUs: as many at once as fit in the GPUs'
    memory and as the machine has cores, since each run drives its GPU work from one core; each
    reserves 1/k of a GPU for the k runs a GPU then holds. Without it a run takes a whole GPU.
    """
    if parallel < 1:
        raise ValueError(f"--parallel must be >= 1, got {parallel}")
    gpus = int(cluster.get("GPU", 0))
    if gpu and not gpus:
        log("--gpu: no GPU in the cluster; the runs train on CPU")
        gpu = False
    cores = max(1, int(os.cpu_count() or 1))
    fraction = 1.0
    if gpu:
        per_gpu = 1 if memory is None else runs_per_gpu(memory)
        if parallel > gpus * per_gpu:
            why = "one GPU per run" if memory is None else f"{per_gpu} run(s) of {memory.describe()}"
            log(f"--parallel {parallel} lowered to {gpus * per_gpu}: {why}")
            parallel = gpus * per_gpu
        if memory is not None and parallel > cores:
            log(f"--parallel {parallel} lowered to {cores}: one core per run drives its GPU work")
            parallel = cores
        fraction = math.floor(10_000 / math.ceil(parallel / gpus)) / 10_000  # Ray counts GPUs in 1e-4 steps
    return Placement(parallel=parallel, cpus_per_run=max(1, cores // parallel), gpu=gpu, gpu_fraction=fraction)


def task_options(where: Placement) -> dict[str, Any]:
    """Ray options of one run's task: its cores, and on a GPU its fraction and allocator settings."""
    options: dict[str, Any] = {"num_cpus": where.cpus_per_run, "max_retries": 0}
    if where.gpu:
        options |= {"num_gpus": where.gpu_fraction, "runtime_env": {"env_vars": dict(GPU_ENV)}}
    return options


def place(plan: RunPlan, where: Placement) -> RunPlan:
    """The plan with the threads and device of its placement (neither enters the resume fingerprint)."""
    train = plan.config.train.model_copy(update={"torch_threads": plan.config.train.torch_threads
                                                 or where.cpus_per_run})
    scaling = plan.config.scaling.model_copy(update={"use_gpu": plan.config.scaling.use_gpu or where.gpu})
    return replace(plan, config=plan.config.model_copy(update={"train": train, "scaling": scaling}))


def _prepare_shared(comparison: Comparison, plan: RunPlan) -> None:
    """What runs would otherwise race to create: the stream's shards, the MLflow store and experiment.

    Created once here, in the driver; the experiment keeps its artifacts under
    the comparison's folder rather than under whichever run came first.
    """
    from pipelines.tracking import Tracker

    stream = plan.config.load_stream(comparison.config_dir)
    prepare_shared_shards(plan.config, stream, comparison.output_dir)
    if comparison.umbrella_run_id is None:  # else the umbrella run created it (and drains this folder's spool)
        Tracker(comparison.tracking_uri, output_dir=comparison.output_dir).ensure_experiment(plan.config.experiment)


def execute(comparison: Comparison, plans: list[RunPlan], *, resume: bool,
            parallel: int = 1, gpu: bool = False) -> list[dict[str, Any]]:
    """Run the plans (in this process, or ``parallel`` at a time as Ray tasks), logging each start and end."""
    from pipelines.run import JOURNAL, init_ray

    started_elsewhere = [p.run_dir for p in plans if (p.run_dir / JOURNAL).exists() or p.result_file.exists()]
    if started_elsewhere and not resume:
        raise ValueError(f"{comparison.output_dir} already holds {len(started_elsewhere)} run(s) of this "
                         f"comparison; pass --resume to skip the finished ones, or choose another --output-dir")
    records: dict[int, dict[str, Any]] = {}
    todo: list[int] = []
    for i, plan in enumerate(plans):
        done = _finished_result(comparison, plan, i, plans) if resume else None
        if done is not None:
            records[i] = done
        else:
            todo.append(i)
    if not todo:
        return [records[i] for i in sorted(records)]
    init_ray()
    _prepare_shared(comparison, plans[todo[0]])
    if parallel == 1 and not gpu:
        progress = _Progress(plans, len(todo), parallel=1)
        for i in todo:
            progress.started(i)
            records[i] = progress.ended(i, _keep_result(plans[i], _run_one(comparison, plans[i], resume)))
    else:
        records.update(_execute_on_ray(comparison, plans, todo, resume, parallel, gpu))
    return [records[i] for i in sorted(records)]


def _finished_result(comparison: Comparison, plan: RunPlan, i: int, plans: list[RunPlan]) -> dict[str, Any] | None:
    """``--resume``: the record of a run whose result file stands for it, else None (it runs again).

    A run finished before result files existed gets its file from its folder; a run folder left by another
    config is set aside, so that the rerun starts clean.
    """
    from pipelines.run import JOURNAL, Journal, config_fingerprint

    verdict = plan_result(plan)
    if verdict.usable:
        log(f"{_where(plans, i)}: result file {plan.result_file.name} present, skipped")
        return {"label": plan.label, "lr": plan.lr, "seed": plan.seed, "status": "finished",
                "wall_s": float(verdict.result["wall_s"])}
    journal = Journal.load(plan.run_dir / JOURNAL)
    if journal and journal.config_hash != config_fingerprint(plan.config):
        aside = plan.run_dir.with_name(f"{plan.run_dir.name}.stale-{int(time.time())}")
        os.replace(plan.run_dir, aside)
        log(f"{_where(plans, i)}: its folder was made by another config, moved to {aside.name}")
    elif verdict.reason == "missing" and journal and journal.finished:
        record = _read_record(plan.run_dir)
        write_result(plan.result_file, run_result(comparison, plan, float(record.get("wall_s", 0.0))))
        log(f"{_where(plans, i)}: finished earlier, result file written from its folder")
        return record
    if verdict.reason != "missing":
        log(f"{_where(plans, i)}: result file {plan.result_file} is {verdict.reason}; running it again")
    return None


def _where(plans: list[RunPlan], i: int) -> str:
    return f"[{i + 1}/{len(plans)}] {plans[i].label} lr {plans[i].lr:g} seed {plans[i].seed}"


class _Progress:
    """The start and end lines of every run, with an ETA from the runs finished so far."""

    def __init__(self, plans: list[RunPlan], total: int, parallel: int) -> None:
        self.plans, self.left, self.parallel, self.durations = plans, total, parallel, []

    def started(self, i: int) -> None:
        log(f"{_where(self.plans, i)}: starting ({_eta(self.durations, self.left / self.parallel)})")

    def ended(self, i: int, record: dict[str, Any]) -> dict[str, Any]:
        self.left -= 1
        self.durations.append(record["wall_s"])
        status = record["status"] if record["status"] == "finished" else f"FAILED ({record['error']})"
        log(f"{_where(self.plans, i)}: {status} in {record['wall_s'] / 60:.1f} min "
            f"({_eta(self.durations, self.left / self.parallel)})")
        return record


def gpu_memory(comparison: Comparison, plans: list[RunPlan]) -> RunMemory:
    """One run's reservation: the largest measured peak of the plans (see `pipelines.gpu_memory`).

    Measured once per distinct memory key, in one Ray task that holds a whole GPU and ends with its
    process (so its memory goes back), and kept in ``gpu-memory.json`` for ``--resume``.
    """
    import ray

    path = comparison.output_dir / "gpu-memory.json"
    cache = json.loads(path.read_text()) if path.is_file() else {"peaks": {}}
    configs = {memory_key(plan.config): plan.config for plan in plans}
    missing = {key: config for key, config in configs.items() if key not in cache["peaks"]}
    if missing:
        log(f"memory: measuring {len(missing)} distinct run(s) on a GPU")
        measure = ray.remote(num_gpus=1, max_calls=1, max_retries=0)(measure_on_gpu)
        total, peaks = ray.get(measure.options(runtime_env={"env_vars": dict(GPU_ENV)}).remote(
            missing, str(comparison.config_dir), str(comparison.output_dir)))
        cache = {"gpu_bytes": total, "peaks": cache["peaks"] | peaks}
        write_text_atomic(path, json.dumps(cache, indent=1))
    measured = {key: cache["peaks"][key] for key in configs}
    for key, entry in measured.items():
        labels = sorted({plan.label for plan in plans if memory_key(plan.config) == key})
        log(f"memory: {', '.join(labels)}: peak {entry['peak'] / GIB:.2f} GiB ({entry['source']}), "
            f"reserves {run_bytes(entry['peak']) / GIB:.2f} GiB")
    worst = max(measured.values(), key=lambda entry: entry["peak"])
    return RunMemory(run_bytes(worst["peak"]), cache["gpu_bytes"], worst["source"])


def _collect(ref, plan: RunPlan) -> dict[str, Any]:
    """A run's record; a worker that died (killed for host memory, a CUDA fault) is that run's failure."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayError as error:
        first_line = next(iter(str(error).strip().splitlines()), "")
        record = {"wall_s": 0.0, **_read_record(plan.run_dir), "label": plan.label, "lr": plan.lr,
                  "seed": plan.seed, "status": "failed", "error": f"{type(error).__name__}: {first_line}"}
        _write_record(plan.run_dir, record)
        return record


def _execute_on_ray(comparison: Comparison, plans: list[RunPlan], todo: list[int], resume: bool,
                    parallel: int, gpu: bool) -> dict[int, dict[str, Any]]:
    """``parallel`` runs at a time as Ray tasks, each with its threads (and its share of a GPU) reserved.

    On GPUs each run is a fresh process (Ray's default for GPU tasks), so its memory goes back when it
    ends and one run's CUDA fault cannot spoil the next.
    """
    import ray

    cluster = ray.cluster_resources()
    memory = gpu_memory(comparison, [plans[i] for i in todo]) if gpu and cluster.get("GPU") else None
    where = placement(parallel, gpu, cluster, memory)
    if where.gpu:
        log(f"{where.parallel} run(s) at a time, {where.gpu_fraction:g} GPU and {where.cpus_per_run} "
            f"thread(s) each")
    progress = _Progress(plans, len(todo), where.parallel)
    run = ray.remote(max_calls=1 if where.gpu else 0)(_run_one).options(**task_options(where))
    # seed-major: a comparison cut short still has every point at its first seeds
    queue, pending, records = sorted(todo, key=lambda i: (plans[i].seed, i)), {}, {}
    while queue or pending:
        while queue and len(pending) < where.parallel:
            i = queue.pop(0)
            progress.started(i)
            pending[run.remote(comparison, place(plans[i], where), resume)] = i
        done, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(done[0])
        records[i] = progress.ended(i, _keep_result(plans[i], _collect(done[0], plans[i])))
    return records


# --- results of the runs -----------------------------------------------------------------


@dataclass
class RunResultRow:
    """What one finished run contributes to its point."""

    label: str
    lr: float
    seed: int
    status: str  # finished, failed, running (interrupted), missing
    new_acc: float = math.nan  # mean R[j, j]: each task right after training it
    acc: float = math.nan  # ACC after the last stage
    bwt: float = math.nan
    forgetting: float = math.nan
    retention: float = math.nan  # probe score after the last stage / base probe score
    probe_items: float = math.nan  # probe items right after the last stage
    base_items: float = math.nan
    wall_s: float = math.nan
    error: str = ""


def new_task_accuracy(matrix) -> float:
    """Mean of R[j, j]: plasticity, the accuracy on each task right after training it."""
    return statistics.fmean(matrix[j, task] for j, task in enumerate(matrix.tasks, start=1))


def row_from_matrix(label: str, lr: float, seed: int, matrix, probe: str, probe_total: int,
                    wall_s: float) -> RunResultRow:
    last = len(matrix.tasks)
    final, base = matrix[last, probe], matrix[0, probe]
    return RunResultRow(
        label=label, lr=lr, seed=seed, status="finished", new_acc=new_task_accuracy(matrix), acc=matrix.acc(last),
        bwt=matrix.bwt(last), forgetting=matrix.forgetting(last),
        retention=final / base if base else math.nan, probe_items=final * probe_total,
        base_items=base * probe_total, wall_s=wall_s,
    )


def read_run(plan: RunPlan, probe: str) -> RunResultRow:
    """A run's row from its result file alone; without one, what its folder says it is doing."""
    verdict = plan_result(plan)
    if verdict.usable:
        result = verdict.result
        return row_from_matrix(plan.label, plan.lr, plan.seed, result_matrix(result), probe,
                               int(result["probe_items_total"][probe]), float(result["wall_s"]))
    record = _read_record(plan.run_dir)
    status = record.get("status", "missing")
    return RunResultRow(plan.label, plan.lr, plan.seed, status if status != "finished" else "missing",
                        wall_s=float(record.get("wall_s", math.nan)), error=record.get("error", ""))


def _point_results(comparison: Comparison, point: "Point") -> list[dict[str, Any]]:
    """The result files of a point's finished seeds."""
    return [plan_result(plan).result for plan in comparison.plans
            if (plan.label, plan.lr) == (point.label, point.lr) and plan.seed in point.seeds]


# --- aggregation -------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """Mean over seeds with a 95% t-interval half-width (None with one value: no interval)."""

    mean: float
    half: float | None
    n: int

    @property
    def low(self) -> float:
        return self.mean - (self.half if self.half is not None else math.inf)

    @property
    def high(self) -> float:
        return self.mean + (self.half if self.half is not None else math.inf)

    def text(self, digits: int = 3) -> str:
        if self.n == 0:
            return "–"
        if self.half is None:
            return f"{self.mean:.{digits}f} (n=1, no CI)"
        return f"{self.mean:.{digits}f} ± {self.half:.{digits}f}"


def t_interval(values: list[float], confidence: float = 0.95) -> Estimate:
    """Student-t interval of the mean: seeds are few (3), so not a normal interval."""
    from scipy import stats

    values = [v for v in values if not math.isnan(v)]
    n = len(values)
    if n == 0:
        return Estimate(math.nan, None, 0)
    mean = statistics.fmean(values)
    if n == 1:
        return Estimate(mean, None, 1)
    sem = statistics.stdev(values) / math.sqrt(n)
    return Estimate(mean, float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sem, n)


METRICS = ("new_acc", "acc", "bwt", "forgetting", "retention", "probe_items", "wall_s")


@dataclass
class Point:
    """One (method, lr) point aggregated over its finished seeds."""

    label: str
    lr: float
    stats: dict[str, Estimate]
    seeds: list[int]
    trainable_params: int | None = None
    on_frontier: bool = False

    @property
    def n(self) -> int:
        return len(self.seeds)

    def x(self, accuracy: str) -> Estimate:
        return self.stats["new_acc" if accuracy == "new_task" else "acc"]


def aggregate(rows: list[RunResultRow]) -> list[Point]:
    """Per (method, lr): mean and CI of every metric over the finished seeds, in first-seen order."""
    keys = list(dict.fromkeys((r.label, r.lr) for r in rows))
    points = []
    for label, lr in keys:
        done = [r for r in rows if (r.label, r.lr) == (label, lr) and r.status == "finished"]
        if done:
            stats = {m: t_interval([getattr(r, m) for r in done]) for m in METRICS}
            points.append(Point(label, lr, stats, [r.seed for r in done]))
    return points


def _xy(point: Point, accuracy: str) -> dict[str, float]:
    return {"plasticity": point.x(accuracy).mean, "retention": point.stats["retention"].mean}


def mark_frontiers(points: list[Point], accuracy: str) -> None:
    """Per method, the lr points no other lr point of it beats on both mean ACC and mean retention."""
    from pipelines.plots import pareto_front

    for label in dict.fromkeys(p.label for p in points):
        members = [p for p in points if p.label == label]
        front = set(pareto_front([_xy(p, accuracy) for p in members]))
        for i, point in enumerate(members):
            point.on_frontier = i in front


def frontier(points: list[Point], label: str) -> list[Point]:
    return [p for p in points if p.label == label and p.on_frontier]


def frontier_dominates(a: list[Point], b: list[Point], accuracy: str) -> bool:
    """A's frontier dominates B's: every B frontier point is matched or beaten on both axes by some
    A frontier point (so at every ACC level B reaches, A keeps at least as much), and not vice versa."""
    def covers(xs: list[Point], ys: list[Point]) -> bool:
        return all(any(_xy(p, accuracy)["plasticity"] >= _xy(q, accuracy)["plasticity"]
                       and _xy(p, accuracy)["retention"] >= _xy(q, accuracy)["retention"] for p in xs) for q in ys)

    return bool(a) and bool(b) and covers(a, b) and not covers(b, a)


@dataclass
class Matched:
    """Retention at matched accuracy: the threshold and each method's chosen point (None: none reaches it)."""

    threshold: float
    reference_best: float
    chosen: dict[str, Point | None]


def matched_accuracy(points: list[Point], labels: list[str], reference: str, fraction: float,
                     accuracy: str) -> Matched:
    """Per method, among its lr points with mean ACC ≥ fraction × the reference's best mean ACC,
    the one with the highest mean retention."""
    ref = [p.x(accuracy).mean for p in points if p.label == reference]
    best = max(ref) if ref else math.nan
    threshold = fraction * best
    chosen: dict[str, Point | None] = {}
    for label in labels:
        eligible = [p for p in points if p.label == label and p.x(accuracy).mean >= threshold]
        chosen[label] = max(eligible, key=lambda p: p.stats["retention"].mean, default=None)
    return Matched(threshold, best, chosen)


# --- goals -------------------------------------------------------------------------------


@dataclass
class Goal:
    name: str
    status: Status
    detail: str


def _too_few(points: list[Point], min_seeds: int) -> list[str]:
    return [f"{p.label} lr {p.lr:g} (n={p.n})" for p in points if p.n < min_seeds]


def goal_frontier(points: list[Point], subject: str, baselines: list[str], accuracy: str, min_seeds: int) -> Goal:
    name = f"{subject}'s frontier dominates every baseline's"
    beaten = {b: frontier_dominates(frontier(points, subject), frontier(points, b), accuracy) for b in baselines}
    missing = [b for b in [subject, *baselines] if not frontier(points, b)]
    detail = "; ".join(f"vs {b}: {'dominates' if ok else 'does not dominate'}" for b, ok in beaten.items())
    if missing:
        return Goal(name, "cannot tell", f"no finished runs for {missing}. {detail}")
    few = _too_few([p for p in points if p.label in [subject, *baselines]], min_seeds)
    if few:
        return Goal(name, "cannot tell", f"fewer than {min_seeds} seeds: {', '.join(few)}. On the means: {detail}")
    return Goal(name, "met" if all(beaten.values()) else "not met", f"on mean points: {detail}")


def goal_floor(matched: Matched, subject: str, floor: float, min_seeds: int) -> Goal:
    name = f"{subject} keeps ≥ {floor:.0%} of the base probe at ≥ matched accuracy"
    point = matched.chosen.get(subject)
    if point is None:
        return Goal(name, "not met", f"no {subject} point reaches ACC ≥ {matched.threshold:.3f}")
    ret = point.stats["retention"]
    detail = f"lr {point.lr:g}: retention {ret.text()}"
    if point.n < min_seeds:
        return Goal(name, "cannot tell", f"{detail}; only {point.n} seed(s), {min_seeds} needed")
    return Goal(name, "met" if ret.mean >= floor else "not met", detail)


def goal_margin(matched: Matched, subject: str, baselines: list[str], margin: float, min_seeds: int) -> Goal:
    name = f"{subject} keeps ≥ {margin:g} probe items more than the best baseline at matched accuracy, CIs apart"
    mine = matched.chosen.get(subject)
    rivals = [matched.chosen[b] for b in baselines if matched.chosen.get(b) is not None]
    if mine is None:
        return Goal(name, "not met", f"no {subject} point reaches ACC ≥ {matched.threshold:.3f}")
    if not rivals:
        return Goal(name, "cannot tell", "no baseline point reaches the matched accuracy")
    best = max(rivals, key=lambda p: p.stats["probe_items"].mean)
    a, b = mine.stats["probe_items"], best.stats["probe_items"]
    gap = a.mean - b.mean
    detail = (f"{subject} lr {mine.lr:g}: {a.text(1)} items; best baseline {best.label} lr {best.lr:g}: "
              f"{b.text(1)} items; difference {gap:+.1f}")
    if min(mine.n, best.n) < min_seeds:
        return Goal(name, "cannot tell", f"{detail}; fewer than {min_seeds} seeds, no usable CI")
    apart = a.low > b.high
    detail += f"; CIs {'apart' if apart else 'overlap'}"
    return Goal(name, "met" if gap >= margin and apart else "not met", detail)


def evaluate_goals(points: list[Point], matched: Matched, subject: str | None, baselines: list[str],
                   goals: GoalSpec, accuracy: str) -> list[Goal]:
    """The issue's goals, each decided from the numbers alone."""
    if subject is None:
        return [Goal("goals", "cannot tell", "no SECURA method in the comparison (set goals.subject)")]
    return [
        goal_frontier(points, subject, baselines, accuracy, goals.min_seeds),
        goal_floor(matched, subject, goals.retention_floor, goals.min_seeds),
        goal_margin(matched, subject, baselines, goals.item_margin, goals.min_seeds),
    ]


# --- reports -----------------------------------------------------------------------------


def runs_csv(rows: list[RunResultRow]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(asdict(rows[0])) if rows else ["label"], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(asdict(row))
    return buffer.getvalue()


def results_csv(points: list[Point]) -> str:
    """One row per (method, lr): n, then mean / CI half-width (empty with n=1) of every metric."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["label", "lr", "n", "seeds", "trainable_params", "on_frontier",
                     *(f"{m}_{part}" for m in METRICS for part in ("mean", "ci95"))])
    for p in points:
        values = [v for m in METRICS for v in (repr(p.stats[m].mean), "" if p.stats[m].half is None
                                               else repr(p.stats[m].half))]
        writer.writerow([p.label, repr(p.lr), p.n, " ".join(map(str, p.seeds)),
                         "" if p.trainable_params is None else p.trainable_params, p.on_frontier, *values])
    return buffer.getvalue()


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _params(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def points_table(points: list[Point], accuracy: str) -> str:
    acc_name = "new-task ACC" if accuracy == "new_task" else "final ACC"
    header = ["method", "lr", "n", acc_name, "final ACC" if accuracy == "new_task" else "new-task ACC", "BWT",
              "forgetting", "probe retention", "probe items", "trainable params", "wall min", "frontier"]
    other = "acc" if accuracy == "new_task" else "new_acc"
    rows = [[p.label, f"{p.lr:g}", str(p.n), p.x(accuracy).text(), p.stats[other].text(), p.stats["bwt"].text(),
             p.stats["forgetting"].text(), p.stats["retention"].text(), p.stats["probe_items"].text(1),
             _params(p.trainable_params), f"{p.stats['wall_s'].mean / 60:.1f}", "yes" if p.on_frontier else ""]
            for p in points]
    return _table(header, rows)


def diagnostics_table(comparison: Comparison, points: list[Point]) -> str:
    """Per point, the mean over its finished seeds of what training logged: drift and S-MagNorm (why)."""
    from pipelines.diagnostics import DRIFT_KEYS, MAGNORM_KEYS, mean_diagnostics

    def cell(value: float, digits: int = 3) -> str:
        return "–" if math.isnan(value) else f"{value:.{digits}f}"

    rows = []
    for p in points:
        d = mean_diagnostics([r.get("diagnostics", {}) for r in _point_results(comparison, p)],
                             (*DRIFT_KEYS, *MAGNORM_KEYS))
        rows.append([p.label, f"{p.lr:g}", str(p.n), cell(d["drift/rel_spectral_mean"], 4),
                     cell(d["drift/rel_spectral_max"], 4), cell(d["drift/rel_frobenius_mean"], 4),
                     cell(d["magnorm/s_mean"]), cell(d["magnorm/frac_ge_1_8"]), cell(d["magnorm/brake_rate"])])
    header = ["method", "lr", "n", "drift ‖ΔW‖₂/‖W‖₂ mean", "max", "‖ΔW‖_F/‖W‖_F mean",
              "S mean", "frac S ≥ 1.8", "brake rate"]
    return _table(header, rows)


def matched_table(matched: Matched, labels: list[str], accuracy: str) -> str:
    rows = []
    for label in labels:
        p = matched.chosen.get(label)
        if p is None:
            rows.append([label, "no point reaches it", "", "", "", ""])
        else:
            rows.append([label, f"{p.lr:g}", str(p.n), p.x(accuracy).text(), p.stats["retention"].text(),
                         p.stats["probe_items"].text(1)])
    return _table(["method", "lr", "n", "ACC", "probe retention", "probe items"], rows)


def summary_markdown(comparison: Comparison, rows: list[RunResultRow], points: list[Point], matched: Matched,
                     goals: list[Goal], probe: str, probe_total: int) -> str:
    spec = comparison.spec
    counts = {s: sum(r.status == s for r in rows) for s in dict.fromkeys(r.status for r in rows)}
    base = [r.base_items for r in rows if r.status == "finished"]
    acc_name = "new-task ACC (mean R[j,j])" if spec.accuracy == "new_task" else "final ACC"
    lines = [
        f"# Comparison `{spec.name}`", "",
        f"Runs: {', '.join(f'{n} {s}' for s, n in counts.items())} of {len(rows)}; "
        f"seeds {spec.seeds}. Probe `{probe}`: {probe_total} items"
        + (f", base model {statistics.fmean(base):.0f}/{probe_total}." if base else "."),
        f"Accuracy axis: {acc_name}. Intervals: 95% Student-t over seeds (n=1: none).", "",
        "## Goals (computed from the numbers below)", "",
        *[f"- **{g.status.upper()}** — {g.name}: {g.detail}" for g in goals], "",
        f"## Retention at matched accuracy (ACC ≥ {spec.match_fraction:g} × best {comparison.reference} "
        f"ACC {matched.reference_best:.3f} = {matched.threshold:.3f})", "",
        matched_table(matched, comparison.labels, spec.accuracy), "",
        "## Every (method, lr) point", "",
        "`frontier`: on the method's own Pareto frontier of mean retention vs mean ACC over its lr grid.", "",
        points_table(points, spec.accuracy), "",
        "## Why: how far each point moved the weights, and what S-MagNorm did", "",
        "Drift: the adapter-held ΔW of every adapted layer after the last stage, relative to the base "
        "weight (under M1 the part already merged into the base is not counted). S statistics "
        "(SECURA only): mean over every logged training window.", "",
        diagnostics_table(comparison, points), "",
    ]
    if comparison.subject:
        rows_dom = [[b, "yes" if frontier_dominates(frontier(points, comparison.subject), frontier(points, b),
                                                    spec.accuracy) else "no"] for b in comparison.baselines]
        lines += ["## Frontier dominance (on mean points)", "",
                  _table([f"{comparison.subject} dominates", ""], rows_dom), ""]
    failed = [r for r in rows if r.status == "failed"]
    if failed:
        lines += ["## Failed runs", "", *[f"- {r.label} lr {r.lr:g} seed {r.seed}: {r.error}" for r in failed], ""]
    lines += ["Plots: `frontier.png` (probe retention) and `frontier-forgetting.png` (1 − forgetting of earlier "
              "tasks) against accuracy; `plots/<method>-accuracy_matrix.png` and `plots/<method>-retention.png` "
              "(mean over seeds of each method's matched point, else its highest-retention point)."]
    return "\n".join(lines) + "\n"


FRONTIER_PLANES = {  # file → (a point's y value and its interval half-width, y label); higher is better
    "frontier.png": (lambda p: (p.stats["retention"].mean, p.stats["retention"].half),
                     "probe retention (final / base)"),
    "frontier-forgetting.png": (lambda p: (1.0 - p.stats["forgetting"].mean, p.stats["forgetting"].half),
                                "1 − forgetting of earlier tasks"),
}


def draw_frontier(points: list[Point], path: Path, accuracy: str, title: str, plane: str = "frontier.png") -> None:
    """One plane of the comparison: new-task (or final) accuracy against retention of the probe or of earlier tasks."""
    from pipelines.plots import plot_frontier

    value, ylabel = FRONTIER_PLANES[plane]
    data = [{"label": f"{p.lr:g}" + (f" (n={p.n})" if p.n < 2 else ""), "group": p.label,
             "plasticity": p.x(accuracy).mean, "retention": value(p)[0],
             "plasticity_ci": p.x(accuracy).half or 0.0, "retention_ci": value(p)[1] or 0.0}
            for p in points]
    xlabel = "new-task accuracy (mean R[j,j])" if accuracy == "new_task" else "final ACC"
    plot_frontier(data, path, title=title, xlabel=xlabel, ylabel=ylabel)


def mean_matrix(matrices: list):
    """The cell-wise mean of several seeds' accuracy matrices (same tasks and probes)."""
    from pipelines.metrics import AccuracyMatrix

    out = AccuracyMatrix(matrices[0].tasks, matrices[0].probes)
    for stage in range(out.num_stages):
        for column in out.columns:
            values = [m.get(stage, column) for m in matrices if m.get(stage, column) is not None]
            if values:
                out.record(stage, column, statistics.fmean(values))
    return out


def draw_best_points(comparison: Comparison, points: list[Point], matched: Matched, plots: Path) -> None:
    """Heatmap and retention curve of each method's matched point (else its highest-retention point)."""
    from pipelines.plots import plot_accuracy_matrix, plot_retention

    for label in comparison.labels:
        mine = [p for p in points if p.label == label]
        point = matched.chosen.get(label) or max(mine, key=lambda p: p.stats["retention"].mean, default=None)
        if point is None:
            continue
        matrix = mean_matrix([result_matrix(r) for r in _point_results(comparison, point)])
        title = f"{label} lr {point.lr:g}, mean of {point.n} seed(s)"
        plot_accuracy_matrix(matrix, plots / f"{label}-accuracy_matrix.png", title=title)
        plot_retention(matrix, plots / f"{label}-retention.png", title=title)


# --- trainable parameters ----------------------------------------------------------------


def count_trainable(config: RunConfig) -> int:
    """Trainable parameters of the wrapped model (what the optimiser updates)."""
    from pipelines.models import load_model
    from secura.methods import Method, build_method

    model = build_method(config.method_config_obj()).wrap(load_model(config.model_config_obj(), seed=config.seed))
    return Method.trainable_parameter_count(model)[0]


def attach_trainable_params(comparison: Comparison, points: list[Point]) -> None:
    """What each point's result files say its runs trained (the same for every seed)."""
    for point in points:
        point.trainable_params = int(_point_results(comparison, point)[0]["trainable_params"])


def probe_totals(config: RunConfig, run_dir: Path, config_dir: Path) -> dict[str, int]:
    """How many items each probe is scored on, from the run's prepared manifest (the probe limit applied)."""
    from pipelines.preprocess import Manifest

    stream = config.load_stream(config_dir)
    root = Path(config.storage_path or run_dir) / SHARDS / stream.name
    manifest = Manifest.load(str(root))
    limit = config.eval.probe_limit
    totals = {}
    for probe in stream.probe:
        rows = manifest.task(probe.name).split("test").rows
        totals[probe.name] = rows if limit is None else min(rows, limit)
    return totals


# --- the report ----------------------------------------------------------------------------


@dataclass
class Report:
    rows: list[RunResultRow]
    points: list[Point]
    matched: Matched
    goals: list[Goal]
    probe: str
    probe_total: int
    files: list[Path] = field(default_factory=list)


def probe_info(comparison: Comparison) -> tuple[str, int]:
    """The compared probe and how many items it is scored on (from the result files; 0 before any)."""
    stream = comparison.plans[0].config.load_stream(comparison.config_dir)
    names = [p.name for p in stream.probe]
    probe = comparison.spec.probe or (names[0] if names else None)
    if probe not in names:
        raise ValueError(f"probe: {probe!r} is not a probe of stream {stream.name!r} ({names})")
    totals = [v.result["probe_items_total"].get(probe) for v in map(plan_result, comparison.plans) if v.usable]
    return probe, int(next((t for t in totals if t is not None), 0))


def report(comparison: Comparison) -> Report:
    """Aggregate whatever runs exist on disk and write the tables and plots."""
    probe, probe_total = probe_info(comparison)
    rows = [read_run(plan, probe) for plan in comparison.plans]
    points = aggregate(rows)
    accuracy = comparison.spec.accuracy
    mark_frontiers(points, accuracy)
    if points:
        attach_trainable_params(comparison, points)
    matched = matched_accuracy(points, comparison.labels, comparison.reference, comparison.spec.match_fraction,
                               accuracy)
    goals = evaluate_goals(points, matched, comparison.subject, comparison.baselines, comparison.spec.goals,
                           accuracy)
    out = comparison.output_dir
    files = [out / "runs.csv", out / "results.csv", out / "summary.md"]
    write_text_atomic(files[0], runs_csv(rows))
    write_text_atomic(files[1], results_csv(points))
    write_text_atomic(files[2], summary_markdown(comparison, rows, points, matched, goals, probe, probe_total))
    if points:
        seeds = sorted({p.n for p in points})
        for plane, (_, ylabel) in FRONTIER_PLANES.items():
            draw_frontier(points, out / plane, accuracy,
                          f"{comparison.spec.name}: {ylabel.split(' (')[0]} vs accuracy (seeds per point: {seeds})",
                          plane)
            files.append(out / plane)
        draw_best_points(comparison, points, matched, out / "plots")
    return Report(rows, points, matched, goals, probe, probe_total, files)


# --- the umbrella run -----------------------------------------------------------------------


@contextmanager
def umbrella_run(comparison: Comparison, resume: bool) -> Iterator[Any]:
    """The comparison's MLflow run, its id in ``umbrella.json`` (``--resume`` re-attaches to it); sets
    ``comparison.umbrella_run_id`` so that every run's parent is nested under it. Yields its `Tracker`."""
    from pipelines.run_report import provenance_tags
    from pipelines.tracking import Tracker

    spec, path = comparison.spec, comparison.output_dir / UMBRELLA
    previous = json.loads(path.read_text())["run_id"] if path.is_file() else None
    if previous and not resume:
        raise ValueError(f"{comparison.output_dir} already holds comparison run {previous}; pass --resume to "
                         f"continue it, or choose another --output-dir")
    params = {"compare": spec.name, "methods": ",".join(comparison.labels), "seeds": ",".join(map(str, spec.seeds)),
              "runs": len(comparison.plans), "reference": comparison.reference, "accuracy": spec.accuracy,
              "match_fraction": spec.match_fraction, "probe": spec.probe}
    with Tracker(comparison.tracking_uri, output_dir=comparison.output_dir) as tracker:
        run_id = tracker.start_parent(comparison.plans[0].config.experiment, f"compare:{spec.name}", params=params,
                                      tags={"secura.compare": spec.name, "secura.kind": "compare"} | provenance_tags(),
                                      run_id=previous)
        write_text_atomic(path, json.dumps({"run_id": run_id}))
        tracker.log_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), "compare/compare.yaml",
                         parent=True)
        comparison.umbrella_run_id = run_id
        yield tracker


def points_columns(points: list[Point], accuracy: str) -> dict[str, list]:
    """Every (method, lr) point as table columns: means over seeds, with n and frontier membership."""
    return {"method": [p.label for p in points], "lr": [p.lr for p in points], "n": [p.n for p in points],
            "accuracy": [p.x(accuracy).mean for p in points],
            **{metric: [p.stats[metric].mean for p in points] for metric in METRICS},
            "trainable_params": [p.trainable_params for p in points], "on_frontier": [p.on_frontier for p in points]}


def log_umbrella(tracker, comparison: Comparison, result: Report) -> None:
    """The study on the umbrella run: the results table, the files of the report, the goal verdicts as tags
    ``goal.N`` (and ``goals.json``), and per method its matched point's accuracy and retention.

    Metrics are logged at step = finished runs, so a resumed comparison adds its newer numbers.
    """
    out = comparison.output_dir
    tracker.log_table(points_columns(result.points, comparison.spec.accuracy), "results.json", parent=True)
    for path in result.files:
        tracker.log_artifact(path, parent=True)
    if (out / "plots").is_dir():
        tracker.log_artifact(out / "plots", "plots", parent=True)
    tracker.log_dict({"goals": [asdict(goal) for goal in result.goals]}, "goals.json", parent=True)
    tracker.set_tags({f"goal.{i}": f"{goal.status}: {goal.name}" for i, goal in enumerate(result.goals, 1)},
                     parent=True)
    finished = sum(row.status == "finished" for row in result.rows)
    metrics = {"goals_met": sum(goal.status == "met" for goal in result.goals), "runs_finished": finished,
               "runs_failed": sum(row.status == "failed" for row in result.rows)}
    for label, point in result.matched.chosen.items():
        if point is not None:
            metrics |= {f"matched/{label}/accuracy": point.x(comparison.spec.accuracy).mean,
                        f"matched/{label}/retention": point.stats["retention"].mean}
    tracker.log_metrics(metrics, step=finished, parent=True)
    from pipelines.run import select_tasks
    from pipelines.ui_view import view_tag

    note = umbrella_note(comparison, result)
    tracker.set_tags({NOTE_TAG: note}, parent=True)
    first = comparison.plans[0].config
    stream = first.load_stream(comparison.config_dir)
    view = view_tag([t.name for t in select_tasks(stream, first.tasks)], [p.name for p in stream.probe])
    tracker.set_experiment_tags(first.experiment, {NOTE_TAG: note, view[0]: view[1]})


def umbrella_note(comparison: Comparison, result: Report) -> str:
    """The umbrella run's (and the experiment's) description: every run side by side, then the goal verdicts."""
    def cell(value: float) -> str:
        return "–" if math.isnan(value) else f"{value:.3f}"

    rows = [[f"{r.label} lr={r.lr:g} seed={r.seed}", r.status, cell(r.new_acc), cell(r.acc), cell(r.bwt),
             cell(r.forgetting), cell(r.retention)] for r in result.rows]
    table = markdown_table(["run", "status", "new-task acc", "ACC", "BWT", "forgetting", "probe retention"], rows)
    goals = [f"- **{goal.status.upper()}** — {goal.name}: {goal.detail}" for goal in result.goals]
    return "\n\n".join([f"**Comparison `{comparison.spec.name}`**: {len(result.rows)} runs, probe `{result.probe}`"
                         " (new-task acc: each task right after training it)", table,
                         "\n".join(goals) or "No goals set.", "The full report: `summary.md` in this run's artifacts. "
                         f"Stage by stage: the saved view *{VIEW_NAME}* (Views menu)."]) + "\n"


def compare_command(args: argparse.Namespace) -> int:
    comparison = load_compare(args.config, output_dir=args.output_dir)
    plans = select_plans(comparison, args.only)
    with folder_lock(comparison.output_dir, "secura compare"):  # each of its runs holds its own folder too
        return _compare(comparison, plans, args)


def _compare(comparison: Comparison, plans: list[RunPlan], args: argparse.Namespace) -> int:
    log(f"{comparison.spec.name}: {len(plans)} run(s) of {len(comparison.plans)} → {comparison.output_dir}")
    few = sorted({plan.config.eval.test_limit for plan in plans
                  if plan.config.eval.test_limit is not None and plan.config.eval.test_limit < FIELD_TEST_ITEMS})
    if few:
        log(f"eval.test_limit {few[0]} < {FIELD_TEST_ITEMS} items a task: wider intervals than the field's "
            f"convention (the default, None, scores every test item)")
    started = time.time()
    with umbrella_run(comparison, args.resume) as tracker:
        records = execute(comparison, plans, resume=args.resume, parallel=args.parallel, gpu=args.gpu)
        result = report(comparison)
        log_umbrella(tracker, comparison, result)
    failed = sum(r.get("status") == "failed" for r in records)
    log(f"done in {(time.time() - started) / 60:.1f} min; {failed} failed; "
        f"wrote {', '.join(str(f) for f in result.files)}")
    for goal in result.goals:
        log(f"goal {goal.status.upper()}: {goal.name}: {goal.detail}")
    from pipelines.tracking import store_line

    print((comparison.output_dir / "summary.md").read_text())
    print(store_line(comparison.tracking_uri, comparison.output_dir))
    return 1 if failed else 0
