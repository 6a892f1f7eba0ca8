"""Ray Tune sweeps: the sweep YAML's validation, concurrency sizing, and one real sweep end to end.

The objective, the Pareto set, the plot data and the multi-objective searcher on
synthetic trial records: tests/test_sweep_objective.py."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from pipelines.config import dump_run_config
from tune.objective import TrialRow
from tune.space import Dimension, parse_space
from tune.sweep import parse_sweep, plan_concurrency, trial_need

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL = {"scaling.backend": "local", "train.steps_per_task": 2, "train.checkpoint_every": 0}


def sweep_dict(**changes) -> dict:
    data = {"base": "demo.yaml", "overrides": dict(SMALL), "space": {"train.lr": {"loguniform": [1e-3, 1e-1]}}}
    data.update(changes)
    return data


def parse(data: dict, tmp_path: Path):
    return parse_sweep(data, source="sweep.yaml", base_dir=CONFIGS, output_dir=str(tmp_path / "sweep"))


# --- the space and the sweep YAML ------------------------------------------------------


def test_space_parses_every_distribution():
    dims = parse_space({
        "method.adapter.k": {"choice": [8, 16]},
        "method.adapter.r": {"grid": [4, 8]},
        "method.adapter.sigmoid_scale": {"uniform": [3, 9]},
        "train.lr": {"loguniform": [1e-4, 1e-1]},
    })
    assert [d.kind for d in dims] == ["choice", "grid", "uniform", "loguniform"]
    assert dims[2].bounds == (3.0, 9.0)
    assert dims[0].values == (8, 16)


@pytest.mark.parametrize("space, message", [
    ({}, "space: expected a non-empty mapping"),
    ({"train.lr": [0.1, 0.2]}, "space.train.lr: expected exactly one of"),
    ({"train.lr": {"normal": [0, 1]}}, "space.train.lr: unknown distribution 'normal'"),
    ({"train.lr": {"choice": []}}, "space.train.lr: choice needs a non-empty list"),
    ({"train.lr": {"uniform": [0.1]}}, "space.train.lr: uniform needs [lo, hi]"),
    ({"train.lr": {"uniform": [0.2, 0.1]}}, "space.train.lr: uniform needs lo < hi"),
    ({"train.lr": {"loguniform": [0, 0.1]}}, "space.train.lr: loguniform needs 0 < lo"),
    ({"output_dir": {"choice": ["a", "b"]}}, "space.output_dir: output_dir is set by the sweep"),
])
def test_space_errors_name_the_key(space, message):
    with pytest.raises(ValueError) as err:
        parse_space(space)
    assert message in str(err.value)


@pytest.mark.parametrize("space, message", [
    ({"train.lrr": {"choice": [0.1]}}, "space.train.lrr: value 0.1"),
    ({"method.adapter.kk": {"choice": [4]}}, "unknown field(s) ['kk']"),
    ({"method.adapter.k": {"uniform": [4, 16]}}, "use choice or grid for an integer key"),
    ({"method.adapter.threshold": {"uniform": [0.5, 1.5]}}, "threshold must lie in [1"),
    ({"method.adapter.merge_strategy": {"choice": ["M1", "M3"]}}, "space.method.adapter.merge_strategy: value 'M3'"),
    ({"method.adapter.ratio": {"choice": [0.5, 1.5]}}, "ratio must lie in [0"),
    ({"train.lr": {"choice": [0.1, -1.0]}}, "space.train.lr: value -1.0"),
    ({"stream.name": {"choice": ["x"]}}, "stream is 'demo', not a section"),
])
def test_space_values_are_checked_against_the_base_run(tmp_path, space, message):
    with pytest.raises(ValueError) as err:
        parse(sweep_dict(space=space), tmp_path)
    assert message in str(err.value)


@pytest.mark.parametrize("changes, message", [
    ({"search": "grid"}, "space.train.lr: search: grid enumerates values"),
    ({"search": "bayes"}, "search: Input should be"),
    ({"space": {"train.lr": {"grid": [0.1]}}, "search": "optuna"}, "cannot enumerate a grid"),
    ({"metric": "loss"}, "metric: Input should be"),
    ({"mode": "min"}, "mode: Input should be 'max'"),
    ({"metric": "acc", "weights": {"acc": 0.3}}, "weights: only used by metric: score"),
    ({"weights": {"acc": 0.3}}, "weights: only used by metric: score (metric is learn_then_retain)"),
    ({"metric": "score", "weights": {"acc": 0.3, "probe_retention": 0.3}}, "acc + probe_retention must be 1"),
    ({"metric": "score", "weights": {"loss": 1.0}}, "keys must be acc and/or probe_retention"),
    ({"learning": {"fraction_of_best": 1.5}}, "learning.fraction_of_best"),
    ({"probe_weight": -0.1}, "probe_weight"),
    ({"optuna": {"sampler": "nsga2"}}, "optuna: only used by search: optuna"),
    ({"search": "optuna", "optuna": {"sampler": "cmaes"}}, "optuna.sampler"),
    ({"search": "hyperopt"}, "search: hyperopt optimises one number"),
    ({"search": "grid", "space": {"train.lr": {"grid": [0.1]}}, "points_to_evaluate": [{"train.lr": 0.1}]},
     "points_to_evaluate: a grid already enumerates"),
    ({"points_to_evaluate": [{"train.lr": 0.5}]}, "points_to_evaluate[0].train.lr: 0.5 is outside loguniform"),
    ({"points_to_evaluate": [{"train.lr": 0.01, "seed": 1}]}, "not searched ['seed']"),
    ({"points_to_evaluate": [{}]}, "missing ['train.lr']"),
    ({"points_to_evaluate": [0.01]}, "points_to_evaluate[0]: expected a mapping"),
    ({"scheduler": {"type": "asha", "grace_period": 0}}, "scheduler.grace_period"),
    ({"scheduler": {"type": "pbt"}}, "scheduler.type"),
    ({"resources_per_trial": {"CPU": 0}}, "a trial needs some CPU"),
    ({"resources_per_trial": {"TPU": 1}}, "only CPU and GPU"),
    ({"num_samples": 0}, "num_samples"),
    ({"bogus": 1}, "bogus: Extra inputs are not permitted"),
    ({"base": "missing.yaml"}, "base: run config not found"),
    ({"overrides": {"train.lr": -1}}, "train.lr"),
])
def test_sweep_errors(tmp_path, changes, message):
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        parse(sweep_dict(**changes), tmp_path)
    assert message in str(err.value)


def test_integer_hint_only_for_integer_keys(tmp_path):
    with pytest.raises(ValueError) as err:
        parse(sweep_dict(space={"method.adapter.threshold": {"uniform": [1.0, 3.0]}}), tmp_path)
    assert "threshold must lie in [1" in str(err.value) and "integer key" not in str(err.value)


def test_missing_search_package_is_a_clear_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "hyperopt" else real(name, *a))
    with pytest.raises(ValueError, match="search: hyperopt needs the hyperopt package"):
        parse(sweep_dict(search="hyperopt", metric="score"), tmp_path)


def test_sweep_defaults_and_overrides(tmp_path):
    sweep = parse(sweep_dict(scheduler="none", metric="score", weights={"probe_retention": 0.25}), tmp_path)
    assert sweep.spec.scheduler is None
    assert sweep.spec.weight_acc == pytest.approx(0.75)
    default = parse(sweep_dict(), tmp_path).spec
    assert default.metric == "learn_then_retain" and default.learning.fraction_of_best == 0.5
    assert default.learning.min_gain == 0.0 and default.probe_weight == 0.5
    assert sweep.base["scaling"]["backend"] == "local"
    assert sweep.base["train"]["steps_per_task"] == 2
    assert sweep.experiment == "secura-cl-demo"  # the base run's, unless the sweep names one
    assert sweep.tracking_uri == "sqlite:///" + str((tmp_path / "sweep" / "mlflow.db").resolve())


def test_demo_sweep_config_is_valid():
    """The demo searches the mission's knobs with the learning rule and the two-objective search."""
    from tune.sweep import load_sweep

    sweep = load_sweep(CONFIGS / "sweep-demo.yaml")
    assert {"method.adapter.k", "method.adapter.r", "method.adapter.sigmoid_scale", "train.lr"} <= \
        {dim.key for dim in sweep.dimensions}
    assert sweep.spec.metric == "learn_then_retain" and sweep.spec.search == "optuna"
    assert sweep.spec.scheduler is not None and sweep.base["model"]["source"] == "tiny"


# --- sizing and results ----------------------------------------------------------------


def test_concurrency_leaves_cpus_for_ray_data(tmp_path):
    from pipelines.config import parse_run_config

    local = parse_run_config({"scaling": {"backend": "local"}})
    assert trial_need(local, {"CPU": 1.0}) == {"CPU": 1.0, "GPU": 0.0}
    scaling = {"backend": "ray_train", "num_workers": 2, "resources_per_worker": {"CPU": 2}}
    train = parse_run_config({"scaling": scaling})
    assert trial_need(train, {"CPU": 1.0}) == {"CPU": 5.0, "GPU": 0.0}

    assert plan_concurrency({"CPU": 4.0}, {"CPU": 1.0}, 1.0, None) == 3
    assert plan_concurrency({"CPU": 4.0}, {"CPU": 1.0}, 1.0, 2) == 2
    assert plan_concurrency({"CPU": 4.0}, {"CPU": 1.0}, 1.0, 8) == 3  # capped by the cluster
    assert plan_concurrency({"CPU": 64.0, "GPU": 4.0}, {"CPU": 5.0, "GPU": 2.0}, 2.0, None) == 2
    with pytest.raises(ValueError, match="a trial needs 5 CPUs but the cluster has 4"):
        plan_concurrency({"CPU": 4.0}, {"CPU": 5.0}, 1.0, None)
    with pytest.raises(ValueError, match="a trial needs 1 GPUs but the cluster has 0"):
        plan_concurrency({"CPU": 4.0}, {"CPU": 1.0, "GPU": 1.0}, 1.0, None)


def test_trial_storage_never_shares_ray_train_checkpoints():
    from tune.sweep import trial_storage

    assert trial_storage({"storage_path": None, "scaling": {"backend": "ray_train"}}, "t1") is None
    assert trial_storage({"storage_path": "s3://b/x", "scaling": {"backend": "local"}}, "t1") == "s3://b/x"
    assert trial_storage({"storage_path": "s3://b/x/", "scaling": {"backend": "ray_train"}}, "t1") == \
        "s3://b/x/trials/t1"


def test_best_run_config_is_a_standalone_run_yaml(tmp_path):
    """Relative stream paths follow the base run YAML's folder; best_run.yaml lives elsewhere."""
    from pipelines.config import load_run_config
    from tune.sweep import best_run_config

    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "my-stream.yaml").write_text("name: x\n")
    (tmp_path / "conf" / "run.yaml").write_text("stream: my-stream.yaml\nscaling: {backend: local}\n")
    sweep = parse_sweep({"base": "conf/run.yaml", "space": {"train.lr": {"choice": [0.1, 0.2]}}},
                        base_dir=tmp_path, output_dir=str(tmp_path / "sweep"))
    assert sweep.config_dir == tmp_path / "conf"
    row = TrialRow("t0", {"train.lr": 0.2}, 3, "completed", new_acc=0.5, base_new_acc=0.3, retention=0.9)
    path = tmp_path / "sweep" / "best_run.yaml"
    path.parent.mkdir()
    path.write_text(dump_run_config(best_run_config(sweep, row)))
    best = load_run_config(path)
    assert best.stream == str(tmp_path / "conf" / "my-stream.yaml") and best.train.lr == 0.2
    assert best.output_dir == str(tmp_path / "sweep" / "best")


def test_dimension_probes_catch_integer_keys():
    assert Dimension("k", "uniform", bounds=(4.0, 16.0)).probe_values()[2] % 1 != 0



# --- a real sweep ------------------------------------------------------------------------


def cue_stream(root: Path) -> Path:
    """Two tasks the tiny model learns in 60 steps (a cue word decides the label; the untrained model
    scores 0.5), then the demo's facts probe, which the demo model knows before the stream."""
    import json
    import random

    for task, cues in (("cues1", [("ping", "red"), ("pong", "blue")]), ("cues2", [("zip", "red"), ("zap", "blue")])):
        rng = random.Random(task)
        (root / task).mkdir(parents=True)
        for split, count in (("train", 64), ("test", 16)):
            rows = [{"text": f"{cues[i % 2][0]} {rng.choice(['one', 'two', 'six', 'ten'])}", "label": cues[i % 2][1]}
                    for i in range(count)]
            (root / task / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = "{{name: {0}, type: classification, source: {0}, fields: {{text: text, label: label}}, " \
           "labels: [red, blue], template: \"Q: {{text}}\\nA:\"}}"
    path = root / "stream.yaml"
    path.write_text("name: cues\nseed: 0\ndefaults: {max_length: 64}\ntasks:\n"
                    f"  - {task.format('cues1')}\n  - {task.format('cues2')}\n"
                    "probe:\n  - {name: facts-probe, type: multiple_choice, source: 'builtin:demo/facts'}\n")
    return path


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1200)  # 3.5 min on 2 cores at load ~20 (shared); less when idle
def test_sweep_end_to_end(ray_local, tmp_path):
    """Two-objective Optuna search with ASHA, one trial at a time, its first four points fixed:
    a do-nothing lr (the untrained model kept: retention 1), a learning lr, the do-nothing lr again,
    and k 999 (larger than the tiny model's layers). ASHA stops the second do-nothing trial after
    stage 1 (below the median gain of the two before it); the k 999 trial fails and the sweep goes
    on; the learning trial is best although the do-nothing one retains more, and learns again when
    its best_run.yaml is rerun."""
    import mlflow
    import yaml

    from pipelines.config import load_run_config, parse_run_config
    from tune.report import plot_points
    from tune.rerun import best_trial, markdown, rerun_best
    from tune.sweep import BEST_RUN, PARETO, run_sweep

    noop, learn = 1e-7, 0.05
    data = sweep_dict(
        name="t",
        overrides={**SMALL, "stream": str(cue_stream(tmp_path / "stream")), "train.steps_per_task": 60,
                   "eval.test_limit": 16},
        space={"train.lr": {"loguniform": [noop, 0.1]}, "method.adapter.k": {"choice": [16, 999]}},
        points_to_evaluate=[{"train.lr": lr, "method.adapter.k": k}
                            for lr, k in ((noop, 16), (learn, 16), (noop, 16), (learn, 999))],
        search="optuna", optuna={"population_size": 2}, num_samples=4, max_concurrent=1,
        scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
    )
    sweep = parse(data, tmp_path)
    result = run_sweep(sweep)

    by_status = {}
    for row in result.trials:
        by_status.setdefault(row.status, []).append(row)
    assert sorted((r.params["train.lr"], r.params["method.adapter.k"]) for r in by_status["completed"]) == \
        [(noop, 16), (learn, 16)]
    [stopped], [failed] = by_status["stopped"], by_status["error"]
    assert (stopped.params["train.lr"], stopped.stage) == (noop, 1) and "method.adapter.k: 999" in failed.error
    idle = next(r for r in by_status["completed"] if r.params["train.lr"] == noop)
    assert idle.gain == pytest.approx(0.0, abs=1e-9) and idle.retention == pytest.approx(1.0)
    assert result.best.params["train.lr"] == learn and result.best.gain > 0.2
    assert result.selection.learns(idle) is False and result.best.retention < idle.retention
    assert "1/2 (stopped early)" in result.table
    kinds = {p["label"]: p["kind"] for p in plot_points(result.trials, result.selection, 2)}
    assert kinds[f"{stopped.trial_id} (stopped early, stage 1/2)"] == "stopped early"
    assert kinds["untrained model"] == "untrained model"
    assert (result.output_dir / "pareto.png").stat().st_size > 0

    # pareto.yaml: the non-dominated completed trials, each entry a full run config, also a file for `secura run`.
    entries = yaml.safe_load((result.output_dir / PARETO).read_text())
    front = {e["trial_id"] for e in entries}
    assert front == {r.trial_id for r in result.selection.front} and result.best.trial_id in front
    for entry in entries:
        assert load_run_config(entry["config"]).to_dict() == parse_run_config(entry["run"]).to_dict()
        others = [e for e in entries if e is not entry]
        assert not any(o["new_acc"] >= entry["new_acc"] and o["retention"] >= entry["retention"] for o in others)

    # MLflow: sweep run → trial runs (one per trial that started a run) → stage runs.
    mlflow.set_tracking_uri("sqlite:///" + str(result.output_dir / "mlflow.db"))
    runs = mlflow.search_runs(experiment_names=["secura-cl-demo"])
    parent = runs["tags.mlflow.parentRunId"]
    sweep_run = runs[runs.run_id == result.sweep_run_id].iloc[0]
    assert sweep_run.status == "FINISHED" and sweep_run["metrics.best/new_acc"] == pytest.approx(result.best.new_acc)
    trials = runs[parent == result.sweep_run_id]
    statuses = dict(zip(trials["tags.secura.trial_id"], trials.status))
    expected = {"completed": "FINISHED", "stopped": "KILLED", "error": "FAILED"}
    assert statuses == {row.trial_id: expected[row.status] for row in result.trials}
    best_run = trials[trials["tags.secura.trial_id"] == result.best.trial_id].iloc[0]
    assert sorted(runs[parent == best_run.run_id]["tags.secura.stage"].astype(int)) == [1, 2]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.sweep_run_id, "sweep")}
    assert {"sweep/pareto.png", f"sweep/{BEST_RUN}", f"sweep/{PARETO}", "sweep/trials.csv"} <= artifacts

    # The best config is a plain run YAML, and run again on its own it learns as its trial did.
    best = load_run_config(result.best_config_path)
    assert best.train.lr == learn and best.method["adapter"]["k"] == 16
    assert yaml.safe_load(result.best_config_path.read_text())["output_dir"] == str(result.output_dir / "best")
    rerun = rerun_best(sweep)
    assert rerun["gain"] > 0.2 and rerun["base_new_acc"] == pytest.approx(result.best.base_new_acc)
    assert best_trial(result.output_dir)["trial_id"] == result.best.trial_id
    assert f"| trial {result.best.trial_id} (in the sweep) |" in markdown(best_trial(result.output_dir), rerun)
