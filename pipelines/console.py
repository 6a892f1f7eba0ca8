"""What a run prints: our own lines, one progress bar per stage, a readable summary.

Ray's progress bars, actor-state warnings and result dumps, and MLflow's
store messages are off unless ``--verbose`` (or ``SECURA_VERBOSE=1``); errors
are never hidden (the CLI prints them in one line, with the traceback under
``--verbose``).
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from typing import Any

VERBOSE_ENV = "SECURA_VERBOSE"


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes")


def configure(verbose: bool | None = None) -> bool:
    """Quiet third-party output for this process and the Ray processes it starts; returns the verbosity."""
    verbose = is_verbose() if verbose is None else verbose
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if verbose:
        return True
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")  # Ray Data re-reads its level when it configures itself
    # a stream's actors (Ray Data, the trainer, its dataset splits) start at once: not worth a raylet warning
    os.environ.setdefault("RAY_worker_maximum_startup_concurrency", "16")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")  # MLflow resets its logger's level when imported
    # MLflow's own "🏃 View run … at: <url>" on every run's end (a server's runs): our last line names the store
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "alembic", "transformers", "peft", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # a store error (a full disk) also reaches the tracking spool, which names it in one line
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*SADeprecationWarning.*")
    warnings.filterwarnings("ignore", module="sqlalchemy")
    try:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    except ImportError:
        pass
    return False


def ray_init_kwargs() -> dict[str, Any]:
    """`ray.init` arguments that keep the workers' logs off the console unless verbose."""
    verbose = is_verbose()
    return {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}


class StageProgress:
    """One bar per stage (step, loss, tokens/s, ETA); plain lines when stderr is not a terminal."""

    def __init__(self, num_stages: int, stream=None) -> None:
        self.num_stages = num_stages
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._bar = None
        self._stage = None
        self._task = ""
        self._step = 0
        self._started = 0.0

    def start(self, stage: int, task: str, rows: int) -> None:
        self.close()
        self._stage, self._task, self._step, self._started = stage, task, 0, time.time()

    def update(self, metrics: dict[str, Any]) -> None:
        """A trainer report; only this stage's step reports move the bar."""
        if metrics.get("stage") != self._stage or "loss" not in metrics:
            return
        step, total = int(metrics["step"]), int(metrics.get("total_steps") or 0)
        if step <= self._step:
            return
        self._step = step
        loss, speed = float(metrics["loss"]), float(metrics.get("tokens_per_s", math.nan))
        if self.tty:
            self._bar_for(total).update(step - self._bar.n)
            self._bar.set_postfix_str(f"loss {loss:.4f}, {speed:,.0f} tok/s", refresh=True)
        else:
            eta = (time.time() - self._started) / step * (total - step) if total else math.nan
            print(f"[secura] stage {self._stage}/{self.num_stages} ({self._task}): step {step}/{total} "
                  f"loss {loss:.4f} {speed:,.0f} tok/s, ETA {eta:.0f}s", file=self.stream, flush=True)

    def _bar_for(self, total: int):
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=f"stage {self._stage}/{self.num_stages} {self._task}",
                             unit="step", file=self.stream, leave=True, dynamic_ncols=True)
        return self._bar

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def format_matrix(matrix) -> str:
    """The accuracy matrix as an aligned text table: a row per stage, a column per task and probe."""
    header = ["after", *matrix.columns]
    rows = [[("base" if stage == 0 else f"{stage} {matrix.tasks[stage - 1]}"),
             *(_cell(value) for value in values)] for stage, values in enumerate(matrix.to_rows())]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    return "\n".join(lines)


def _cell(value: float) -> str:
    return "  -  " if value is None or math.isnan(value) else f"{value:.3f}"
