"""Synthetic tasks for the ``demo`` stream, generated in code from a seed.

The demo's tiny byte-level model must learn each task in a few hundred steps
on 2 CPUs and must have something to forget. So every task is asked in a
format the model met in its pretraining (its "basic knowledge", `KNOWLEDGE`,
taught by ``model.pretrain`` in ``configs/demo.yaml``), every test item is
answerable from what the task's train split teaches, and every prompt plus
answer fits in 64 bytes. Names are invented words from one shared lexicon,
so no two tasks share an entity.

Basic knowledge (pretraining only):

* ``facts``: the colour, home and food of 12 creatures and the job of 24
  people, as multiple choice. It is also the stream's probe, asked after
  every stage: it measures how much basic knowledge later training erases.
  ``train`` and ``test`` hold the same questions.
* ``reviews``: short reviews labelled positive or negative by 8 common
  polarity words: the model knows what a review is and how to answer.

The stream's tasks, in order:

* ``jobs`` (knowledge injection): the jobs of 24 new people. ``test`` asks
  the trained facts again, as knowledge-injection studies do: it measures
  memorisation of new facts in a known format.
* ``creatures`` (knowledge injection): the colour, home and food of 12 new
  creatures, the probe's own question format, so it competes most directly
  with the probe; ``test`` again asks the trained facts.
* ``sentiment`` (a rule): reviews built from 12 new polarity words, 10 nouns
  and 4 sentence patterns. ``test`` holds combinations never trained, of
  words, nouns and patterns that ``train`` uses often, so it measures whether
  the model learnt the rule (the polarity word decides), not the rows.
"""
from __future__ import annotations

import random
from typing import Any, Callable

SPLITS = ("train", "test")
# How the stream renders each kind of row (the preset's templates) and so how pretraining shows it.
QUESTION_TEMPLATE = "Question: {question}\nAnswer:"
REVIEW_TEMPLATE = "Review: {text}\nSentiment:"
# What the tiny model is pretrained on before the stream.
KNOWLEDGE = ("facts", "reviews")

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_COLORS = ["red", "blue", "green", "yellow", "purple", "orange"]
_HOMES = ["cave", "lake", "forest", "desert", "river", "hill"]
_FOODS = ["seeds", "fish", "berries", "leaves", "honey", "bugs"]
_CREATURE_QUESTIONS = [
    ("What color is a {}?", _COLORS),
    ("Where does a {} live?", _HOMES),
    ("What does a {} eat?", _FOODS),
]
_JOB_QUESTION = ("What is the job of {}?", ["baker", "pilot", "farmer", "doctor", "singer", "tailor", "miner", "judge"])
_NOUNS = ["soup", "movie", "trip", "song", "game", "book", "party", "hotel", "show", "meal"]
_PATTERNS = ["the {noun} was {word}", "my {noun} felt {word}", "this {noun} is {word}", "our {noun} was so {word}"]
_KNOWN_WORDS = {"positive": ["good", "happy", "cool", "sweet"], "negative": ["sad", "ugly", "weak", "nasty"]}
_NEW_WORDS = {"positive": ["great", "lovely", "superb", "fun", "nice", "perfect"],
              "negative": ["awful", "boring", "bad", "dull", "poor", "terrible"]}
_SENTIMENT_TEST_ROWS = 64

# Consecutive blocks of the shared lexicon: (name, size).
_NAME_BLOCKS = [("creatures", 12), ("people", 24), ("new_people", 24), ("new_creatures", 12)]


def _lexicon(seed: int, count: int) -> list[str]:
    """Distinct pronounceable non-words (CV-CVC), drawn in a fixed order for a seed."""
    rng = random.Random(f"demo/lexicon/{seed}")
    words: list[str] = []
    while len(words) < count:
        word = rng.choice(_CONSONANTS) + rng.choice(_VOWELS) + rng.choice(_CONSONANTS) + rng.choice(_VOWELS) + rng.choice(_CONSONANTS)
        if word not in words:
            words.append(word)
    return words


def _names(seed: int, block: str) -> list[str]:
    start = 0
    for name, size in _NAME_BLOCKS:
        if name == block:
            return _lexicon(seed, start + size)[start:]
        start += size
    raise KeyError(block)


def _multiple_choice(rng: random.Random, question: str, answer: str, distractors: list[str]) -> dict[str, Any]:
    choices = [answer, *rng.sample(distractors, 3)]
    rng.shuffle(choices)
    return {"question": question, "choices": choices, "answer": choices.index(answer)}


def _questions(rng: random.Random, names: list[str], questions: list[tuple[str, list[str]]]) -> list[dict[str, Any]]:
    """One multiple-choice fact per name and question, with a seeded answer and distractors."""
    rows = []
    for name in names:
        for question, values in questions:
            answer = rng.choice(values)
            rows.append(_multiple_choice(rng, question.format(name), answer, [v for v in values if v != answer]))
    return rows


def _review(pattern: str, noun: str, word: str, words: dict[str, list[str]]) -> dict[str, str]:
    label = "positive" if word in words["positive"] else "negative"
    return {"text": pattern.format(noun=noun, word=word), "label": label}


# Knowledge tasks: the same questions in both splits (see the module docstring), so `split` is unused.

def _facts(seed: int, split: str) -> list[dict[str, Any]]:
    rng = random.Random(f"demo/facts/{seed}")
    return _questions(rng, _names(seed, "creatures"), _CREATURE_QUESTIONS) + _questions(rng, _names(seed, "people"), [_JOB_QUESTION])


def _jobs(seed: int, split: str) -> list[dict[str, Any]]:
    return _questions(random.Random(f"demo/jobs/{seed}"), _names(seed, "new_people"), [_JOB_QUESTION])


def _creatures(seed: int, split: str) -> list[dict[str, Any]]:
    return _questions(random.Random(f"demo/creatures/{seed}"), _names(seed, "new_creatures"), _CREATURE_QUESTIONS)


def _reviews(seed: int, split: str) -> list[dict[str, Any]]:
    """Every known polarity word in every pattern, each with a seeded noun."""
    rng = random.Random(f"demo/reviews/{seed}")
    words = _KNOWN_WORDS["positive"] + _KNOWN_WORDS["negative"]
    return [_review(pattern, rng.choice(_NOUNS), word, _KNOWN_WORDS) for pattern in _PATTERNS for word in words]


def _sentiment(seed: int, split: str) -> list[dict[str, Any]]:
    """Every (pattern, noun, word) combination of the new words; ``test`` takes a seeded sample, ``train`` the rest."""
    rng = random.Random(f"demo/sentiment/{seed}")
    words = _NEW_WORDS["positive"] + _NEW_WORDS["negative"]
    rows = [_review(pattern, noun, word, _NEW_WORDS) for pattern in _PATTERNS for noun in _NOUNS for word in words]
    rng.shuffle(rows)
    return rows[:_SENTIMENT_TEST_ROWS] if split == "test" else rows[_SENTIMENT_TEST_ROWS:]


GENERATORS: dict[str, Callable[[int, str], list[dict[str, Any]]]] = {
    "facts": _facts,
    "reviews": _reviews,
    "jobs": _jobs,
    "creatures": _creatures,
    "sentiment": _sentiment,
}


def generate(task: str, split: str, seed: int = 0) -> list[dict[str, Any]]:
    """Rows of one demo task and split; the same seed always gives the same rows."""
    if task not in GENERATORS:
        raise KeyError(f"no demo task {task!r}; available: {', '.join(GENERATORS)}")
    if split not in SPLITS:
        raise KeyError(f"demo task {task!r} has no split {split!r}; available: {', '.join(SPLITS)}")
    return GENERATORS[task](seed, split)


def prompt_and_answer(row: dict[str, Any]) -> tuple[str, str]:
    """A row as the demo stream renders it: the prompt and the right answer."""
    if "question" in row:
        return QUESTION_TEMPLATE.format(question=row["question"]), row["choices"][row["answer"]]
    return REVIEW_TEMPLATE.format(text=row["text"]), row["label"]
