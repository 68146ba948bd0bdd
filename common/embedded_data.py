"""The embedded default's data: a generated instruction suite and a plain-text pretraining corpus.

Both are deterministic functions of a seed and use one small, closed vocabulary (a few hundred word
types), so a 512-entry word-level tokenizer covers every word and a tiny model can learn them on a CPU.

- `generate_instruction_suite` makes Dolly-style examples `{"instruction", "context", "response",
  "family"}` from eight task families, each with an exact reference answer computed by code, split into
  non-overlapping train / validation / test sets (no (instruction, context) pair appears twice).
- `generate_corpus` makes prose about the same objects, numbers, colours and lists, never in the
  instruction format: pretraining gives the base models the words and facts, and only SFT teaches the
  format and the tasks. That shift is what Delta-KD transfers to the student.

Words and punctuation are separated by single spaces so whitespace splitting tokenises them exactly.
Pure stdlib: no numpy, torch or transformers.
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = [
    "FAMILIES",
    "FACTS",
    "NUMBER_WORDS",
    "generate_instruction_suite",
    "generate_corpus",
    "number_to_words",
]

COLOURS = ["red", "green", "blue", "yellow", "black", "white", "brown", "pink", "grey", "orange"]
PLACES = ["kitchen", "garden", "farm", "forest", "river", "school", "house", "field", "city", "sea"]
SIZES = ["small", "big", "tall", "tiny", "long", "short"]
# A fixed fact table: object -> (colour, place, size). Fixed (not seeded) so the corpus, the training
# questions and the held-out questions all talk about the same world.
FACTS: dict[str, tuple[str, str, str]] = {
    "apple": ("red", "kitchen", "small"),
    "banana": ("yellow", "kitchen", "long"),
    "cat": ("black", "house", "small"),
    "dog": ("brown", "garden", "big"),
    "cow": ("white", "farm", "big"),
    "frog": ("green", "river", "tiny"),
    "fish": ("orange", "sea", "small"),
    "tree": ("green", "forest", "tall"),
    "rose": ("pink", "garden", "short"),
    "horse": ("brown", "field", "tall"),
    "pig": ("pink", "farm", "big"),
    "duck": ("white", "river", "small"),
    "bear": ("brown", "forest", "big"),
    "mouse": ("grey", "house", "tiny"),
    "bus": ("yellow", "city", "long"),
    "car": ("blue", "city", "small"),
    "book": ("blue", "school", "small"),
    "chair": ("brown", "school", "short"),
    "boat": ("white", "sea", "long"),
    "owl": ("grey", "forest", "small"),
    "sheep": ("white", "field", "small"),
    "whale": ("blue", "sea", "big"),
    "lamp": ("yellow", "house", "tall"),
    "cake": ("pink", "kitchen", "small"),
}
OBJECTS = sorted(FACTS)
# Extra list items: task lists mix objects, colours and these, so the list vocabulary is wider than the facts.
ITEMS = OBJECTS + COLOURS + ["sun", "moon", "star", "hat", "cup", "key", "door", "ball", "bird", "milk"]
NUMBER_WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth"]
MAX_NUMBER = 40  # numbers 0..40 appear as digit tokens; sums of two numbers <= 20 stay within it


def number_to_words(n: int) -> str:
    """0..20 -> its English word (the target of the `number_words` family)."""
    if not 0 <= n < len(NUMBER_WORDS):
        raise ValueError(f"number_to_words covers 0..{len(NUMBER_WORDS) - 1}, got {n}")
    return NUMBER_WORDS[n]


Example = dict[str, str]
# A family maker draws (instruction, context, response) from the rng; the response is exact.
Maker = Callable[[random.Random], tuple[str, str, str]]


def _word_list(rng: random.Random, lo: int = 3, hi: int = 5) -> list[str]:
    return rng.sample(ITEMS, rng.randint(lo, hi))


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    words = _word_list(rng)
    return "reverse the order of the words .", " ".join(words), " ".join(reversed(words))


def _sort(rng: random.Random) -> tuple[str, str, str]:
    nums = rng.sample(range(MAX_NUMBER + 1), rng.randint(3, 5))
    instruction = rng.choice(["sort the numbers from small to big .", "sort these numbers in order ."])
    return instruction, " ".join(map(str, nums)), " ".join(map(str, sorted(nums)))


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if rng.random() < 0.5:
        return f"what is {a} plus {b} ?", "", str(a + b)
    a, b = max(a, b), min(a, b)  # keep results non-negative: the vocabulary has no minus sign
    return f"what is {a} minus {b} ?", "", str(a - b)


def _kth_item(rng: random.Random) -> tuple[str, str, str]:
    words = _word_list(rng, 3, 6)
    k = rng.randrange(len(words))
    return f"what is the {ORDINALS[k]} word in the list ?", " ".join(words), words[k]


def _count(rng: random.Random) -> tuple[str, str, str]:
    words = _word_list(rng, 2, 6)
    return "how many words are in the list ?", " ".join(words), str(len(words))


def _fact_qa(rng: random.Random) -> tuple[str, str, str]:
    obj = rng.choice(OBJECTS)
    colour, place, size = FACTS[obj]
    kind = rng.randrange(3)
    if kind == 0:
        return f"what colour is the {obj} ?", "", colour
    if kind == 1:
        return f"where does the {obj} live ?", "", f"in the {place}"
    return f"what size is the {obj} ?", "", size


def _number_words(rng: random.Random) -> tuple[str, str, str]:
    nums = [rng.randint(0, len(NUMBER_WORDS) - 1) for _ in range(rng.randint(1, 4))]
    return "write the numbers in words .", " ".join(map(str, nums)), " ".join(map(number_to_words, nums))


def _last_item(rng: random.Random) -> tuple[str, str, str]:
    words = _word_list(rng, 2, 6)
    return "what is the last word in the list ?", " ".join(words), words[-1]


FAMILIES: dict[str, Maker] = {
    "reverse": _reverse,
    "sort": _sort,
    "arithmetic": _arithmetic,
    "kth_item": _kth_item,
    "count": _count,
    "fact_qa": _fact_qa,
    "number_words": _number_words,
    "last_item": _last_item,
}
_MAX_RETRIES = 200  # draws of one family before it counts as exhausted (every distinct example used)


def generate_instruction_suite(seed: int, num_train: int, num_val: int, num_test: int) -> dict[str, list[Example]]:
    """Deterministic train / validation / test splits of the generated instruction suite.

    Families are drawn uniformly; a drawn (instruction, context) pair already used anywhere is redrawn,
    so the splits are disjoint. Test is drawn first, then validation, then train, so the held-out sets do
    not change when only `num_train` changes. A family whose distinct examples run out (the fact table
    is finite) drops out; if all do, a ValueError names the shortfall.
    """
    for name, n in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    rng = random.Random(f"deltakd-suite-{seed}")
    seen: set[tuple[str, str]] = set()
    live = list(FAMILIES)
    out: dict[str, list[Example]] = {}
    for split, n in (("test", num_test), ("validation", num_val), ("train", num_train)):
        rows: list[Example] = []
        while len(rows) < n:
            if not live:
                raise ValueError(
                    f"instruction suite exhausted: {split} got {len(rows)} of {n} examples "
                    f"({len(seen)} distinct in all); ask for fewer"
                )
            family = rng.choice(live)
            for _ in range(_MAX_RETRIES):
                instruction, context, response = FAMILIES[family](rng)
                if (instruction, context) not in seen:
                    seen.add((instruction, context))
                    rows.append({"instruction": instruction, "context": context, "response": response,
                                 "family": family})
                    break
            else:
                live.remove(family)
        out[split] = rows
    return {"train": out["train"], "validation": out["validation"], "test": out["test"]}


# ----------------------------------------------------------------------------------------------------
# The pretraining corpus: prose about the same world, never "### Instruction:".


def _prose_fact(rng: random.Random) -> str:
    obj = rng.choice(OBJECTS)
    colour, place, size = FACTS[obj]
    return rng.choice([
        f"the {obj} is {colour} .",
        f"the {obj} lives in the {place} .",
        f"you can find the {obj} in the {place} .",
        f"the {obj} is {size} and {colour} .",
        f"a {size} {colour} {obj} lives in the {place} .",
        f"look at the {colour} {obj} !",
    ])


def _prose_numbers(rng: random.Random) -> str:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    n = rng.randint(0, len(NUMBER_WORDS) - 1)
    hi, lo = max(a, b), min(a, b)
    return rng.choice([
        f"{a} and {b} together make {a + b} .",
        f"if you take {lo} away from {hi} you get {hi - lo} .",
        f"we write {number_to_words(n)} as {n} .",
        f"there are {number_to_words(n)} birds , that is {n} birds .",
        f"{a} plus {b} is {a + b} and {hi} minus {lo} is {hi - lo} .",
    ])


def _prose_list(rng: random.Random) -> str:
    words = _word_list(rng, 2, 5)
    nums = rng.sample(range(MAX_NUMBER + 1), rng.randint(3, 5))
    said = " , ".join(words[:-1]) + f" and {words[-1]}"
    return rng.choice([
        f"i saw a {said} .",
        f"she put {number_to_words(len(words))} things in the box : {said} .",
        f"first came the {words[0]} and last came the {words[-1]} .",
        f"the cards read {' '.join(map(str, nums))} and in order they read {' '.join(map(str, sorted(nums)))} .",
        f"he said {' '.join(words)} and then backwards {' '.join(reversed(words))} .",
        f"the {ORDINALS[1]} thing was the {words[1]} .",
    ])


def generate_corpus(seed: int, num_sentences: int) -> list[str]:
    """`num_sentences` deterministic prose sentences (facts, numbers, lists) for pretraining.

    Roughly 40% facts, 30% numbers, 30% lists. Same words as the instruction suite, none of its
    format tokens (`###`, `Instruction`, `Input`, `Response`).
    """
    if num_sentences < 0:
        raise ValueError(f"num_sentences must be >= 0, got {num_sentences}")
    rng = random.Random(f"deltakd-corpus-{seed}")
    makers = [_prose_fact, _prose_fact, _prose_numbers, _prose_list, _prose_fact, _prose_numbers,
              _prose_list, _prose_fact, _prose_numbers, _prose_list]
    return [rng.choice(makers)(rng) for _ in range(num_sentences)]
