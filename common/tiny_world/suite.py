"""The embedded default's data: a generated instruction suite and a plain-text pretraining corpus.

Both are deterministic functions of a seed and use one small, closed vocabulary (a few hundred word
types), so a 512-entry word-level tokenizer covers every word and a tiny model can learn them on a CPU.

- `generate_instruction_suite` makes Dolly-style examples `{"instruction", "context", "response",
  "family"}` from eight task families, each with an exact reference answer computed by code, split into
  non-overlapping train / validation / test sets (no (instruction, context) pair appears twice).
- `generate_corpus` makes prose about the same objects, numbers, colours and lists, never in the
  instruction format: pretraining gives the base models the words and facts, and only SFT teaches the
  format and the tasks. That shift is what Delta-KD transfers to the student.

Two presets use them (`embedded.preset`, docs/EXPERIMENT.md says why each exists):

- `format_shift` (the first one, unchanged): the suite above; the bases see prose only.
- `style_shift` (`generate_style_suite`): the same tasks, each with two answers: `terse` (the bare answer,
  the bases' own style, mixed into their pretraining as instruction-formatted documents) and `response`
  (`sentence_answer`: one full sentence restating the question, items separated by commas, ending with a
  full stop; the style only SFT teaches). Splits are assigned by a hash of the question: test, validation,
  train (SFT and distillation) and pretrain (the bases' instruction documents), disjoint by construction.

`embedded_suite(ecfg)` returns the splits of whichever preset the config names.

Words and punctuation are separated by single spaces so whitespace splitting tokenises them exactly.
Pure stdlib: no numpy, torch or transformers.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from typing import Any

__all__ = [
    "FAMILIES",
    "FACTS",
    "NUMBER_WORDS",
    "PRESETS",
    "STYLE_SPLIT_SHARES",
    "generate_instruction_suite",
    "generate_style_suite",
    "generate_corpus",
    "embedded_suite",
    "number_to_words",
    "sentence_answer",
]

PRESETS = ("format_shift", "style_shift")

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


def generate_instruction_suite(seed: int, num_train: int, num_val: int, num_test: int,
                               num_test_extra: int = 0) -> dict[str, list[Example]]:
    """Deterministic train / validation / test splits of the generated instruction suite (`format_shift`).

    Families are drawn uniformly; a drawn (instruction, context) pair already used anywhere is redrawn,
    so the splits are disjoint. Test is drawn first, then validation, then train, so the held-out sets do
    not change when only `num_train` changes. A family whose distinct examples run out (the fact table
    is finite) drops out; if all do, a ValueError names the shortfall.

    `num_test_extra` more test examples are drawn AFTER train and appended to test: a larger held-out set
    that leaves train, validation and the first `num_test` test examples (so the models built from them)
    exactly as they are. Families exhausted by then (fact_qa's 72 questions) are missing from the extra part.
    """
    for name, n in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test),
                    ("num_test_extra", num_test_extra)):
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    rng = random.Random(f"deltakd-suite-{seed}")
    seen: set[tuple[str, str]] = set()
    live = list(FAMILIES)
    out: dict[str, list[Example]] = {}
    for split, n in (("test", num_test), ("validation", num_val), ("train", num_train),
                     ("test_extra", num_test_extra)):
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
    return {"train": out["train"], "validation": out["validation"], "test": out["test"] + out["test_extra"]}


# ----------------------------------------------------------------------------------------------------
# The style_shift preset: the same tasks, a terse answer (the bases' style) and a sentence answer (SFT's)


def _items(text: str) -> str:
    return " , ".join(text.split())


def sentence_answer(family: str, instruction: str, context: str, terse: str) -> str:
    """The SFT style of `style_shift`: one sentence that restates the question around the exact (terse)
    answer, list items separated by " , ", ending with " .". Pure function of the example (no rng)."""
    words = instruction.split()
    if family == "reverse":
        return f"the reversed list is {_items(terse)} ."
    if family == "sort":
        return f"the sorted numbers are {_items(terse)} ."
    if family == "arithmetic":  # "what is {a} plus|minus {b} ?"
        return f"{words[2]} {words[3]} {words[4]} is {terse} ."
    if family == "kth_item":  # "what is the {ordinal} word in the list ?"
        return f"the {words[3]} word is {terse} ."
    if family == "count":
        return f"the list has {terse} words ."
    if family == "fact_qa":  # "what colour is the {obj} ?" / "where does the {obj} live ?" / "what size ..."
        obj = words[-2] if words[0] == "what" else words[3]
        return f"the {obj} lives {terse} ." if words[0] == "where" else f"the {obj} is {terse} ."
    if family == "number_words":
        return f"the numbers in words are {_items(terse)} ."
    if family == "last_item":
        return f"the last word is {terse} ."
    raise ValueError(f"no sentence style for family {family!r}")


# Shares of the question space (by hash) per split. Test and validation get more than their counts need,
# so small families (fact_qa has 72 questions) still reach every split.
STYLE_SPLIT_SHARES = (("test", 0.20), ("validation", 0.05), ("train", 0.40), ("pretrain", 0.35))
_STYLE_PATIENCE = 50_000  # candidates in a row that add nothing before the pools count as exhausted


def _split_of(seed: int, instruction: str, context: str) -> str:
    """The split a question belongs to: a hash of (seed, instruction, context) mapped onto the shares."""
    digest = hashlib.sha256(f"{seed}\x1f{instruction}\x1f{context}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    edge = 0.0
    for split, share in STYLE_SPLIT_SHARES:
        edge += share
        if u < edge:
            return split
    return STYLE_SPLIT_SHARES[-1][0]


def generate_style_suite(seed: int, num_train: int, num_val: int, num_test: int,
                         num_pretrain: int) -> dict[str, list[Example]]:
    """Deterministic splits of the `style_shift` suite: train / validation / test / pretrain.

    Each example: {"instruction", "context", "response" (sentence style), "terse" (bare answer), "family"}.
    One seeded stream of candidate questions (family uniform, then the family's maker) is read in order;
    each new question goes to the split its hash names (`_split_of`), or is dropped when that split is
    full. The stream does not depend on the sizes, so a split's first examples do not depend on the other
    splits' sizes; the splits are disjoint by construction and each family reaches every split in
    proportion to its pool. If `_STYLE_PATIENCE` candidates in a row add nothing before every split is
    full (the question pools are exhausted), a ValueError names the shortfall.
    """
    want = {"train": num_train, "validation": num_val, "test": num_test, "pretrain": num_pretrain}
    for name, n in want.items():
        if n < 0:
            raise ValueError(f"style suite: the {name} size must be >= 0, got {n}")
    rng = random.Random(f"deltakd-style-suite-{seed}")
    families = list(FAMILIES)
    seen: set[tuple[str, str]] = set()
    out: dict[str, list[Example]] = {name: [] for name in want}
    idle = 0
    while any(len(out[s]) < n for s, n in want.items()):
        if idle >= _STYLE_PATIENCE:
            short = {s: f"{len(out[s])} of {n}" for s, n in want.items() if len(out[s]) < n}
            raise ValueError(f"style suite exhausted ({len(seen)} distinct questions drawn): {short}; ask for fewer")
        family = rng.choice(families)
        instruction, context, terse = FAMILIES[family](rng)
        key = (instruction, context)
        split = _split_of(seed, instruction, context)
        if key in seen or len(out[split]) >= want[split]:
            idle += 1
            continue
        seen.add(key)
        idle = 0
        out[split].append({"instruction": instruction, "context": context, "terse": terse, "family": family,
                           "response": sentence_answer(family, instruction, context, terse)})
    return out


def embedded_suite(ecfg: Any) -> dict[str, list[Example]]:
    """The splits (train, validation, test, and for style_shift pretrain) of the preset `ecfg.preset`
    (an EmbeddedConfig), sized by its fields."""
    preset = getattr(ecfg, "preset", "format_shift")
    if preset == "format_shift":
        return generate_instruction_suite(ecfg.seed, ecfg.num_train, ecfg.num_val, ecfg.num_test,
                                          ecfg.num_test_extra)
    if preset == "style_shift":
        return generate_style_suite(ecfg.seed, ecfg.num_train, ecfg.num_val, ecfg.num_test, ecfg.num_pretrain)
    raise ValueError(f"embedded.preset: unknown preset {preset!r}; expected one of {list(PRESETS)}")


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


def generate_corpus(seed: int, num_sentences: int, stream: str = "") -> list[str]:
    """`num_sentences` deterministic prose sentences (facts, numbers, lists) for pretraining.

    Roughly 40% facts, 30% numbers, 30% lists. Same words as the instruction suite, none of its
    format tokens (`###`, `Instruction`, `Input`, `Response`). `stream` names an independent draw for the
    same seed (style_shift's student base reads its own); "" is the format_shift corpus.
    """
    if num_sentences < 0:
        raise ValueError(f"num_sentences must be >= 0, got {num_sentences}")
    rng = random.Random(f"deltakd-corpus-{seed}{stream}")
    makers = [_prose_fact, _prose_fact, _prose_numbers, _prose_list, _prose_fact, _prose_numbers,
              _prose_list, _prose_fact, _prose_numbers, _prose_list]
    return [rng.choice(makers)(rng) for _ in range(num_sentences)]
