"""What a continual run records in MLflow beyond per-step metrics: its config, identity and provenance,
its data, each stage's scores and artifacts, and the whole stream's story on the parent run.

The parent run is the one a user opens. It holds the final accuracy matrix (an MLflow table, a CSV, a
heatmap), the retention curve, ``final/<task>`` for every task and probe, ``base/<task>`` for the
untrained model, the series ``acc``, ``bwt``, ``fwt``, ``forgetting`` and ``probe_retention`` at
step = stage, the datasets it read (MLflow dataset inputs, digest = the shard's content hash) and the
final adapter as an MLflow model (`pipelines.registry`). The parent and every stage run carry the same
identity (method, strategy, lr, seed, stream, S-MagNorm mode) as tags and params; a stage run is named
``<parent run name>/stage-N-<task>`` and lists its task's datasets.
"""
from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

from mlflow.data.meta_dataset import MetaDataset

from pipelines.config import RunConfig, dump_run_config


def flat_scores(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"eval/{task}/{metric}": value for task, metrics in scores.items() for metric, value in metrics.items()}


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
    tags = identity | provenance_tags()
    tracker.log_text(dump_run_config(config), "config/run.yaml", parent=True)
    tracker.set_tags(tags, parent=True)
    tracker.log_params({k: v for k, v in identity.items() if k != "stream"}, parent=True)  # `stream`: the config's
    inputs = stream_inputs([t.name for t in select_tasks(stream, config.tasks)], manifest)
    for datasets in inputs.values():
        for dataset, context in datasets:
            tracker.log_input(dataset, context, parent=True)
    tracker.stage_defaults = StageDefaults(name_prefix=config.run_name(stream.name), tags=tags, params=identity,
                                           inputs=inputs)


def log_base_scores(tracker, scores: dict[str, dict[str, float]], matrix) -> None:
    """Stage 0, the untrained model, on the parent run: ``base/<task>`` (its score), ``base/<task>/<metric>``
    for its other metrics (e.g. ``generative_accuracy``) and the start of the series."""
    base = {f"base/{name}": metrics["score"] for name, metrics in scores.items()}
    base |= {f"base/{name}/{key}": value for name, metrics in scores.items() for key, value in metrics.items()
             if key not in ("score", "accuracy")}
    tracker.log_metrics(base | matrix.summary(0), step=0, parent=True)


def log_stage(tracker, matrix, stage: int, scores: dict[str, dict[str, float]], state_dir: Path, output_dir: Path,
              extra: dict[str, Any]) -> None:
    """On the stage's run: its scores, the matrix so far and its plots, the adapter; the series on the parent."""
    summary = matrix.summary(stage)
    tracker.log_metrics(flat_scores(scores) | summary | extra, step=stage)
    tracker.log_artifact(state_dir / "adapter.safetensors", "adapter")
    tracker.log_text(matrix.to_csv(), "accuracy_matrix.csv")
    for plot in _plots(matrix, output_dir):
        tracker.log_artifact(plot, "plots")
    tracker.log_metrics(summary, step=stage, parent=True)


def matrix_table(matrix) -> dict[str, list]:
    """The accuracy matrix as table columns: ``stage`` (base, then ``N: task``), the tasks, ``probe:<probe>``."""
    from pipelines.metrics import PROBE_PREFIX

    rows = matrix.to_rows()
    names = matrix.tasks + [PROBE_PREFIX + probe for probe in matrix.probes]
    return {"stage": ["base"] + [f"{i}: {task}" for i, task in enumerate(matrix.tasks, 1)],
            **{name: [row[j] for row in rows] for j, name in enumerate(names)}}


def log_run_end(tracker, matrix, output_dir: Path, config: RunConfig, final_state_dir: Path | None) -> None:
    """On the parent run, after the last stage: the final metrics and scores, the matrix (table, CSV, heatmap),
    the retention curve and the final adapter as the MLflow model ``adapter``."""
    from pipelines.registry import FLAVOR, MODEL_NAME, write_model_folder

    last = matrix.last_stage
    final = {f"final/{k}": v for k, v in matrix.summary().items()}
    tracker.log_metrics(final | {f"final/{name}": matrix[last, name] for name in matrix.columns}, parent=True)
    tracker.log_table(matrix_table(matrix), "accuracy_matrix.json", parent=True)
    tracker.log_text(matrix.to_csv(), "accuracy_matrix.csv", parent=True)
    for plot in _plots(matrix, output_dir):
        tracker.log_artifact(plot, "plots", parent=True)
    state_dir = final_state_dir or sorted((output_dir / "stages").iterdir())[-1]  # done before a resume
    with tempfile.TemporaryDirectory() as tmp:
        conf = write_model_folder(config, state_dir, Path(tmp) / MODEL_NAME)
        tracker.log_model(Path(tmp) / MODEL_NAME, MODEL_NAME, FLAVOR, conf, step=last, parent=True,
                          params={"base_model": conf["base_model"], "method": conf["method"]["name"]})


def _plots(matrix, output_dir: Path) -> list[Path]:
    from pipelines.plots import plot_accuracy_matrix, plot_retention

    plots = output_dir / "plots"
    return [plot_accuracy_matrix(matrix, plots / "accuracy_matrix.png"),
            plot_retention(matrix, plots / "retention_curve.png")]
