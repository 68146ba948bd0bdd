"""The embedded instruction suite and corpus: deterministic, disjoint splits, exact answers, no format leak."""

from __future__ import annotations

import pytest

from common.embedded_data import (
    FACTS,
    FAMILIES,
    generate_corpus,
    generate_instruction_suite,
    number_to_words,
)

SIZES = dict(num_train=600, num_val=60, num_test=60)


@pytest.fixture(scope="module")
def suite() -> dict[str, list[dict[str, str]]]:
    return generate_instruction_suite(0, **SIZES)


def test_same_seed_same_output_different_seed_different(suite: dict) -> None:
    assert generate_instruction_suite(0, **SIZES) == suite
    assert generate_instruction_suite(1, **SIZES) != suite
    assert generate_corpus(3, 200) == generate_corpus(3, 200)
    assert generate_corpus(3, 200) != generate_corpus(4, 200)


def test_sizes_fields_and_families(suite: dict) -> None:
    assert [len(suite[s]) for s in ("train", "validation", "test")] == [600, 60, 60]
    for rows in suite.values():
        for r in rows:
            assert set(r) == {"instruction", "context", "response", "family"}
            assert r["instruction"].strip() and r["response"].strip()
            assert len(r["response"].split()) <= 12
    assert len(FAMILIES) >= 6
    assert {r["family"] for r in suite["train"]} == set(FAMILIES)
    assert len({r["family"] for r in suite["test"]}) >= 6


def test_splits_disjoint(suite: dict) -> None:
    keys = {s: {(r["instruction"], r["context"]) for r in rows} for s, rows in suite.items()}
    assert sum(len(k) for k in keys.values()) == 720  # no duplicate inside a split either
    assert not keys["train"] & keys["test"]
    assert not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]


def test_held_out_sets_do_not_depend_on_num_train(suite: dict) -> None:
    other = generate_instruction_suite(0, num_train=100, num_val=60, num_test=60)
    assert other["test"] == suite["test"] and other["validation"] == suite["validation"]


def test_answers_are_exact(suite: dict) -> None:
    checked: set[str] = set()
    for r in suite["train"] + suite["test"]:
        fam, inst, ctx, resp = r["family"], r["instruction"], r["context"], r["response"]
        words = ctx.split()
        if fam == "reverse":
            assert resp.split() == words[::-1]
        elif fam == "sort":
            assert [int(x) for x in resp.split()] == sorted(int(x) for x in words)
        elif fam == "arithmetic":
            _, _, a, op, b, _ = inst.split()
            assert int(resp) == (int(a) + int(b) if op == "plus" else int(a) - int(b))
        elif fam == "count":
            assert int(resp) == len(words)
        elif fam == "last_item":
            assert resp == words[-1]
        elif fam == "kth_item":
            ordinal = inst.split()[3]
            k = ["first", "second", "third", "fourth", "fifth", "sixth"].index(ordinal)
            assert resp == words[k]
        elif fam == "number_words":
            assert resp.split() == [number_to_words(int(x)) for x in words]
        elif fam == "fact_qa":
            (obj,) = [w for w in inst.split() if w in FACTS]
            assert resp in (FACTS[obj][0], f"in the {FACTS[obj][1]}", FACTS[obj][2])
        checked.add(fam)
    assert checked == set(FAMILIES)


def test_corpus_is_prose_over_the_same_small_vocabulary(suite: dict) -> None:
    corpus = generate_corpus(0, 2000)
    assert len(corpus) == 2000
    text = " ".join(corpus)
    for marker in ("###", "Instruction", "Response", "Input"):
        assert marker not in text
    corpus_words = set(text.split())
    suite_words = {w for rows in suite.values() for r in rows
                   for w in f"{r['instruction']} {r['context']} {r['response']}".split()}
    assert len(corpus_words | suite_words) < 400  # a 512-entry word-level vocabulary covers it
    # Every object of the fact table and every answer word of the test split is seen in pretraining.
    assert set(FACTS) <= corpus_words
    answer_words = {w for r in suite["test"] for w in r["response"].split()}
    assert len(answer_words - corpus_words) <= 0.1 * len(answer_words)


def test_bad_sizes_are_errors() -> None:
    with pytest.raises(ValueError, match="num_test"):
        generate_instruction_suite(0, 1, 1, -1)
    with pytest.raises(ValueError, match="num_sentences"):
        generate_corpus(0, -5)
