"""Evaluation after every stage: option log-likelihood scoring and greedy generation.

Rows are eval-shard rows (docs/architecture.md): ``prompt``, ``choices``,
``answer``, ``target``, ``prompt_ids``, ``choice_ids``. Token lists may arrive as
Python lists or numpy arrays (Parquet via pandas/Ray Data); both are accepted.

Choice tasks are scored without generation: the predicted option is the one
whose tokens have the highest summed log-likelihood after the prompt. Right
padding keeps every sequence's positions identical to an unbatched forward, so
batching never changes an answer.
"""
from __future__ import annotations

import inspect
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

CHOICE_TASKS = ("classification", "multiple_choice")
GENERATION = "generation"
GENERATION_METRICS = ("exact_match", "rougeL", "bleu")

Row = Mapping[str, Any]


def _ids(tokens: Any) -> list[int]:
    """A token sequence (list, tuple, numpy array) as a list of ints."""
    return np.asarray(tokens, dtype=np.int64).reshape(-1).tolist()


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under DistributedDataParallel (Ray Train's prepare_model), which cannot generate."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


def _max_length(model: nn.Module, max_length: int | None) -> int:
    if max_length is not None:
        return max_length
    length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if length is None:
        raise ValueError("max_length: the model config has no max_position_embeddings; pass max_length")
    return int(length)


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """eval() + inference_mode, restoring each submodule's own train/eval flag afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the causal LM can compute logits on chosen positions only (most HF models can)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


# --- choice tasks ---------------------------------------------------------------------


def _fit(prompt: list[int], choice: list[int], max_length: int) -> list[int]:
    """Drop prompt tokens from the left so that prompt + choice fits ``max_length``."""
    if not choice:
        raise ValueError("an empty choice has log-likelihood 0 and would always win")
    keep = max_length - len(choice)
    if keep < 1:
        raise ValueError(f"a choice of {len(choice)} tokens leaves no room for the prompt in max_length {max_length}")
    prompt = prompt[-keep:]
    if not prompt:
        raise ValueError("empty prompt_ids: the first choice token needs a context")
    return prompt


def _score_batch(
    model: nn.Module, pairs: list[tuple[list[int], list[int]]], device: torch.device, keep_logits: bool
) -> list[float]:
    """Summed log p(choice | prompt) for each (prompt, choice) pair, in one forward."""
    totals = [len(p) + len(c) for p, c in pairs]
    input_ids = torch.zeros((len(pairs), max(totals)), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, (prompt, choice) in enumerate(pairs):
        input_ids[i, : totals[i]] = torch.tensor(prompt + choice)
        attention_mask[i, : totals[i]] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    # Position t predicts token t+1: only positions first..last-1 are needed.
    first = min(len(p) for p, _ in pairs) - 1
    last = max(totals) - 1
    positions = torch.arange(first, last, device=device)
    kwargs = {"logits_to_keep": positions} if keep_logits else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits
    if not keep_logits:
        logits = logits[:, first:last]
    targets = input_ids[:, first + 1 : last + 1]
    token_lp = logits.float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    starts = torch.tensor([len(p) - 1 for p, _ in pairs], device=device).unsqueeze(1)
    ends = torch.tensor(totals, device=device).unsqueeze(1) - 1
    in_choice = (positions >= starts) & (positions < ends)
    return torch.where(in_choice, token_lp, torch.zeros_like(token_lp)).sum(-1).tolist()


def choice_loglikelihoods(
    model: nn.Module,
    rows: Sequence[Row],
    *,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    max_length: int | None = None,
) -> list[list[float]]:
    """Per row, the summed log-likelihood of each option's ``choice_ids`` after its ``prompt_ids``.

    (row, choice) pairs are sorted by length and batched (less padding); one
    forward per batch. ``max_length`` defaults to the model's
    ``max_position_embeddings``; longer prompts lose tokens on the left.
    """
    model = _unwrap(model)
    device = _device(model, device)
    limit = _max_length(model, max_length)
    pairs: list[tuple[int, list[int], list[int]]] = []
    for r, row in enumerate(rows):
        prompt, choices = _ids(row["prompt_ids"]), [_ids(c) for c in row["choice_ids"]]
        if not choices:
            raise ValueError(f"row {r} has no choice_ids: score_choices is for choice tasks")
        pairs.extend((r, _fit(prompt, choice, limit), choice) for choice in choices)
    order = sorted(range(len(pairs)), key=lambda k: len(pairs[k][1]) + len(pairs[k][2]))
    scores = [0.0] * len(pairs)
    keep_logits = _accepts_logits_to_keep(model)
    with _inference(model):
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            values = _score_batch(model, [pairs[k][1:] for k in batch], device, keep_logits)
            for k, value in zip(batch, values):
                scores[k] = value
    per_row: list[list[float]] = [[] for _ in rows]
    for (r, _, _), value in zip(pairs, scores):
        per_row[r].append(value)
    return per_row


def score_choices(
    model: nn.Module,
    rows: Sequence[Row],
    *,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    max_length: int | None = None,
) -> list[int]:
    """The predicted option per row: argmax of summed log-likelihood (first option wins ties)."""
    scores = choice_loglikelihoods(model, rows, batch_size=batch_size, device=device, max_length=max_length)
    return [int(np.argmax(row_scores)) for row_scores in scores]


# --- generation tasks -----------------------------------------------------------------


def generate_answers(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[Row],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    max_length: int | None = None,
) -> list[str]:
    """Greedy answers to each row's ``prompt_ids`` (left-padded batches), decoded and stripped.

    Prompts longer than ``max_length - max_new_tokens`` lose tokens on the left.
    """
    model = _unwrap(model)
    device = _device(model, device)
    keep = _max_length(model, max_length) - max_new_tokens
    if keep < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for the prompt")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str] = []
    with _inference(model):
        for start in range(0, len(rows), batch_size):
            prompts = [_ids(row["prompt_ids"])[-keep:] for row in rows[start : start + batch_size]]
            if not all(prompts):
                raise ValueError("empty prompt_ids: generation needs at least one prompt token")
            width = max(len(p) for p in prompts)
            input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for i, prompt in enumerate(prompts):
                input_ids[i, width - len(prompt) :] = torch.tensor(prompt)
                attention_mask[i, width - len(prompt) :] = 1
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            texts = tokenizer.batch_decode(output[:, width:].cpu(), skip_special_tokens=True)
            answers.extend(text.strip() for text in texts)
    return answers


# --- metrics ------------------------------------------------------------------------


def _normalise(text: str) -> str:
    return " ".join(str(text).casefold().split())


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """exact_match (case- and whitespace-insensitive), mean rougeL F1, corpus BLEU; all in [0, 1].

    BLEU is sacrebleu's corpus BLEU / 100 (4-gram, so answers under 4 words
    score 0: use it for translation-like targets, not one-word answers).
    """
    from rouge_score import rouge_scorer
    import sacrebleu

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    exact = [_normalise(p) == _normalise(r) for p, r in zip(predictions, references)]
    rouge = [scorer.score(str(r), str(p))["rougeL"].fmeasure for p, r in zip(predictions, references)]
    bleu = sacrebleu.corpus_bleu([str(p) for p in predictions], [[str(r) for r in references]]).score
    return {
        "exact_match": sum(exact) / len(exact),
        "rougeL": sum(rouge) / len(rouge),
        "bleu": min(bleu / 100.0, 1.0),
    }


def task_metrics(
    task_type: str, rows: Sequence[Row], predictions: Sequence[Any], *, headline: str | None = None
) -> dict[str, float]:
    """The task's metrics plus ``score``, its headline metric (what the accuracy matrix records).

    Choice tasks: ``accuracy`` (headline). Generation: ``exact_match``
    (default headline), ``rougeL``, ``bleu``; ``headline`` picks another.
    """
    if len(rows) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(rows)} rows")
    if not rows:
        raise ValueError("no rows to evaluate")
    if task_type in CHOICE_TASKS:
        if headline not in (None, "accuracy"):
            raise ValueError(f"headline {headline!r}: choice tasks report only 'accuracy'")
        accuracy = sum(int(p) == int(row["answer"]) for p, row in zip(predictions, rows)) / len(rows)
        return {"accuracy": accuracy, "score": accuracy}
    if task_type == GENERATION:
        headline = headline or "exact_match"
        if headline not in GENERATION_METRICS:
            raise ValueError(f"headline {headline!r} is not one of {GENERATION_METRICS}")
        metrics = generation_metrics(predictions, [row["target"] for row in rows])
        return {**metrics, "score": metrics[headline]}
    raise ValueError(f"unknown task type {task_type!r}; expected one of {(*CHOICE_TASKS, GENERATION)}")


def evaluate_tasks(
    model: nn.Module,
    tokenizer: Any,
    eval_sets: Mapping[str, tuple[str, Sequence[Row]]],
    *,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    progress: bool | Callable[[str], None] = True,
    max_new_tokens: int = 32,
    headlines: Mapping[str, str] | None = None,
    max_length: int | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate every task (seen and future) and probe: ``{name: task_metrics(...)}``.

    ``eval_sets`` maps a name to ``(task_type, rows)``; ``headlines`` maps a
    generation task to its headline metric. ``progress`` prints one line per
    task to stderr (or passes it to a callable, e.g. ``logger.info``).
    """
    report = _progress_sink(progress)
    results: dict[str, dict[str, float]] = {}
    for name, (task_type, rows) in eval_sets.items():
        started = time.perf_counter()
        if task_type == GENERATION:
            predictions: list[Any] = generate_answers(
                model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size,
                device=device, max_length=max_length,
            )
        else:
            predictions = score_choices(model, rows, batch_size=batch_size, device=device, max_length=max_length)
        results[name] = task_metrics(task_type, rows, predictions, headline=(headlines or {}).get(name))
        seconds = time.perf_counter() - started
        rate = len(rows) / seconds if seconds > 0 else math.inf
        report(f"eval {name} ({task_type}): {len(rows)} items in {seconds:.1f}s "
               f"({rate:.1f} items/s), score {results[name]['score']:.4f}")
    return results


def _progress_sink(progress: bool | Callable[[str], None]) -> Callable[[str], None]:
    if callable(progress):
        return progress
    if progress:
        return lambda line: print(line, file=sys.stderr, flush=True)
    return lambda line: None
