"""The demo stream: tasks the tiny model can learn, in the formats its pretraining teaches."""
from __future__ import annotations

import pytest
import torch

from pipelines import demo_stream
from pipelines.evaluate import score_choices
from pipelines.models import PretrainSpec, build_byte_tokenizer, build_tiny_model, pretrained_tiny_model
from pipelines.preprocess import render_row
from pipelines.streams import load_stream

DEMO = load_stream("demo")
TASKS = {task.name: task for task in [*DEMO.tasks, *DEMO.probe]}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}  # configs/demo.yaml


def generator(name: str) -> str:
    return TASKS[name].source.builtin.split("/", 1)[1]


def rendered(name: str, row: dict) -> tuple[str, str]:
    parts = render_row(TASKS[name], row)
    return parts["head"] + parts["body"] + parts["tail"], parts["target"]


def test_pretraining_shows_the_text_the_stream_renders():
    assert [t.name for t in DEMO.tasks] == ["jobs", "creatures", "sentiment"]
    assert [(p.name, generator(p.name)) for p in DEMO.probe] == [("facts-probe", "facts")]
    for name in TASKS:
        for split in demo_stream.SPLITS:
            for row in demo_stream.generate(generator(name), split, seed=0):
                assert demo_stream.prompt_and_answer(row) == rendered(name, row)
    for row in demo_stream.generate("reviews", "train", seed=0):  # pretraining only, in the sentiment format
        assert demo_stream.prompt_and_answer(row) == rendered("sentiment", row)


def test_knowledge_tasks_ask_new_facts_in_known_formats():
    known = demo_stream.generate("facts", "train", seed=0)
    known_questions = {row["question"] for row in known}
    known_answers = {choice for row in known for choice in row["choices"]}
    seen: set[str] = set(known_questions)
    for task in ("jobs", "creatures"):
        train, test = (demo_stream.generate(task, split, seed=0) for split in demo_stream.SPLITS)
        assert test == train  # memorisation: the trained facts asked again
        questions = {row["question"] for row in train}
        assert len(questions) == len(train) and not questions & seen  # new entities, never asked before
        assert {choice for row in train for choice in row["choices"]} <= known_answers
        seen |= questions


def test_sentiment_tests_unseen_reviews_of_trained_words():
    train, test = (demo_stream.generate("sentiment", split, seed=0) for split in demo_stream.SPLITS)
    assert len(test) == 64 and len(train) == 416
    assert not {r["text"] for r in test} & {r["text"] for r in train}
    polarity = {r["text"].split()[-1]: r["label"] for r in train}  # the last word decides
    vocabulary = {word for r in train for word in r["text"].split()}
    for row in test:
        assert polarity[row["text"].split()[-1]] == row["label"]
        assert set(row["text"].split()) <= vocabulary
    known = {r["text"].split()[-1] for r in demo_stream.generate("reviews", "train", seed=0)}
    assert not known & set(polarity), "the task's polarity words are new to the pretrained model"


@pytest.mark.parametrize("task", ["facts", "reviews"])
def test_pretraining_data_is_seeded(task):
    rows = demo_stream.generate(task, "train", seed=0)
    assert rows == demo_stream.generate(task, "train", seed=0) != demo_stream.generate(task, "train", seed=1)


def test_pretraining_spec_errors_name_the_field():
    assert PretrainSpec.from_dict({"tasks": ["facts"]}).tasks == ("facts",)
    with pytest.raises(ValueError, match=r"model.pretrain.tasks: \['nope'\] not demo tasks"):
        PretrainSpec.from_dict({"tasks": ["facts", "nope"]})
    with pytest.raises(ValueError, match="model.pretrain.tasks: expected a non-empty list"):
        PretrainSpec.from_dict({"tasks": "facts"})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['task'\]"):
        PretrainSpec.from_dict({"task": "facts"})


def test_pretrained_model_is_cached_by_its_text(tmp_path, monkeypatch, single_thread):
    monkeypatch.setenv("SECURA_CL_CACHE", str(tmp_path))
    spec = PretrainSpec(tasks=("jobs",), steps=2, batch_size=4)
    first = pretrained_tiny_model(TINY, spec, seed=0)
    again = pretrained_tiny_model(TINY, spec, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert len(list(tmp_path.glob("models/*.safetensors"))) == 1
    real = demo_stream.GENERATORS["jobs"]
    monkeypatch.setitem(demo_stream.GENERATORS, "jobs", lambda seed, split: real(seed, split)[:-1])
    pretrained_tiny_model(TINY, spec, seed=0)
    assert len(list(tmp_path.glob("models/*.safetensors"))) == 2, "changed pretraining text, new weights"


def accuracy(model: torch.nn.Module, name: str) -> float:
    tokenizer = build_byte_tokenizer()
    rows = []
    for row in demo_stream.generate(generator(name), "test", seed=0):
        prompt, target = rendered(name, row)
        choices = render_row(TASKS[name], row)["choices"]
        rows.append({"prompt_ids": tokenizer(prompt)["input_ids"], "answer": choices.index(target),
                     "choice_ids": [tokenizer(" " + choice)["input_ids"] for choice in choices]})
    predictions = score_choices(model, rows, batch_size=64)
    return sum(p == row["answer"] for p, row in zip(predictions, rows)) / len(rows)


@pytest.mark.parametrize("name", ["jobs", "creatures", "sentiment", "facts-probe"])
def test_a_short_full_fine_tune_learns_each_task(name, tmp_path, monkeypatch, single_thread):
    """From random weights, 200 steps of 16 rows reach 0.85 on the test split (seconds on one core)."""
    monkeypatch.setenv("SECURA_CL_CACHE", str(tmp_path))
    assert accuracy(build_tiny_model(TINY, seed=0), name) < 0.7
    trained = pretrained_tiny_model(TINY, PretrainSpec(tasks=(generator(name),), steps=200, batch_size=16), seed=0)
    assert accuracy(trained, name) >= 0.85
