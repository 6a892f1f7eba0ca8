"""Why a run kept or lost what the model knew: the numbers its stages logged to MLflow.

A comparison says *which* method retains more; these say *why*, per run, from
what training already tracked (no extra compute): how far the adapter moved
each weight (relative spectral / Frobenius norm of ΔW, the paper's drift
analysis) and, for SECURA, what S-MagNorm did (mean S, how often S ≥ 1.8, how
often the retention brake fired). Read through the MLflow client, so a remote
tracking server works as well as the local store.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

DRIFT_KEYS = ("drift/rel_spectral_mean", "drift/rel_spectral_max", "drift/rel_frobenius_mean")
MAGNORM_KEYS = ("magnorm/s_mean", "magnorm/frac_ge_1_8", "magnorm/brake_rate")


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def stage_run_ids(client: Any, run_dir: Path) -> list[str]:
    """The MLflow run ids of a run's training stages, in stage order (nested under the journal's parent run)."""
    from pipelines.run import JOURNAL, Journal
    from pipelines.tracking import PARENT_TAG, STAGE_TAG

    journal = Journal.load(run_dir / JOURNAL)
    if not journal or not journal.parent_run_id or journal.parent_run_id.startswith("offline-"):
        return []
    parent = client.get_run(journal.parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{journal.parent_run_id}'")
    staged = [r for r in runs if r.data.tags.get(STAGE_TAG, "").isdigit()]
    return [r.info.run_id for r in sorted(staged, key=lambda r: int(r.data.tags[STAGE_TAG]))]


def run_diagnostics(client: Any, run_dir: Path) -> dict[str, float]:
    """Drift after the last stage; S-MagNorm statistics averaged over every logged window of every stage."""
    ids = stage_run_ids(client, run_dir)
    if not ids:
        return {}
    last = client.get_run(ids[-1]).data.metrics
    out = {key: float(last.get(key, math.nan)) for key in DRIFT_KEYS}
    for key in MAGNORM_KEYS:
        out[key] = _mean([m.value for run_id in ids for m in client.get_metric_history(run_id, key)])
    return out


def mean_diagnostics(runs: list[dict[str, float]], keys: tuple[str, ...]) -> dict[str, float]:
    """The mean over a point's runs of each diagnostic (NaN where none of them logged it)."""
    return {key: _mean([float(r.get(key, math.nan)) for r in runs]) for key in keys}
