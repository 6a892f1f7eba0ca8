"""The sweep's objective, Pareto set, plot data and multi-objective searcher, on synthetic trial records
(no Ray cluster, no training: milliseconds)."""
from __future__ import annotations

import math
import random

import pytest

from pipelines.metrics import AccuracyMatrix
from tune.objective import LEARN_THEN_RETAIN, LearningRule, TrialRow, pareto_set, select, trial_metrics
from tune.report import format_table, plot_points, plot_sweep, trials_csv, verdict

BASE = 0.4  # the untrained model's new-task accuracy in the synthetic sweeps


def done(trial_id: str, new_acc: float, retention: float, **extra) -> TrialRow:
    return TrialRow(trial_id, {"train.lr": extra.pop("lr", 0.01)}, 3, "completed", new_acc=new_acc,
                    base_new_acc=BASE, retention=retention, **extra)


def dominated(row: TrialRow, rows: list[TrialRow]) -> bool:
    return any(o.new_acc >= row.new_acc and o.retention >= row.retention
               and (o.new_acc > row.new_acc or o.retention > row.retention) for o in rows)


# --- what a trial reports ----------------------------------------------------------------


def test_trial_metrics_read_the_diagonal_the_untrained_row_and_what_was_kept():
    matrix = AccuracyMatrix(["a", "b", "c"], ["p"])
    rows = [[0.2, 0.3, 0.4, 0.8],   # untrained
            [0.6, 0.3, 0.4, 0.6],
            [0.3, 0.9, 0.4, 0.4],
            [0.3, 0.45, 1.0, 0.2]]
    for stage, values in enumerate(rows):
        for name, value in zip(["a", "b", "c", "p"], values):
            matrix.record(stage, name, value)
    m = trial_metrics(matrix, 3, weight_acc=0.25, probe_weight=0.5)
    assert m["new_acc"] == pytest.approx((0.6 + 0.9 + 1.0) / 3)
    assert m["base_new_acc"] == pytest.approx(0.3) and m["gain"] == pytest.approx(2.5 / 3 - 0.3)
    assert m["probe_retention"] == pytest.approx(0.25)
    assert m["task_retention"] == pytest.approx((0.3 / 0.6 + 0.45 / 0.9) / 2)
    assert m["retention"] == pytest.approx(0.5 * 0.25 + 0.5 * 0.5)
    assert m["score"] == pytest.approx(0.25 * matrix.acc(3) + 0.75 * 0.25)
    first = trial_metrics(matrix, 1, weight_acc=0.5, probe_weight=0.5)  # no earlier task yet: probe only
    assert math.isnan(first["task_retention"]) and first["retention"] == pytest.approx(0.75)
    assert first["gain"] == pytest.approx(0.4) and first["stage"] == 1


# --- the choice ----------------------------------------------------------------------------


def test_a_do_nothing_trial_is_never_best_and_is_reported_as_not_learning():
    rows = [
        done("t0", BASE, 1.0, lr=1e-7),          # the untrained model, kept: retains everything
        done("t1", 0.8, 0.55),                    # learns most, forgets most
        done("t2", 0.7, 0.65),                    # learns (0.3 ≥ half of 0.4) and retains more: best
        done("t3", 0.5, 0.85),                    # learns a little (0.1 < 0.2): not enough
        TrialRow("t4", {"train.lr": 0.1}, 1, "stopped", new_acc=0.9, base_new_acc=0.3, retention=0.99),
        TrialRow("t5", {"train.lr": 9.0}, 0, "error", error="ValueError: k too large"),
    ]
    selection = select(rows, LEARN_THEN_RETAIN, LearningRule(fraction_of_best=0.5))
    assert selection.best.trial_id == "t2"
    assert selection.required_gain == pytest.approx(0.2)
    assert [selection.learns(r) for r in rows] == [False, True, True, False, True, None]
    assert {r.trial_id for r in selection.front} == {"t0", "t1", "t2", "t3"}  # the do-nothing trial is on it
    # The weighted score, kept as an option, is exactly what picked the no-op before.
    weighted = [done(r.trial_id, r.new_acc, r.retention, score=0.5 * r.new_acc + 0.5 * r.retention) for r in rows[:4]]
    assert select(weighted, "score", LearningRule()).best.trial_id == "t0"


def test_min_gain_and_no_learner_mean_no_best():
    rows = [done("t0", BASE, 1.0), done("t1", BASE + 0.02, 0.9)]
    selection = select(rows, LEARN_THEN_RETAIN, LearningRule(fraction_of_best=0.5, min_gain=0.05))
    assert selection.best is None and not selection.learners
    assert "no completed trial learns" in verdict(selection, LEARN_THEN_RETAIN)
    nobody = select([done("t0", BASE, 1.0), done("t1", BASE - 0.1, 0.8)], LEARN_THEN_RETAIN, LearningRule())
    assert nobody.best is None  # a gain must be positive, whatever the fraction of the best
    stopped_only = select([TrialRow("t0", {}, 1, "stopped", new_acc=0.9, base_new_acc=0.1, retention=0.9)],
                          LEARN_THEN_RETAIN, LearningRule())
    assert stopped_only.best is None and stopped_only.required_gain is None
    assert "no trial completed" in verdict(stopped_only, LEARN_THEN_RETAIN)


@pytest.mark.parametrize("seed", range(20))
def test_random_sweeps_never_pick_the_do_nothing_trial_and_the_best_is_on_a_non_dominated_front(seed):
    rng = random.Random(seed)
    rows = [done("noop", BASE, 1.0, lr=1e-7)]
    for i in range(rng.randint(1, 12)):
        rows.append(done(f"t{i}", rng.uniform(BASE - 0.1, 0.95), rng.uniform(0.2, 1.0)))
    for i in range(rng.randint(0, 3)):
        rows.append(TrialRow(f"s{i}", {}, 1, "stopped", new_acc=rng.uniform(0, 1), base_new_acc=BASE,
                             retention=rng.uniform(0, 1.2)))
    selection = select(rows, LEARN_THEN_RETAIN, LearningRule(fraction_of_best=rng.choice([0.0, 0.5, 0.9])))
    completed = [r for r in rows if r.status == "completed"]
    assert all(not dominated(r, completed) for r in selection.front)
    assert all(r.status == "completed" for r in selection.front)
    assert all(dominated(r, completed) for r in completed if r not in selection.front)
    if any(r.gain > 0 for r in completed):
        assert selection.best is not None and selection.best.trial_id != "noop"
        assert selection.best in selection.front and selection.best.gain > 0
        learners = [r for r in completed if selection.learns(r)]
        assert selection.best.retention == max(r.retention for r in learners)
    else:
        assert selection.best is None


# --- table, CSV and plot data ----------------------------------------------------------------


def sweep_rows() -> list[TrialRow]:
    return [
        done("t0", BASE, 1.0, lr=1e-7),
        done("t1", 0.9, 0.5),
        TrialRow("t2", {"train.lr": 1e-7}, 1, "stopped", new_acc=0.3, base_new_acc=0.3, retention=1.0),
        TrialRow("t3", {"train.lr": 0.2}, 2, "error", new_acc=0.6, base_new_acc=0.35, retention=0.4,
                 error="RuntimeError: NaN loss"),
        TrialRow("t4", {"train.lr": 5.0}, 0, "error", error="ValueError: k=999 too large"),
    ]


def test_the_table_and_csv_list_every_trial_with_its_stage():
    rows = sweep_rows()
    selection = select(rows, LEARN_THEN_RETAIN, LearningRule())
    table = format_table(rows, 3, selection).splitlines()
    assert len(table) == 1 + len(rows)
    assert table[0].split()[:4] == ["trial", "params", "stage", "new"]
    assert table[2].startswith("t1 *") and "3/3" in table[2]
    assert "1/3 (stopped early)" in table[3] and " no " in table[1]
    assert "error: ValueError: k=999" in table[5]
    csv_lines = trials_csv(rows, selection).splitlines()
    assert len(csv_lines) == 1 + len(rows) and csv_lines[3].split(",")[2] == "1"  # t2's stage


def test_plot_data_holds_every_trial_the_untrained_model_and_the_best(tmp_path):
    rows = sweep_rows()
    selection = select(rows, LEARN_THEN_RETAIN, LearningRule())
    points = plot_points(rows, selection, num_stages=3)
    by_label = {p["label"]: p for p in points}
    assert set(by_label) == {"t0", "t1", "t2 (stopped early, stage 1/3)", "t3 (failed, stage 2/3)", "untrained model"}
    stopped = by_label["t2 (stopped early, stage 1/3)"]
    assert stopped["kind"] == "stopped early" and stopped["stage"] == 1 and not stopped["front"]
    assert (stopped["gain"], stopped["retention"]) == (0.0, 1.0)  # drawn where it stopped
    assert by_label["untrained model"] == {"label": "untrained model", "kind": "untrained model", "gain": 0.0,
                                           "new_acc": BASE, "retention": 1.0, "stage": 0, "front": False,
                                           "best": False, "learns": False}
    assert by_label["t1"]["gain"] == pytest.approx(0.9 - BASE)
    assert [p["label"] for p in points if p["best"]] == ["t1"]
    assert [p["label"] for p in points if p["front"]] == ["t0", "t1"]
    path = plot_sweep(points, selection, tmp_path / "pareto.png", title="t")
    assert path.stat().st_size > 10_000
    assert plot_sweep([by_label["untrained model"]], selection, tmp_path / "none.png", title="t") is None


# --- the multi-objective searcher ----------------------------------------------------------------


def test_optuna_multi_objective_learns_only_from_trials_that_ran_every_stage():
    """Two objectives to NSGA-II; a trial ASHA stopped is PRUNED (its numbers are from stage 1),
    and the completed trials' Pareto set is what Optuna calls its best trials."""
    import optuna
    from optuna.trial import TrialState
    from ray import tune as ray_tune

    from tune.search import FinalStageOptunaSearch, optuna_sampler, searched_metrics

    metrics = searched_metrics(LEARN_THEN_RETAIN)
    assert metrics == ["new_acc", "retention"]
    searcher = FinalStageOptunaSearch(num_stages=3, metric=metrics, mode=["max", "max"],
                                      sampler=optuna_sampler(None, metrics, seed=0, population_size=4))
    assert isinstance(searcher._sampler, optuna.samplers.NSGAIISampler)
    searcher.set_search_properties(None, None, {"train.lr": ray_tune.loguniform(1e-4, 1e-1)})
    rows = []
    for i in range(16):
        lr = searcher.suggest(f"t{i}")["train.lr"]
        x = math.log10(lr / 1e-4) / 3  # 0..1: higher lr learns more and retains less (a real trade-off)
        result = {"stage": 3 if i % 4 else 1, "new_acc": BASE + 0.5 * x, "retention": 1.0 - x * x}
        searcher.on_trial_complete(f"t{i}", result=result)
        status = "completed" if result["stage"] == 3 else "stopped"
        rows.append(TrialRow(f"t{i}", {"train.lr": lr}, result["stage"], status, new_acc=result["new_acc"],
                             base_new_acc=BASE, retention=result["retention"]))
    study = searcher._ot_study
    states = [t.state for t in study.trials]
    assert states.count(TrialState.PRUNED) == 4 and states.count(TrialState.COMPLETE) == 12
    front = pareto_set(rows)
    assert front and all(not dominated(r, [o for o in rows if o.status == "completed"]) for r in front)
    optuna_front = {(t.values[0], t.values[1]) for t in study.best_trials}
    assert {(r.new_acc, r.retention) for r in front} == optuna_front


@pytest.mark.parametrize("sampler", ["nsga2", "tpe"])
def test_the_optuna_searcher_survives_tunes_pickling_and_goes_on_suggesting(sampler):
    """Tuner() cloudpickles its searcher at start and Tune saves it for --resume; optuna 5's
    NSGA-II holds a thread lock, which cannot be pickled unless the sampler drops it."""
    from ray import cloudpickle
    from ray import tune as ray_tune

    from tune.search import search_algorithm

    searcher = search_algorithm("optuna", metric=LEARN_THEN_RETAIN, seed=0, concurrency=2, num_stages=3,
                                points=[], sampler=sampler)
    searcher = cloudpickle.loads(cloudpickle.dumps(searcher))
    searcher.set_search_properties(None, None, {"train.lr": ray_tune.loguniform(1e-4, 1e-1)})
    first = searcher.suggest("t0")
    restored = cloudpickle.loads(cloudpickle.dumps(searcher))
    assert 1e-4 <= first["train.lr"] <= 1e-1
    assert 1e-4 <= restored.suggest("t1")["train.lr"] <= 1e-1
