"""Search algorithms and early stopping for a sweep, and how the two fit together.

With the learning rule (``metric: learn_then_retain``) ``search: optuna`` is
a two-objective search: new-task accuracy and retention, both maximised, by
NSGA-II (default) or Optuna's multi-objective TPE. ASHA judges one number, so
it judges the rule's first question, whether a trial learns: its metric is
``gain`` (new-task accuracy over the untrained model's on the same tasks).
Retention is judged only on trials that ran every stage, because a trial
stopped after task 1 has had less to forget. Tune tells the searcher a trial
ASHA stopped is complete, with its last, earlier-stage result; Optuna is told
it was *pruned* instead, and its samplers build on completed trials only.
"""
from __future__ import annotations

import threading
from typing import Any

from optuna.samplers import NSGAIISampler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from tune.objective import LEARN_THEN_RETAIN, OBJECTIVES


class FinalStageOptunaSearch(OptunaSearch):
    """OptunaSearch that counts a trial as complete only if it reported its last stage; else pruned."""

    def __init__(self, *, num_stages: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._num_stages = num_stages

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result is not None and not error and result.get("stage", 0) < self._num_stages:
            result = None  # no values and no error: Optuna records the trial as PRUNED
        super().on_trial_complete(trial_id, result=result, error=error)


def searched_metrics(metric: str) -> list[str]:
    """What the searcher maximises: both objectives under the learning rule, else the one metric."""
    return list(OBJECTIVES) if metric == LEARN_THEN_RETAIN else [metric]


def stopping_metric(metric: str) -> str:
    """What ASHA compares at its rungs: learning (``gain``) under the learning rule, else the metric."""
    return "gain" if metric == LEARN_THEN_RETAIN else metric


class PicklableNSGAIISampler(NSGAIISampler):
    """NSGA-II that survives Tune's pickling of its searcher (at Tuner start and on every save).

    Optuna 5 gave the genetic samplers a ``threading.Lock`` for their generation
    cache, which cannot be pickled: the lock is dropped on the way out and made
    anew on the way in, the cache itself travels.
    """

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_thread_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


def optuna_sampler(name: str | None, metrics: list[str], seed: int, population_size: int | None):
    """NSGA-II for two objectives and TPE for one, unless ``name`` says otherwise."""
    import optuna

    name = name or ("nsga2" if len(metrics) > 1 else "tpe")
    if name == "nsga2":
        return PicklableNSGAIISampler(seed=seed, **({"population_size": population_size}
                                                     if population_size else {}))
    return optuna.samplers.TPESampler(seed=seed)


def search_algorithm(search: str, *, metric: str, seed: int, concurrency: int, num_stages: int,
                     points: list[dict[str, Any]], sampler: str | None = None, population_size: int | None = None):
    """The Tune search algorithm, with the concurrency applied in the way each kind accepts it.

    ``points`` are evaluated first (``points_to_evaluate``), then the search samples.
    """
    if search in ("random", "grid"):  # a generator, which TuneConfig.max_concurrent_trials would ignore
        return BasicVariantGenerator(max_concurrent=concurrency, random_state=seed,
                                     points_to_evaluate=points or None)
    metrics = searched_metrics(metric)
    modes = ["max"] * len(metrics)
    if search == "optuna":
        searcher = FinalStageOptunaSearch(
            num_stages=num_stages, metric=metrics if len(metrics) > 1 else metrics[0],
            mode=modes if len(modes) > 1 else modes[0], points_to_evaluate=points or None,
            sampler=optuna_sampler(sampler, metrics, seed, population_size))
    else:
        from ray.tune.search.hyperopt import HyperOptSearch

        searcher = HyperOptSearch(metric=metrics[0], mode="max", random_state_seed=seed,
                                  points_to_evaluate=points or None)
    return ConcurrencyLimiter(searcher, max_concurrent=concurrency)


def asha(metric: str, num_stages: int, grace_period: int, reduction_factor: float):
    """ASHA on the stage axis: a trial is compared with the others at the same stage (rung)."""
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="stage", metric=stopping_metric(metric), mode="max", max_t=num_stages,
                         grace_period=grace_period, reduction_factor=reduction_factor)
