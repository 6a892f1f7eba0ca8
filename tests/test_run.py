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


def _demo_tasks() -> list[str]:
    from pipelines.streams import load_stream

    return [task.name for task in load_stream("demo").tasks]


FIRST, SECOND, THIRD = _demo_tasks()[:3]


def small_config(tmp_path: Path, **overrides) -> dict:
    data = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    data.update(output_dir=str(tmp_path / "run"), tasks=[FIRST, SECOND])
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
    assert sorted(p.name for p in (out / "stages").iterdir()) == [f"01-{FIRST}", f"02-{SECOND}"]
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir()), \
        "a finished run keeps its stage states, not its resume checkpoints"
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
        assert {f"eval/{FIRST}", f"eval/{SECOND}", "drift/rel_spectral_mean"} <= set(stage.data.metrics)
        assert "acc" not in stage.data.metrics, "the stream's series live on the parent only"
        assert {"method", "lr", "seed", "task"} <= set(stage.data.params)
        artifacts = {a.path for a in client.list_artifacts(stage.info.run_id)}
        assert {"adapter", "plots", "accuracy_matrix.csv"} <= artifacts
    assert parent[0].data.metrics["acc"] == pytest.approx(result.summary["acc"])
    assert parent[0].data.params["method.name"] == "secura"


def test_the_secura_stage_state_reproduces_its_scores(local_run):
    """The stage checkpoint holds adapter state only and reproduces the evaluation."""
    from pipelines.run import Evaluator, load_eval_sets
    from pipelines.preprocess import Manifest
    from pipelines.streams import load_stream

    config, result = local_run
    out = Path(config.output_dir)
    assert not any("embed" in k or "base_layer" in k for k in _keys(out / "stages" / f"02-{SECOND}"))
    manifest = Manifest.load(str(out / "shards" / "demo"))
    sets = load_eval_sets(config, load_stream(config.stream), manifest)
    scores = Evaluator(config, sets).score(out / "stages" / f"02-{SECOND}")
    assert {k: v["score"] for k, v in scores.items()} == {
        k: result.matrix[2, k] for k in scores
    }


def _keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "adapter.safetensors"), "pt") as f:
        return list(f.keys())


def test_resume_continues_at_the_first_unfinished_stage_without_new_mlflow_runs(ray_local, tmp_path, monkeypatch):
    import pipelines.train as train_module
    from pipelines.run import StreamTraining

    config = parse_run_config(small_config(tmp_path, tasks=[FIRST, THIRD]))
    real_wait, real_stage = StreamTraining.wait_for, train_module.run_stage
    trained: list[str] = []

    def crash_on_second(self, stage):
        if stage.index == 2:
            raise KeyboardInterrupt("driver killed")
        return real_wait(self, stage)

    def counting(run, stage, *args, **kwargs):
        trained.append(stage.task)
        return real_stage(run, stage, *args, **kwargs)

    monkeypatch.setattr(train_module, "run_stage", counting)
    monkeypatch.setattr(StreamTraining, "wait_for", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_continual(config)
    with pytest.raises(ValueError, match="--resume"):
        run_continual(config)
    trained.clear()
    monkeypatch.setattr(StreamTraining, "wait_for", real_wait)
    result = run_continual(config, resume=True)
    assert trained == [THIRD], "the finished stage is not trained again"
    mlflow.set_tracking_uri(f"sqlite:///{Path(config.output_dir).resolve()}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=[config.experiment], output_format="list")
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1
    assert len([r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]) == 2


def test_resume_refuses_a_changed_config_and_a_finished_run_is_followed_by_a_new_one(ray_local, tmp_path):
    config = parse_run_config(small_config(tmp_path, tasks=[FIRST]))
    first = run_continual(config)
    changed = parse_run_config(small_config(tmp_path, tasks=[FIRST], **{"train.lr": 0.5}))
    with pytest.raises(ValueError, match="config differs"):
        run_continual(changed, resume=True)
    second = run_continual(config)  # `make demo` twice: a new run in the same output dir
    assert second.parent_run_id != first.parent_run_id
    assert (Path(config.output_dir) / f"journal-{first.parent_run_id}.json").exists()


def test_nan_loss_stops_the_stage_with_a_clear_error(ray_local, tmp_path):
    config = parse_run_config(small_config(tmp_path, tasks=[FIRST], **{"train.lr": 1e30, "train.max_grad_norm": None}))
    with pytest.raises(NonFiniteLossError, match=f"stage 1 \\({FIRST}\\).*lower train.lr"):
        run_continual(config)


@pytest.mark.parametrize("method", [
    {"name": "lora"}, {"name": "dora"}, {"name": "er"}, {"name": "ewc"}, {"name": "ilora"}, {"name": "full"},
    {"name": "cur_lora", "adapter": {"k": 16}},
    {"name": "secura", "strategy": "er", "adapter": {"k": 16, "r": 8, "merge_strategy": "M1"}},
], ids=lambda m: "+".join(filter(None, [m["name"], m.get("strategy")])))
def test_baselines_run_in_the_same_harness(ray_local, tmp_path, method):
    config = parse_run_config(small_config(tmp_path, tasks=[SECOND], method=method))
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
        tmp_path, tasks=[FIRST],
        scaling={"backend": "ray_train", "num_workers": 2, "resources_per_worker": {"CPU": 0.5}},
    ))
    result = run_continual(config)
    stage = Path(config.output_dir) / "stages" / f"01-{FIRST}"
    assert {"adapter.safetensors", "strategy-rank0.pt", "strategy-rank1.pt"} <= {p.name for p in stage.iterdir()}
    assert not math.isnan(result.summary["acc"])


def _stream_loop(config, tmp_path: Path, tasks: list[str]) -> dict:
    from pipelines.preprocess import prepare_stream
    from pipelines.streams import load_stream
    from pipelines.train import StageSpec, stage_dicts

    manifest = prepare_stream(load_stream("demo"), config.model_config_obj(), str(tmp_path), progress=False)
    stages = [StageSpec(index=i, task=t, train_path=manifest.task(t).split("train").path,
                        train_rows=manifest.task(t).split("train").rows) for i, t in enumerate(tasks, 1)]
    return {"run": config.to_dict(), "stages": stage_dicts(stages), "checkpoint_root": str(tmp_path / "ckpt")}


def test_a_restarted_stage_resumes_from_its_mid_stage_checkpoint_to_the_same_adapter(ray_local, tmp_path):
    """What a worker restarted by FailureConfig (or a resumed driver) does: adapter, optimiser, strategy
    state, RNG and data position come from the newest checkpoint; the result equals an undisturbed run."""
    from safetensors.torch import load_file

    from pipelines.checkpoints import CheckpointStore
    from pipelines.train import ADAPTER_FILE, LocalContext, train_stream

    config = parse_run_config(small_config(tmp_path, tasks=[FIRST], method={"name": "er"},
                                           **{"train.steps_per_task": 6, "train.checkpoint_every": 2}))

    class WorkerKilled(Exception):
        pass

    def kill_after_step_4(metrics):
        if metrics.get("step") == 4 and "loss" in metrics:
            raise WorkerKilled

    killed = _stream_loop(config, tmp_path / "killed", [FIRST])
    with pytest.raises(WorkerKilled):
        list(train_stream(killed, LocalContext(on_report=kill_after_step_4)))
    store = CheckpointStore(killed["checkpoint_root"])
    assert [(r.stage, r.step, r.done) for r in store.list()][-1] == (1, 4, False)

    reports: list[dict] = []
    list(train_stream(killed, LocalContext(on_report=reports.append)))
    from pipelines.precision import resolve_precision

    assert reports[0] == {"event": "attempt", "stage": 1, "attempt": reports[0]["attempt"], "from_step": 4,
                          "precision": resolve_precision(config.train.precision, "cpu")}
    assert [r["step"] for r in reports if "loss" in r] == [6], "resumed after step 4, not at step 1"

    undisturbed = _stream_loop(config, tmp_path / "undisturbed", [FIRST])
    list(train_stream(undisturbed, LocalContext()))

    def final_adapter(loop):
        with __import__("tempfile").TemporaryDirectory() as folder:
            store = CheckpointStore(loop["checkpoint_root"])
            return load_file(str(store.download(store.final(1), Path(folder) / "s") / ADAPTER_FILE))

    resumed, reference = final_adapter(killed), final_adapter(undisturbed)
    assert resumed.keys() == reference.keys()
    assert all(torch_equal(resumed[k], reference[k]) for k in reference), "bit for bit on CPU"


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_an_incomplete_checkpoint_is_never_used(tmp_path):
    from pipelines.checkpoints import MARKER, CheckpointStore

    store = CheckpointStore(str(tmp_path / "store"))
    folder = tmp_path / "state"
    folder.mkdir()
    (folder / "adapter.safetensors").write_bytes(b"x" * 100)
    store.save(folder, 1, 2, False)
    store.save(folder, 1, 4, False)
    assert store.latest().step == 4
    (tmp_path / "store" / "stage-01-step-000004" / "adapter.safetensors").write_bytes(b"x" * 10)  # truncated
    assert store.latest().step == 2
    (tmp_path / "store" / "stage-01-step-000002" / MARKER).unlink()  # never registered
    assert store.latest() is None


def test_a_checkpoint_whose_content_differs_is_rejected_naming_the_file(tmp_path):
    """Same size, other bytes (a flipped bit, a tampered file): the marker's hashes catch it, the one before is used."""
    from pipelines.checkpoints import MARKER, CheckpointStore, CheckpointWarning

    store = CheckpointStore(str(tmp_path / "store"))
    folder = tmp_path / "state"
    folder.mkdir()
    (folder / "adapter.safetensors").write_bytes(bytes(range(256)) * 4)
    for step in (2, 4):
        store.save(folder, 1, step, False)
    store.save(folder, 1, 6, True)
    tampered = tmp_path / "store" / "stage-01-final" / "adapter.safetensors"
    data = bytearray(tampered.read_bytes())
    data[500:564] = bytes(b ^ 0xFF for b in data[500:564])
    tampered.write_bytes(bytes(data))
    assert [r.name for r in store.list()][-1] == "stage-01-final", "sizes alone cannot tell"
    with pytest.warns(CheckpointWarning, match=f"{tampered}: content differs.*stage 1 is trained again"):
        assert store.final(1) is None
    assert not (tampered.parent / MARKER).exists(), "unregistered, its files kept for inspection"
    assert store.latest() is None, "a final state prunes its stage's mid-stage checkpoints"

    store.save(folder, 2, 2, False)
    store.save(folder, 2, 4, False)
    (tmp_path / "store" / "stage-02-step-000004" / "adapter.safetensors").write_bytes(bytes(1024))
    with pytest.warns(CheckpointWarning, match="stage-02-step-000004/adapter.safetensors.*resuming from "
                                               "stage-02-step-000002"):
        assert store.latest().name == "stage-02-step-000002"


def test_checkpoints_do_not_wait_for_log_steps(ray_local, tmp_path):
    from pipelines.checkpoints import CheckpointStore
    from pipelines.train import LocalContext, train_stream

    config = parse_run_config(small_config(tmp_path, tasks=[FIRST], **{
        "train.steps_per_task": 6, "train.checkpoint_every": 3, "train.log_every": 5}))
    loop = _stream_loop(config, tmp_path, [FIRST])
    store = CheckpointStore(loop["checkpoint_root"])
    seen: list[tuple] = []
    reports: list[dict] = []

    def record(metrics):
        reports.append(metrics)
        seen.append(tuple((r.step, r.done) for r in store.list()))

    list(train_stream(loop, LocalContext(on_report=record)))
    steps = [r["step"] for r in reports if "loss" in r]
    assert steps == [5, 6]
    assert (3, False) in seen[1], "the step-3 checkpoint was written before the step-5 report"


def test_the_run_seed_decides_which_rows_a_stage_sees():
    import torch

    from pipelines.train import micro_batches, shuffle_seed

    rows = 40
    columns = {name: torch.arange(rows).repeat(2, 1).T.contiguous() for name in ("input_ids", "attention_mask", "labels")}

    def order(run_seed: int, count: int = rows // 8, start: int = 0) -> list[int]:
        batches = micro_batches(columns, 8, lambda e: shuffle_seed(run_seed, 1, e), torch.device("cpu"), count, start)
        return [int(i) for b in batches for i in b["input_ids"][:, 0]]

    assert sorted(order(1)) == list(range(rows))  # a permutation: every row once per pass
    assert order(1) == order(1) and order(1) != order(2)  # two seeds of a short stage train on different rows
    two_epochs = order(0, count=2 * rows // 8)
    assert sorted(two_epochs[:rows]) == sorted(two_epochs[rows:]) and two_epochs[:rows] != two_epochs[rows:]
    assert order(0, count=3, start=7) == two_epochs[7 * 8:10 * 8], "a resumed stage continues at its position"


def test_runs_on_the_same_shards_score_the_base_model_once(ray_local, tmp_path, monkeypatch):
    from pipelines.run import Evaluator

    shared = {"storage_path": str(tmp_path / "store"), "tasks": [FIRST], "train.steps_per_task": 2}
    first = run_continual(parse_run_config(small_config(tmp_path / "a", **shared)))
    cached = list((tmp_path / "store" / "shards").rglob("base-scores/*.json"))
    assert len(cached) == 1

    real_score = Evaluator.score

    def trained_stages_only(self, state_dir):
        assert state_dir is not None, "the base model was scored again"
        return real_score(self, state_dir)

    monkeypatch.setattr(Evaluator, "score", trained_stages_only)
    second = run_continual(parse_run_config(small_config(tmp_path / "b", **shared, method={"name": "lora"})))
    assert second.matrix.get(0, FIRST) == first.matrix.get(0, FIRST)
    other_seed = parse_run_config(small_config(tmp_path / "c", **shared, seed=1))
    with pytest.raises(AssertionError, match="scored again"):  # the tiny model's weights depend on the seed
        run_continual(other_seed)


def test_validation_keeps_the_best_state_and_stops_early(ray_local, tmp_path):
    """Selection and early stopping look at validation rows carved from train, never at the test split."""
    from pipelines.evaluate import evaluate_tasks
    from pipelines.models import load_model, load_tokenizer
    from pipelines.preprocess import prepare_stream, read_eval_rows
    from pipelines.run import stage_spec
    from pipelines.train import LocalContext, load_stage_state, stage_dicts, train_stream
    from secura.methods import build_method

    config = parse_run_config(small_config(
        tmp_path, tasks=[FIRST], method={"name": "lora"}, validation_rows=16,
        **{"train.steps_per_task": 40, "train.validation_every": 2, "train.early_stopping_patience": 2,
           "train.lr": 0.05, "train.checkpoint_every": 0}))
    manifest = prepare_stream(config.load_stream(), config.model_config_obj(), str(tmp_path), progress=False)
    stage = stage_spec(manifest.task(FIRST), 1)
    assert stage.validation_path is not None
    loop = {"run": config.to_dict(), "stages": stage_dicts([stage]), "checkpoint_root": str(tmp_path / "ckpt")}
    reports: list[dict] = []
    (final,) = list(train_stream(loop, LocalContext(on_report=reports.append)))
    scores = [r["val/score"] for r in reports if "val/score" in r]
    best = max(scores)
    assert len(scores) < 20, "stopped before the last step"
    assert scores[-2:] and all(s <= best for s in scores[-2:]) and scores.index(best) == len(scores) - 3

    from pipelines.checkpoints import CheckpointStore

    method = build_method(config.method_config_obj())
    model = method.wrap(load_model(config.model_config_obj(), seed=config.seed))
    folder = CheckpointStore(loop["checkpoint_root"]).download(final, tmp_path / "final")
    load_stage_state(folder, method, model, 0)
    rows = read_eval_rows(stage.validation_path)
    rescored = evaluate_tasks(model, load_tokenizer(config.model_config_obj()), {FIRST: (stage.task_type, rows)},
                              progress=False)[FIRST]["score"]
    assert rescored == best, "the stage ends with its best-validating state"
