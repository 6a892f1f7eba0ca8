"""Synthetic tasks for the ``demo`` stream, generated in code from a seed.

Small and short on purpose: every prompt plus answer fits in 64 bytes, so the
whole continual demo runs in minutes on 2 CPUs with the tiny byte-level model.

* ``facts``: invented creatures and their colour, home and food, asked as
  multiple choice. The demo trains on them in its first stage *and* evaluates
  the same questions as its probe after every stage, so the probe measures
  how much of stage 1 survives later stages. (A never-trained probe would sit
  at chance forever with a randomly initialised tiny model.) Its ``train`` and
  ``test`` splits hold the same questions: the task is memorisation.
* ``arithmetic``: ``What is 3 plus 11?``, multiple choice with near-miss distractors.
* ``strings``: reverse or upper-case a random word, multiple choice with look-alikes.
* ``sentiment``: classification of phrases built from invented positive and
  negative words; ``test`` uses a sentence pattern never seen in ``train``.
"""
from __future__ import annotations

import random
from typing import Any, Callable

SPLITS = ("train", "test")
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"

_COLORS = ["red", "blue", "green", "yellow", "purple", "orange"]
_HOMES = ["cave", "lake", "forest", "desert", "river", "hill"]
_FOODS = ["seeds", "fish", "berries", "leaves", "honey", "bugs"]
_FACT_QUESTIONS = [
    ("What color is a {}?", _COLORS),
    ("Where does a {} live?", _HOMES),
    ("What does a {} eat?", _FOODS),
]
_N_CREATURES = 12
_N_SENTIMENT_WORDS = 10  # per polarity
_NOUNS = ["soup", "movie", "trip", "song", "game", "book", "party", "hotel"]
_TRAIN_PATTERNS = ["the {noun} was {word}", "a {word} {noun}", "my {noun} felt {word}"]
_TEST_PATTERNS = ["so {word}, that {noun}"]


def _lexicon(seed: int, count: int) -> list[str]:
    """Distinct pronounceable non-words (CV-CVC), shared by all demo tasks so that they never collide."""
    rng = random.Random(f"demo/lexicon/{seed}")
    words: list[str] = []
    while len(words) < count:
        word = rng.choice(_CONSONANTS) + rng.choice(_VOWELS) + rng.choice(_CONSONANTS) + rng.choice(_VOWELS) + rng.choice(_CONSONANTS)
        if word not in words:
            words.append(word)
    return words


def _multiple_choice(rng: random.Random, question: str, answer: str, distractors: list[str]) -> dict[str, Any]:
    choices = [answer, *rng.sample(distractors, 3)]
    rng.shuffle(choices)
    return {"question": question, "choices": choices, "answer": choices.index(answer)}


def _facts(seed: int, split: str) -> list[dict[str, Any]]:
    rng = random.Random(f"demo/facts/{seed}")
    creatures = _lexicon(seed, _N_CREATURES)
    rows = []
    for creature in creatures:
        for question, values in _FACT_QUESTIONS:
            answer = rng.choice(values)
            rows.append(_multiple_choice(rng, question.format(creature), answer, [v for v in values if v != answer]))
    return rows  # same questions in both splits: see the module docstring


def _arithmetic(seed: int, split: str) -> list[dict[str, Any]]:
    rng = random.Random(f"demo/arithmetic/{seed}")
    pairs = [(a, b) for a in range(15) for b in range(15)]
    rng.shuffle(pairs)
    chosen = pairs[:45] if split == "test" else pairs[45:]
    rows = []
    for a, b in chosen:
        total = a + b
        near = [n for n in range(total - 3, total + 4) if n >= 0 and n != total]
        rows.append(_multiple_choice(rng, f"What is {a} plus {b}?", str(total), [str(n) for n in near]))
    return rows


def _look_alikes(word: str, op: str) -> tuple[str, list[str]]:
    if op == "reverse":
        answer = word[::-1]
        return answer, [word, answer[1:] + answer[0], answer[1] + answer[0] + answer[2:]]
    answer = word.upper()
    return answer, [word, word.capitalize(), answer[::-1]]


def _strings(seed: int, split: str) -> list[dict[str, Any]]:
    rng = random.Random(f"demo/strings/{seed}")
    words: list[str] = []
    while len(words) < 250:
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 5)))
        answer, others = _look_alikes(word, "reverse")
        if word not in words and len({answer, *others}) == 4:  # no palindromes or repeated letters that collide
            words.append(word)
    chosen = words[200:] if split == "test" else words[:200]
    rows = []
    for word in chosen:
        op = rng.choice(["reverse", "uppercase"])
        answer, others = _look_alikes(word, op)
        rows.append(_multiple_choice(rng, f"{op} {word}", answer, others))
    return rows


def _sentiment(seed: int, split: str) -> list[dict[str, Any]]:
    rng = random.Random(f"demo/sentiment/{seed}/{split}")
    words = _lexicon(seed, _N_CREATURES + 2 * _N_SENTIMENT_WORDS)[_N_CREATURES:]
    polarity = {word: ("positive" if i < _N_SENTIMENT_WORDS else "negative") for i, word in enumerate(words)}
    patterns = _TEST_PATTERNS if split == "test" else _TRAIN_PATTERNS
    rows = [
        {"text": pattern.format(noun=noun, word=word), "label": polarity[word]}
        for pattern in patterns
        for noun in _NOUNS
        for word in words
    ]
    return rng.sample(rows, 60 if split == "test" else 200)


GENERATORS: dict[str, Callable[[int, str], list[dict[str, Any]]]] = {
    "facts": _facts,
    "arithmetic": _arithmetic,
    "strings": _strings,
    "sentiment": _sentiment,
}


def generate(task: str, split: str, seed: int = 0) -> list[dict[str, Any]]:
    """Rows of one demo task and split; the same seed always gives the same rows."""
    if task not in GENERATORS:
        raise KeyError(f"no demo task {task!r}; available: {', '.join(GENERATORS)}")
    if split not in SPLITS:
        raise KeyError(f"demo task {task!r} has no split {split!r}; available: {', '.join(SPLITS)}")
    return GENERATORS[task](seed, split)
