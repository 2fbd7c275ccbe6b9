"""The embedded default dataset: deterministic instruction -> response pairs, no files, no hub.

Six small word-level tasks (the ``topic`` column, usable for non-IID skew) over numbers written as
words-tokens ("0" .. "49") and a handful of nouns. A tiny model learns them within a few rounds, so
loss, perplexity and BLEU all move in the default run. Examples are distinct, so the eval split never
repeats a training example (see :func:`make_splits`).
"""

from __future__ import annotations

import random

from fedtune.data.schema import Example, Splits
from fedtune.errors import ConfigError

NOUNS = ("apple", "river", "stone", "cloud", "tiger", "lamp", "seed", "bird", "glass", "wolf")
TOPICS = ("reverse", "sort", "add", "max", "repeat", "next")
MAX_NUMBER = 50


def _example(rng: random.Random, topic: str) -> Example:
    nums = [rng.randrange(MAX_NUMBER) for _ in range(rng.randint(3, 6))]
    if topic == "reverse":
        words = [rng.choice(NOUNS) for _ in range(rng.randint(3, 6))]
        prompt, response = f"reverse the words : {' '.join(words)}", " ".join(reversed(words))
    elif topic == "sort":
        prompt, response = f"sort the numbers : {' '.join(map(str, nums))}", " ".join(map(str, sorted(nums)))
    elif topic == "add":
        a, b = rng.randrange(MAX_NUMBER // 2), rng.randrange(MAX_NUMBER // 2)
        prompt, response = f"add {a} and {b}", f"the sum is {a + b}"
    elif topic == "max":
        prompt, response = f"largest of : {' '.join(map(str, nums))}", f"the largest is {max(nums)}"
    elif topic == "repeat":  # 240 distinct: a noun or a number, 2..5 times
        word = rng.choice(NOUNS + tuple(map(str, range(MAX_NUMBER))))
        n = rng.randint(2, 5)
        prompt, response = f"repeat {word} {n} times", " ".join([word] * n)
    else:  # 200 distinct: steps of 1..4
        a, step = rng.randrange(MAX_NUMBER), rng.randint(1, 4)
        prompt, response = f"count on from {a} by {step}", " ".join(str(a + k * step) for k in (1, 2, 3))
    return {"prompt": prompt, "response": response, "topic": topic}


def make_splits(*, num_train: int = 600, num_eval: int = 60, seed: int = 0) -> Splits:
    """Generate the synthetic train/eval splits (topics in equal shares, shuffled).

    Eval examples are drawn first, distinct from each other; training examples are then drawn
    distinct from eval and, while a topic has unused examples left, from each other (a topic
    asked for more examples than it has, e.g. ``num_train=10000``, repeats training examples).
    """
    rng = random.Random(seed)
    topics = [TOPICS[i % len(TOPICS)] for i in range(num_train + num_eval)]
    rng.shuffle(topics)
    taken: set[tuple[str, str]] = set()
    exhausted: set[str] = set()
    eval_rows = [_distinct(rng, t, taken, exhausted, split="eval") for t in topics[num_train:]]
    eval_keys = set(taken)
    train_rows = [_distinct(rng, t, taken, exhausted, split="train", avoid=eval_keys) for t in topics[:num_train]]
    return Splits(train=train_rows, eval=eval_rows, task="generate", info={"source": "synthetic",
                                                                   "eval_from": "synthetic (data.source.num_eval)"})


def _distinct(
    rng: random.Random, topic: str, taken: set[tuple[str, str]], exhausted: set[str], *, split: str,
    avoid: set[tuple[str, str]] | None = None, tries: int = 2000,
) -> Example:
    """An example of ``topic`` not in ``taken`` (added to it); past a topic's supply, only not in ``avoid``."""
    for _ in range(tries):
        ex = _example(rng, topic)
        key = (ex["prompt"], ex["response"])
        if key not in taken or (topic in exhausted and avoid is not None and key not in avoid):
            taken.add(key)
            return ex
    if split == "eval" or avoid is None:
        raise ConfigError(f"data.source.num_eval: topic {topic!r} has too few distinct examples for the eval split")
    exhausted.add(topic)
    return _distinct(rng, topic, taken, exhausted, split=split, avoid=avoid, tries=tries)


def vocabulary() -> list[str]:
    """Every word the synthetic data can contain (used to build the embedded tokenizer)."""
    words = {str(i) for i in range(2 * MAX_NUMBER)} | set(NOUNS)
    rng = random.Random(0)
    for topic in TOPICS:
        for _ in range(20):
            ex = _example(rng, topic)
            words.update(ex["prompt"].split() + ex["response"].split())
    return sorted(words)
