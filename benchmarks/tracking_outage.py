"""Training time while MLflow is down: issue 13's "a stage's training time grows by at most 5%".

    .venv/bin/python benchmarks/tracking_outage.py [--repeats 3] [--steps 250] [--output-dir DIR]

The same one-stage run of the demo stream (task ``jobs``, the local backend,
seed 0, a report and a spooled metrics event every step, no mid-stage
checkpoint) in three conditions, interleaved (up, down, offline, up, ...) so a
machine that gets busier part-way hurts each alike:

* ``up``: MLflow's SQLite store answers; the drainer thread replays every
  step's event while the stage trains;
* ``down``: once the run has created its parent run, another process holds
  ``BEGIN EXCLUSIVE`` on the store's database until the stage has been trained
  and evaluated, so every store call waits (MLflow's SQLite sessions wait up to
  20 s for a lock, then fail) while the stage trains;
* ``offline``: spool only (``--offline``), no drainer: the floor.

The stage's training time is the wall time between its first and last step
reports (the ``ts`` of its spooled ``loss`` events), so model set-up and
evaluation are left out; the trainer's own tokens/s (report time excluded) is
shown beside it. Afterwards every run's spool is replayed as ``secura sync``
does, and the stage's ``loss`` history in MLflow must hold every step exactly
once. All runs share one SQLite store, the shards and the base model's scores
(a short warm-up run builds them). Target: median over repeats of
down / up ≤ 1.05.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONDITIONS = ("up", "down", "offline")
TARGET = 1.05
# Waits until the store holds more than argv[2] runs (the run's parent exists: a run must find the store
# answering when it starts), locks the database, prints the time, and keeps the lock until stdin closes.
LOCKER = """
import contextlib, sqlite3, sys, time
db, before = sys.argv[1], int(sys.argv[2])
while True:
    with contextlib.closing(sqlite3.connect(db)) as probe:
        if probe.execute("SELECT COUNT(*) FROM runs").fetchone()[0] > before:
            break
    time.sleep(0.05)
lock = sqlite3.connect(db, timeout=120, isolation_level=None)
lock.execute("BEGIN EXCLUSIVE")
print(time.time(), flush=True)
sys.stdin.read()
lock.execute("ROLLBACK")
"""


class Outage:
    """Another process holding an exclusive lock on the SQLite store, from the run's parent run on."""

    def __init__(self, db: Path, runs_before: int) -> None:
        self.locked_at: float | None = None
        self.released_at: float | None = None
        self._process = subprocess.Popen([sys.executable, "-c", LOCKER, str(db), str(runs_before)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read_lock_time, daemon=True)
        self._reader.start()

    def _read_lock_time(self) -> None:
        line = self._process.stdout.readline()
        if line:
            self.locked_at = float(line)

    def release(self) -> None:
        """End the outage (idempotent: called after the stage's evaluation and again when the run returns)."""
        if self.released_at is None:
            self.released_at = time.time()
            self._process.stdin.close()
            if self.locked_at is None:  # the run failed before its parent run existed: still polling
                self._process.kill()
            self._process.wait(timeout=60)
            self._reader.join(timeout=5)

    @property
    def seconds(self) -> float:
        return self.released_at - self.locked_at if self.locked_at and self.released_at else 0.0


@dataclass
class Outcome:
    """One run of one condition, read back from MLflow after the spool was replayed."""

    condition: str
    train_s: float  # first to last step report of the stage
    tokens_per_s: float  # median of the trainer's per-step reports
    stage_s: float  # the stage metric: start of the stage run to the end of its evaluation
    steps_once: bool  # the stage's loss history holds steps 1..N, each once
    spooled_at_end: int  # events still in the spool when the run returned
    left_after_sync: int
    first_step_at: float  # epoch seconds of the stage's first and last step reports
    last_step_at: float
    stage_created_at: float  # when the stage run was created in MLflow
    outage: Outage | None = None
    covered: bool = True  # the outage spanned every step report of the stage
    arrived_after: bool = True  # the stage run reached MLflow only after the outage ended
    failed_calls: int = 0  # store calls MLflow reported as failed (SQLite lock timeouts)


class FailedStoreCalls(logging.Handler):
    """Counts MLflow's "SQLAlchemy database error" records: store calls that gave up on the lock."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def run_data(args: argparse.Namespace, shared: Path) -> dict:
    from pipelines.config import apply_overrides
    from pipelines.files import read_yaml

    data = read_yaml(ROOT / "configs" / "demo.yaml", "run config", mapping=True)
    return apply_overrides(data, [
        "name=outage", "experiment=tracking-outage", "seed=0", "tasks=[jobs]", "scaling.backend=local",
        f"train.steps_per_task={args.steps}", "train.log_every=1", "train.checkpoint_every=0",
        "eval.test_limit=16", "eval.probe_limit=16",
        f"storage_path={shared / 'store'}", f"tracking_uri=sqlite:///{shared / 'mlflow.db'}",
    ])


def count_runs(db: Path) -> int:
    import sqlite3

    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]


def run_once(data: dict, out: Path, condition: str) -> Outcome:
    """One run of ``condition`` in ``out``; its console output goes to ``out/console.log``."""
    from pipelines.config import parse_run_config
    from pipelines.run import run_continual

    config = parse_run_config({**data, "output_dir": str(out)})
    db = Path(config.tracking_uri.removeprefix("sqlite:///"))
    outage = Outage(db, count_runs(db)) if condition == "down" else None
    failed = FailedStoreCalls()
    store_log = logging.getLogger("mlflow.store.db.utils")
    out.mkdir(parents=True)
    store_log.addHandler(failed)
    try:
        with (out / "console.log").open("w") as console, contextlib.redirect_stderr(console):
            result = run_continual(config, offline=condition == "offline",
                                   on_stage_end=(lambda *_: outage.release()) if outage else None)
    finally:
        store_log.removeHandler(failed)
        if outage is not None:
            outage.release()
    outcome = read_back(config.tracking_uri, out, result.parent_run_id, config.train.steps_per_task, condition)
    outcome.failed_calls = failed.count
    if outage is not None:
        outcome.outage = outage
        outcome.covered = outage.locked_at is not None and outage.locked_at < outcome.first_step_at < \
            outcome.last_step_at < outage.released_at
        outcome.arrived_after = outcome.stage_created_at >= outage.released_at
    return outcome


def read_back(uri: str, out: Path, parent_key: str, steps: int, condition: str) -> Outcome:
    """Replay what is left in the run's spool (``secura sync``), then read the stage back from MLflow."""
    from mlflow import MlflowClient

    from pipelines.spool import Drainer, tracking_folder
    from pipelines.tracking import stage_key

    drainer = Drainer(tracking_folder(out), uri)
    spooled = drainer.pending()
    drainer.drain()
    client = MlflowClient(uri)
    stage_id = drainer.run_id(stage_key(parent_key, 1))
    loss = client.get_metric_history(stage_id, "loss")
    at = {m.step: m.timestamp / 1000 for m in loss}
    speeds = [m.value for m in client.get_metric_history(stage_id, "tokens_per_s")]
    run = client.get_run(stage_id)
    first, last = at[min(at)], at[max(at)]
    return Outcome(condition, last - first, statistics.median(speeds), run.data.metrics["stage_seconds"],
                   sorted(m.step for m in loss) == list(range(1, steps + 1)), spooled, drainer.pending(),
                   first, last, run.info.start_time / 1000)


def spread(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def report(results: dict[str, list[Outcome]], steps: int) -> None:
    up = results["up"]
    ratios = {c: [o.train_s / u.train_s for o, u in zip(results[c], up)] for c in CONDITIONS}
    print(f"\none stage of {steps} steps (demo stream, task jobs, a report every step), "
          f"{len(up)} repeats per condition; median (min–max)\n")
    print("| MLflow | stage training, steps 1…N (s) | ms/step | tokens/s (trainer) | stage_seconds "
          "(incl. eval) | × up, per repeat | × up, median |")
    print("|---|---|---|---|---|---|---|")
    for condition, outcomes in results.items():
        train = [o.train_s for o in outcomes]
        print(f"| {condition} | {spread(train, 2)} | {statistics.median(train) / (steps - 1) * 1000:.1f} | "
              f"{spread([o.tokens_per_s for o in outcomes], 0)} | {spread([o.stage_s for o in outcomes])} | "
              f"{', '.join(f'{r:.3f}' for r in ratios[condition])} | {statistics.median(ratios[condition]):.3f} |")
    print("\noutage per repeat: lock held (s), spanned every step report, stage run reached MLflow only after "
          "it, store calls failed")
    for index, outcome in enumerate(results["down"], start=1):
        print(f"  repeat {index}: {outcome.outage.seconds:.1f} s, {yes(outcome.covered)}, "
              f"{yes(outcome.arrived_after)}, {outcome.failed_calls}")
    print("\nevents after the run (spooled when the run returned → left after `secura sync`; loss steps 1…N once)")
    for condition, outcomes in results.items():
        print(f"  {condition}: " + "; ".join(f"{o.spooled_at_end} → {o.left_after_sync}, {yes(o.steps_once)}"
                                             for o in outcomes))
    arrived = all(o.steps_once and not o.left_after_sync for outcomes in results.values() for o in outcomes)
    print(f"every event arrived, every step once: {yes(arrived)}")
    down = statistics.median(ratios["down"])
    floor = statistics.median(d.train_s / o.train_s for d, o in zip(results["down"], results["offline"]))
    medians = statistics.median(o.train_s for o in results["down"]) / statistics.median(o.train_s for o in up)
    verdict = "PASS" if down <= TARGET and all(o.covered for o in results["down"]) else "MISS"
    print(f"\n{verdict}: stage training time while MLflow is down = {down:.3f} × up (target ≤ {TARGET:.2f}; "
          f"ratio of medians {medians:.3f}; {floor:.3f} × offline)")


def yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=250, help="steps of the stage (~10 s on 2 CPUs)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="a new folder for the runs and their MLflow store (default: a temporary one, removed)")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps: at least 2 (training time runs from the first step report to the last)")
    if args.output_dir is not None and args.output_dir.exists() and any(args.output_dir.iterdir()):
        parser.error(f"--output-dir {args.output_dir}: not empty; choose a new folder")

    import ray

    root = (args.output_dir or Path(tempfile.mkdtemp(prefix="tracking-outage-"))).resolve()
    data = run_data(args, root)
    try:
        started = time.perf_counter()
        run_once({**data, "train": {**data["train"], "steps_per_task": 5}}, root / "warm-up", "up")
        print(f"warm-up (shards, base model and its scores, the store): {time.perf_counter() - started:.0f} s",
              flush=True)
        results: dict[str, list[Outcome]] = {c: [] for c in CONDITIONS}
        for repeat in range(1, args.repeats + 1):
            for condition in CONDITIONS:
                outcome = run_once(data, root / f"{condition}-{repeat}", condition)
                results[condition].append(outcome)
                print(f"  {condition} {repeat}: {outcome.train_s:.2f} s training, {outcome.stage_s:.1f} s stage",
                      flush=True)
        report(results, args.steps)
    finally:
        ray.shutdown()
        if args.output_dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
