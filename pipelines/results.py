"""Result files: what one finished comparison run contributes, in one small JSON file.

A long comparison outlives the machine it started on: its run folders (shards,
checkpoints, the MLflow store) stay behind, but its result files are committed
(``results_dir``, e.g. ``docs/results/<comparison>/``), and aggregation, plots and
verdicts are computed from them alone. A result file is trusted only if it
parses, has every field and carries the config hash of the run it stands for;
otherwise `secura compare --resume` runs that run again.

One file: the accuracy matrix (log-likelihood scores, CSV text), every
evaluation set's metrics after every stage (generative accuracy beside the
log-likelihood score), probe item counts, ACC/BWT/forgetting, drift and
S-MagNorm statistics, trainable parameters, wall time, precision and backend,
package versions and the commit.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pipelines.config import RunConfig
from pipelines.files import write_text_atomic

SCHEMA = 1
REQUIRED = ("schema", "label", "lr", "seed", "config_hash", "matrix_csv", "stage_metrics", "probe_items_total",
            "summary", "wall_s", "trainable_params")
PACKAGES = ("torch", "transformers", "peft", "ray", "mlflow", "secura-cl")
# Where and how a run is placed, not what it computes: left out of the hash.
PLACEMENT_KEYS = ("output_dir", "storage_path", "tracking_uri", "experiment")


def experiment_hash(config: RunConfig) -> str:
    """What the run computes: the whole config less where it writes and how many threads it gets."""
    data = config.to_dict()
    for key in PLACEMENT_KEYS:
        data.pop(key, None)
    data["train"].pop("torch_threads", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def result_path(results_dir: Path, label: str, lr: float, seed: int) -> Path:
    return results_dir / label / f"lr{lr:g}" / f"seed{seed}.json"


@dataclass
class Verdict:
    """Whether a result file can stand for its run, and why not."""

    result: dict[str, Any] | None
    reason: str = ""  # "", "missing", "unreadable: ...", "incomplete: ...", "stale: ..."

    @property
    def usable(self) -> bool:
        return self.result is not None


def read_result(path: Path, expected_hash: str) -> Verdict:
    """The result file at ``path`` if it is whole and was made by the config that hashes to ``expected_hash``."""
    if not path.is_file():
        return Verdict(None, "missing")
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return Verdict(None, f"unreadable: {type(error).__name__}: {error}")
    if not isinstance(result, dict):
        return Verdict(None, "unreadable: not a JSON object")
    absent = [key for key in REQUIRED if key not in result]
    if absent:
        return Verdict(None, f"incomplete: no {', '.join(absent)}")
    if result["schema"] != SCHEMA:
        return Verdict(None, f"stale: schema {result['schema']}, this code writes {SCHEMA}")
    if result["config_hash"] != expected_hash:
        return Verdict(None, f"stale: made by config {result['config_hash']}, the plan's is {expected_hash}")
    return Verdict(result)


def build_result(*, label: str, lr: float, seed: int, config: RunConfig, matrix, stage_metrics: dict[str, Any],
                 probe_items_total: dict[str, int], wall_s: float, trainable_params: int,
                 diagnostics: dict[str, float], commit: str | None) -> dict[str, Any]:
    last = len(matrix.tasks)
    return {
        "schema": SCHEMA, "label": label, "lr": lr, "seed": seed, "config_hash": experiment_hash(config),
        "matrix_csv": matrix.to_csv(), "stage_metrics": stage_metrics, "probe_items_total": probe_items_total,
        "summary": {key: value for key, value in matrix.summary(last).items() if _finite(value)},
        "diagnostics": {key: value for key, value in diagnostics.items() if _finite(value)},
        "wall_s": wall_s, "trainable_params": trainable_params,
        "precision": config.train.precision, "backend": config.scaling.backend,
        "versions": package_versions(), "commit": commit,
    }


def write_result(path: Path, result: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(result, indent=1, sort_keys=True) + "\n")


def result_matrix(result: dict[str, Any]):
    from pipelines.metrics import AccuracyMatrix

    return AccuracyMatrix.from_csv(result["matrix_csv"])


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
