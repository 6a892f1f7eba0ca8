"""What a user finds in MLflow after a tiny-model stream and a tiny comparison: the parent run's
whole story, the stage runs' identity, the datasets, the adapter as a registered model loaded back,
the comparison's umbrella run; and the spool's new events replayed once."""
from __future__ import annotations

import argparse
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus, Run

from pipelines.config import RunConfig, parse_run_config
from pipelines.run import RunResult, run_continual
from pipelines.tracking import PARENT_TAG, STAGE_TAG, Tracker, resolve_tracking_uri

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TASKS = ["jobs", "creatures"]
PROBE = "facts-probe"
IDENTITY = {"method": "secura", "strategy": "seq", "lr": "0.08", "seed": "0", "stream": "demo", "norm_mode": "mean"}


def read_table(client: MlflowClient, run_id: str, artifact_file: str):
    """A table as the UI reads it: listed in the run's ``mlflow.loggedArtifacts``, a pandas "split" JSON.

    (``MlflowClient.load_table`` searches runs through the process-global tracking URI.)
    """
    import pandas as pd

    listed = json.loads(client.get_run(run_id).data.tags["mlflow.loggedArtifacts"])
    assert {"path": artifact_file, "type": "table"} in listed
    return pd.read_json(client.download_artifacts(run_id, artifact_file), orient="split")


def tiny_run_config(output_dir: Path) -> dict:
    data = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    data.update(output_dir=str(output_dir), tasks=TASKS)
    data["train"].update(steps_per_task=2, log_every=1, checkpoint_every=0, batch_size=8)
    data["eval"].update(test_limit=8, probe_limit=8)
    data["scaling"]["backend"] = "local"
    return data


@dataclass
class Story:
    config: RunConfig
    result: RunResult
    uri: str
    client: MlflowClient
    parent: Run
    stages: list[Run]


@pytest.fixture(scope="module")
def story(ray_local, tmp_path_factory) -> Story:
    config = parse_run_config(tiny_run_config(tmp_path_factory.mktemp("story") / "run"))
    result = run_continual(config)
    uri = resolve_tracking_uri(None, config.output_dir)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent = client.get_run(result.parent_run_id)
    stages = client.search_runs([parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{result.parent_run_id}'",
                                order_by=[f"tags.`{STAGE_TAG}` ASC"])
    return Story(config, result, uri, client, parent, stages)


def test_the_parent_run_has_one_name_per_number_and_per_stage_series(story):
    result, client, parent = story.result, story.client, story.parent
    matrix, metrics, last = result.matrix, parent.data.metrics, len(TASKS)
    run_id = parent.info.run_id
    for name in [*TASKS, PROBE]:  # every task and probe, stage by stage from the base model on
        history = sorted(client.get_metric_history(run_id, f"score/{name}"), key=lambda m: m.step)
        assert [m.step for m in history] == [0, 1, 2], name
        assert [m.value for m in history] == pytest.approx([matrix[s, name] for s in range(last + 1)])
    for series, steps in (("acc", [1, 2]), ("bwt", [1, 2]), ("forgetting", [1, 2]), ("probe_retention", [0, 1, 2])):
        assert sorted(m.step for m in client.get_metric_history(run_id, series)) == steps, series
    assert metrics["acc"] == pytest.approx(result.summary["acc"])  # the latest point is the final value
    assert metrics["probe_retention"] == pytest.approx(result.summary["probe_retention"])
    # no second name for the same number: no final/*, base/*, eval/* copies, no per-probe copy of one probe's mean
    assert not [key for key in metrics if key.split("/")[0] in ("final", "base", "eval")], sorted(metrics)
    assert f"probe_retention/{PROBE}" not in metrics
    steps = story.config.train.steps_per_task
    loss = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
    assert loss == list(range(1, 2 * steps + 1)), "the stream's loss is one curve over the stream-wide step"
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "stage")) == [(1, 1), (steps + 1, 2)]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"accuracy_matrix.json", "accuracy_matrix.csv", "config", "plots"} <= artifacts
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "plots")} == {
        "plots/accuracy_matrix.png", "plots/retention_curve.png"}
    table = read_table(client, parent.info.run_id, "accuracy_matrix.json")
    assert list(table["stage"]) == ["base", f"1: {TASKS[0]}", f"2: {TASKS[1]}"]
    assert list(table[f"probe:{PROBE}"]) == pytest.approx([matrix[s, PROBE] for s in range(last + 1)])
    csv_path = client.download_artifacts(parent.info.run_id, "accuracy_matrix.csv")
    assert Path(csv_path).read_text() == matrix.to_csv()


def test_parent_and_stage_runs_carry_identity_and_provenance(story):
    parent, stages = story.parent, story.stages
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert IDENTITY.items() <= parent.data.tags.items()
    assert {k: v for k, v in IDENTITY.items() if k != "stream"}.items() <= parent.data.params.items()
    assert parent.data.tags["mlflow.source.git.commit"] == commit
    assert parent.data.tags["mlflow.source.name"] == "secura" and parent.data.tags["secura.version"]
    assert parent.info.run_name == "secura lr=0.08 seed=0"
    assert [s.info.run_name for s in stages] == [f"stage {i}: {task}" for i, task in enumerate(TASKS, 1)]
    for stage in stages:
        assert IDENTITY.items() <= stage.data.tags.items() and IDENTITY.items() <= stage.data.params.items()
        assert stage.data.tags["mlflow.source.git.commit"] == commit


def test_the_parent_runs_description_is_its_report(story):
    from pipelines.run_report import matrix_markdown

    result, parent = story.result, story.parent
    note = parent.data.tags["mlflow.note.content"]
    assert "**method** secura (strategy seq) · **lr** 0.08 · **seed** 0 · **stream** demo" in note
    assert matrix_markdown(result.matrix) in note
    assert f"| after | {' | '.join(TASKS)} | probe: {PROBE} |" in note
    assert f"| base | {result.matrix[0, TASKS[0]]:.3f} |" in note  # 3 decimals
    summary = result.summary
    assert ("| " + " | ".join(f"{summary[k]:.3f}" for k in ("acc", "bwt", "forgetting", "probe_retention"))
            + " |") in note
    verdict = note.split("**Verdict:** ")[1]
    assert verdict.startswith("learned ") and f"kept {summary['probe_retention']:.3f}" in verdict


def test_artifacts_stay_beside_the_store_under_each_run_and_no_default_experiment(story):
    client, parent = story.client, story.parent
    store = Path(story.config.output_dir).resolve()
    for run in (parent, *story.stages):
        assert run.info.artifact_uri.startswith((store / "mlartifacts").as_uri())
        assert run.info.run_id in run.info.artifact_uri
    assert [e.name for e in client.search_experiments()] == [story.config.experiment], "no empty Default"


def test_datasets_are_inputs_with_the_shard_digests(story):
    from pipelines.preprocess import Manifest

    parent, stages = story.parent, story.stages
    manifest = Manifest.load(str(Path(story.config.output_dir) / "shards" / "demo"))

    def inputs(run) -> dict[str, tuple[str, str]]:
        return {i.dataset.name: (i.dataset.digest, {t.key: t.value for t in i.tags}["mlflow.data.context"])
                for i in run.inputs.dataset_inputs}

    expected = {f"{task}/{split}": (manifest.task(task).split(split).shard_hash, split)
                for task in TASKS for split in ("train", "test")}
    expected[f"{PROBE}/test"] = (manifest.task(PROBE).split("test").shard_hash, "probe")
    assert inputs(parent) == expected
    for stage, task in zip(stages, TASKS):
        assert inputs(stage) == {k: v for k, v in expected.items() if k.startswith(f"{task}/")}
    dataset = next(i.dataset for i in parent.inputs.dataset_inputs if i.dataset.name == f"{TASKS[0]}/train")
    assert json.loads(dataset.source)["uri"] == manifest.task(TASKS[0]).split("train").path
    assert json.loads(dataset.profile)["rows"] == manifest.task(TASKS[0]).split("train").rows


def test_register_then_load_gives_the_adapter_the_run_evaluated(story):
    from safetensors.torch import load_file

    from pipelines.cli import main
    from pipelines.models import load_model
    from pipelines.registry import load_registered
    from pipelines.train import ADAPTER_FILE
    from secura.methods import build_method

    config, client, parent = story.config, story.client, story.parent
    out = config.output_dir
    assert main(["register", parent.info.run_id, "tiny-adapter", "--output-dir", out]) == 0
    assert main(["register", parent.info.run_id, "tiny-adapter", "--output-dir", out]) == 0
    assert sorted(int(v.version) for v in client.search_model_versions("name = 'tiny-adapter'")) == [1, 2]
    assert client.get_model_version("tiny-adapter", "1").tags["method"] == "secura"
    assert main(["register", story.stages[0].info.run_id, "stage", "--output-dir", out]) == 2, "a stage has no model"

    model = load_registered("models:/tiny-adapter/1", tracking_uri=story.uri)
    method = build_method(config.method_config_obj())
    evaluated = method.wrap(load_model(config.model_config_obj(), seed=config.seed))
    untrained = method.wrap(load_model(config.model_config_obj(), seed=config.seed)).eval()
    method.load_adapter_state(evaluated, load_file(str(Path(out) / "stages" / f"02-{TASKS[1]}" / ADAPTER_FILE)))
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert torch.equal(logits, evaluated.eval()(input_ids=ids).logits)
        assert not torch.allclose(logits, untrained(input_ids=ids).logits), "the trained state was loaded"


def compare_spec(tmp_path: Path) -> dict:
    return {
        "name": "tiny",
        "base": str(CONFIGS / "demo.yaml"),
        "overrides": {"scaling.backend": "local", "tasks": ["jobs"], "train.steps_per_task": 2,
                      "train.checkpoint_every": 0, "train.log_every": 1, "eval.test_limit": 8, "eval.probe_limit": 8},
        "methods": [
            {"label": "secura", "method": {"name": "secura", "target_modules": ["q_proj", "v_proj"],
                                           "adapter": {"k": 16, "r": 8}}, "lrs": [0.02]},
            {"label": "lora", "method": {"name": "lora", "target_modules": ["q_proj", "v_proj"]}, "lrs": [0.003]},
        ],
        "seeds": [0],
        "output_dir": str(tmp_path / "cmp"),
    }


def test_a_comparison_is_one_umbrella_run_holding_its_runs(ray_local, tmp_path, monkeypatch):
    import pipelines.run
    from pipelines.compare import UMBRELLA, compare_command

    spec = tmp_path / "cmp.yaml"
    spec.write_text(yaml.safe_dump(compare_spec(tmp_path)))
    args = argparse.Namespace(config=str(spec), resume=False, only=[], output_dir=None, parallel=1, gpu=False)
    assert compare_command(args) == 0
    out = tmp_path / "cmp"
    client = MlflowClient(tracking_uri=resolve_tracking_uri(None, out))
    experiment = client.get_experiment_by_name("secura-cl-demo").experiment_id
    (umbrella,) = client.search_runs([experiment], "tags.`secura.kind` = 'compare'")
    assert umbrella.info.run_id == json.loads((out / UMBRELLA).read_text())["run_id"]
    children = client.search_runs([experiment], f"tags.`{PARENT_TAG}` = '{umbrella.info.run_id}'")
    assert sorted(r.data.tags["secura.compare.label"] for r in children) == ["lora", "secura"]
    assert {a.path for a in client.list_artifacts(umbrella.info.run_id)} >= {
        "results.json", "results.csv", "runs.csv", "summary.md", "frontier.png", "frontier-forgetting.png", "goals.json", "plots"}
    table = read_table(client, umbrella.info.run_id, "results.json")
    assert sorted(table["method"]) == ["lora", "secura"]
    assert umbrella.data.tags["goal.1"].startswith("cannot tell: ") and umbrella.data.metrics["runs_finished"] == 2
    note = umbrella.data.tags["mlflow.note.content"]  # the runs side by side, on the page a user opens first
    assert "| run | status | new-task acc | ACC | BWT | forgetting | probe retention |" in note
    for child in children:
        assert f"| {child.info.run_name} | finished |" in note
        assert f"{child.data.metrics['acc']:.3f}" in note
    assert "**CANNOT TELL**" in note
    assert client.get_experiment(experiment).tags["mlflow.note.content"] == note
    assert sorted(r.info.run_name for r in children) == ["lora lr=0.003 seed=0", "secura lr=0.02 seed=0"]

    for child in children:
        stage_runs = client.search_runs([experiment], f"tags.`{PARENT_TAG}` = '{child.info.run_id}'")
        is_secura = child.data.tags["method"] == "secura"
        assert stage_runs and ("norm_mode" in child.data.tags) == is_secura
        if not is_secura:
            assert not [key for run in stage_runs for key in run.data.metrics if key.startswith("magnorm/")]

    monkeypatch.setattr(pipelines.run, "run_continual", lambda *a, **k: pytest.fail("a finished run was rerun"))
    with pytest.raises(ValueError, match="--resume"):
        compare_command(args)
    args.resume = True
    assert compare_command(args) == 0
    umbrellas = client.search_runs([experiment], "tags.`secura.kind` = 'compare'")
    assert [r.info.run_id for r in umbrellas] == [umbrella.info.run_id], "--resume re-attaches to the umbrella"
    assert umbrellas[0].info.status == "FINISHED"


# --- the spool's new events ------------------------------------------------------------------


def test_tables_inputs_and_models_are_replayed_once(tmp_path):
    """A replay whose state was lost (a killed drainer) logs nothing twice; a table logged again is replaced."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from pipelines.spool import STATE, Drainer

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"w")
    dataset = MetaDataset(resolve_dataset_source("s3://bucket/shard"), name="task/train", digest="abc123")
    with Tracker(None, tmp_path) as tracker:
        run_id = tracker.start_parent("replay", "replay-run")
        tracker.log_table({"a": [1.0, 2.0]}, "t.json", parent=True)
        tracker.log_input(dataset, "train", parent=True)
        tracker.log_model(tmp_path / "model", "adapter", "custom", {"base": "tiny"}, params={"k": 1}, parent=True)
        tracker.flush()
        state = json.loads((tracker.folder / STATE).read_text())
        (tracker.folder / STATE).write_text(json.dumps({"runs": state["runs"]}))
        Drainer(tracker.folder, tracker.tracking_uri).drain()
        tracker.log_table({"a": [3.0]}, "t.json", parent=True)
    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    run = client.get_run(run_id)
    assert list(read_table(client, run_id, "t.json")["a"]) == [3.0]
    assert json.loads(run.data.tags["mlflow.loggedArtifacts"]) == [{"path": "t.json", "type": "table"}]
    assert [(i.dataset.name, i.dataset.digest) for i in run.inputs.dataset_inputs] == [("task/train", "abc123")]
    (model,) = client.search_logged_models([run.info.experiment_id])
    assert model.status == LoggedModelStatus.READY and model.params == {"k": "1"}
    assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]
    files = {f.path for f in client.list_logged_model_artifacts(model.model_id)}
    assert files == {"MLmodel", "weights.bin"}


def test_the_parent_params_name_the_stream_and_keep_its_source():
    from pipelines.run_report import parent_params
    from pipelines.streams import load_stream

    config = parse_run_config(tiny_run_config(Path("/tmp/unused")) | {"stream": str(CONFIGS / "streams" / "x.yaml")})
    params = parent_params(config, load_stream("demo"))
    assert params["stream"] == "demo" and params["stream_source"] == str(CONFIGS / "streams" / "x.yaml")


def test_the_base_models_generative_scores_are_logged_beside_its_score():
    from pipelines.metrics import AccuracyMatrix
    from pipelines.run_report import log_base_scores

    logged = {}

    class Recorder:
        def log_metrics(self, metrics, step, parent=False):
            assert step == 0 and parent
            logged.update(metrics)

    matrix = AccuracyMatrix(["t"], ["p"])
    scores = {"t": {"score": 0.5, "accuracy": 0.5}, "p": {"score": 0.7, "accuracy": 0.7, "generative_accuracy": 0.4}}
    for name, values in scores.items():
        matrix.record(0, name, values["score"])
    log_base_scores(Recorder(), scores, matrix)
    assert logged["score/t"] == 0.5 and logged["score/p"] == 0.7 and logged["score/p/generative_accuracy"] == 0.4
    assert "score/t/accuracy" not in logged and "score/p/score" not in logged