"""The embedded instruction suite and corpus: deterministic, disjoint splits, exact answers, no format leak."""

from __future__ import annotations

import pytest

from common.tiny_world.suite import (
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


# ----------------------------------------------------------------------------------------------------
# format_shift stays bit for bit; the style_shift suite


def test_format_shift_suite_is_what_it_was_before_presets() -> None:
    """The first preset's splits, pinned: the models built from them (and the numbers measured on them)
    must not move when the style_shift code changes."""
    import hashlib
    import json

    default = generate_instruction_suite(0, num_train=2000, num_val=100, num_test=100)
    assert hashlib.sha256(json.dumps(default).encode()).hexdigest()[:16] == "d8c8738bcd5fa5b9"


def test_extra_test_examples_leave_the_rest_alone(suite: dict) -> None:
    more = generate_instruction_suite(0, **SIZES, num_test_extra=50)
    assert more["train"] == suite["train"] and more["validation"] == suite["validation"]
    assert more["test"][:60] == suite["test"] and len(more["test"]) == 110
    keys = {(r["instruction"], r["context"]) for r in more["train"] + more["validation"]}
    assert not keys & {(r["instruction"], r["context"]) for r in more["test"]}


STYLE = dict(num_train=400, num_val=40, num_test=200, num_pretrain=300)


@pytest.fixture(scope="module")
def style() -> dict[str, list[dict[str, str]]]:
    from common.tiny_world.suite import generate_style_suite

    return generate_style_suite(0, **STYLE)


def test_style_suite_sizes_disjoint_and_deterministic(style: dict) -> None:
    from common.tiny_world.suite import generate_style_suite

    assert {s: len(rows) for s, rows in style.items()} == {"train": 400, "validation": 40, "test": 200,
                                                          "pretrain": 300}
    assert generate_style_suite(0, **STYLE) == style and generate_style_suite(1, **STYLE) != style
    keys = [{(r["instruction"], r["context"]) for r in rows} for rows in style.values()]
    assert sum(len(k) for k in keys) == 940  # no question twice, in or across splits
    # A split's first examples do not depend on the other splits' sizes.
    other = generate_style_suite(0, num_train=50, num_val=40, num_test=200, num_pretrain=10)
    assert other["test"] == style["test"] and other["validation"] == style["validation"]
    assert other["train"] == style["train"][:50]
    assert {r["family"] for r in style["test"]} == set(FAMILIES)  # fact_qa's 72 questions reach test too


def test_sentence_answers_restate_the_exact_terse_answer(style: dict) -> None:
    for r in style["train"] + style["test"] + style["pretrain"]:
        sentence, terse = r["response"].split(), r["terse"].split()
        assert sentence[-1] == "." and 4 <= len(sentence) <= 16
        words = [w for w in sentence if w != ","]  # the terse answer, items comma-separated, inside the sentence
        assert any(words[i:i + len(terse)] == terse for i in range(len(words))), (r["response"], r["terse"])
    # The style differs from the terse answer everywhere: that is the shift SFT teaches.
    assert all(r["response"] != r["terse"] for r in style["test"])
    examples = {r["family"]: r["response"] for r in style["test"]}
    assert examples["fact_qa"].startswith("the ") and examples["arithmetic"].split()[1] in ("plus", "minus")


def test_embedded_suite_dispatches_on_the_preset() -> None:
    from common.config import EmbeddedConfig
    from common.tiny_world.suite import embedded_suite

    fmt = embedded_suite(EmbeddedConfig(num_train=30, num_val=5, num_test=5))
    assert fmt == generate_instruction_suite(0, 30, 5, 5)
    sty = embedded_suite(EmbeddedConfig(preset="style_shift", num_train=30, num_val=5, num_test=5, num_pretrain=7))
    assert set(sty) == {"train", "validation", "test", "pretrain"} and len(sty["pretrain"]) == 7


def test_preset_defaults_fill_only_absent_keys() -> None:
    from common.config import EMBEDDED_PRESET_DEFAULTS, EmbeddedConfig

    style = EmbeddedConfig(preset="style_shift")
    for key, value in EMBEDDED_PRESET_DEFAULTS["style_shift"].items():
        assert getattr(style, key) == value
    assert EmbeddedConfig(preset="style_shift", num_test=7).num_test == 7  # an explicit key wins
    assert EmbeddedConfig().num_test == 100  # the schema's defaults are format_shift's
    with pytest.raises(ValueError, match="preset"):
        EmbeddedConfig(preset="bogus")
