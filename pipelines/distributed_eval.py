"""Per-stage evaluation as Ray Data batch inference: one model replica per actor (GPU).

The single-process `pipelines.evaluate.evaluate_tasks` scores every task on one
device; on a cluster the eval sets of a long stream (every task and probe after
every stage) dominate a stage's wall time. Here the choice-task rows of all
tasks go into one Ray Dataset, ``map_batches`` with a callable class keeps
``num_replicas`` actors each holding one model, and every actor scores with
`pipelines.evaluate.score_choices` — the same scorer (one prompt forward per
item), so predictions (and hence metrics, via `pipelines.evaluate.task_metrics`)
match the plain path.

Right padding and explicit positions keep each option's score that of an
unbatched forward (see `pipelines.evaluate`), so regrouping rows into other
batches changes no answer beyond float rounding of near-ties.

Greedy generation (generation tasks, and choice tasks when ``generative``)
falls back to the single-process path in the driver (`generate_answers` on a
model from the same loader, on the driver's GPU if it has one, else its CPU).
Moving it onto the actors would also ship the tokenizer to every actor for
padding and decoding; left for later.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.evaluate import (
    CHOICE_TASKS,
    GENERATION,
    Row,
    generate_answers,
    generative_accuracy,
    score_choices,
    task_metrics,
)

ModelLoader = Callable[[], nn.Module]


class _ChoiceScorer:
    """A Ray Data actor: loads one model replica once, then scores batches of (task, row) items."""

    def __init__(self, model_loader: ModelLoader, use_gpu: bool, batch_size: int, max_length: int | None,
                 precision: str = "fp32") -> None:
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model = model_loader().to(self.device).eval()
        self.batch_size = batch_size
        self.max_length = max_length
        self.precision = precision  # resolved on the actor's own device

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [{"prompt_ids": p, "choice_ids": c} for p, c in zip(batch["prompt_ids"], batch["choice_ids"])]
        predictions = score_choices(
            self.model, rows, batch_size=self.batch_size, device=self.device, max_length=self.max_length,
            precision=self.precision,
        )
        return {"task": batch["task"], "row": batch["row"], "prediction": np.asarray(predictions, dtype=np.int64)}


def _choice_items(eval_sets: Mapping[str, tuple[str, Sequence[Row]]]) -> list[dict[str, Any]]:
    """One item per choice-task row, longest packed sequence (prompt + option inputs) first,
    so the actors' batches carry little padding."""
    items = [
        {
            "task": name,
            "row": index,
            "prompt_ids": np.asarray(row["prompt_ids"], dtype=np.int64).tolist(),
            "choice_ids": [np.asarray(c, dtype=np.int64).tolist() for c in row["choice_ids"]],
        }
        for name, (task_type, rows) in eval_sets.items()
        if task_type != GENERATION
        for index, row in enumerate(rows)
    ]
    return sorted(items, key=lambda it: -(len(it["prompt_ids"]) + sum(len(c) - 1 for c in it["choice_ids"])))


def _score_with_ray(
    items: list[dict[str, Any]], model_loader: ModelLoader, *, num_replicas: int, use_gpu: bool, batch_size: int,
    max_length: int | None, cpus_per_replica: float, precision: str = "fp32",
) -> dict[tuple[str, int], int]:
    import ray.data

    scored = ray.data.from_items(items).map_batches(
        _ChoiceScorer,
        fn_constructor_args=(model_loader, use_gpu, batch_size, max_length, precision),
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=num_replicas,
        num_gpus=1 if use_gpu else 0,
        num_cpus=cpus_per_replica,
    )
    return {(str(r["task"]), int(r["row"])): int(r["prediction"]) for r in scored.take_all()}


def evaluate_tasks_distributed(
    model_loader: ModelLoader,
    eval_sets: Mapping[str, tuple[str, Sequence[Row]]],
    *,
    num_replicas: int,
    use_gpu: bool,
    batch_size: int = 16,
    max_length: int | None = None,
    cpus_per_replica: float = 1.0,
    tokenizer: Any = None,
    max_new_tokens: int = 32,
    headlines: Mapping[str, str] | None = None,
    generative: bool = False,
    generative_max_new_tokens: int = 16,
    precision: str = "fp32",
) -> dict[str, dict[str, float]]:
    """``{name: task_metrics(...)}`` like `evaluate_tasks`, with choice tasks scored on Ray Data actors.

    ``model_loader`` is a picklable zero-argument callable returning the model to
    score (base + the stage's adapter); it runs once in each of the
    ``num_replicas`` actors (one GPU each when ``use_gpu``). Greedy generation
    (generation tasks; choice tasks' ``generative_accuracy`` when ``generative``,
    as in `evaluate_tasks`) runs in this process and needs ``tokenizer``.
    """
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    items = _choice_items(eval_sets)
    predicted = (
        _score_with_ray(items, model_loader, num_replicas=num_replicas, use_gpu=use_gpu, batch_size=batch_size,
                        max_length=max_length, cpus_per_replica=cpus_per_replica, precision=precision)
        if items else {}
    )
    limits = {name: max_new_tokens if task_type == GENERATION else generative_max_new_tokens
              for name, (task_type, _) in eval_sets.items() if task_type == GENERATION or generative}
    generated = _generate_locally(model_loader, eval_sets, limits, tokenizer=tokenizer, use_gpu=use_gpu,
                                  batch_size=batch_size, max_length=max_length)
    results: dict[str, dict[str, float]] = {}
    for name, (task_type, rows) in eval_sets.items():
        predictions = generated[name] if task_type == GENERATION else [predicted[(name, i)] for i in range(len(rows))]
        results[name] = task_metrics(task_type, rows, predictions, headline=(headlines or {}).get(name))
        if task_type in CHOICE_TASKS and name in generated:
            results[name]["generative_accuracy"] = generative_accuracy(rows, generated[name])
    return results


def _generate_locally(
    model_loader: ModelLoader, eval_sets: Mapping[str, tuple[str, Sequence[Row]]], limits: Mapping[str, int], *,
    tokenizer: Any, use_gpu: bool, batch_size: int, max_length: int | None,
) -> dict[str, list[str]]:
    """Greedy answers for the tasks in ``limits`` (name: max_new_tokens), single-process (the documented fallback)."""
    if not limits:
        return {}
    if tokenizer is None:
        raise ValueError(f"greedy generation for task(s) {sorted(limits)} needs a tokenizer")
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")  # the driver may have no GPU
    model = model_loader().to(device).eval()
    return {
        name: generate_answers(model, tokenizer, eval_sets[name][1], max_new_tokens=limit,
                               batch_size=batch_size, device=device, max_length=max_length)
        for name, limit in limits.items()
    }


class StageModelLoader:
    """A picklable loader for one stage: the run's base model with the stage's saved adapter.

    What `pipelines.run.Evaluator.score` builds in the driver, rebuilt in each
    actor. The adapter tensors are read here, in the driver, and travel with
    the loader (megabytes even at 8B), so actors on other nodes need no shared
    file system; the base model comes from the run's model config.
    """

    def __init__(self, run_config: dict[str, Any], state_dir: str | Path | None) -> None:
        from safetensors.torch import load_file

        from pipelines.train import ADAPTER_FILE

        self.run_config = run_config
        self.adapter = load_file(str(Path(state_dir) / ADAPTER_FILE)) if state_dir is not None else None

    def __call__(self) -> nn.Module:
        from pipelines.config import parse_run_config
        from pipelines.models import load_model
        from secura.methods import build_method

        config = parse_run_config(self.run_config)
        model = load_model(config.model_config_obj(), seed=config.seed)
        if self.adapter is None:
            return model
        method = build_method(config.method_config_obj())
        model = method.wrap(model)
        method.load_adapter_state(model, self.adapter)
        return model
