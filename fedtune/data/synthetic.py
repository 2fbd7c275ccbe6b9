"""The embedded default dataset: deterministic instruction -> response pairs, no files, no hub.

Six small word-level tasks (the ``topic`` column, usable for non-IID skew) over numbers written as
words-tokens ("0" .. "49") and a handful of nouns. A tiny model learns them within a few rounds, so
loss, perplexity and BLEU all move in the default run.
"""

from __future__ import annotations

import random

from fedtune.data.schema import Example, Splits

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
    elif topic == "repeat":
        word = rng.choice(NOUNS)
        n = rng.randint(2, 5)
        prompt, response = f"repeat {word} {n} times", " ".join([word] * n)
    else:
        a = rng.randrange(MAX_NUMBER - 3)
        prompt, response = f"count on from {a}", f"{a + 1} {a + 2} {a + 3}"
    return {"prompt": prompt, "response": response, "topic": topic}


def make_splits(*, num_train: int = 600, num_eval: int = 60, seed: int = 0) -> Splits:
    """Generate the synthetic train/eval splits (topics in equal shares, shuffled)."""
    rng = random.Random(seed)
    rows = [_example(rng, TOPICS[i % len(TOPICS)]) for i in range(num_train + num_eval)]
    rng.shuffle(rows)
    return Splits(train=rows[:num_train], eval=rows[num_train:], task="generate", info={"source": "synthetic"})


def vocabulary() -> list[str]:
    """Every word the synthetic data can contain (used to build the embedded tokenizer)."""
    words = {str(i) for i in range(2 * MAX_NUMBER)} | set(NOUNS)
    rng = random.Random(0)
    for topic in TOPICS:
        for _ in range(20):
            ex = _example(rng, topic)
            words.update(ex["prompt"].split() + ex["response"].split())
    return sorted(words)
