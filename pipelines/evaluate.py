"""Evaluation after every stage: option log-likelihood scoring and greedy generation.

Rows are eval-shard rows (docs/architecture.md): ``prompt``, ``choices``,
``answer``, ``target``, ``prompt_ids``, ``choice_ids``. Token lists may arrive as
Python lists or numpy arrays (Parquet via pandas/Ray Data); both are accepted.

Choice tasks are scored without generation: the predicted option is the one
whose tokens have the highest summed log-likelihood after the prompt. The prompt
runs once per row, its options packed after it in the same sequence with a 4D
attention mask and positions that make each option see only the prompt and
itself; right padding and explicit positions keep every score that of an
unbatched prompt + option forward, so packing and batching never change an
answer. Optionally, choice rows are also answered by greedy generation and
scored by the option the answer names (`generative_accuracy`).
"""
from __future__ import annotations

import contextlib
import math
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from transformers import StoppingCriteria, StoppingCriteriaList

from pipelines.precision import autocast, resolve_precision

CHOICE_TASKS = ("classification", "multiple_choice")
GENERATION = "generation"
GENERATION_METRICS = ("exact_match", "rougeL", "bleu")
# Option scoring ends a batch early rather than pad more than this share of its tokens.
MAX_PADDING = 0.1

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


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's activations, which an additive attention mask must match."""
    dtype = getattr(model, "dtype", torch.float32)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _check_attention(model: nn.Module, longest: int) -> None:
    """Option scoring's 4D mask replaces the model's own: flash-attention kernels cannot take it,
    and a sliding window shorter than ``longest`` (prompt + option) would no longer apply."""
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None) or ""
    if "flash" in implementation:
        raise ValueError(f"attention implementation {implementation!r} takes no custom 4D mask; "
                         "load the model with attn_implementation='sdpa' or 'eager' for option scoring")
    window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and longest > window:
        raise ValueError(f"a prompt + option of {longest} tokens exceeds the model's sliding window ({window}), "
                         "which option scoring's 4D mask does not apply; pass max_length <= the window")


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


@dataclass(frozen=True)
class _Packed:
    """One sequence of a forward: a row's prompt, then the inputs of every option scored after it.

    An option's last token is predicted but never read, so it is no input. The
    options of a row share one sequence unless `_fit` cuts the prompt
    differently for them (a prompt near ``max_length``): then each cut gets its own.
    """

    row: int
    prompt: list[int]
    options: list[tuple[int, list[int]]]  # (option index in the row, its tokens)

    @property
    def inputs(self) -> int:
        """Option tokens read as inputs."""
        return sum(len(choice) - 1 for _, choice in self.options)


def _pack(rows: Sequence[Row], max_length: int) -> list[_Packed]:
    """Every row's options, grouped by the prompt that `_fit` leaves each of them."""
    packs: list[_Packed] = []
    for r, row in enumerate(rows):
        prompt, choices = _ids(row["prompt_ids"]), [_ids(c) for c in row["choice_ids"]]
        if not choices:
            raise ValueError(f"row {r} has no choice_ids: score_choices is for choice tasks")
        by_cut: dict[int, list[tuple[int, list[int]]]] = {}
        for j, choice in enumerate(choices):
            by_cut.setdefault(len(_fit(prompt, choice, max_length)), []).append((j, choice))
        packs.extend(_Packed(r, prompt[-keep:], options) for keep, options in by_cut.items())
    return packs


def _padding(packs: list[_Packed]) -> float:
    """The share of a batch's tokens that `_layout` pads."""
    width = max(len(pack.prompt) for pack in packs) + max(pack.inputs for pack in packs)
    return 1.0 - sum(len(pack.prompt) + pack.inputs for pack in packs) / (len(packs) * width)


def _batches(packs: list[_Packed], batch_size: int) -> Iterator[list[_Packed]]:
    """Packs sorted by length, at most ``batch_size`` a batch; a batch also ends before its padding
    passes `MAX_PADDING` (few items of very different lengths), since padded tokens cost as much as real ones."""
    batch: list[_Packed] = []
    for pack in sorted(packs, key=lambda pack: (len(pack.prompt), pack.inputs)):
        if batch and (len(batch) == batch_size or _padding([*batch, pack]) > MAX_PADDING):
            yield batch
            batch = []
        batch.append(pack)
    if batch:
        yield batch


@dataclass
class _Layout:
    """A batch of packs as model inputs, and where each option token's log-probability is read.

    ``segments`` is 0 on prompts, k on the k-th option of a sequence, -1 on padding.
    Per scored token: its ``sequence``, the ``source`` column whose logits
    predict it, the ``target`` token and its ``option`` (numbered over the batch).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor
    sequence: list[int] = field(default_factory=list)
    source: list[int] = field(default_factory=list)
    target: list[int] = field(default_factory=list)
    option: list[int] = field(default_factory=list)


def _layout(packs: list[_Packed]) -> _Layout:
    """Prompts end in one column, options follow, padding on either side: the logits needed
    (the prompts' last column and the options') are a few columns of the batch."""
    prompt_end = max(len(pack.prompt) for pack in packs)
    shape = (len(packs), prompt_end + max(pack.inputs for pack in packs))
    out = _Layout(torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long),
                  torch.full(shape, -1, dtype=torch.long))
    options = 0
    for i, pack in enumerate(packs):
        length, offset = len(pack.prompt), prompt_end
        out.input_ids[i, prompt_end - length : prompt_end] = torch.tensor(pack.prompt)
        out.position_ids[i, prompt_end - length : prompt_end] = torch.arange(length)
        out.segments[i, prompt_end - length : prompt_end] = 0
        for segment, (_, choice) in enumerate(pack.options, start=1):
            end = offset + len(choice) - 1
            out.input_ids[i, offset:end] = torch.tensor(choice[:-1], dtype=torch.long)
            out.position_ids[i, offset:end] = torch.arange(length, length + end - offset)
            out.segments[i, offset:end] = segment
            out.sequence += [i] * len(choice)
            out.source += [prompt_end - 1, *range(offset, end)]
            out.target += choice
            out.option += [options] * len(choice)
            options, offset = options + 1, end
    return out


def _option_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive (batch, 1, L, L) mask: the prompt is causal, an option's tokens see the prompt and
    their own option; padding sees only itself, so no softmax row is empty."""
    width = segments.shape[1]
    query, key = segments.unsqueeze(2), segments.unsqueeze(1)
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    allowed = causal & (key >= 0) & ((key == 0) | (key == query))
    allowed |= torch.eye(width, dtype=torch.bool, device=segments.device)
    blocked = torch.full(allowed.shape, torch.finfo(dtype).min, dtype=dtype, device=segments.device)
    return blocked.masked_fill(allowed, 0.0).unsqueeze(1)


def _score_packed(model: nn.Module, packs: list[_Packed], device: torch.device) -> list[float]:
    """Summed log p(option | prompt) for every option of every pack, in pack order, in one forward."""
    from pipelines.models import lm_head_on

    layout = _layout(packs)
    sequence, source, target, option = (
        torch.tensor(values, device=device)
        for values in (layout.sequence, layout.source, layout.target, layout.option)
    )
    # Logits only where an option token is predicted: the prompts' last column and the options' inputs.
    # (A model without a separate head, such as a test's scripted one, gives every position's logits.)
    needed = torch.zeros(layout.input_ids.shape, dtype=torch.bool, device=device)
    needed[sequence, source] = True
    row_of = torch.full(needed.shape, -1, dtype=torch.long, device=device)
    row_of[needed] = torch.arange(int(needed.sum()), device=device)
    has_head = getattr(model, "get_output_embeddings", lambda: None)() is not None
    with lm_head_on(model, needed) if has_head else contextlib.nullcontext():
        logits = model(
            input_ids=layout.input_ids.to(device),
            position_ids=layout.position_ids.to(device),
            attention_mask=_option_mask(layout.segments.to(device), _float_dtype(model)),
            use_cache=False,
        ).logits
    picked = logits[row_of[sequence, source]] if has_head else logits[sequence, source]
    token_lp = picked.float().log_softmax(-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return torch.zeros(int(option[-1]) + 1, device=device).index_add_(0, option, token_lp).tolist()


def choice_loglikelihoods(
    model: nn.Module,
    rows: Sequence[Row],
    *,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    max_length: int | None = None,
    precision: str = "fp32",
) -> list[list[float]]:
    """Per row, the summed log-likelihood of each option's ``choice_ids`` after its ``prompt_ids``.

    The prompt runs once per row: the row's options follow it in the same
    sequence, each seeing the prompt and itself only (a 4D attention mask and
    per-option positions), so every score equals that of prompt + option alone.
    Sequences are sorted by length and up to ``batch_size`` of them make one
    forward (fewer where more would pad over `MAX_PADDING` of the tokens).
    ``max_length`` defaults to the model's ``max_position_embeddings``; a longer
    prompt + option loses prompt tokens on the left. ``precision`` (`pipelines.precision`): the forward's
    compute dtype; log-probabilities are always taken in fp32.
    """
    model = _unwrap(model)
    device = _device(model, device)
    packs = _pack(rows, _max_length(model, max_length))
    _check_attention(model, max((len(p.prompt) + max(len(c) for _, c in p.options) for p in packs), default=0))
    per_row: list[list[float]] = [[0.0] * len(row["choice_ids"]) for row in rows]
    with _inference(model), autocast(resolve_precision(precision, device), device):
        for batch in _batches(packs, batch_size):
            scores = iter(_score_packed(model, batch, device))
            for pack in batch:
                for j, _ in pack.options:
                    per_row[pack.row][j] = next(scores)
    return per_row


def score_choices(
    model: nn.Module,
    rows: Sequence[Row],
    *,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    max_length: int | None = None,
    precision: str = "fp32",
) -> list[int]:
    """The predicted option per row: argmax of summed log-likelihood (first option wins ties)."""
    scores = choice_loglikelihoods(model, rows, batch_size=batch_size, device=device, max_length=max_length,
                                   precision=precision)
    return [int(np.argmax(row_scores)) for row_scores in scores]


# --- generation tasks -----------------------------------------------------------------


@dataclass(frozen=True)
class _LineEnds:
    """Per vocabulary id: whether the token holds a newline, text (not whitespace), or text before its
    first newline; and the end-of-turn ids. Built once per tokenizer."""

    newline: torch.Tensor
    text: torch.Tensor
    text_then_newline: torch.Tensor
    end_ids: tuple[int, ...]


_LINE_ENDS: dict[int, tuple[Any, _LineEnds]] = {}


def _line_ends(tokenizer: Any, model: nn.Module) -> _LineEnds:
    cached = _LINE_ENDS.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
    flags = [("\n" in piece, bool(piece.strip()), bool(piece.split("\n", 1)[0].strip()) and "\n" in piece)
             for piece in pieces]
    newline, text, text_then_newline = (torch.tensor(column, dtype=torch.bool) for column in zip(*flags))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ends = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])}
    ends |= {tokenizer.convert_tokens_to_ids(token) for token in END_OF_TURN if token in tokenizer.get_vocab()}
    found = _LineEnds(newline, text, text_then_newline, tuple(sorted(i for i in ends if i is not None)))
    _LINE_ENDS[id(tokenizer)] = (tokenizer, found)
    return found


# End-of-turn tokens of common chat templates (ChatML, Llama 3, Gemma): an answer ends there.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


class _StopAtLineEnd(StoppingCriteria):
    """A `transformers` stopping criterion, per row: stop once the answer's first line has ended.

    A row is done at an end-of-turn token, or at a newline after some text (leading newlines are
    skipped: the answer is the first non-empty line). `generate` pads the rows that are done and ends
    the batch once every row is.
    """

    def __init__(self, ends: _LineEnds, rows: int, device: torch.device) -> None:
        super().__init__()
        self.newline, self.text = ends.newline.to(device), ends.text.to(device)
        self.text_then_newline = ends.text_then_newline.to(device)
        self.end_ids = torch.tensor(ends.end_ids, dtype=torch.long, device=device)
        self.started = torch.zeros(rows, dtype=torch.bool, device=device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        last = input_ids[:, -1].clamp(0, len(self.newline) - 1)
        done = torch.isin(input_ids[:, -1], self.end_ids) | self.text_then_newline[last] | (
            self.newline[last] & self.started)
        self.started |= self.text[last]
        return done


def first_line(text: str) -> str:
    """A generated answer as scored: its first non-empty line, stripped."""
    return text.strip().split("\n", 1)[0].strip()


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
    """Greedy answers to each row's ``prompt_ids``: each one's first line (`first_line`).

    Prompts are sorted by length and batched (left-padded), decoded with the KV cache; each row stops at
    its first end-of-turn token or at the newline that ends its first line of text (`_StopAtLineEnd`),
    and a batch ends once all its rows have. Prompts longer than ``max_length - max_new_tokens`` lose
    tokens on the left. Decoding stays in the model's dtype, not under bf16 autocast: on a few tokens a
    step autocast saves nothing (it casts every frozen weight again on each call; SmolLM2 on a CPU took
    the same CPU time either way), and fp32 keeps the answers those of the fp32 model.
    """
    model = _unwrap(model)
    device = _device(model, device)
    keep = _max_length(model, max_length) - max_new_tokens
    if keep < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for the prompt")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ends = _line_ends(tokenizer, model)
    prompts = [_ids(row["prompt_ids"])[-keep:] for row in rows]
    if not all(prompts):
        raise ValueError("empty prompt_ids: generation needs at least one prompt token")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    with _inference(model):
        for start in range(0, len(order), batch_size):
            picked = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in picked)
            input_ids = torch.full((len(picked), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for row, i in enumerate(picked):
                input_ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                attention_mask[row, width - len(prompts[i]) :] = 1
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                use_cache=True,
                pad_token_id=pad_id,
                eos_token_id=list(ends.end_ids),
                stopping_criteria=StoppingCriteriaList([_StopAtLineEnd(ends, len(picked), device)]),
            )
            texts = tokenizer.batch_decode(output[:, width:].cpu(), skip_special_tokens=True)
            for i, text in zip(picked, texts):
                answers[i] = first_line(text)
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


def answer_words(text: str) -> list[str]:
    """Case-folded words with punctuation dropped: ``"Sci/Tech."`` and ``" sci tech"`` both give ``["sci", "tech"]``."""
    return re.sub(r"[\W_]+", " ", str(text).casefold()).split()


def named_option(answer: str, choices: Sequence[str]) -> int:
    """The one option a free-form answer names (its index), or -1 when it names none or several.

    Answer and options are compared as `answer_words`. An option is named when
    its words occur, in order and adjacent, anywhere in the answer's words: an
    instruct model answers in sentences ("The capital of Germany is Berlin.",
    "Sports. The article..."). An option named only inside a longer named option
    does not count ("New York City" names that option, not "New York"). Two
    different options named, or two options identical after normalising, name
    none: the answer did not decide. An option with no words never matches.
    """
    words = answer_words(answer)
    spans = {j: _occurrences(words, option) for j, option in enumerate(map(answer_words, choices)) if option}
    named = [j for j, found in spans.items() if found and not all(
        any(other != j and _inside(span, wider) for other in spans for wider in spans[other]
            if wider[1] - wider[0] > span[1] - span[0]) for span in found)]
    return named[0] if len(named) == 1 else -1


def _occurrences(words: list[str], option: list[str]) -> list[tuple[int, int]]:
    size = len(option)
    return [(i, i + size) for i in range(len(words) - size + 1) if words[i:i + size] == option]


def _inside(span: tuple[int, int], wider: tuple[int, int]) -> bool:
    return wider[0] <= span[0] and span[1] <= wider[1]


def generative_accuracy(rows: Sequence[Row], answers: Sequence[str]) -> float:
    """Share of choice rows whose greedy answer names the gold option (`named_option`): the
    normalised gold-option match, exact-match scoring of generation for choice tasks."""
    if len(rows) != len(answers) or not rows:
        raise ValueError(f"{len(answers)} answers for {len(rows)} rows")
    hits = [named_option(answer, [str(c) for c in row["choices"]]) == int(row["answer"])
            for answer, row in zip(answers, rows)]
    return sum(hits) / len(hits)


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
    generative: bool = False,
    generative_max_new_tokens: int = 16,
    precision: str = "fp32",
) -> dict[str, dict[str, float]]:
    """Evaluate every task (seen and future) and probe: ``{name: task_metrics(...)}``.

    ``eval_sets`` maps a name to ``(task_type, rows)``; ``headlines`` maps a
    generation task to its headline metric. ``progress`` prints one line per
    task to stderr (or passes it to a callable, e.g. ``logger.info``).
    ``generative`` also answers every choice row by greedy generation (at most
    ``generative_max_new_tokens`` tokens after its ``prompt_ids``) and adds
    ``generative_accuracy`` (`generative_accuracy`) beside ``score``, which stays
    the option log-likelihood accuracy. ``precision`` (``auto``, ``fp32``, ``bf16``) is resolved for
    ``device`` as training resolves it (`pipelines.precision`) and applies to option scoring; greedy
    generation decodes in the model's dtype (`generate_answers` says why).
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
            predictions = score_choices(model, rows, batch_size=batch_size, device=device, max_length=max_length,
                                        precision=precision)
        results[name] = task_metrics(task_type, rows, predictions, headline=(headlines or {}).get(name))
        if generative and task_type in CHOICE_TASKS:
            answers = generate_answers(model, tokenizer, rows, max_new_tokens=generative_max_new_tokens,
                                       batch_size=batch_size, device=device, max_length=max_length)
            results[name]["generative_accuracy"] = generative_accuracy(rows, answers)
        seconds = time.perf_counter() - started
        rate = len(rows) / seconds if seconds > 0 else math.inf
        report(f"eval {name} ({task_type}): {len(rows)} items in {seconds:.1f}s ({rate:.1f} items/s), "
               + ", ".join(f"{key} {results[name][key]:.4f}" for key in ("score", "generative_accuracy")
                           if key in results[name]))
    return results


def _progress_sink(progress: bool | Callable[[str], None]) -> Callable[[str], None]:
    if callable(progress):
        return progress
    if progress:
        return lambda line: print(line, file=sys.stderr, flush=True)
    return lambda line: None
