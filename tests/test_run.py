"""The continual-learning driver end to end on the demo stream with the tiny model:
stages, evaluation matrix, MLflow hierarchy, resume, bad configs, NaN losses."""
from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pytest
import yaml

from pipelines.config import load_run_config, parse_run_config
from pipelines.run import run_continual
from pipelines.train import NonFiniteLossError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def small_config(tmp_path: Path, **overrides) -> dict:
    data = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    data.update(output_dir=str(tmp_path / "run"), tasks=["arithmetic", "sentiment"])
    data["train"].update(steps_per_task=4, log_every=2, checkpoint_every=2, batch_size=8)
    data["eval"].update(test_limit=8, probe_limit=8)
    data["scaling"]["backend"] = "local"
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data


@pytest.fixture(scope="module")
def local_run(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local")
    config = parse_run_config(small_config(tmp))
    return config, run_continual(config)


def test_every_stage_is_evaluated_on_every_task_and_probe(local_run):
    config, result = local_run
    rows = result.matrix.to_rows()
    assert len(rows) == 3  # base + 2 stages
    assert all(not math.isnan(v) for row in rows for v in row)  # seen, future and probe columns
    assert set(result.summary) >= {"acc", "bwt", "fwt", "forgetting", "probe_retention"}
    out = Path(config.output_dir)
    assert (out / "accuracy_matrix.csv").read_text() == result.matrix.to_csv()
    assert sorted(p.name for p in (out / "stages").iterdir()) == ["01-arithmetic", "02-sentiment"]
    assert json.loads((out / "journal.json").read_text())["finished"] is True


def test_mlflow_holds_a_parent_with_one_nested_run_per_stage(local_run):
    config, result = local_run
    mlflow.set_tracking_uri(f"sqlite:///{Path(config.output_dir).resolve()}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=[config.experiment], output_format="list")
    parent = [r for r in runs if r.info.run_id == result.parent_run_id]
    stages = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]
    assert len(parent) == 1 and len(stages) == 2
    client = mlflow.MlflowClient()
    for stage in stages:
        assert client.get_metric_history(stage.info.run_id, "loss"), "per-step loss is logged"
        assert {"eval/arithmetic/accuracy", "drift/rel_spectral_mean", "acc"} <= set(stage.data.metrics)
        artifacts = {a.path for a in client.list_artifacts(stage.info.run_id)}
        assert {"adapter", "plots", "accuracy_matrix.csv"} <= artifacts
    assert "final/acc" in parent[0].data.metrics
    assert parent[0].data.params["method.name"] == "secura"


def test_the_secura_stage_state_reproduces_its_scores(local_run):
    """The stage checkpoint holds adapter state only and reproduces the evaluation."""
    from pipelines.run import Evaluator, load_eval_sets
    from pipelines.preprocess import Manifest
    from pipelines.streams import load_stream

    config, result = local_run
    out = Path(config.output_dir)
    assert not any("embed" in k or "base_layer" in k for k in _keys(out / "stages" / "02-sentiment"))
    manifest = Manifest.load(str(out / "shards" / "demo"))
    sets = load_eval_sets(config, load_stream(config.stream), manifest)
    scores = Evaluator(config, sets).score(out / "stages" / "02-sentiment")
    assert {k: v["score"] for k, v in scores.items()} == {
        k: result.matrix[2, k] for k in scores
    }


def _keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "adapter.safetensors"), "pt") as f:
        return list(f.keys())


def test_resume_continues_at_the_first_unfinished_stage_without_new_mlflow_runs(ray_local, tmp_path, monkeypatch):
    import pipelines.run as run_module

    config = parse_run_config(small_config(tmp_path, tasks=["arithmetic", "strings"]))
    real = run_module.train_stage
    calls: list[str] = []

    def crash_on_second(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 2:
            raise KeyboardInterrupt("driver killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "train_stage", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_continual(config)
    with pytest.raises(ValueError, match="--resume"):
        run_continual(config)
    calls.clear()
    monkeypatch.setattr(run_module, "train_stage", lambda *a, **k: (calls.append(a[2]), real(*a, **k))[1])
    result = run_continual(config, resume=True)
    assert calls == ["strings"], "the finished stage is not trained again"
    mlflow.set_tracking_uri(f"sqlite:///{Path(config.output_dir).resolve()}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=[config.experiment], output_format="list")
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1
    assert len([r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]) == 2


def test_resume_refuses_a_changed_config_and_a_finished_run_is_followed_by_a_new_one(ray_local, tmp_path):
    config = parse_run_config(small_config(tmp_path, tasks=["arithmetic"]))
    first = run_continual(config)
    changed = parse_run_config(small_config(tmp_path, tasks=["arithmetic"], **{"train.lr": 0.5}))
    with pytest.raises(ValueError, match="config differs"):
        run_continual(changed, resume=True)
    second = run_continual(config)  # `make demo` twice: a new run in the same output dir
    assert second.parent_run_id != first.parent_run_id
    assert (Path(config.output_dir) / f"journal-{first.parent_run_id}.json").exists()


def test_nan_loss_stops_the_stage_with_a_clear_error(ray_local, tmp_path):
    config = parse_run_config(small_config(tmp_path, tasks=["arithmetic"], **{"train.lr": 1e30, "train.max_grad_norm": None}))
    with pytest.raises(NonFiniteLossError, match="stage 1 \\(arithmetic\\).*lower train.lr"):
        run_continual(config)


@pytest.mark.parametrize("method", [
    {"name": "lora"}, {"name": "dora"}, {"name": "er"}, {"name": "ewc"}, {"name": "ilora"}, {"name": "full"},
    {"name": "cur_lora", "adapter": {"k": 16}},
    {"name": "secura", "strategy": "er", "adapter": {"k": 16, "r": 8, "merge_strategy": "M1"}},
], ids=lambda m: "+".join(filter(None, [m["name"], m.get("strategy")])))
def test_baselines_run_in_the_same_harness(ray_local, tmp_path, method):
    config = parse_run_config(small_config(tmp_path, tasks=["sentiment"], method=method))
    result = run_continual(config)
    assert len(result.matrix.to_rows()) == 2


def test_a_strategy_penalty_is_logged_beside_the_task_loss(ray_local, tmp_path):
    """EWC's penalty exists only once a task is behind it; its size is logged, so a weak λ shows."""
    config = parse_run_config(small_config(tmp_path, method={"name": "ewc", "strategy_args": {"ewc_lambda": 1e6}}))
    result = run_continual(config)
    client = mlflow.MlflowClient(f"sqlite:///{Path(config.output_dir).resolve()}/mlflow.db")
    stages = client.search_runs(
        [client.get_experiment_by_name(config.experiment).experiment_id],
        f"tags.mlflow.parentRunId = '{result.parent_run_id}'", order_by=["attributes.start_time ASC"])
    first, second = (client.get_metric_history(s.info.run_id, "loss/strategy") for s in stages)
    assert first == []  # nothing to protect during the first task
    assert second and all(m.value > 0 for m in second)


def test_bad_run_config_names_the_file_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"train": {"lr": "fast"}, "method": {"name": "secura", "adapter": {"k": 0}}}))
    with pytest.raises(ValueError) as err:
        load_run_config(path)
    message = str(err.value)
    assert f"{path}: train.lr" in message and "method" in message and "k" in message
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        parse_run_config({"method": {"name": "nope"}})
    with pytest.raises(ValueError, match="bogus"):
        parse_run_config({"bogus": 1})


@pytest.mark.slow
def test_ray_train_backend_with_two_ddp_workers(ray_local, tmp_path):
    """The real path: a TorchTrainer per stage, 2 DDP workers on gloo, CPU left for Ray Data."""
    config = parse_run_config(small_config(
        tmp_path, tasks=["arithmetic"],
        scaling={"backend": "ray_train", "num_workers": 2, "resources_per_worker": {"CPU": 0.5}},
    ))
    result = run_continual(config)
    stage = Path(config.output_dir) / "stages" / "01-arithmetic"
    assert {"adapter.safetensors", "strategy-rank0.pt", "strategy-rank1.pt"} <= {p.name for p in stage.iterdir()}
    assert not math.isnan(result.summary["acc"])


def test_a_restarted_stage_resumes_from_its_mid_stage_checkpoint(ray_local, tmp_path):
    """What a worker restarted by Ray Train's FailureConfig does: adapter, optimiser, strategy
    state and step come from the last mid-stage checkpoint; the stage does not start over."""
    import torch

    from pipelines.preprocess import Manifest, prepare_stream
    from pipelines.streams import load_stream
    from pipelines.train import TRAINER_FILE, LocalContext, StageSpec, run_stage, stage_spec_dict

    config = parse_run_config(small_config(tmp_path, tasks=["arithmetic"], method={"name": "er"},
                                           **{"train.steps_per_task": 6}))
    manifest: Manifest = prepare_stream(load_stream("demo"), config.model_config_obj(), str(tmp_path), progress=False)
    split = manifest.task("arithmetic").split("train")
    loop = {"run": config.to_dict(), "stage": stage_spec_dict(
        StageSpec(index=1, task="arithmetic", init_state_dir=None, stage_run_id=None, tracking_uri=None,
                  train_rows=split.rows))}

    class WorkerKilled(Exception):
        pass

    def kill_after_first_checkpoint(metrics):
        if metrics["step"] == 2:
            raise WorkerKilled

    first = LocalContext(split.path, on_report=kill_after_first_checkpoint, checkpoint_root=tmp_path / "ckpt")
    with pytest.raises(WorkerKilled):
        run_stage(loop, first)
    checkpoint = first.last_checkpoint
    assert checkpoint is not None and torch.load(checkpoint / TRAINER_FILE, weights_only=False)["step"] == 2

    steps: list[int] = []
    second = LocalContext(split.path, on_report=lambda m: steps.append(m["step"]),
                          checkpoint_root=tmp_path / "ckpt2", resume_from=checkpoint)
    run_stage(loop, second)
    assert steps == [4, 6, 6], "resumed at step 3: reports at 4 and 6, then the final checkpoint"
    assert second.last_metrics["done"] == 1


def test_checkpoints_do_not_wait_for_log_steps(ray_local, tmp_path):
    from pipelines.preprocess import prepare_stream
    from pipelines.streams import load_stream
    from pipelines.train import LocalContext, StageSpec, run_stage, stage_spec_dict

    config = parse_run_config(small_config(tmp_path, tasks=["arithmetic"], **{
        "train.steps_per_task": 6, "train.checkpoint_every": 3, "train.log_every": 5}))
    split = prepare_stream(load_stream("demo"), config.model_config_obj(), str(tmp_path),
                           progress=False).task("arithmetic").split("train")
    loop = {"run": config.to_dict(), "stage": stage_spec_dict(
        StageSpec(index=1, task="arithmetic", init_state_dir=None, stage_run_id=None, tracking_uri=None,
                  train_rows=split.rows))}
    reports: list[dict] = []
    ctx = LocalContext(split.path, on_report=reports.append, checkpoint_root=tmp_path / "ckpt")
    run_stage(loop, ctx)
    assert [r["step"] for r in reports] == [3, 5, 6, 6]
    assert "loss" not in reports[0] and "loss" in reports[1]
    assert (tmp_path / "ckpt" / "checkpoint-000003" / "trainer.pt").exists()


def test_the_run_seed_decides_which_rows_a_stage_sees(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from pipelines.train import LocalContext, _micro_batches, shuffle_seed

    rows = 40
    table = pa.table({name: [[i, i] for i in range(rows)] for name in ("input_ids", "attention_mask", "labels")})
    pq.write_table(table, tmp_path / "train.parquet")
    ctx = LocalContext(str(tmp_path / "train.parquet"))

    def order(seed: int) -> list[int]:
        return [int(i) for b in ctx.batches(8, seed) for i in b["input_ids"][:, 0]]

    assert sorted(order(1)) == list(range(rows))  # a permutation: every row once per pass
    assert order(1) == order(1) and order(1) != order(2)
    first_steps = [order(shuffle_seed(run_seed, stage=1, epoch=0))[:16] for run_seed in (0, 1)]
    assert first_steps[0] != first_steps[1]  # two seeds of a short stage train on different rows
    epochs = _micro_batches(lambda epoch: ctx.batches(8, shuffle_seed(0, 1, epoch)), 2 * rows // 8)
    seen = torch.cat([b["input_ids"][:, 0] for b in epochs]).tolist()
    assert sorted(seen[:rows]) == sorted(seen[rows:]) and seen[:rows] != seen[rows:]  # each epoch reshuffled


def test_runs_on_the_same_shards_score_the_base_model_once(ray_local, tmp_path, monkeypatch):
    from pipelines.run import Evaluator

    shared = {"storage_path": str(tmp_path / "store"), "tasks": ["arithmetic"], "train.steps_per_task": 2}
    first = run_continual(parse_run_config(small_config(tmp_path / "a", **shared)))
    cached = list((tmp_path / "store" / "shards").rglob("base-scores/*.json"))
    assert len(cached) == 1

    real_score = Evaluator.score

    def trained_stages_only(self, state_dir):
        assert state_dir is not None, "the base model was scored again"
        return real_score(self, state_dir)

    monkeypatch.setattr(Evaluator, "score", trained_stages_only)
    second = run_continual(parse_run_config(small_config(tmp_path / "b", **shared, method={"name": "lora"})))
    assert second.matrix.get(0, "arithmetic") == first.matrix.get(0, "arithmetic")
    other_seed = parse_run_config(small_config(tmp_path / "c", **shared, seed=1))
    with pytest.raises(AssertionError, match="scored again"):  # the tiny model's weights depend on the seed
        run_continual(other_seed)
