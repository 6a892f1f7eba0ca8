"""Option scoring, generation, metrics and evaluation of a stage; drift and gradient analyses."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from pipelines.analysis import adapter_drift, grad_norms, snapshot_weights, summarize_drift, weight_drift
from pipelines.evaluate import (
    answer_words,
    choice_loglikelihoods,
    evaluate_tasks,
    generate_answers,
    generation_metrics,
    generative_accuracy,
    named_option,
    score_choices,
    task_metrics,
)
from pipelines.models import build_tiny_model


class CountingLM(nn.Module):
    """After token t it predicts t + 1 with high confidence: a model whose preferences are known."""

    def __init__(self, vocab: int = 32, max_length: int = 64) -> None:
        super().__init__()
        self.vocab = vocab
        self.config = SimpleNamespace(max_position_embeddings=max_length)
        self.scale = nn.Parameter(torch.tensor(8.0))

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        logits = nn.functional.one_hot((input_ids + 1) % self.vocab, self.vocab).float() * self.scale
        return SimpleNamespace(logits=logits)


def choice_row(prompt, choices, answer=0):
    return {"prompt_ids": prompt, "choice_ids": choices, "answer": answer, "target": "", "prompt": "", "choices": []}


def text_row(tokenizer, prompt, choices=(), answer=-1, target=""):
    """A row as read from an eval shard: token lists as numpy arrays (object array of arrays for choices)."""
    choice_ids = np.empty(len(choices), dtype=object)
    for i, choice in enumerate(choices):
        choice_ids[i] = np.array(tokenizer(choice)["input_ids"], dtype=np.int64)
    return {
        "prompt": prompt,
        "choices": list(choices),
        "answer": answer,
        "target": target,
        "prompt_ids": np.array(tokenizer(prompt)["input_ids"], dtype=np.int64),
        "choice_ids": choice_ids,
    }


def test_score_choices_picks_the_preferred_option():
    model = CountingLM()
    rows = [
        choice_row([3, 4, 5], [[7, 8], [6, 7], [6, 9]], answer=1),
        choice_row([10], [[12], [5], [11]], answer=2),
        choice_row([1, 2], [[3, 4, 5]], answer=0),
    ]
    assert score_choices(model, rows, batch_size=2) == [1, 2, 0]
    # Summed, not averaged: a two-token perfect continuation beats one wrong token.
    scores = choice_loglikelihoods(model, rows[:1])[0]
    assert scores[1] == max(scores) and scores[1] > -0.05


def test_long_prompts_lose_tokens_on_the_left():
    model = CountingLM(max_length=4)
    # Keeping the left end ([1, 2, 3]) would prefer [4]; the right end ([8, 9, 10]) prefers [11].
    row = choice_row(list(range(1, 11)), [[4], [11]], answer=1)
    assert score_choices(model, [row]) == [1]
    with pytest.raises(ValueError, match="no room"):
        score_choices(model, [choice_row([1], [[2, 3, 4, 5]])])


def test_attention_that_cannot_take_the_option_mask_is_refused():
    flash = CountingLM()
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="4D mask"):
        score_choices(flash, [choice_row([1, 2], [[3]])])
    windowed = CountingLM()
    windowed.config.sliding_window = 4
    row = choice_row(list(range(1, 8)), [[8], [9, 10]])
    with pytest.raises(ValueError, match="sliding window"):
        score_choices(windowed, [row])
    assert score_choices(windowed, [row], max_length=4) == [0]


def test_batched_scores_equal_one_at_a_time(tiny_model, tiny_tokenizer):
    rows = [
        text_row(tiny_tokenizer, f"Q{i}: is {'x' * i} short? A:", [" yes", " no", " it depends"])
        for i in range(5)
    ]
    tiny_model.train()
    batched = choice_loglikelihoods(tiny_model, rows, batch_size=4)
    single = [choice_loglikelihoods(tiny_model, [row], batch_size=1)[0] for row in rows]
    assert np.allclose(batched, single, atol=1e-4)
    assert tiny_model.training  # mode restored

    # Against a plain forward of one unpadded sequence.
    prompt, choice = list(rows[2]["prompt_ids"]), list(rows[2]["choice_ids"][2])
    with torch.no_grad():
        logprobs = tiny_model.eval()(torch.tensor([prompt + choice])).logits.log_softmax(-1)[0]
    expected = sum(logprobs[len(prompt) - 1 + k, token].item() for k, token in enumerate(choice))
    assert batched[2][2] == pytest.approx(expected, abs=1e-4)
    assert score_choices(tiny_model, rows, batch_size=3) == [int(np.argmax(s)) for s in single]


def per_pair_reference(model, rows, max_length: int) -> list[list[float]]:
    """The scorer before one-prompt-forward: each (prompt, option) pair alone, the prompt cut on the
    left so that prompt + option fits max_length, log-likelihoods of the option's tokens summed."""
    scores = []
    with torch.no_grad():
        for row in rows:
            prompt = [int(t) for t in row["prompt_ids"]]
            row_scores = []
            for choice in row["choice_ids"]:
                choice = [int(t) for t in choice]
                kept = prompt[-(max_length - len(choice)):]
                logprobs = model(torch.tensor([kept + choice])).logits[0].float().log_softmax(-1)
                row_scores.append(sum(logprobs[len(kept) - 1 + k, t].item() for k, t in enumerate(choice)))
            scores.append(row_scores)
    return scores


def random_rows(seed: int, count: int, max_prompt: int) -> list[dict]:
    """Token rows with 2-6 options of 1-6 tokens each (so options differ in length)."""
    rng = np.random.default_rng(seed)
    return [
        choice_row(rng.integers(3, 259, rng.integers(1, max_prompt + 1)).tolist(),
                   [rng.integers(3, 259, rng.integers(1, 7)).tolist() for _ in range(rng.integers(2, 7))])
        for _ in range(count)
    ]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_one_prompt_forward_equals_per_pair_scoring(attention):
    model = build_tiny_model({"attn_implementation": attention}, seed=1).eval()
    max_length = 24
    rows = random_rows(0, 24, max_prompt=30)
    cuts = [{min(len(r["prompt_ids"]), max_length - len(c)) for c in r["choice_ids"]} for r in rows]
    assert any(len(c) > 1 for c in cuts), "no row whose options cut the prompt differently"
    assert any(len(r["prompt_ids"]) > max(c) for r, c in zip(rows, cuts)), "no prompt cut to max_length"
    expected = per_pair_reference(model, rows, max_length)
    for batch_size in (1, 5, 64):
        got = choice_loglikelihoods(model, rows, batch_size=batch_size, max_length=max_length)
        assert [len(s) for s in got] == [len(s) for s in expected]
        assert np.allclose(np.concatenate(got), np.concatenate(expected), rtol=0, atol=1e-5)


def forward_shapes(model, rows, batch_size: int) -> list[tuple[int, int]]:
    """(sequences, width) of every forward that `choice_loglikelihoods` makes."""
    shapes: list[tuple[int, int]] = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        choice_loglikelihoods(model, rows, batch_size=batch_size)
    finally:
        hook.remove()
    return shapes


def test_the_prompt_runs_once_per_item(tiny_model):
    rng = np.random.default_rng(2)
    options = [[rng.integers(3, 259, n).tolist() for n in (1, 3, 2, 5)] for _ in range(10)]
    rows = [choice_row(rng.integers(3, 259, 12).tolist(), o) for o in options]
    # One sequence per item, every option inside it; an option's last token is never an input.
    assert forward_shapes(tiny_model, rows, batch_size=4) == [(4, 12 + 0 + 2 + 1 + 4)] * 2 + [(2, 19)]
    # Few items of very different lengths: two forwards rather than one mostly padded.
    uneven = [choice_row(rng.integers(3, 259, n).tolist(), [[5], [6, 7]]) for n in (9, 9, 10, 40, 41, 41)]
    assert forward_shapes(tiny_model, uneven, batch_size=8) == [(3, 11), (3, 42)]


class ScriptedLM(LlamaForCausalLM):
    """A tiny Llama whose greedy answer is known: after token a it says ``following[a]`` (else EOS)."""

    def script(self, after: int, answer: list[int]) -> "ScriptedLM":
        chain = [after, *answer, self.config.eos_token_id]
        following = torch.full((self.config.vocab_size,), self.config.eos_token_id)
        following[torch.tensor(chain[:-1])] = torch.tensor(chain[1:])
        self.register_buffer("following", following, persistent=False)
        return self

    def forward(self, input_ids=None, **kwargs):
        output = super().forward(input_ids=input_ids, **kwargs)
        if output.logits.dim() == 2:  # option scoring, the head on chosen positions only: not scripted
            return output
        said = self.following[input_ids[:, -output.logits.shape[1] :]]
        output.logits = output.logits + 100.0 * nn.functional.one_hot(said, output.logits.shape[-1])
        return output


def test_named_option_rules():
    topics = ["World", "Sports", "Business", "Sci/Tech"]
    assert answer_words("  Sci/Tech. ") == ["sci", "tech"]
    assert named_option("Sports", topics) == 1
    assert named_option("  SPORTS! The match was...", topics) == 1  # the answer may go on after the option
    assert named_option("sci-tech", topics) == 3  # punctuation and case do not matter
    assert named_option("The topic is Sports.", topics) == 1  # an instruct model answers in a sentence
    assert named_option("Not Sports but World", topics) == -1  # two options named: undecided
    assert named_option("Sport", topics) == -1 and named_option("", topics) == -1
    assert named_option("Sportsmanship", topics) == -1  # words, not characters
    assert named_option("New York City, of course", ["New York", "New York City"]) == 1  # inside a longer one
    assert named_option("I'd say New York", ["New York", "New York City"]) == 0
    assert named_option("New York, not New York City", ["New York", "New York City"]) == -1
    assert named_option("yes", ["Yes", "yes!"]) == -1  # identical after normalising: ambiguous
    assert named_option("?", ["?", "no"]) == -1  # an option with no words never matches
    rows = [{"choices": topics, "answer": a} for a in (1, 1, 0, 3)]
    assert generative_accuracy(rows, ["Sports.", "World", "world news", "Sci Tech"]) == 0.75
    with pytest.raises(ValueError, match="answers"):
        generative_accuracy(rows, ["Sports"])


def test_generative_accuracy_of_greedy_answers(tiny_tokenizer):
    model = ScriptedLM(build_tiny_model(seed=0).config)
    model.script(tiny_tokenizer(":")["input_ids"][0], tiny_tokenizer(" Sports")["input_ids"])
    topics = ["World", "Sports", "Business", "Sci/Tech"]
    news = [text_row(tiny_tokenizer, f"News {i}. Topic:", topics, answer=a) for i, a in enumerate((1, 0, 1, 3))]
    cars = [text_row(tiny_tokenizer, "Which? Answer:", ["Sports car", "Sports"], answer=1)]
    assert generate_answers(model, tiny_tokenizer, news, max_new_tokens=10) == ["Sports"] * 4
    eval_sets = {"news": ("classification", news), "cars": ("multiple_choice", cars)}
    results = evaluate_tasks(model, tiny_tokenizer, eval_sets, batch_size=3, progress=False, generative=True,
                             generative_max_new_tokens=10)
    assert results["news"]["generative_accuracy"] == 0.5 and results["cars"]["generative_accuracy"] == 1.0
    assert results["news"]["score"] == results["news"]["accuracy"]  # the headline stays the likelihood accuracy
    short = evaluate_tasks(model, tiny_tokenizer, eval_sets, progress=False, generative=True,
                           generative_max_new_tokens=3)  # " Sp": names no option
    assert short["news"]["generative_accuracy"] == 0.0
    assert "generative_accuracy" not in evaluate_tasks(model, tiny_tokenizer, eval_sets, progress=False)["news"]


def test_generation_metrics_on_known_strings():
    sentence = "the quick brown fox jumps over the lazy dog"
    same = generation_metrics([sentence], [sentence])
    assert same["exact_match"] == 1.0 and same["rougeL"] == pytest.approx(1.0) and same["bleu"] == pytest.approx(1.0)
    assert generation_metrics(["Paris"], [" paris "])["exact_match"] == 1.0  # case and spaces ignored
    partial = generation_metrics(["the quick brown fox sleeps"], [sentence])
    assert partial["exact_match"] == 0.0 and 0.0 < partial["rougeL"] < 1.0 and 0.0 < partial["bleu"] < 1.0
    disjoint = generation_metrics(["alpha beta gamma delta"], ["one two three four"])
    assert disjoint == {"exact_match": 0.0, "rougeL": 0.0, "bleu": 0.0}


def test_task_metrics_headline():
    rows = [{"answer": 1}, {"answer": 0}, {"answer": 2}, {"answer": 2}]
    assert task_metrics("classification", rows, [1, 0, 0, 2]) == {"accuracy": 0.75, "score": 0.75}
    gen_rows = [{"target": "a b c d e"}, {"target": "yes"}]
    default = task_metrics("generation", gen_rows, ["a b c d e", "no"])
    assert default["score"] == default["exact_match"] == 0.5
    assert task_metrics("generation", gen_rows, ["a b c d e", "no"], headline="rougeL")["score"] == 0.5
    with pytest.raises(ValueError, match="headline"):
        task_metrics("multiple_choice", rows, [0] * 4, headline="bleu")
    with pytest.raises(ValueError, match="unknown task type"):
        task_metrics("regression", rows, [0] * 4)
    with pytest.raises(ValueError, match="predictions"):
        task_metrics("classification", rows, [0])


def test_evaluate_tasks_on_small_tasks(tiny_model, tiny_tokenizer):
    sentiment = [text_row(tiny_tokenizer, f"Review {i}: fine. Sentiment:", [" positive", " negative"], answer=i % 2)
                 for i in range(4)]
    qa = [text_row(tiny_tokenizer, f"Say {w}:", target=w) for w in ("yes", "no", "maybe")]
    lines: list[str] = []
    results = evaluate_tasks(
        tiny_model, tiny_tokenizer, {"sentiment": ("classification", sentiment), "probe": ("generation", qa)},
        batch_size=4, progress=lines.append, max_new_tokens=4, headlines={"probe": "rougeL"},
    )
    assert set(results) == {"sentiment", "probe"}
    assert set(results["sentiment"]) == {"accuracy", "score"}
    assert set(results["probe"]) == {"exact_match", "rougeL", "bleu", "score"}
    assert results["probe"]["score"] == results["probe"]["rougeL"]
    assert all(0.0 <= v <= 1.0 for metrics in results.values() for v in metrics.values())
    assert len(lines) == 2 and all("items/s" in line for line in lines)


# --- analysis ---------------------------------------------------------------------------


@pytest.fixture()
def lora_model(tiny_model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def test_adapter_drift_matches_delta_weight(lora_model):
    drift = adapter_drift(lora_model)
    assert sorted(drift) == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    )
    layer = lora_model.base_model.model.model.layers[0].self_attn.q_proj
    delta = layer.get_delta_weight("default")
    base = layer.get_base_layer().weight
    stats = drift["model.layers.0.self_attn.q_proj"]
    assert stats["spectral"] == pytest.approx(torch.linalg.matrix_norm(delta, ord=2).item(), rel=1e-5)
    assert stats["rel_frobenius"] == pytest.approx((delta.norm() / base.norm()).item(), rel=1e-5)
    # Merged into the base weight: the same drift, measured from the recovered W0.
    lora_model.merge_adapter()
    assert adapter_drift(lora_model)["model.layers.0.self_attn.q_proj"] == pytest.approx(stats, rel=1e-4)
    summary = summarize_drift(drift)
    assert summary["drift/spectral_max"] == max(s["spectral"] for s in drift.values())


def test_fresh_lora_has_no_drift(tiny_model):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj"]))
    assert all(s["frobenius"] == 0.0 for s in adapter_drift(model).values())


def test_grad_norms_grouped_per_layer_type(lora_model):
    ids = torch.randint(0, 259, (2, 8))
    lora_model(input_ids=ids, labels=ids).loss.backward()
    norms = grad_norms(lora_model)
    assert set(norms) == {"total"} | {f"{p}.lora_{m}" for p in ("q_proj", "v_proj") for m in "AB"}
    grads = [p.grad for p in lora_model.parameters() if p.requires_grad]
    assert norms["total"] == pytest.approx(math.sqrt(sum(g.pow(2).sum().item() for g in grads)), rel=1e-5)


def test_weight_drift_against_a_snapshot(tiny_model):
    snapshot = snapshot_weights(tiny_model)
    with torch.no_grad():
        tiny_model.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    drift = weight_drift(tiny_model, snapshot)
    assert drift["model.layers.1.mlp.down_proj"]["rel_frobenius"] == pytest.approx(0.5, rel=1e-5)
    assert drift["model.layers.0.mlp.down_proj"]["frobenius"] == 0.0
    with pytest.raises(KeyError):
        snapshot_weights(tiny_model, ["no.such.weight"])
