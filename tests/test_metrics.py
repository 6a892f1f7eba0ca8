"""The accuracy matrix and its metrics on a hand-computed 3-task run; plots."""
from __future__ import annotations

import math

import pytest

from pipelines.metrics import AccuracyMatrix
from pipelines.plots import pareto_front, plot_accuracy_matrix, plot_frontier, plot_retention

# R[stage][column], columns A, B, C (tasks) and P (probe).
SCORES = [
    {"A": 0.2, "B": 0.3, "C": 0.1, "P": 0.8},   # base model
    {"A": 0.9, "B": 0.4, "C": 0.2, "P": 0.6},   # after A
    {"A": 0.95, "B": 0.8, "C": 0.3, "P": 0.4},  # after B
    {"A": 0.6, "B": 0.5, "C": 0.9, "P": 0.2},   # after C
]


def matrix_until(last_stage: int) -> AccuracyMatrix:
    matrix = AccuracyMatrix(["A", "B", "C"], ["P"])
    for stage in range(last_stage + 1):
        for column, score in SCORES[stage].items():
            matrix.record(stage, column, score)
    return matrix


def test_full_matrix_metrics():
    m = matrix_until(3)
    assert m.acc() == pytest.approx((0.6 + 0.5 + 0.9) / 3)
    assert m.acc_curve() == pytest.approx([0.9, (0.95 + 0.8) / 2, (0.6 + 0.5 + 0.9) / 3])
    # BWT_3 = ((R3A - R1A) + (R3B - R2B)) / 2
    assert m.bwt() == pytest.approx(((0.6 - 0.9) + (0.5 - 0.8)) / 2)
    # FWT_3 = ((R1B - R0B) + (R2C - R0C)) / 2
    assert m.fwt() == pytest.approx(((0.4 - 0.3) + (0.3 - 0.1)) / 2)
    # forgetting: A: max(0.9, 0.95) - 0.6, B: max(0.4, 0.8) - 0.5
    assert m.forgetting() == pytest.approx(((0.95 - 0.6) + (0.8 - 0.5)) / 2)
    assert m.probe_retention() == pytest.approx({"P": 0.2 / 0.8})
    summary = m.summary()
    assert summary["probe_retention"] == pytest.approx(0.25)
    # one probe: its retention is the mean, under one name
    assert set(summary) == {"acc", "bwt", "fwt", "forgetting", "probe_retention"}


def test_two_probes_get_their_own_retention_beside_the_mean():
    m = AccuracyMatrix(["A"], ["P", "Q"])
    for stage, (a, p, q) in enumerate([(0.1, 0.8, 0.5), (0.9, 0.4, 0.5)]):
        m.record(stage, "A", a)
        m.record(stage, "P", p)
        m.record(stage, "Q", q)
    summary = m.summary()
    assert summary["probe_retention/P"] == pytest.approx(0.5) and summary["probe_retention/Q"] == pytest.approx(1.0)
    assert summary["probe_retention"] == pytest.approx(0.75)


def test_partial_matrices_use_seen_tasks_only():
    after_one = matrix_until(1)
    assert after_one.last_stage == 1
    assert after_one.acc() == pytest.approx(0.9)
    assert (after_one.bwt(), after_one.fwt(), after_one.forgetting()) == (0.0, 0.0, 0.0)

    after_two = matrix_until(2)
    assert after_two.acc() == pytest.approx((0.95 + 0.8) / 2)
    assert after_two.bwt() == pytest.approx(0.95 - 0.9)
    assert after_two.fwt() == pytest.approx(0.4 - 0.3)
    assert after_two.forgetting() == pytest.approx(0.9 - 0.95)  # negative: improved
    # An earlier stage of a full matrix gives the same numbers as the partial one.
    assert matrix_until(3).summary(2) == pytest.approx(after_two.summary())

    base_only = matrix_until(0)
    assert base_only.summary() == {"probe_retention": 1.0}
    with pytest.raises(ValueError):
        base_only.acc()


def test_missing_cell_and_bad_names_fail_loudly():
    m = matrix_until(1)
    m.record(2, "A", 0.5)  # stage 2 without B
    with pytest.raises(KeyError, match="'B' after stage 2"):
        m.acc()
    with pytest.raises(KeyError):
        m.record(1, "D", 0.1)
    with pytest.raises(ValueError):
        m.record(4, "A", 0.1)
    with pytest.raises(ValueError):
        AccuracyMatrix(["A", "A"])


def test_zero_base_probe_gives_nan_retention():
    m = AccuracyMatrix(["A"], ["P"])
    m.record(0, "P", 0.0)
    m.record(0, "A", 0.0)
    assert math.isnan(m.probe_retention(0)["P"])


def test_csv_round_trip_is_exact():
    m = matrix_until(2)
    m.record(3, "A", 1 / 3)  # partial last row
    text = m.to_csv()
    assert text.splitlines()[0] == "stage,A,B,C,probe:P"
    back = AccuracyMatrix.from_csv(text)
    assert (back.tasks, back.probes) == (["A", "B", "C"], ["P"])
    assert back.get(3, "A") == 1 / 3 and back.get(3, "B") is None
    assert back.to_csv() == text
    assert back.summary(2) == m.summary(2)


def test_plots_write_pngs(tmp_path):
    m = matrix_until(2)  # stage 3 missing: NaN cells must not break the plots
    heatmap = plot_accuracy_matrix(m, tmp_path / "matrix.png", title="demo")
    curve = plot_retention(m, tmp_path / "sub" / "retention.png")
    points = [
        {"label": "lr=1e-3", "retention": 0.5, "plasticity": 0.7, "group": "lora"},
        {"label": "lr=5e-4", "retention": 0.7, "plasticity": 0.6, "group": "lora", "retention_ci": 0.05},
        {"label": "lr=1e-4", "retention": 0.6, "plasticity": 0.5, "group": "lora"},
        {"label": "lr=1e-2", "retention": 0.8, "plasticity": 0.65, "group": "secura"},
    ]
    frontier = plot_frontier(points, tmp_path / "frontier.png")
    for path in (heatmap, curve, frontier):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_pareto_front():
    points = [
        {"retention": 0.5, "plasticity": 0.7},
        {"retention": 0.7, "plasticity": 0.6},
        {"retention": 0.6, "plasticity": 0.5},  # dominated by the second
        {"retention": 0.7, "plasticity": 0.6},  # a tie is not domination
    ]
    assert pareto_front(points) == [0, 1, 3]


# A 4-task run, hand-computed (tasks A-D, stages 0-4). A peaks after stage 2, and C scores
# higher before it is trained (stage 1) than after: forgetting counts every earlier stage l >= 1.
LONG = [
    {"A": 0.25, "B": 0.50, "C": 0.20, "D": 0.40},  # base model
    {"A": 0.80, "B": 0.55, "C": 0.80, "D": 0.40},  # after A
    {"A": 0.85, "B": 0.90, "C": 0.35, "D": 0.45},  # after B
    {"A": 0.60, "B": 0.85, "C": 0.75, "D": 0.50},  # after C
    {"A": 0.50, "B": 0.60, "C": 0.70, "D": 0.95},  # after D
]


def long_matrix(last_stage: int = 4) -> AccuracyMatrix:
    matrix = AccuracyMatrix(["A", "B", "C", "D"])
    for stage in range(last_stage + 1):
        for task, score in LONG[stage].items():
            matrix.record(stage, task, score)
    return matrix


def test_literature_metrics_on_a_hand_computed_four_task_run():
    m = long_matrix()
    # AP: mean of the final row over all four tasks: (0.50 + 0.60 + 0.70 + 0.95) / 4.
    assert m.ap() == m.acc() == pytest.approx(0.6875)
    # BWT over A, B, C (not the last task): (0.50-0.80) + (0.60-0.90) + (0.70-0.75) = -0.65.
    assert m.bwt() == pytest.approx(-0.65 / 3)
    # FWT against the base model: (0.55-0.50) + (0.35-0.20) + (0.50-0.40) = 0.30.
    assert m.fwt() == pytest.approx(0.10)
    # Forgetting: A 0.85-0.50, B 0.90-0.60, C 0.80-0.70 (its best earlier score is before training).
    assert m.forgetting() == pytest.approx(0.75 / 3)
    # After stage 2 only A and B count: A went up, so forgetting is negative and BWT positive.
    assert (m.acc(2), m.bwt(2), m.fwt(2), m.forgetting(2)) == pytest.approx((0.875, 0.05, 0.05, -0.05))


def test_ap_needs_the_final_row():
    with pytest.raises(KeyError, match="'A' after stage 4"):
        long_matrix(3).ap()
