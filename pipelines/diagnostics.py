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


def stage_run_ids(run_dir: Path) -> list[str]:
    """The MLflow run ids of a run's training stages, in order (from its journal)."""
    from pipelines.run import JOURNAL, Journal

    journal = Journal.load(run_dir / JOURNAL)
    stages = journal.stages if journal else {}
    return [stages[k]["run_id"] for k in sorted(stages, key=int) if k != "0" and stages[k].get("run_id")]


def run_diagnostics(client: Any, run_dir: Path) -> dict[str, float]:
    """Drift after the last stage; S-MagNorm statistics averaged over every logged window of every stage."""
    ids = stage_run_ids(run_dir)
    if not ids:
        return {}
    last = client.get_run(ids[-1]).data.metrics
    out = {key: float(last.get(key, math.nan)) for key in DRIFT_KEYS}
    for key in MAGNORM_KEYS:
        out[key] = _mean([m.value for run_id in ids for m in client.get_metric_history(run_id, key)])
    return out


def point_diagnostics(client: Any, run_dirs: list[Path]) -> dict[str, float]:
    """The mean over a point's finished seeds of each run's diagnostics (NaN where nothing was logged)."""
    runs = [d for d in (run_diagnostics(client, run_dir) for run_dir in run_dirs) if d]
    return {key: _mean([r.get(key, math.nan) for r in runs]) for key in (*DRIFT_KEYS, *MAGNORM_KEYS)}
