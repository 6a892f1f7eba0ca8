"""Rerun a sweep's chosen configuration on its own and say what it achieved.

The claim "this config learns and retains" rests on the config run again as a
user would run it (``secura run best_run.yaml``), not on its trial's report:
the rerun checks that the written config reproduces it. ``python -m tune.rerun
SWEEP.yaml`` does that run (reusing the sweep's tokenised shards) and prints
the trial's and the rerun's numbers side by side as a Markdown table, ready
for docs/sweeps.md.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

from tune.objective import trial_metrics

COLUMNS = (("new_acc", "new-task accuracy"), ("base_new_acc", "untrained"), ("gain", "gain"),
           ("retention", "retention"), ("probe_retention", "probe retention"), ("acc", "ACC"))


def best_trial(sweep_dir: Path) -> dict[str, str]:
    """The best trial's row of ``trials.csv``."""
    with (sweep_dir / "trials.csv").open(newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["best"] == "True"]
    if not rows:
        raise ValueError(f"{sweep_dir / 'trials.csv'}: no best trial (no trial learned?)")
    return rows[0]


def rerun_best(sweep) -> dict[str, float]:
    """Run ``best_run.yaml`` from scratch (a finished earlier rerun is archived) and return its metrics."""
    from pipelines.config import load_run_config
    from pipelines.preprocess import link_shared_shards
    from pipelines.run import run_continual
    from tune.sweep import BEST_RUN

    config = load_run_config(sweep.output_dir / BEST_RUN)
    if config.storage_path is None:
        link_shared_shards(sweep.output_dir, Path(config.output_dir))
    matrix = run_continual(config).matrix
    return trial_metrics(matrix, matrix.last_stage, weight_acc=sweep.spec.weight_acc,
                         probe_weight=sweep.spec.probe_weight)


def markdown(trial: dict[str, str], rerun: dict[str, float]) -> str:
    def cell(value: float) -> str:
        return f"{value:.3f}" if math.isfinite(value) else "-"

    lines = ["| | " + " | ".join(title for _, title in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|",
             f"| trial {trial['trial_id']} (in the sweep) | "
             + " | ".join(cell(float(trial[key])) for key, _ in COLUMNS) + " |",
             "| `secura run best_run.yaml` (rerun) | " + " | ".join(cell(rerun[key]) for key, _ in COLUMNS) + " |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from tune.sweep import load_sweep

    parser = argparse.ArgumentParser(prog="python -m tune.rerun", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="the sweep YAML that produced the sweep")
    parser.add_argument("--output-dir", help="the sweep's output_dir, if it was overridden")
    args = parser.parse_args(argv)
    sweep = load_sweep(args.config, output_dir=args.output_dir)
    trial = best_trial(sweep.output_dir)
    print(markdown(trial, rerun_best(sweep)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
