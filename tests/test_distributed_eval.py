"""The Ray Data evaluation path gives the same metrics and predictions as `evaluate_tasks`."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from pipelines.distributed_eval import StageModelLoader, evaluate_tasks_distributed
from pipelines.evaluate import choice_loglikelihoods, evaluate_tasks, score_choices

pytestmark = pytest.mark.ray

RUN = {"model": {"source": "tiny", "tiny": {"hidden_size": 32, "intermediate_size": 64}},
       "method": {"name": "secura", "adapter": {"k": 8, "r": 4}}, "seed": 3}


def _rows(seed: int, count: int, n_choices: int) -> list[dict]:
    """Random token rows of varied lengths (so the sort-and-batch order differs between the two paths)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        prompt = [rng.randrange(3, 259) for _ in range(rng.randrange(2, 40))]
        choices = [[rng.randrange(3, 259) for _ in range(rng.randrange(1, 6))] for _ in range(n_choices)]
        rows.append({"prompt": "", "choices": [""] * n_choices, "answer": rng.randrange(n_choices) if n_choices else -1, "target": "",
                     "prompt_ids": prompt, "choice_ids": choices})
    return rows


def _stage_dir(folder: Path) -> Path:
    """A saved SECURA stage whose adapter changes the model (non-zero U after a merge, and a live B)."""
    from pipelines.config import parse_run_config
    from pipelines.models import load_model
    from pipelines.train import save_stage_state
    from secura.methods import build_method

    config = parse_run_config(RUN)
    method = build_method(config.method_config_obj())
    model = method.wrap(load_model(config.model_config_obj(), seed=config.seed))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "secura_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
        method.end_task(model)  # B → U
        for name, p in model.named_parameters():
            if "secura_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    save_stage_state(folder, method, model, rank=0, trainer_state=None)
    return folder


def test_ray_data_eval_equals_single_process(ray_local, tmp_path: Path, tiny_tokenizer) -> None:
    loader = StageModelLoader(RUN, _stage_dir(tmp_path))
    generation = [{**row, "target": "ab"} for row in _rows(2, 4, 0)]  # the driver-side fallback
    eval_sets = {
        "task-a": ("classification", _rows(0, 24, 2)),
        "task-b": ("multiple_choice", _rows(1, 16, 4)),
        "task-g": ("generation", generation),
    }
    model = loader()
    expected = evaluate_tasks(model, tiny_tokenizer, eval_sets, batch_size=8, progress=False, max_new_tokens=4,
                              generative=True, generative_max_new_tokens=3)
    got = evaluate_tasks_distributed(loader, eval_sets, num_replicas=2, use_gpu=False, batch_size=8,
                                     cpus_per_replica=0.5, tokenizer=tiny_tokenizer, max_new_tokens=4,
                                     generative=True, generative_max_new_tokens=3)
    assert got == expected
    assert set(got["task-a"]) == {"accuracy", "score", "generative_accuracy"}
    assert "generative_accuracy" not in got["task-g"]
    # Metrics could hide compensating flips: batching must not change any single prediction either.
    for name in ("task-a", "task-b"):
        rows = eval_sets[name][1]
        assert score_choices(model, rows, batch_size=8) == [score_choices(model, [r], batch_size=1)[0] for r in rows]
    # The adapter is really loaded: the base model alone scores differently.
    base, rows = StageModelLoader(RUN, None)(), eval_sets["task-a"][1]
    assert choice_loglikelihoods(base, rows) != choice_loglikelihoods(model, rows)
