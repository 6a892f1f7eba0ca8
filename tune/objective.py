"""What a sweep optimises, and how it picks the configuration worth running.

A weighted score of accuracy and retention is maximised by not learning
whenever the tasks are hard: the untrained model keeps everything. So the
default rule (``learn_then_retain``) asks two questions in order:

1. Does the trial learn? Its *gain*, the mean new-task accuracy (the
   diagonal ``R[j, j]`` of its accuracy matrix) minus the untrained model's
   accuracy on the same tasks (``R[0, j]``), must be positive and at least
   ``max(min_gain, fraction_of_best × the best completed trial's gain)``.
2. Among the trials that learn, the highest *retention* wins (ties: the higher
   new-task accuracy). Retention mixes the probes' score relative to the
   untrained model with the earlier tasks' score relative to right after they
   were trained.

Trials that do not learn are reported as such and are never the best. The
best is always on the Pareto set of (new-task accuracy, retention): a trial
beating it on both would learn too and retain more.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from pipelines.metrics import AccuracyMatrix

LEARN_THEN_RETAIN = "learn_then_retain"
OBJECTIVES = ("new_acc", "retention")  # the two axes of the multi-objective search and of the plot
SUMMARY_KEYS = ("bwt", "fwt", "forgetting")


def trial_metrics(matrix: AccuracyMatrix, stage: int, *, weight_acc: float, probe_weight: float) -> dict[str, float]:
    """Everything a trial reports after ``stage`` (NaN where undefined).

    ``new_acc``: mean R[j, j] over the tasks trained so far; ``base_new_acc``:
    the untrained model on the same tasks; ``gain``: their difference.
    ``task_retention``: mean R[stage, j] / R[j, j] over the earlier tasks
    (tasks scored 0 right after training have nothing to keep and are left
    out). ``retention``: ``probe_weight``·probe retention + (1 − probe_weight)·
    task retention, or whichever of the two exists. ``score``: the weighted
    ``weight_acc``·ACC + (1 − weight_acc)·probe retention.
    """
    seen = matrix.tasks[:stage]
    summary = matrix.summary(stage)
    new_acc = _mean([matrix[j, task] for j, task in enumerate(seen, start=1)])
    base_new_acc = _mean([matrix[0, task] for task in seen])
    kept = [matrix[stage, task] / matrix[j, task] for j, task in enumerate(seen[:-1], start=1) if matrix[j, task]]
    probe = float(summary.get("probe_retention", math.nan))
    acc = float(summary.get("acc", math.nan))
    metrics = {
        "stage": stage, "new_acc": new_acc, "base_new_acc": base_new_acc, "gain": new_acc - base_new_acc,
        "probe_retention": probe, "task_retention": _mean(kept),
        "retention": _mix(probe, _mean(kept), probe_weight),
        "acc": acc, "score": weight_acc * acc + (1.0 - weight_acc) * probe,
    }
    metrics.update({key: float(summary[key]) for key in SUMMARY_KEYS if key in summary})
    return metrics


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _mix(probe: float, tasks: float, probe_weight: float) -> float:
    if math.isnan(probe):
        return tasks
    if math.isnan(tasks):
        return probe
    return probe_weight * probe + (1.0 - probe_weight) * tasks


# --- trial records and the choice ----------------------------------------------------


@dataclass
class TrialRow:
    """One trial as the sweep saw it last: its values and what it reported at ``stage`` (0: nothing)."""

    trial_id: str
    params: dict[str, Any]
    stage: int
    status: Literal["completed", "stopped", "error"]
    new_acc: float = math.nan
    base_new_acc: float = math.nan
    retention: float = math.nan
    probe_retention: float = math.nan
    acc: float = math.nan
    score: float = math.nan
    error: str | None = None

    @property
    def gain(self) -> float:
        return self.new_acc - self.base_new_acc

    @property
    def stopped_early(self) -> bool:
        return self.status == "stopped"

    @property
    def finite(self) -> bool:
        """Both objectives are numbers: the trial can be drawn and compared."""
        return math.isfinite(self.new_acc) and math.isfinite(self.retention)

    @classmethod
    def from_metrics(cls, trial_id: str, params: dict[str, Any], status: str, metrics: dict[str, Any],
                     error: str | None = None) -> "TrialRow":
        values = {key: float(metrics.get(key, math.nan)) for key in
                  ("new_acc", "base_new_acc", "retention", "probe_retention", "acc", "score")}
        return cls(trial_id, params, int(metrics.get("stage", 0)), status, error=error, **values)


@dataclass(frozen=True)
class LearningRule:
    """A trial learns when its gain is positive, ≥ ``min_gain`` and ≥ ``fraction_of_best`` × the best gain."""

    fraction_of_best: float = 0.5
    min_gain: float = 0.0

    def required_gain(self, best_gain: float) -> float:
        return max(self.min_gain, self.fraction_of_best * best_gain)


@dataclass
class Selection:
    """The sweep's verdict: who learns, the Pareto set of completed trials, and the best trial."""

    best: TrialRow | None
    front: list[TrialRow]
    learners: set[str] = field(default_factory=set)
    required_gain: float | None = None  # None: no completed trial to measure the best gain against

    def learns(self, row: TrialRow) -> bool | None:
        """Whether the trial learns by the rule (None: not known, no threshold or no numbers)."""
        if self.required_gain is None or not math.isfinite(row.gain):
            return None
        return row.trial_id in self.learners

    def on_front(self, row: TrialRow) -> bool:
        return any(member.trial_id == row.trial_id for member in self.front)


def pareto_set(rows: list[TrialRow]) -> list[TrialRow]:
    """The completed trials no other completed trial beats on both new-task accuracy and retention.

    Trials stopped early are left out: their numbers come from an earlier
    stage (fewer tasks, less to forget), so they would crowd out the real front.
    """
    from pipelines.plots import pareto_front

    completed = [row for row in rows if row.status == "completed" and row.finite]
    points = [{"plasticity": row.new_acc, "retention": row.retention} for row in completed]
    return sorted((completed[i] for i in pareto_front(points)), key=lambda row: row.new_acc)


def select(rows: list[TrialRow], metric: str, rule: LearningRule) -> Selection:
    """Who learns and which trial is best, by ``metric``: the learning rule, or one reported number.

    Only completed trials compete (a stopped trial's numbers are from an
    earlier stage). With a weighted ``metric`` (``score``, ``acc``,
    ``probe_retention``) the best is the highest value, learning or not; the
    table still says who learns.
    """
    completed = [row for row in rows if row.status == "completed" and row.finite]
    front = pareto_set(rows)
    if not completed:
        return Selection(best=None, front=front)
    required = rule.required_gain(max(row.gain for row in completed))
    learners = {row.trial_id for row in rows if math.isfinite(row.gain) and row.gain > 0
                and row.gain >= required - 1e-12}
    if metric == LEARN_THEN_RETAIN:
        candidates = [row for row in completed if row.trial_id in learners]
        best = max(candidates, key=lambda row: (row.retention, row.new_acc), default=None)
    else:
        candidates = [row for row in completed if math.isfinite(getattr(row, metric))]
        best = max(candidates, key=lambda row: getattr(row, metric), default=None)
    return Selection(best=best, front=front, learners=learners, required_gain=required)
