"""What a continual run records in MLflow beyond per-step metrics: its config, identity and provenance,
its data, each stage's scores and artifacts, and the whole stream's story on the parent run.

The parent run is the one a user opens. Its description (MLflow's run note) is a short report: identity,
the accuracy matrix, ACC, BWT, forgetting, probe retention and a verdict. Its metrics, one name per
number, are series at step = stage (0: the untrained model), so the runs table shows the latest
(final) value and the chart view compares runs stage by stage on the parents alone:

* ``score/<task>`` for every task and probe (the matrix's column), ``score/<task>/<metric>`` for a
  task's other metrics (generation's ``rougeL``, ``generative_accuracy``);
* ``acc``, ``bwt``, ``fwt``, ``forgetting`` (from stage 1), ``probe_retention`` (and, with two or more
  probes, ``probe_retention/<probe>``);
* ``loss`` and ``stage`` over the stream-wide training step (`pipelines.train.ReportSink`).

It also holds the final accuracy matrix (an MLflow table, a CSV, a heatmap), the retention curve, the
datasets it read (MLflow dataset inputs, digest = the shard's content hash) and the final adapter as an
MLflow model (`pipelines.registry`). A stage run, named ``stage N: <task>``, holds that stage's own
evaluation (``eval/<task>``, ``eval/<task>/<metric>``), drift, its training telemetry over the same
stream-wide step, and its task's datasets. Parent and stage runs carry the same identity (method,
strategy, lr, seed, stream, S-MagNorm mode) as tags and params; the parent is named
``<label> lr=<lr> seed=<seed>`` (`run_name`).
"""
from __future__ import annotations

import json
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any

from mlflow.data.meta_dataset import MetaDataset

from pipelines.config import RunConfig, dump_run_config


LABEL_TAG = "secura.label"  # what a comparison or demo calls the run's method (default: the method's name)
NOTE_TAG = "mlflow.note.content"  # a run's (or an experiment's) description in the MLflow UI
COLOR_TAG = "mlflow.runColor"  # a run's colour in the UI's charts
# One colour per method of a comparison or demo (its seeds share it), far apart for the charts' lines.
LABEL_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def label_tags(labels: list[str], label: str) -> dict[str, str]:
    """What a comparison or demo tags each run's parent with: its label and the label's colour."""
    return {LABEL_TAG: label, COLOR_TAG: LABEL_COLORS[labels.index(label) % len(LABEL_COLORS)]}


def score_metrics(scores: dict[str, dict[str, float]], prefix: str) -> dict[str, float]:
    """``<prefix>/<task>`` (the headline score, what the matrix records) and ``<prefix>/<task>/<metric>`` for
    the task's other metrics; a choice task's ``accuracy`` is its score, so it is not logged twice."""
    out = {}
    for task, metrics in scores.items():
        out[f"{prefix}/{task}"] = metrics["score"]
        out |= {f"{prefix}/{task}/{key}": value for key, value in metrics.items() if key not in ("score", "accuracy")}
    return out


def run_name(identity: dict[str, str], label: str | None = None) -> str:
    """Short and unique in a comparison: ``<label> lr=<lr> seed=<seed>`` (label: the method by default)."""
    return f"{label or identity['method']} lr={identity['lr']} seed={identity['seed']}"


def stage_run_name(stage: int, task: str) -> str:
    return f"stage {stage}: {task}"


def run_identity(config: RunConfig, stream) -> dict[str, str]:
    """What tells runs apart in the UI's columns and filters; ``norm_mode`` for SECURA only (off when
    S-MagNorm is off)."""
    from secura.methods import build_method

    method = build_method(config.method_config_obj())
    identity = {"method": method.name, "strategy": method.strategy.name, "lr": f"{config.train.lr:g}",
                "seed": str(config.seed), "stream": stream.name}
    if method.adapter_name == "secura":
        adapter = method.adapter.config(method.config.target_modules, dict(method.config.adapter))
        identity["norm_mode"] = adapter.magnorm_norm if adapter.magnorm == "on" else "off"
    return identity


def adapter_defaults(config: RunConfig) -> dict[str, Any]:
    """The knobs a short-listed adapter (OSF, CorDA) took from its defaults, as ``method.adapter.<field>``: the
    parent's params hold the config as written, which would leave OSF's preserved rank unsaid."""
    from secura.methods import ADAPTERS, METHODS, CordaAdapter, OsfAdapter

    method = config.method_config_obj()
    adapter = ADAPTERS[METHODS[method.name].adapter]
    if not isinstance(adapter, (OsfAdapter, CordaAdapter)):
        return {}
    resolved = adapter.config(method.target_modules, dict(method.adapter))
    return {f"method.adapter.{name}": getattr(resolved, name) for name in adapter.fields()
            if name not in method.adapter}


def provenance_tags() -> dict[str, str]:
    """The code that made the run: the secura version and, in a git checkout, the commit, branch and remote
    (a run started in a Ray task would otherwise name Ray's worker script as its source)."""
    from mlflow.utils.git_utils import get_git_branch, get_git_commit, get_git_repo_url

    import secura

    here = str(Path(__file__).resolve().parent)
    git = {"mlflow.source.git.commit": get_git_commit(here), "mlflow.source.git.branch": get_git_branch(here),
           "mlflow.source.git.repoURL": get_git_repo_url(here)}
    return {"secura.version": secura.__version__, "mlflow.source.name": "secura"} | {k: v for k, v in git.items() if v}


def parent_params(config: RunConfig, stream) -> dict[str, Any]:
    """The parent run's params: the whole config, with ``stream`` the stream's name (as on the stage runs and
    in the tags) and what the config named (a built-in name, a file, an inline stream) as ``stream_source``."""
    import torch

    from pipelines.precision import resolve_precision

    params = config.to_dict()
    evaluator = "cuda" if config.scaling.use_gpu and torch.cuda.is_available() else "cpu"  # the driver's device
    return {**params, "stream": stream.name, "stream_source": params["stream"],
            "eval.precision_resolved": resolve_precision(config.train.precision, evaluator)}


class ShardDataset(MetaDataset):
    """A prepared shard as MLflow sees it: its content hash as the digest, its URI as the source, and rows,
    tokens and the raw data it came from as the profile."""

    def __init__(self, name: str, split) -> None:
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        with warnings.catch_warnings():  # a local path matches two equivalent local sources
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(split.path)
        super().__init__(source, name=name, digest=split.shard_hash)
        self._profile = {"rows": split.rows, "tokens": split.tokens, "truncated": split.truncated,
                         "skipped": split.skipped, "origin": split.source, "origin_hash": split.source_hash}

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def stream_inputs(tasks: list[str], manifest) -> dict[str, list[tuple[ShardDataset, str]]]:
    """Per task and probe: its shards as (dataset, context), named ``<task>/<split>``; a probe's context is
    ``probe``."""
    inputs = {}
    for entry in manifest.tasks:
        if entry.role == "probe":
            inputs[entry.name] = [(ShardDataset(f"{entry.name}/test", entry.split("test")), "probe")]
        elif entry.name in tasks:
            inputs[entry.name] = [(ShardDataset(f"{entry.name}/{split}", entry.split(split)), split)
                                  for split in ("train", "test")]
    return inputs


def log_run_start(tracker, config: RunConfig, stream, manifest) -> None:
    """On the parent run, once it exists: the config that rebuilds the run, its identity and provenance, the
    datasets it reads; and what each stage run will carry (`pipelines.tracking.StageDefaults`)."""
    from pipelines.run import select_tasks
    from pipelines.tracking import StageDefaults

    identity = run_identity(config, stream)
    tags = identity | provenance_tags() | {"secura.name": config.name}
    tracker.log_text(dump_run_config(config), "config/run.yaml", parent=True)
    tracker.set_tags(tags, parent=True)
    tracker.log_params({k: v for k, v in identity.items() if k != "stream"}, parent=True)  # `stream`: the config's
    defaults = adapter_defaults(config)
    if defaults:
        tracker.log_params(defaults, parent=True)
    inputs = stream_inputs([t.name for t in select_tasks(stream, config.tasks)], manifest)
    for datasets in inputs.values():
        for dataset, context in datasets:
            tracker.log_input(dataset, context, parent=True)
    tracker.stage_defaults = StageDefaults(tags=tags, params=identity, inputs=inputs)


def log_base_scores(tracker, scores: dict[str, dict[str, float]], matrix) -> None:
    """Stage 0, the untrained model, on the parent run: the series' first points (``score/<task>``,
    ``probe_retention`` = 1)."""
    tracker.log_metrics(score_metrics(scores, "score") | matrix.summary(0), step=0, parent=True)


def log_stage(tracker, matrix, stage: int, scores: dict[str, dict[str, float]], state_dir: Path, output_dir: Path,
              extra: dict[str, Any], identity: dict[str, str]) -> None:
    """On the stage's run: its evaluation, the matrix so far and its plots, the adapter; on the parent: the
    series' points at step = stage and the description with the matrix so far."""
    tracker.log_metrics(score_metrics(scores, "eval") | extra, step=stage)
    tracker.log_artifact(state_dir / "adapter.safetensors", "adapter")
    tracker.log_text(matrix.to_csv(), "accuracy_matrix.csv")
    for plot in _plots(matrix, output_dir):
        tracker.log_artifact(plot, "plots")
    tracker.log_metrics(score_metrics(scores, "score") | matrix.summary(stage), step=stage, parent=True)
    tracker.set_tags({NOTE_TAG: run_note(identity, matrix)}, parent=True)


def matrix_table(matrix) -> dict[str, list]:
    """The accuracy matrix as table columns: ``stage`` (base, then ``N: task``), the tasks, ``probe:<probe>``."""
    from pipelines.metrics import PROBE_PREFIX

    rows = matrix.to_rows()
    names = matrix.tasks + [PROBE_PREFIX + probe for probe in matrix.probes]
    return {"stage": ["base"] + [f"{i}: {task}" for i, task in enumerate(matrix.tasks, 1)],
            **{name: [row[j] for row in rows] for j, name in enumerate(names)}}


def log_run_end(tracker, matrix, output_dir: Path, config: RunConfig, final_state_dir: Path | None) -> None:
    """On the parent run, after the last stage: the matrix (table, CSV, heatmap), the retention curve and the
    final adapter as the MLflow model ``adapter`` (the final numbers are the series' last points)."""
    from pipelines.registry import FLAVOR, MODEL_NAME, write_model_folder

    last = matrix.last_stage
    tracker.log_table(matrix_table(matrix), "accuracy_matrix.json", parent=True)
    tracker.log_text(matrix.to_csv(), "accuracy_matrix.csv", parent=True)
    for plot in _plots(matrix, output_dir):
        tracker.log_artifact(plot, "plots", parent=True)
    state_dir = final_state_dir or sorted((output_dir / "stages").iterdir())[-1]  # done before a resume
    with tempfile.TemporaryDirectory() as tmp:
        conf = write_model_folder(config, state_dir, Path(tmp) / MODEL_NAME)
        tracker.log_model(Path(tmp) / MODEL_NAME, MODEL_NAME, FLAVOR, conf, step=last, parent=True,
                          params={"base_model": conf["base_model"], "method": conf["method"]["name"]})


# --- descriptions (Markdown, as the MLflow UI renders a run's or an experiment's note) -------------------


def _num(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.3f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def matrix_markdown(matrix) -> str:
    """The accuracy matrix as a Markdown table: a row per stage (base, then ``N: task``), 3 decimals."""
    columns = matrix.tasks + [f"probe: {probe}" for probe in matrix.probes]
    stages = ["base"] + [f"{i}: {task}" for i, task in enumerate(matrix.tasks, 1)]
    rows = [[stage, *(_num(value) for value in values)]
            for stage, values in zip(stages, matrix.to_rows()) if not all(math.isnan(v) for v in values)]
    return markdown_table(["after", *columns], rows)


def learned_tasks(matrix) -> list[str]:
    """The tasks trained so far that scored above the untrained model right after their stage."""
    last = matrix.last_stage
    return [task for j, task in enumerate(matrix.tasks[:last], 1) if matrix[j, task] > matrix[0, task]]


def run_verdict(matrix) -> str:
    """One line from the numbers: what the run learned, forgot and kept."""
    last = matrix.last_stage
    if last < 1:
        return "not trained yet: only the base model's scores"
    summary = matrix.summary(last)
    parts = [f"learned {len(learned_tasks(matrix))} of {last} task(s) (above the base model right after training)"]
    if last > 1:
        parts.append(f"forgot {_num(summary['forgetting'])} of earlier tasks' best scores on average")
    if "probe_retention" in summary:
        parts.append(f"kept {_num(summary['probe_retention'])} of the base model's probe score")
    progress = "" if last == len(matrix.tasks) else f" (after stage {last} of {len(matrix.tasks)})"
    return "; ".join(parts) + progress


def run_note(identity: dict[str, str], matrix) -> str:
    """The parent run's description: identity, the matrix so far, its summary metrics and a verdict."""
    summary = matrix.summary(matrix.last_stage)
    head = (f"**method** {identity['method']} (strategy {identity['strategy']}) · **lr** {identity['lr']} · "
            f"**seed** {identity['seed']} · **stream** {identity['stream']} ({len(matrix.tasks)} tasks, "
            f"{len(matrix.probes)} probe(s))")
    metrics = markdown_table(["ACC", "BWT", "forgetting", "probe retention"],
                             [[_num(summary.get(key)) for key in ("acc", "bwt", "forgetting", "probe_retention")]])
    return "\n\n".join([head, "Accuracy matrix (rows: after each stage; columns: tasks, then probes)",
                         matrix_markdown(matrix), metrics, f"**Verdict:** {run_verdict(matrix)}"]) + "\n"


def _plots(matrix, output_dir: Path) -> list[Path]:
    from pipelines.plots import plot_accuracy_matrix, plot_retention

    plots = output_dir / "plots"
    return [plot_accuracy_matrix(matrix, plots / "accuracy_matrix.png"),
            plot_retention(matrix, plots / "retention_curve.png")]
