"""Ray Tune sweeps: the sweep YAML's validation, concurrency sizing, and one real sweep end to end."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from pipelines.config import dump_run_config
from tune.space import Dimension, parse_space
from tune.sweep import (
    TrialRow,
    format_table,
    parse_sweep,
    pick_best,
    plan_concurrency,
    stage_metrics,
    trial_need,
)

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
    ({"method.adapter.threshold": {"uniform": [0.5, 1.5]}}, "SecuraConfig.threshold must lie in [1, 2]"),
    ({"method.adapter.merge_strategy": {"choice": ["M1", "M3"]}}, "space.method.adapter.merge_strategy: value 'M3'"),
    ({"method.adapter.ratio": {"choice": [0.5, 1.5]}}, "SecuraConfig.ratio must lie in [0, 1]"),
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
    ({"weights": {"acc": 0.3, "probe_retention": 0.3}}, "acc + probe_retention must be 1"),
    ({"weights": {"loss": 1.0}}, "keys must be acc and/or probe_retention"),
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
    assert "must lie in [1, 2]" in str(err.value) and "integer key" not in str(err.value)


def test_missing_search_package_is_a_clear_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "hyperopt" else real(name, *a))
    with pytest.raises(ValueError, match="search: hyperopt needs the hyperopt package"):
        parse(sweep_dict(search="hyperopt"), tmp_path)


def test_sweep_defaults_and_overrides(tmp_path):
    sweep = parse(sweep_dict(scheduler="none", weights={"probe_retention": 0.25}), tmp_path)
    assert sweep.spec.scheduler is None
    assert sweep.spec.weight_acc == pytest.approx(0.75)
    assert sweep.base["scaling"]["backend"] == "local"
    assert sweep.base["train"]["steps_per_task"] == 2
    assert sweep.experiment == "secura-cl-demo"  # the base run's, unless the sweep names one
    assert sweep.tracking_uri == "sqlite:///" + str((tmp_path / "sweep" / "mlflow.db").resolve())


def test_demo_sweep_config_is_valid():
    from tune.sweep import load_sweep

    sweep = load_sweep(CONFIGS / "sweep-demo.yaml")
    assert sweep.spec.num_samples == 4 and sweep.spec.scheduler is not None
    assert sweep.base["scaling"]["backend"] == "local" and sweep.base["model"]["source"] == "tiny"


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


def test_stage_metrics_always_carry_acc_and_retention():
    metrics = stage_metrics(2, {"acc": 0.6, "probe_retention": 0.8, "bwt": -0.1, "probe_retention/p": 0.8}, 0.25)
    assert metrics["stage"] == 2 and metrics["score"] == pytest.approx(0.25 * 0.6 + 0.75 * 0.8)
    assert metrics["bwt"] == -0.1 and "probe_retention/p" not in metrics
    assert math.isnan(stage_metrics(1, {"acc": 0.5}, 0.5)["probe_retention"])


def test_best_is_a_completed_trial_and_the_table_shows_every_trial():
    rows = [
        TrialRow("t0", {"train.lr": 0.01}, 3, 0.5, 0.9, 0.7, "completed"),
        TrialRow("t1", {"train.lr": 0.1}, 1, 0.9, 0.9, 0.9, "stopped"),  # earlier stage: not comparable
        TrialRow("t2", {"train.lr": 1.0}, 0, math.nan, math.nan, math.nan, "error", "ValueError: k too large"),
        TrialRow("t3", {"train.lr": 0.02}, 3, 0.6, 0.7, 0.65, "completed"),
    ]
    assert pick_best(rows, "score").trial_id == "t0"
    assert pick_best(rows, "acc").trial_id == "t3"
    assert pick_best(rows[1:3], "score") is None
    table = format_table(rows, 3, pick_best(rows, "score")).splitlines()
    assert table[0].split()[:3] == ["trial", "params", "acc"]
    assert table[1].startswith("t0 *") and "yes (stage 1/3)" in table[2] and "error: ValueError" in table[3]


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
    row = TrialRow("t0", {"train.lr": 0.2}, 3, 0.5, 0.9, 0.7, "completed")
    path = tmp_path / "sweep" / "best_run.yaml"
    path.parent.mkdir()
    path.write_text(dump_run_config(best_run_config(sweep, row)))
    best = load_run_config(path)
    assert best.stream == str(tmp_path / "conf" / "my-stream.yaml") and best.train.lr == 0.2
    assert best.output_dir == str(tmp_path / "sweep" / "best")


def test_dimension_probes_catch_integer_keys():
    assert Dimension("k", "uniform", bounds=(4.0, 16.0)).probe_values()[2] % 1 != 0


# --- a real sweep ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1200)  # ~2.5 min on 2 idle cores; the margin is for a loaded machine
def test_sweep_end_to_end(ray_local, tmp_path):
    """Grid over lr (a, b, a) × k (16, 999), one trial at a time, so ASHA's decision is
    deterministic whichever of a and b is worse after stage 1: if b < a, the b trial
    is stopped (below the a trial before it); if b > a, the second a trial is (below
    the median of a and b). k 999 is larger than the tiny model's layers: those three
    trials fail, are reported, and the sweep goes on."""
    import mlflow
    import yaml

    from pipelines.config import load_run_config
    from pipelines.run import run_continual
    from pipelines.streams import load_stream
    from tune.sweep import BEST_RUN, run_sweep

    data = sweep_dict(
        name="t",
        overrides={**SMALL, "train.steps_per_task": 20, "eval.test_limit": 16},
        space={"train.lr": {"grid": [1e-6, 0.05, 1e-6]}, "method.adapter.k": {"grid": [16, 999]}},
        search="grid", num_samples=1, max_concurrent=1, metric="acc",
        scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
    )
    result = run_sweep(parse(data, tmp_path))

    by_status = {}
    for row in result.trials:
        by_status.setdefault(row.status, []).append(row)
    assert len(result.trials) == 6
    assert sorted(by_status) == ["completed", "error", "stopped"]
    assert [row.stage for row in by_status["stopped"]] == [1]
    assert sorted(r.params["train.lr"] for r in by_status["completed"] + by_status["stopped"]) == [1e-6, 1e-6, 0.05]
    assert all(r.params["method.adapter.k"] == 16 for r in by_status["completed"] + by_status["stopped"])
    assert len(by_status["error"]) == 3 and all("k=999" in r.error for r in by_status["error"])
    assert result.best in by_status["completed"]
    assert (result.output_dir / "pareto.png").stat().st_size > 0
    assert "stopped early" in result.table and (result.output_dir / "trials.csv").exists()

    # MLflow: sweep run → trial runs (one per trial that started a run) → stage runs.
    mlflow.set_tracking_uri("sqlite:///" + str(result.output_dir / "mlflow.db"))
    runs = mlflow.search_runs(experiment_names=["secura-cl-demo"])
    parent = runs["tags.mlflow.parentRunId"]
    sweep_run = runs[runs.run_id == result.sweep_run_id].iloc[0]
    assert sweep_run.status == "FINISHED" and sweep_run["metrics.best/acc"] == pytest.approx(result.best.acc)
    trials = runs[parent == result.sweep_run_id]
    assert len(trials) == 6
    statuses = dict(zip(trials["tags.secura.trial_id"], trials.status))
    expected = {"completed": "FINISHED", "stopped": "KILLED", "error": "FAILED"}
    assert statuses == {row.trial_id: expected[row.status] for row in result.trials}
    best_run = trials[trials["tags.secura.trial_id"] == result.best.trial_id].iloc[0]
    stages = runs[parent == best_run.run_id]
    assert sorted(stages["tags.secura.stage"].astype(int)) == [1, 2, 3]
    assert best_run["params.train.lr"] == str(result.best.params["train.lr"])
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.sweep_run_id, "sweep")}
    assert {"sweep/pareto.png", f"sweep/{BEST_RUN}", "sweep/trials.csv"} <= artifacts

    # The best config is a plain run YAML: `secura run` loads and runs it unchanged.
    best = load_run_config(result.best_config_path)
    assert best.train.lr == result.best.params["train.lr"] and best.method["adapter"]["k"] == 16
    assert yaml.safe_load(result.best_config_path.read_text())["output_dir"] == str(result.output_dir / "best")
    first_task = load_stream(best.stream).tasks[0].name
    tiny = best.model_copy(update={"tasks": [first_task]})
    tiny.train.steps_per_task = 2
    Path(tiny.output_dir).mkdir(parents=True)
    (Path(tiny.output_dir) / "shards").symlink_to(result.output_dir / "shards")  # reuse the sweep's tokenised stream
    assert "acc" in run_continual(tiny).summary
