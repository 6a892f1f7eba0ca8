"""The run config: one YAML names the model, the stream, the method, training,
evaluation, scaling and tracking. Validated up front so a typo fails in
seconds with the file and field named, not an hour into a cluster run."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipelines.files import read_yaml
from pipelines.models import ModelConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TrainConfig(_Strict):
    """One stage = one task; these settings apply to every stage."""

    steps_per_task: int | None = Field(60, ge=1, description="optimiser steps per task (wins over epochs)")
    epochs_per_task: float | None = Field(None, gt=0, description="passes over the task's train shard")
    batch_size: int = Field(8, ge=1, description="per-worker micro-batch size")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimiser step")
    lr: float = Field(1e-2, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="compute precision of training and evaluation: bf16 autocast (weights, optimiser "
        "state, SECURA's core and merges stay fp32); auto: bf16 on a GPU with bf16 and on a CPU with native bf16 "
        "(AVX512-BF16 or AMX), fp32 elsewhere; what it resolved to is logged as train.precision_resolved")
    length_groups: int = Field(50, ge=1, description="rows of similar length share a micro-batch: each run of "
                               "this many batches' worth of shuffled rows is sorted by length before it is cut "
                               "into batches (less padding); every pass still visits every row once; 1: off")
    log_every: int = Field(10, ge=1, description="steps between loss/throughput reports")
    checkpoint_every: int = Field(0, ge=0, description="steps between mid-stage checkpoints (0: stage end only)")
    analysis_every: int = Field(0, ge=0, description="steps between adapter gradient-norm logs (0: off)")
    gradient_checkpointing: bool = False
    compile: bool = Field(False, description="torch.compile each decoder layer (where the backend supports it)")
    validation_every: int = Field(0, ge=0, description="steps between scores on the task's validation split "
                                  "(carved from train by the stream's validation_rows); the stage ends with "
                                  "its best-scoring state. 0: off")
    early_stopping_patience: int | None = Field(None, ge=1, description="end a stage after this many validation "
                                                "scores without improvement (needs validation_every)")
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per worker (default: CPUs per worker)")


class EvalConfig(_Strict):
    """Evaluation after every stage on every task of the stream and on the probes."""

    batch_size: int = Field(16, ge=1)
    test_limit: int | None = Field(None, ge=1, description="items per task (a fixed seeded subset); None: all")
    probe_limit: int | None = Field(None, ge=1, description="items per probe; None: all")
    max_new_tokens: int = Field(32, ge=1, description="for generation tasks")
    generative: bool = Field(False, description="also answer every choice item by greedy generation and report "
                             "generative_accuracy (the answer names the gold option and no other) beside the "
                             "option log-likelihood score; the accuracy matrix holds the log-likelihood score")
    generative_max_new_tokens: int = Field(16, ge=1, description="tokens a generated answer may use")
    num_replicas: int = Field(0, ge=0, description="score on this many Ray Data actors (one model replica each, "
                              "a GPU each with scaling.use_gpu); 0: in the driver process")
    seed: int = 0


class ScalingConfig(_Strict):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1.0})
    parallel_strategy: Literal["ddp", "fsdp"] = "ddp"
    max_failures: int = Field(1, ge=0, description="worker failures a stage survives (resumes from its checkpoint)")
    peak_tflops_per_worker: float | None = Field(
        None, gt=0, description="the device's peak dense TFLOP/s in the training precision (e.g. 989 for an "
        "H100 in bf16); when set, each stage logs MFU next to tokens/s")
    backend: Literal["ray_train", "local"] = Field(
        "ray_train", description="ray_train: a TorchTrainer per stage; local: the same loop in this process "
        "(small models in sweeps and tests, where a trainer's start-up would dominate)")


class RunConfig(_Strict):
    name: str = Field("run", description="the config's name (tag secura.name); the MLflow parent run is named "
                      "<method> lr=<lr> seed=<seed>")
    model: dict[str, Any] = Field(default_factory=dict, description="see pipelines.models.ModelConfig")
    stream: str | dict[str, Any] = Field("demo", description="a built-in stream name, a stream YAML path, or inline")
    method: dict[str, Any] = Field(default_factory=lambda: {"name": "secura"}, description="see secura.methods.MethodConfig")
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    seed: int = 0
    output_dir: str = Field("runs/default", description="local (or shared-filesystem) folder: journal, stage "
                            "adapters, plots, the default MLflow store")
    storage_path: str | None = Field(None, description="shards and Ray Train checkpoints: a local path or an "
                                     "s3:// / gs:// URI shared by all nodes (default: output_dir)")
    tracking_uri: str | None = None
    experiment: str = "secura-cl"
    tasks: list[str] | None = Field(None, description="train only these tasks of the stream, in this order")
    prompt_format: Literal["auto", "chat", "raw"] | None = Field(
        None, description="how every task's prompts are rendered: chat (the tokenizer's chat template, what an "
        "instruct model expects), raw (the task's template text), auto (chat when the tokenizer has a template); "
        "None: each task's own setting (default auto)")
    validation_rows: int | float | None = Field(
        None, gt=0, description="carve this many (or this fraction of) rows out of every task's train split as "
        "its validation split (train.validation_every selects and stops on it); None: each task's own setting")

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: dict[str, Any]) -> dict[str, Any]:
        ModelConfig.from_dict(value)
        return value

    @field_validator("method")
    @classmethod
    def _check_method(cls, value: dict[str, Any]) -> dict[str, Any]:
        from pipelines.corda import parse_corda
        from secura.methods import MethodConfig

        MethodConfig.from_dict(value)
        parse_corda(value)
        return value

    def model_config_obj(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model)

    def method_config_obj(self):
        from secura.methods import MethodConfig

        return MethodConfig.from_dict(self.method)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def load_stream(self, base_dir: str | Path | None = None):
        """The run's stream with the run-level prompt and validation options applied to its tasks."""
        from pipelines.streams import load_stream, with_options

        return with_options(load_stream(self.stream, base_dir=base_dir), prompt_format=self.prompt_format,
                            validation_rows=self.validation_rows)


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {dotted}: {key} is not a section")
    node[keys[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` overrides, values parsed as YAML (so numbers and lists work)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        _set_path(data, key.strip(), yaml.safe_load(raw))
    return data


def _format_error(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        message = e["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {where}: {message}")
    return "\n".join(lines)


def parse_run_config(data: dict[str, Any], source: str = "<run config>") -> RunConfig:
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ValueError(_format_error(source, err)) from None


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    data = apply_overrides(read_yaml(path, "run config", mapping=True), overrides or [])
    return parse_run_config(data, str(path))


def read_base_run(base: str | dict[str, Any], base_dir: Path) -> tuple[dict[str, Any], Path]:
    """A sweep's or comparison's ``base:``: an inline run config or a run YAML relative to ``base_dir``.

    Returns a copy the caller may override, and the folder its relative paths are read from.
    """
    if isinstance(base, dict):
        return copy.deepcopy(base), base_dir.resolve()
    path = (base_dir / base).expanduser().resolve()
    return read_yaml(path, "base: run config", mapping=True), path.parent


def dump_run_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
