"""The tokenizer pre-flight on locally built tokenizer pairs that mimic real ones (nothing downloaded).

A base model and its instruct version share one token -> id map but call different tokens eos (Qwen2-7B:
`<|endoftext|>`; Qwen2-7B-Instruct: `<|im_end|>`): that passes with a warning naming both models and both
tokens. A real vocabulary mismatch (one extra token; two ids swapped) is a TokenizerMismatchError naming
both models and the first id they disagree on.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest

from common.config import config_from_dict
from common.data.tokenizer_check import check_tokenizers, special_token_choices, tokenizer_fingerprint
from teacher_service.errors import TokenizerMismatchError, TokenizerSpecialTokensWarning

WORDS = "the quick brown fox jumps over lazy dog sort numbers answer one two three".split()
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _save_tokenizer(out: Path, tokens: list[str], eos: str, pad: str, extra_special: list[str] | None = None) -> Path:
    """A word-level fast tokenizer whose vocabulary is exactly `tokens` (id = position), with chosen specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token=eos, pad_token=pad)
    fast.add_special_tokens({"additional_special_tokens": [t for t in QWEN_SPECIALS + (extra_special or [])
                                                           if t in tokens]})
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def toks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toks")
    vocab = ["[UNK]", *WORDS, *QWEN_SPECIALS]
    swapped = list(vocab)
    swapped[1], swapped[2] = swapped[2], swapped[1]  # "the" and "quick" re-numbered
    return {
        # Qwen2-7B-like base: eos = pad = <|endoftext|>
        "base": _save_tokenizer(root / "base", vocab, eos="<|endoftext|>", pad="<|endoftext|>"),
        # Qwen2-7B-Instruct-like: the same map, eos = <|im_end|>
        "instruct": _save_tokenizer(root / "instruct", vocab, eos="<|im_end|>", pad="<|endoftext|>"),
        "student": _save_tokenizer(root / "student", vocab, eos="<|endoftext|>", pad="<|endoftext|>"),
        "extra": _save_tokenizer(root / "extra", [*vocab, "<|tool|>"], eos="<|im_end|>", pad="<|endoftext|>",
                                 extra_special=["<|tool|>"]),
        "renumbered": _save_tokenizer(root / "renumbered", swapped, eos="<|endoftext|>", pad="<|endoftext|>"),
    }


def _cfg(base: Path, sft: Path, student: Path):
    return config_from_dict({"models": {"base_teacher": {"path": str(base)}, "sft_teacher": {"path": str(sft)},
                                        "student": {"path": str(student)}}, "loss": {"k": 4}})


def test_fingerprint_is_the_token_id_map(toks: dict[str, Path]) -> None:
    fp = {name: tokenizer_fingerprint(str(p)) for name, p in toks.items()}
    assert fp["base"] == fp["instruct"] == fp["student"]
    assert len({fp["base"], fp["extra"], fp["renumbered"]}) == 3
    assert special_token_choices(str(toks["base"]))["eos_token"] == "<|endoftext|>"
    assert special_token_choices(str(toks["instruct"]))["eos_token"] == "<|im_end|>"


def test_base_instruct_pair_passes_with_a_warning_naming_models_and_tokens(toks: dict[str, Path]) -> None:
    cfg = _cfg(toks["base"], toks["instruct"], toks["student"])
    with pytest.warns(TokenizerSpecialTokensWarning) as caught:
        info = check_tokenizers(cfg)
    assert info["fingerprint"] == tokenizer_fingerprint(str(toks["base"]))
    assert info["vocab_size"] == len(WORDS) + 1 + len(QWEN_SPECIALS)
    assert len(info["warnings"]) == 1  # only the instruct model differs from the student
    msg = str(caught[0].message)
    assert msg == info["warnings"][0]
    for text in (f"student={toks['student']}", f"sft={toks['instruct']}", "eos_token '<|endoftext|>' vs '<|im_end|>'"):
        assert text in msg, msg
    # Same choices everywhere: no warning at all.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_tokenizers(_cfg(toks["base"], toks["base"], toks["student"]))["warnings"] == []


@pytest.mark.parametrize("culprit, detail", [("extra", f"id {len(WORDS) + 4} is None vs '<|tool|>'"),
                                             ("renumbered", "id 1 is 'the' vs 'quick'")])
def test_a_real_vocabulary_mismatch_is_an_error(toks: dict[str, Path], culprit: str, detail: str) -> None:
    with pytest.raises(TokenizerMismatchError) as info:
        check_tokenizers(_cfg(toks[culprit], toks["instruct"], toks["student"]))
    msg = str(info.value)
    assert f"base={toks[culprit]}" in msg and f"sft={toks['instruct']}" in msg and detail in msg, msg
    again = pickle.loads(pickle.dumps(info.value))  # crosses Ray's process boundary intact
    assert str(again) == msg
