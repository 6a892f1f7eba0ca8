"""Per-run diagnostics read back from MLflow: drift after the last stage, S-MagNorm over all windows."""
from __future__ import annotations

import json
import math

from mlflow.tracking import MlflowClient

from pipelines.diagnostics import DRIFT_KEYS, MAGNORM_KEYS, mean_diagnostics, run_diagnostics, stage_run_ids
from pipelines.tracking import PARENT_TAG, STAGE_TAG


def fake_run(client: MlflowClient, experiment: str, run_dir, drifts: list[float], s_windows: list[list[float]]):
    """A finished run's journal, its parent run and its nested stage runs with the metrics training logs."""
    parent = client.create_run(experiment).info.run_id
    stages = {"0": {"status": "done"}}
    for index, (drift, windows) in reversed(list(enumerate(zip(drifts, s_windows), start=1))):
        run_id = client.create_run(experiment, tags={PARENT_TAG: parent, STAGE_TAG: str(index)}).info.run_id
        client.log_metric(run_id, "drift/rel_spectral_mean", drift, step=index)
        for step, value in enumerate(windows):
            client.log_metric(run_id, "magnorm/s_mean", value, step=step)
        stages[str(index)] = {"status": "done", "run_id": f"{parent}/stage-{index}"}
    run_dir.mkdir(parents=True)
    (run_dir / "journal.json").write_text(json.dumps({"config_hash": "h", "parent_run_id": parent,
                                                      "stages": stages, "finished": True}))


def test_drift_is_the_last_stage_and_s_the_mean_of_every_window(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("diag", artifact_location=(tmp_path / "art").as_uri())
    fake_run(client, experiment, tmp_path / "seed0", [0.01, 0.03], [[1.0, 1.2], [1.4]])
    fake_run(client, experiment, tmp_path / "seed1", [0.02, 0.05], [[1.1], [1.3, 1.5]])
    assert len(stage_run_ids(client, tmp_path / "seed0")) == 2

    runs = [run_diagnostics(client, tmp_path / name) for name in ("seed0", "seed1", "never-ran")]
    assert runs[2] == {}
    d = mean_diagnostics(runs, (*DRIFT_KEYS, *MAGNORM_KEYS))
    assert math.isclose(d["drift/rel_spectral_mean"], (0.03 + 0.05) / 2)
    assert math.isclose(d["magnorm/s_mean"], ((1.0 + 1.2 + 1.4) / 3 + (1.1 + 1.3 + 1.5) / 3) / 2)
    assert math.isnan(d["magnorm/brake_rate"])  # never logged (a LoRA run): no number, not zero
