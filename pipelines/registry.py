"""A run's final adapter as an MLflow model, the Model Registry, and loading a registered adapter back.

Every finished run logs its final adapter on its parent run as the MLflow model ``adapter`` (the run's
Models tab), in this layout::

    MLmodel              flavour ``secura``: the base model (pipelines.models.ModelConfig), the seed
                         that builds a tiny base, the method config, the files below
    adapter.safetensors  the trained state, as the run's last stage saved it
    run.yaml             the full run config, to rebuild or continue the run

``secura register RUN_ID NAME`` puts it in the Model Registry as a new version of ``NAME``; then one
call gives the base model with the adapter, ready to evaluate or generate::

    from pipelines.registry import load_registered
    model = load_registered("models:/NAME/1", tracking_uri="sqlite:////abs/runs/demo/mlflow.db")

(the tokenizer: ``pipelines.models.load_tokenizer`` of the same base model).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from pipelines.config import RunConfig, dump_run_config
from pipelines.files import write_text_atomic

FLAVOR = "secura"
MODEL_NAME = "adapter"  # the logged model's name on a run
CONFIG_FILE = "run.yaml"
IDENTITY_TAGS = ("method", "strategy", "lr", "seed", "stream", "norm_mode")


def write_model_folder(config: RunConfig, state_dir: Path, folder: Path) -> dict[str, Any]:
    """The model's files in ``folder``; returns its flavour's configuration (the MLmodel's ``secura`` entry)."""
    import secura
    from pipelines.train import ADAPTER_FILE

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(state_dir / ADAPTER_FILE, folder / ADAPTER_FILE)
    write_text_atomic(folder / CONFIG_FILE, dump_run_config(config))
    return {"secura_version": secura.__version__, "base_model": config.model_config_obj().to_dict(),
            "seed": config.seed, "method": config.method_config_obj().to_dict(), "adapter": ADAPTER_FILE,
            "config": CONFIG_FILE}


def load_model_folder(path: str | Path) -> nn.Module:
    """The base model wrapped by the method, with the adapter's state loaded, in eval mode (on the CPU)."""
    from mlflow.models import Model
    from safetensors.torch import load_file

    from pipelines.models import ModelConfig, load_model
    from secura.methods import MethodConfig, build_method

    path = Path(path)
    flavors = Model.load(str(path / "MLmodel")).flavors
    if FLAVOR not in flavors:
        raise ValueError(f"{path / 'MLmodel'}: not a secura adapter (flavours: {sorted(flavors)}, no {FLAVOR!r})")
    conf = flavors[FLAVOR]
    method = build_method(MethodConfig.from_dict(conf["method"]))
    model = method.wrap(load_model(ModelConfig.from_dict(conf["base_model"]), seed=int(conf["seed"])))
    method.load_adapter_state(model, load_file(str(path / conf["adapter"])))
    return model.eval()


def load_registered(model_uri: str, *, tracking_uri: str | None = None) -> nn.Module:
    """The adapter of a registered version (``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``) on its base model.

    ``tracking_uri`` is the store that holds the registry (default: ``MLFLOW_TRACKING_URI``).
    """
    import mlflow.artifacts
    from mlflow import MlflowClient
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name, version = get_model_name_and_version(client, model_uri)
    location = client.get_model_version_download_uri(name, version)
    return load_model_folder(mlflow.artifacts.download_artifacts(artifact_uri=location, tracking_uri=tracking_uri))


def register(run_id: str, name: str, tracking_uri: str):
    """A new version of registered model ``name`` (created if new) from the run's logged adapter."""
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ValueError(f"no run {run_id} in {tracking_uri}") from None
    found = client.search_logged_models([run.info.experiment_id],
                                        filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'")
    ready = [m for m in found if m.status == LoggedModelStatus.READY]
    if not ready:
        raise ValueError(f"run {run_id} has no logged {MODEL_NAME!r} model: the run has not finished, it is a stage "
                         f"run (register its parent), or its events are still spooled (secura sync OUTPUT_DIR)")
    model = max(ready, key=lambda m: m.creation_timestamp)
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    tags = {key: run.data.tags[key] for key in IDENTITY_TAGS if key in run.data.tags}
    return client.create_model_version(name, source=model.artifact_location, run_id=run_id, tags=tags,
                                       model_id=model.model_id)


def register_command(args: argparse.Namespace) -> int:
    """``secura register RUN_ID NAME [--output-dir DIR | --tracking-uri URI]``."""
    from pipelines.tracking import check_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri, args.output_dir or ".")
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise FileNotFoundError(f"no MLflow store at {uri}: pass the run's --output-dir or --tracking-uri")
    check_reachable(uri)
    version = register(args.run_id, args.name, uri)
    model_uri = f"models:/{version.name}/{version.version}"
    print(f"registered {model_uri} from run {args.run_id}\n"
          f"load it with: pipelines.registry.load_registered({model_uri!r}, tracking_uri={uri!r})")
    return 0
