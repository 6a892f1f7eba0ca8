"""The continual-learning accuracy matrix and the metrics computed from it.

Notation: ``R[i, j]`` is the score (the task's headline metric, in [0, 1]) on
task ``j`` after stage ``i``. Stage 0 is the base model before any training;
stage ``i >= 1`` is the model right after training on task ``i`` (tasks are
numbered 1..T in stream order). Every stage evaluates every task, seen and
future, plus the probes (held-out general-knowledge sets never trained on),
so ``R[i - 1, i]`` (a task just before it is trained) and ``R[0, j]`` (the
base model) are always available.

The literature's metrics after the last stage T (each method also takes an
earlier ``stage`` i and then uses tasks 1..i only):

* **AP** (average performance; "ACC" in GEM, Lopez-Paz & Ranzato 2017, and
  O-LoRA): the mean of the final row over all tasks,
  ``AP = 1/T · Σ_{j=1..T} R[T, j]`` (`ap`; `acc` is the same mean after any stage).
* **BWT** (backward transfer, GEM), over all tasks but the last, negative when
  tasks are forgotten: ``BWT = 1/(T-1) · Σ_{j=1..T-1} (R[T, j] − R[j, j])``.
* **FWT** (forward transfer, GEM), against the base model's scores
  ``b_j = R[0, j]``: ``FWT = 1/(T-1) · Σ_{j=2..T} (R[j-1, j] − R[0, j])``.
* **Forgetting** (Chaudhry et al. 2018), the mean over earlier tasks of the
  best earlier score minus the final one, positive when tasks are forgotten:
  ``F = 1/(T-1) · Σ_{j=1..T-1} (max_{l=1..T-1} R[l, j] − R[T, j])``; the base
  model (l = 0) is not an "earlier score".

BWT, FWT and forgetting are 0.0 after stage 1 (no earlier task). Probe
retention is ``R[i, p] / R[0, p]``. A required cell that was never recorded
raises ``KeyError``: a silently skipped cell would change the average without
anyone noticing.
"""
from __future__ import annotations

import csv
import io
import math

PROBE_PREFIX = "probe:"


class AccuracyMatrix:
    """Scores per (stage, task or probe); rows = stages 0..T, columns = tasks then probes."""

    def __init__(self, tasks: list[str], probes: list[str] | None = None) -> None:
        probes = list(probes or [])
        names = list(tasks) + probes
        if len(set(names)) != len(names):
            raise ValueError(f"task and probe names must be unique: {names}")
        if not tasks:
            raise ValueError("an accuracy matrix needs at least one task")
        if any(task.startswith(PROBE_PREFIX) for task in tasks):
            raise ValueError(f"task names must not start with {PROBE_PREFIX!r} (it marks probes in the CSV)")
        self.tasks = list(tasks)
        self.probes = probes
        self._scores: dict[tuple[int, str], float] = {}

    @property
    def columns(self) -> list[str]:
        return self.tasks + self.probes

    @property
    def num_stages(self) -> int:
        """Rows of the full matrix: the base model plus one per task."""
        return len(self.tasks) + 1

    def record(self, stage: int, task: str, score: float) -> None:
        """Store ``R[stage, task]`` (a later call for the same cell overwrites it, e.g. on resume)."""
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage {stage} outside 0..{self.num_stages - 1}")
        if task not in self.columns:
            raise KeyError(f"{task!r} is neither a task nor a probe of this matrix: {self.columns}")
        self._scores[(stage, task)] = float(score)

    def get(self, stage: int, task: str) -> float | None:
        """The recorded score, or None."""
        return self._scores.get((stage, task))

    def __getitem__(self, key: tuple[int, str]) -> float:
        stage, task = key
        value = self._scores.get((stage, task))
        if value is None:
            raise KeyError(f"no score recorded for {task!r} after stage {stage}")
        return value

    @property
    def last_stage(self) -> int:
        """The highest stage with any recorded score (-1 when empty)."""
        return max((stage for stage, _ in self._scores), default=-1)

    def _stage(self, stage: int | None, minimum: int) -> int:
        stage = self.last_stage if stage is None else stage
        if not minimum <= stage < self.num_stages:
            raise ValueError(f"stage must be in {minimum}..{self.num_stages - 1}, got {stage}")
        return stage

    def _seen(self, stage: int) -> list[str]:
        return self.tasks[:stage]

    # --- metrics -----------------------------------------------------------------

    def acc(self, stage: int | None = None) -> float:
        """Average accuracy over the seen tasks: ACC_i = 1/i · Σ_{j=1..i} R[i, j] (i >= 1)."""
        stage = self._stage(stage, minimum=1)
        return _mean([self[stage, task] for task in self._seen(stage)])

    def ap(self) -> float:
        """Average performance: the mean of the final row over all T tasks (needs the last stage)."""
        return self.acc(self.num_stages - 1)

    def acc_curve(self) -> list[float]:
        """ACC_i after each recorded stage i = 1..last (the avg seen-task accuracy curve)."""
        return [self.acc(stage) for stage in range(1, self.last_stage + 1)]

    def bwt(self, stage: int | None = None) -> float:
        """Backward transfer (Lopez-Paz & Ranzato 2017), negative = forgetting.

        BWT_i = 1/(i-1) · Σ_{j=1..i-1} (R[i, j] − R[j, j]); 0.0 after stage 1
        (no earlier task to transfer to).
        """
        stage = self._stage(stage, minimum=1)
        earlier = self._seen(stage - 1)
        return _mean([self[stage, task] - self[j, task] for j, task in enumerate(earlier, 1)], empty=0.0)

    def fwt(self, stage: int | None = None) -> float:
        """Forward transfer relative to the base model (Lopez-Paz & Ranzato 2017, b_j = R[0, j]).

        FWT_i = 1/(i-1) · Σ_{j=2..i} (R[j-1, j] − R[0, j]): how much training on
        the earlier tasks helped task j before it was trained. 0.0 after stage 1
        (task 1's term is R[0, 1] − R[0, 1] by definition).
        """
        stage = self._stage(stage, minimum=1)
        terms = [self[j - 1, self.tasks[j - 1]] - self[0, self.tasks[j - 1]] for j in range(2, stage + 1)]
        return _mean(terms, empty=0.0)

    def forgetting(self, stage: int | None = None) -> float:
        """Average forgetting (Chaudhry et al. 2018), positive = forgotten.

        f_j^i = max_{l=1..i-1} R[l, j] − R[i, j] for each earlier task j < i,
        F_i = 1/(i-1) · Σ_j f_j^i; 0.0 after stage 1. The base model (l = 0)
        is excluded, as in the paper.
        """
        stage = self._stage(stage, minimum=1)
        terms = [
            max(self[l, task] for l in range(1, stage)) - self[stage, task]
            for task in self._seen(stage - 1)
        ]
        return _mean(terms, empty=0.0)

    def probe_retention(self, stage: int | None = None) -> dict[str, float]:
        """Per probe: R[i, p] / R[0, p], the fraction of the base model's knowledge kept.

        NaN when the base score is 0 (a ratio to nothing is undefined).
        """
        stage = self._stage(stage, minimum=0)
        return {probe: _ratio(self[stage, probe], self[0, probe]) for probe in self.probes}

    def summary(self, stage: int | None = None) -> dict[str, float]:
        """Every metric after ``stage``, flat, ready for MLflow (``step = stage``).

        Keys: ``acc``, ``bwt``, ``fwt``, ``forgetting`` (from stage 1 on), ``probe_retention`` (the mean over
        the probes, if any) and, with two or more probes, each one's ``probe_retention/<probe>`` (with one,
        that is the mean itself: one name per number).
        """
        stage = self._stage(stage, minimum=0)
        out: dict[str, float] = {}
        if stage >= 1:
            out.update(acc=self.acc(stage), bwt=self.bwt(stage), fwt=self.fwt(stage),
                       forgetting=self.forgetting(stage))
        retention = self.probe_retention(stage)
        if retention:
            out["probe_retention"] = _mean(list(retention.values()))
            if len(retention) > 1:
                out.update({f"probe_retention/{probe}": value for probe, value in retention.items()})
        return out

    # --- storage -----------------------------------------------------------------

    def to_rows(self) -> list[list[float]]:
        """The matrix as stages × columns (NaN where not recorded), for plots."""
        return [
            [self._scores.get((stage, column), math.nan) for column in self.columns]
            for stage in range(self.num_stages)
        ]

    def to_csv(self) -> str:
        """CSV text: header ``stage,<tasks>,probe:<probes>``; one row per stage; empty = not recorded.

        Floats are written with ``repr`` so that ``from_csv`` restores them exactly.
        """
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["stage", *self.tasks, *(PROBE_PREFIX + probe for probe in self.probes)])
        for stage in range(self.num_stages):
            cells = [self._scores.get((stage, column)) for column in self.columns]
            writer.writerow([stage, *("" if value is None else repr(value) for value in cells)])
        return buffer.getvalue()

    @classmethod
    def from_csv(cls, text: str) -> "AccuracyMatrix":
        """Rebuild a matrix from `to_csv` output (e.g. the artifact of an interrupted run)."""
        reader = csv.reader(io.StringIO(text))
        header = next(reader)
        if not header or header[0] != "stage":
            raise ValueError("not an accuracy-matrix CSV: the first column must be 'stage'")
        columns = header[1:]
        tasks = [c for c in columns if not c.startswith(PROBE_PREFIX)]
        probes = [c[len(PROBE_PREFIX):] for c in columns if c.startswith(PROBE_PREFIX)]
        matrix = cls(tasks, probes)
        names = [c.removeprefix(PROBE_PREFIX) for c in columns]
        for row in reader:
            if not row:
                continue
            stage = int(row[0])
            for name, cell in zip(names, row[1:]):
                if cell != "":
                    matrix.record(stage, name, float(cell))
        return matrix


def _mean(values: list[float], empty: float = math.nan) -> float:
    return sum(values) / len(values) if values else empty


def _ratio(value: float, base: float) -> float:
    return value / base if base != 0 else math.nan
