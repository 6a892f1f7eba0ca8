"""`secura compare`: the aggregation math (t-intervals, Pareto frontiers, matched accuracy, goals)
on synthetic results, the comparison YAML, failure recording, and one tiny real comparison."""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
from pathlib import Path

import pytest
import yaml

from pipelines.compare import (
    GoalSpec,
    Placement,
    RunResultRow,
    _collect,
    aggregate,
    compare_command,
    evaluate_goals,
    execute,
    place,
    placement,
    frontier,
    frontier_dominates,
    gpu_memory,
    load_compare,
    mark_frontiers,
    matched_accuracy,
    matched_table,
    parse_compare,
    row_from_matrix,
    select_plans,
    t_interval,
    task_options,
)
from pipelines.gpu_memory import GIB, RunMemory, Workload, formula_parts, memory_key, run_bytes, saved_tensor_bytes
from pipelines.metrics import AccuracyMatrix

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PROBE_ITEMS = 80
BASE_ITEMS = 54


def runs(label: str, lr: float, acc: float, retention: float, seeds: int = 3, spread: float = 0.01):
    """Synthetic finished runs of one point: seed i shifts both numbers by (i - 1) · spread."""
    return [RunResultRow(label, lr, seed, "finished", new_acc=acc + (seed - 1) * spread, acc=acc,
                         bwt=0.0, forgetting=0.0, retention=retention + (seed - 1) * spread,
                         probe_items=(retention + (seed - 1) * spread) * BASE_ITEMS, base_items=BASE_ITEMS,
                         wall_s=60.0) for seed in range(seeds)]


def points_of(*groups):
    points = aggregate([row for group in groups for row in group])
    mark_frontiers(points, "new_task")
    return points


# --- intervals -------------------------------------------------------------------------


def test_t_interval_matches_the_textbook_value():
    est = t_interval([1.0, 2.0, 3.0])
    # mean 2, sd 1, t(0.975, 2) = 4.3027: half-width 4.3027 / sqrt(3)
    assert est.mean == 2.0 and est.n == 3
    assert est.half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert est.low < 2.0 < est.high


def test_one_seed_has_no_interval_and_says_so():
    est = t_interval([0.7, math.nan])
    assert est.n == 1 and est.half is None
    assert "n=1, no CI" in est.text()
    assert est.low == -math.inf and est.high == math.inf  # never "apart" from anything
    assert t_interval([]).n == 0


def test_aggregate_averages_finished_seeds_only():
    rows = runs("lora", 1e-3, 0.8, 0.6) + [RunResultRow("lora", 1e-3, 9, "failed", error="boom")]
    (point,) = aggregate(rows)
    assert point.n == 3 and point.seeds == [0, 1, 2]
    assert point.stats["retention"].mean == pytest.approx(0.6)
    assert point.stats["probe_items"].mean == pytest.approx(0.6 * BASE_ITEMS)


def test_row_from_matrix_reads_plasticity_retention_and_items():
    matrix = AccuracyMatrix(["a", "b"], ["probe"])
    for stage, (a, b, probe) in enumerate([(0.2, 0.5, 0.675), (0.8, 0.5, 0.6), (0.6, 0.9, 0.5)]):
        matrix.record(stage, "a", a), matrix.record(stage, "b", b), matrix.record(stage, "probe", probe)
    row = row_from_matrix("x", 0.01, 0, matrix, "probe", PROBE_ITEMS, 12.0)
    assert row.new_acc == pytest.approx((0.8 + 0.9) / 2)  # R[1, a], R[2, b]
    assert row.acc == pytest.approx((0.6 + 0.9) / 2)
    assert row.retention == pytest.approx(0.5 / 0.675)
    assert row.probe_items == pytest.approx(40) and row.base_items == pytest.approx(54)
    assert row.forgetting == pytest.approx(0.2)


# --- frontiers -------------------------------------------------------------------------


def test_frontier_drops_lr_points_beaten_on_both_axes():
    points = points_of(runs("m", 1e-3, 0.60, 0.90), runs("m", 3e-3, 0.70, 0.80), runs("m", 1e-2, 0.65, 0.70))
    assert [p.lr for p in frontier(points, "m")] == [1e-3, 3e-3]


def test_frontier_dominance_needs_coverage_at_every_accuracy_level():
    a = runs("a", 1, 0.60, 0.95) + runs("a", 2, 0.80, 0.85)
    b = runs("b", 1, 0.60, 0.90) + runs("b", 2, 0.78, 0.70)
    crossing = runs("c", 1, 0.50, 0.99) + runs("c", 2, 0.85, 0.50)
    points = points_of(a, b, crossing, runs("a2", 1, 0.60, 0.95) + runs("a2", 2, 0.80, 0.85))
    front = {label: frontier(points, label) for label in ("a", "b", "c", "a2")}
    assert frontier_dominates(front["a"], front["b"], "new_task")
    assert not frontier_dominates(front["b"], front["a"], "new_task")
    assert not frontier_dominates(front["a"], front["c"], "new_task")  # c reaches an ACC a never does
    assert not frontier_dominates(front["c"], front["a"], "new_task")
    assert not frontier_dominates(front["a"], front["a2"], "new_task")  # equal frontiers: neither dominates
    assert not frontier_dominates(front["a"], [], "new_task")


# --- matched accuracy ------------------------------------------------------------------


def test_matched_accuracy_picks_the_most_retentive_point_above_the_threshold():
    points = points_of(
        runs("lora", 1e-3, 0.80, 0.60), runs("lora", 5e-4, 0.70, 0.80),
        runs("secura", 1e-2, 0.78, 0.92), runs("secura", 3e-2, 0.82, 0.70), runs("secura", 3e-3, 0.60, 0.99),
        runs("weak", 1e-3, 0.50, 1.00),
    )
    matched = matched_accuracy(points, ["lora", "secura", "weak"], "lora", 0.95, "new_task")
    assert matched.reference_best == pytest.approx(0.80)
    assert matched.threshold == pytest.approx(0.76)
    assert matched.chosen["lora"].lr == 1e-3
    assert matched.chosen["secura"].lr == 1e-2  # 3e-3 keeps more but is below 0.76
    assert matched.chosen["weak"] is None
    assert "no point reaches it" in matched_table(matched, ["lora", "secura", "weak"], "new_task")


# --- goals -----------------------------------------------------------------------------


def goals_for(points, subject="secura", baselines=("lora", "er")):
    matched = matched_accuracy(points, [subject, *baselines], "lora", 0.95, "new_task")
    return evaluate_goals(points, matched, subject, list(baselines), GoalSpec(), "new_task")


def test_goals_are_met_when_the_numbers_say_so():
    points = points_of(
        runs("lora", 1e-3, 0.80, 0.60), runs("lora", 5e-4, 0.70, 0.75),
        runs("er", 1e-3, 0.79, 0.65),
        runs("secura", 1e-2, 0.80, 0.95), runs("secura", 3e-3, 0.72, 0.99),
    )
    assert [g.status for g in goals_for(points)] == ["met", "met", "met"]


def test_goals_can_say_not_met():
    points = points_of(
        runs("lora", 1e-3, 0.80, 0.60), runs("er", 1e-3, 0.79, 0.85),
        runs("secura", 1e-2, 0.80, 0.80, spread=0.05), runs("secura", 3e-2, 0.85, 0.50),
    )
    frontier_goal, floor_goal, margin_goal = goals_for(points)
    assert frontier_goal.status == "not met"  # er keeps more at 0.79 than any secura point reaching 0.79
    assert "vs lora: dominates; vs er: does not dominate" in frontier_goal.detail
    assert floor_goal.status == "not met" and "0.800" in floor_goal.detail  # 0.80 < 0.90
    assert margin_goal.status == "not met" and "difference -2.7" in margin_goal.detail  # er keeps more


def test_goals_without_a_point_at_matched_accuracy_are_not_met():
    points = points_of(runs("lora", 1e-3, 0.80, 0.60), runs("er", 1e-3, 0.79, 0.65),
                       runs("secura", 1e-2, 0.50, 0.99))
    _, floor_goal, margin_goal = goals_for(points)
    assert floor_goal.status == margin_goal.status == "not met"
    assert "no secura point reaches" in floor_goal.detail


def test_one_seed_can_never_meet_a_goal():
    points = points_of(runs("lora", 1e-3, 0.80, 0.50, seeds=1), runs("er", 1e-3, 0.79, 0.55, seeds=1),
                       runs("secura", 1e-2, 0.80, 0.99, seeds=1))
    goals = goals_for(points)
    assert [g.status for g in goals] == ["cannot tell"] * 3
    assert "dominates" in goals[0].detail  # the means are still shown


def test_margin_goal_needs_separated_intervals():
    # a 16-item gap on the means, but one noisy seed makes the intervals overlap
    noisy = runs("secura", 1e-2, 0.80, 0.95, spread=0.25)
    points = points_of(runs("lora", 1e-3, 0.80, 0.60), runs("er", 1e-3, 0.79, 0.65), noisy)
    margin_goal = goals_for(points)[2]
    assert margin_goal.status == "not met" and "CIs overlap" in margin_goal.detail


# --- the comparison YAML ---------------------------------------------------------------


def compare_dict(tmp_path: Path, **changes) -> dict:
    data = {
        "name": "tiny",
        "base": "demo.yaml",
        "overrides": {"scaling.backend": "local", "tasks": ["jobs"], "train.steps_per_task": 2,
                      "train.checkpoint_every": 0, "train.log_every": 1, "eval.test_limit": 8,
                      "eval.probe_limit": 8},
        "methods": [
            {"label": "secura", "method": {"name": "secura", "target_modules": ["q_proj", "v_proj"],
                                           "adapter": {"k": 16, "r": 8}}, "lrs": [0.02]},
            {"label": "lora", "method": {"name": "lora", "target_modules": ["q_proj", "v_proj"]}, "lrs": [0.003]},
        ],
        "seeds": [0],
        "output_dir": str(tmp_path / "cmp"),
    }
    data.update(changes)
    return data


@pytest.mark.parametrize("name, runs", [("compare-smollm2.yaml", 123), ("compare-smollm2-2task.yaml", 69),
                                        ("compare-smollm2-gpu.yaml", 195), ("compare-smollm2-forgetting.yaml", 24)])
def test_the_shipped_comparisons_are_valid(name, runs):
    comparison = load_compare(CONFIGS / name)
    assert len(comparison.plans) == runs
    assert comparison.subject == "secura-m2-mean" and comparison.reference == "lora"
    assert all(plan.config.model["source"] == "gguf" for plan in comparison.plans)


def test_the_forgetting_comparison_commits_its_result_files_and_runs_one_code_path():
    comparison = load_compare(CONFIGS / "compare-smollm2-forgetting.yaml")
    root = CONFIGS.parent / "docs" / "results" / "compare-smollm2-forgetting"
    assert all(plan.result_file.is_relative_to(root) for plan in comparison.plans)
    assert {plan.config.train.precision for plan in comparison.plans} == {"auto"}
    assert {plan.config.eval.test_limit for plan in comparison.plans} == {100}
    assert {m.label for m in comparison.spec.methods} >= {"secura-m2-mean", "secura-decay", "lora", "osf", "corda",
                                                            "inflora", "nlora", "er"}


def test_a_later_round_adds_seeds_at_chosen_rates(tmp_path):
    data = compare_dict(tmp_path)
    data["methods"][1]["lrs"] = [0.003, 0.001]
    data["methods"][1]["more_seeds"] = {0.001: [1, 2]}
    comparison = parse_compare(data, base_dir=CONFIGS)
    assert [(p.label, p.lr, p.seed) for p in comparison.plans] == [
        ("secura", 0.02, 0), ("lora", 0.003, 0), ("lora", 0.001, 0), ("lora", 0.001, 1), ("lora", 0.001, 2)]
    data["methods"][1]["more_seeds"] = {0.01: [1]}
    with pytest.raises(ValueError, match=r"more_seeds: \[0.01\] not in this method's lrs"):
        parse_compare(data, base_dir=CONFIGS)


def test_every_run_gets_its_own_folder_lr_and_seed(tmp_path):
    data = compare_dict(tmp_path, seeds=[0, 1])
    data["methods"][1]["lrs"] = [0.003, 0.001]
    comparison = parse_compare(data, base_dir=CONFIGS)
    assert len(comparison.plans) == 2 + 4
    plan = comparison.plans[-1]
    assert (plan.label, plan.lr, plan.seed) == ("lora", 0.001, 1)
    assert plan.run_dir == tmp_path / "cmp" / "runs" / "lora" / "lr0.001" / "seed1"
    assert plan.config.train.lr == 0.001 and plan.config.seed == 1 and plan.config.tasks == ["jobs"]
    assert plan.config.output_dir == str(plan.run_dir)
    assert comparison.reference == "lora" and comparison.subject == "secura" and comparison.baselines == ["lora"]
    assert [p.label for p in select_plans(comparison, ["lora"])] == ["lora"] * 4


@pytest.mark.parametrize("change, message", [
    ({"seeds": [0, 0]}, "seeds: must be distinct"),
    ({"match_fraction": 1.5}, "match_fraction"),
    ({"reference": "dora"}, "reference: 'dora' is not a method label"),
    ({"goals": {"subject": "nope"}}, "goals: 'nope' is not a method label"),
])
def test_bad_comparisons_fail_before_any_run(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        parse_compare(compare_dict(tmp_path, **change), source="cmp.yaml", base_dir=CONFIGS)


def test_a_bad_method_names_the_run(tmp_path):
    data = compare_dict(tmp_path)
    data["methods"][0]["method"]["adapter"]["kk"] = 3
    with pytest.raises(ValueError, match=r"methods\[secura\].*unknown field\(s\) \['kk'\]"):
        parse_compare(data, source="cmp.yaml", base_dir=CONFIGS)
    data = compare_dict(tmp_path)
    data["methods"][1]["label"] = "secura"
    with pytest.raises(ValueError, match="labels must be unique"):
        parse_compare(data, base_dir=CONFIGS)
    with pytest.raises(ValueError, match="--only"):
        select_plans(parse_compare(compare_dict(tmp_path), base_dir=CONFIGS), ["dora"])


def failing_runs(monkeypatch) -> list[str]:
    """Every run fails at once ("out of memory") without Ray or shards; the methods tried, in order."""
    import pipelines.compare
    import pipelines.run

    seen = []

    def fake_run(config, **kwargs):
        seen.append(config.method["name"])
        raise RuntimeError("out of memory")

    monkeypatch.setattr(pipelines.run, "run_continual", fake_run)
    monkeypatch.setattr(pipelines.run, "init_ray", lambda: None)
    monkeypatch.setattr(pipelines.compare, "_prepare_shared", lambda *args: None)
    return seen


def test_a_failed_run_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    comparison = parse_compare(compare_dict(tmp_path), base_dir=CONFIGS)
    seen = failing_runs(monkeypatch)
    records = execute(comparison, comparison.plans, resume=False)
    assert seen == ["secura", "lora"]
    assert [r["status"] for r in records] == ["failed", "failed"]
    saved = json.loads((comparison.plans[0].run_dir / "compare.json").read_text())
    assert saved["error"] == "RuntimeError: out of memory" and saved["wall_s"] >= 0


# --- placement ---------------------------------------------------------------------------


def test_placement_splits_the_cores_and_lowers_what_the_cluster_cannot_hold(monkeypatch):
    import pipelines.compare

    monkeypatch.setattr(pipelines.compare.os, "cpu_count", lambda: 8)
    assert placement(2, False, {"CPU": 8}) == Placement(parallel=2, cpus_per_run=4, gpu=False)
    assert placement(3, True, {"CPU": 8, "GPU": 2}) == Placement(2, 4, True, 1.0)  # no estimate: a GPU per run
    with pytest.raises(ValueError, match="--parallel"):
        placement(0, False, {"CPU": 8})


def test_gpu_without_a_gpu_trains_on_cpu_and_says_so(capsys):
    where = placement(2, True, {"CPU": 8}, RunMemory(3 * GIB, 141 * 10**9, "measured"))
    assert not where.gpu and where.parallel == 2
    assert "--gpu: no GPU in the cluster; the runs train on CPU" in capsys.readouterr().err
    assert "num_gpus" not in task_options(where)


H200 = 141 * 10**9  # bytes, as the datasheet gives it


@pytest.mark.parametrize("k", [1, 3, 4, 8, 16])
def test_runs_are_packed_onto_one_large_gpu(monkeypatch, k):
    import pipelines.compare

    monkeypatch.setattr(pipelines.compare.os, "cpu_count", lambda: 16)
    memory = RunMemory(run_bytes=3 * GIB, gpu_bytes=H200, source="measured")
    where = placement(k, True, {"CPU": 32, "GPU": 1}, memory)
    assert where.gpu and where.parallel == k
    assert where.gpu_fraction <= 1 / k and where.gpu_fraction * k <= 1  # k of them fit Ray's one GPU
    assert where.gpu_fraction * H200 >= memory.run_bytes  # and each reservation covers the estimate
    assert where.cpus_per_run == 16 // k
    options = task_options(where)
    assert options["num_gpus"] == where.gpu_fraction and options["num_cpus"] == 16 // k
    assert options["runtime_env"]["env_vars"]["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_packing_is_capped_by_memory_and_by_cores(monkeypatch, capsys):
    import pipelines.compare

    monkeypatch.setattr(pipelines.compare.os, "cpu_count", lambda: 16)
    small = placement(40, True, {"CPU": 32, "GPU": 1}, RunMemory(3 * GIB, H200, "measured"))
    assert (small.parallel, small.cpus_per_run, small.gpu_fraction) == (16, 1, 0.0625)  # 43 fit; 16 cores
    large = placement(16, True, {"CPU": 32, "GPU": 1}, RunMemory(20 * GIB, H200, "measured"))
    assert (large.parallel, large.cpus_per_run, large.gpu_fraction) == (6, 2, 0.1666)  # 141 GB / 20 GiB = 6.6
    assert "--parallel 16 lowered to 6: 6 run(s) of 20.0 GiB per run" in capsys.readouterr().err
    two = placement(16, True, {"CPU": 32, "GPU": 2}, RunMemory(20 * GIB, H200, "measured"))
    assert (two.parallel, two.gpu_fraction) == (12, 0.1666)


def test_a_run_larger_than_the_gpu_is_refused():
    with pytest.raises(ValueError, match=r"one run needs 200\.0 GiB \(measured peak x 1\.25 \+ the CUDA context\), "
                                         r"more than a GPU's 131\.3 GiB; lower train\.batch_size"):
        placement(4, True, {"CPU": 16, "GPU": 1}, RunMemory(200 * GIB, H200, "measured"))


def test_a_run_reserves_its_peak_with_headroom_and_a_cuda_context():
    assert run_bytes(4 * GIB) == 5 * GIB + GIB
    assert RunMemory(run_bytes(4 * GIB), H200, "formula").describe() == "6.0 GiB per run (formula) of 131 GiB per GPU"


# --- the memory estimate -----------------------------------------------------------------


def _tiny_wrapped(method: dict):
    from pipelines.models import build_tiny_model
    from secura.methods import MethodConfig, build_method

    built = build_method(MethodConfig.from_dict(method))
    return built.wrap(build_tiny_model(seed=0)), built


def test_the_formula_adds_weights_optimizer_state_and_the_larger_of_step_and_evaluation():
    model, _ = _tiny_wrapped({"name": "lora", "target_modules": ["q_proj", "v_proj"], "adapter": {"r": 8}})
    work = Workload(rows=8, seq_len=96, eval_rows=16, precision="fp32")
    parts = formula_parts(model, work)
    params = {p.data_ptr(): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in params if p.requires_grad) * 4
    assert parts["weights"] == sum(p.numel() * 4 for p in params) + sum(b.numel() * b.element_size()
                                                                        for b in model.buffers())
    assert parts["gradients"] == trainable and parts["optimizer"] == 2 * trainable and parts["strategy"] == 0
    # tiny: hidden 64, intermediate 128, 2 layers, 4 heads, vocab 259
    assert parts["activations"] == 8 * 96 * 2 * (12 * 64 + 6 * 128 + 2 * 4 * 96) * 4
    assert parts["logits"] == 8 * 96 * 259 * 16 and parts["evaluation"] == 16 * 96 * 259 * 8
    assert parts["peak"] == 3 * trainable + parts["weights"] + parts["activations"] + parts["logits"]
    assert formula_parts(model, work, "ewc")["strategy"] == 2 * trainable
    half = formula_parts(model, Workload(8, 96, 16, "bf16"))
    assert half["activations"] == parts["activations"] // 2
    checkpointed = formula_parts(model, Workload(8, 96, 16, "fp32", gradient_checkpointing=True))
    assert checkpointed["activations"] < parts["activations"] / 1.5


@pytest.mark.parametrize("method", [
    {"name": "lora", "target_modules": ["q_proj", "v_proj"], "adapter": {"r": 8}},
    {"name": "secura", "target_modules": ["q_proj", "v_proj", "gate_proj", "down_proj"], "adapter": {"k": 16, "r": 8}},
    {"name": "full"},
])
def test_the_formula_covers_what_autograd_saves_without_wild_overcount(method):
    import torch

    model, _ = _tiny_wrapped(method)
    ids = torch.randint(3, 259, (8, 96), generator=torch.Generator().manual_seed(0))
    saved = saved_tensor_bytes(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    parts = formula_parts(model, Workload(rows=8, seq_len=96, eval_rows=16, precision="fp32"))
    assert saved <= parts["activations"] + parts["logits"] <= 4 * saved


def test_the_workload_counts_replayed_rows_and_the_longest_prompt(tmp_path):
    from pipelines.gpu_memory import workload

    data = compare_dict(tmp_path, base=str(CONFIGS / "demo.yaml"), reference="secura")
    data["methods"][1]["method"] = {"name": "er", "strategy_args": {"buffer_size": 50, "replay_ratio": 0.25}}
    data["overrides"].update({"train.batch_size": 8, "train.precision": "auto"})  # auto, whatever the base pins
    comparison = parse_compare(data, base_dir=CONFIGS)
    secura, er = (plan.config for plan in comparison.plans)
    stream = er.load_stream(CONFIGS)
    trained = [task for task in stream.tasks if task.name == "jobs"]  # the comparison's tasks
    longest = max(task.max_length for task in [*trained, *stream.probe])
    assert workload(er, stream) == Workload(rows=10, seq_len=longest, eval_rows=er.eval.batch_size,
                                            precision="bf16")  # train.precision auto, on a GPU
    assert workload(secura, stream).rows == 8


def test_runs_that_differ_in_lr_and_seed_share_one_measurement(tmp_path):
    data = compare_dict(tmp_path, seeds=[0, 1])
    data["methods"][1]["lrs"] = [0.003, 0.001]
    comparison = parse_compare(data, base_dir=CONFIGS)
    assert len({memory_key(plan.config) for plan in comparison.plans}) == 2  # secura, lora
    # measured earlier (--resume): no GPU task, the largest peak sizes every run
    first = {plan.label: plan for plan in reversed(comparison.plans)}
    keys = {memory_key(first["secura"].config): {"peak": 3 * GIB, "source": "formula"},
            memory_key(first["lora"].config): {"peak": 2 * GIB, "source": "measured"}}
    comparison.output_dir.mkdir(parents=True)
    (comparison.output_dir / "gpu-memory.json").write_text(json.dumps({"gpu_bytes": H200, "peaks": keys}))
    assert gpu_memory(comparison, comparison.plans) == RunMemory(run_bytes(3 * GIB), H200, "formula")


def test_the_measurement_runs_the_real_loop_and_evaluation_once_per_model(ray_local, tmp_path):
    """What the GPU task does, on the CPU: the peaks are stand-ins, the work is real."""
    from pipelines.compare import _prepare_shared
    from pipelines.gpu_memory import _on_gpu, formula_estimate, measure_peaks

    data = compare_dict(tmp_path, base=str(CONFIGS / "demo.yaml"))
    data["overrides"]["tasks"] = ["jobs", "creatures"]
    comparison = parse_compare(data, base_dir=CONFIGS)
    _prepare_shared(comparison, comparison.plans[0])
    configs = {memory_key(plan.config): plan.config for plan in comparison.plans}
    measured = []

    def peak(work) -> int:
        work()
        measured.append(len(measured) + 1)
        return measured[-1] * GIB

    peaks = measure_peaks(configs, CONFIGS, str(comparison.output_dir), peak=peak)
    # evaluation (1 GiB) once for the shared model, then each method's training (2, 3 GiB)
    assert list(peaks.values()) == [{"peak": 2 * GIB, "source": "measured"}, {"peak": 3 * GIB, "source": "measured"}]
    assert len(measured) == 3

    def broken(work) -> int:
        raise RuntimeError("no counters here")

    lora = comparison.plans[1].config
    (fallback,) = measure_peaks({"lora": lora}, CONFIGS, str(comparison.output_dir), peak=broken).values()
    assert fallback == {"peak": formula_estimate(_on_gpu(lora), CONFIGS)["peak"], "source": "formula"}


def test_a_dead_worker_is_that_runs_failure(ray_local, tmp_path):
    plan = parse_compare(compare_dict(tmp_path), base_dir=CONFIGS).plans[0]
    plan.run_dir.mkdir(parents=True)
    (plan.run_dir / "compare.json").write_text(json.dumps({"status": "running", "wall_s": 5.0}))
    ref = ray_local.remote(max_retries=0)(lambda: os._exit(1)).remote()  # as the OOM killer would
    record = _collect(ref, plan)
    assert record["status"] == "failed" and "WorkerCrashedError" in record["error"] and record["wall_s"] == 5.0
    assert json.loads((plan.run_dir / "compare.json").read_text())["status"] == "failed"


def test_placing_a_run_changes_threads_and_device_but_not_its_resume_fingerprint(tmp_path):
    from pipelines.run import config_fingerprint

    plan = parse_compare(compare_dict(tmp_path), base_dir=CONFIGS).plans[0]
    placed = place(plan, Placement(parallel=2, cpus_per_run=3, gpu=True))
    assert placed.config.train.torch_threads == 3 and placed.config.scaling.use_gpu
    assert plan.config.train.torch_threads is None and not plan.config.scaling.use_gpu  # the plan is untouched
    threads_only = place(plan, Placement(parallel=2, cpus_per_run=3, gpu=False))
    assert config_fingerprint(threads_only.config) == config_fingerprint(plan.config)


# --- end to end ------------------------------------------------------------------------


def test_tiny_comparison_end_to_end_and_resume(ray_local, tmp_path, monkeypatch):
    path = CONFIGS / "demo.yaml"
    spec = tmp_path / "cmp.yaml"
    spec.write_text(yaml.safe_dump(compare_dict(tmp_path, base=str(path))))
    args = argparse.Namespace(config=str(spec), resume=False, only=[], output_dir=None, parallel=1, gpu=False)
    assert compare_command(args) == 0
    out = tmp_path / "cmp"
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert [(r["label"], r["n"]) for r in rows] == [("secura", "1"), ("lora", "1")]
    assert all(0 <= float(r["retention_mean"]) and r["retention_ci95"] == "" for r in rows)
    assert all(int(r["trainable_params"]) > 0 for r in rows)
    summary = (out / "summary.md").read_text()
    assert "CANNOT TELL" in summary and "n=1, no CI" in summary and "MET —" not in summary
    section = summary.split("## Why")[1].split("\n## ")[0]
    why = {line.split("|")[1].strip(): line.split("|")[1:-1] for line in section.splitlines()
           if line.startswith("| secura |") or line.startswith("| lora |")}
    assert float(why["secura"][3]) > 0 and float(why["secura"][6]) > 0  # drift and S mean were logged
    assert float(why["lora"][3]) > 0 and why["lora"][6].strip() == "–"  # LoRA has no S-MagNorm
    for name in ("frontier.png", "frontier-forgetting.png", "plots/secura-accuracy_matrix.png", "plots/lora-retention.png", "runs.csv"):
        assert (out / name).is_file(), name
    for plan_dir in (out / "runs" / "secura" / "lr0.02" / "seed0", out / "runs" / "lora" / "lr0.003" / "seed0"):
        assert json.loads((plan_dir / "compare.json").read_text())["status"] == "finished"
        assert (plan_dir / "shards").is_symlink()

    with pytest.raises(ValueError, match="--resume"):
        compare_command(args)
    import pipelines.run

    monkeypatch.setattr(pipelines.run, "run_continual", lambda *a, **k: pytest.fail("a finished run was rerun"))
    args.resume = True
    assert compare_command(args) == 0


def test_result_files_outlive_the_machine_and_stale_ones_run_again(ray_local, tmp_path, monkeypatch):
    """Each finished run leaves one result file in results_dir (committed for long comparisons); on a
    fresh clone (no run folders, shards or MLflow store) --resume runs nothing and rebuilds every table
    and plot from those files alone; a stale or truncated file makes its run run again."""
    import pipelines.run
    from pipelines.results import REQUIRED, SCHEMA

    spec = tmp_path / "cmp.yaml"
    spec.write_text(yaml.safe_dump(compare_dict(tmp_path, base=str(CONFIGS / "demo.yaml"),
                                                results_dir=str(tmp_path / "committed"))))
    args = argparse.Namespace(config=str(spec), resume=False, only=[], output_dir=None, parallel=1, gpu=False)
    assert compare_command(args) == 0
    out = tmp_path / "cmp"
    files = sorted((tmp_path / "committed").rglob("*.json"))
    assert [f.relative_to(tmp_path / "committed").as_posix() for f in files] == [
        "lora/lr0.003/seed0.json", "secura/lr0.02/seed0.json"]
    result = json.loads(files[1].read_text())
    assert set(REQUIRED) <= set(result) and result["schema"] == SCHEMA
    matrix = AccuracyMatrix.from_csv(result["matrix_csv"])
    assert matrix.tasks == ["jobs"] and result["probe_items_total"] == {"facts-probe": 8}
    assert set(result["stage_metrics"]) == {"0", "1"} and "score" in result["stage_metrics"]["1"]["facts-probe"]
    assert result["diagnostics"]["drift/rel_spectral_mean"] > 0 and result["trainable_params"] > 0
    assert result["versions"]["torch"] and result["precision"] and result["backend"] == "local"
    before = {name: (out / name).read_text() for name in ("results.csv", "summary.md")}

    # A fresh clone: an empty output folder (no runs, shards or MLflow store), the committed result files.
    clone = tmp_path / "clone"
    monkeypatch.setattr(pipelines.run, "run_continual", lambda *a, **k: pytest.fail("a finished run was rerun"))
    monkeypatch.setattr(pipelines.run, "init_ray", lambda: pytest.fail("nothing to run: Ray stays down"))
    args.resume, args.output_dir = True, str(clone)
    assert compare_command(args) == 0
    assert (clone / "results.csv").read_text() == before["results.csv"]
    assert (clone / "summary.md").read_text().split("## Why")[1] == before["summary.md"].split("## Why")[1]
    for name in ("frontier.png", "frontier-forgetting.png", "plots/secura-accuracy_matrix.png"):
        assert (clone / name).is_file(), name
    assert not (clone / "runs").exists()

    # Stale (another config made it) and truncated files: exactly those runs run again.
    stale = json.loads(files[0].read_text()) | {"config_hash": "0" * 16}
    files[0].write_text(json.dumps(stale))
    files[1].write_text(files[1].read_text()[:200])
    rerun = failing_runs(monkeypatch)
    assert compare_command(args) == 1
    assert sorted(rerun) == ["lora", "secura"]


def test_parallel_runs_are_ray_tasks_with_their_own_threads(ray_local, tmp_path):
    comparison = parse_compare(compare_dict(tmp_path, base=str(CONFIGS / "demo.yaml")), base_dir=CONFIGS)
    records = execute(comparison, comparison.plans, resume=False, parallel=2)
    assert [(r["label"], r["status"]) for r in records] == [("secura", "finished"), ("lora", "finished")]
    assert all((plan.run_dir / "accuracy_matrix.csv").is_file() for plan in comparison.plans)
