"""Tiny real models for tests: a word-level tokenizer trained on the spot and random-initialised Llamas.

Nothing is downloaded. Models are saved in Hugging Face format (safetensors), so every code path loads
them exactly as it would load a hub model by local path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_TEXT = (
    "the quick brown fox jumps over the lazy dog . reverse the words : red green blue . "
    "sort the numbers : 3 1 2 . answer : 1 2 3 . instruction response input output "
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
    "one two three four five six seven eight nine ten # ### : \n"
)


def make_tokenizer(out_dir: str | Path, extra_words: str = "") -> Path:
    """Train a word-level tokenizer (with an [UNK]) and save it as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]"])
    tok.train_from_iterator([TINY_TEXT + " " + extra_words], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )
    fast.save_pretrained(str(out))
    return out


def make_llama(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 64,
    vocab_pad: int = 0,
) -> Path:
    """A random-initialised LlamaForCausalLM sharing `tokenizer_dir`'s vocabulary.

    vocab_pad > 0 adds padded embedding rows beyond the tokenizer's size (like 152064 vs 151936).
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = LlamaConfig(
        vocab_size=len(tok) + vocab_pad,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    # Larger logits than the default init so distributions are far from uniform (tests see real top-k).
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    out = Path(out_dir)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def make_model_set(root: str | Path, vocab_pad: int = 0) -> dict[str, Path]:
    """Tokenizer + base teacher, SFT teacher (different seed), student: paths by role."""
    root = Path(root)
    tok = make_tokenizer(root / "tokenizer")
    return {
        "tokenizer": tok,
        "base_teacher": make_llama(root / "base_teacher", tok, seed=1, vocab_pad=vocab_pad),
        "sft_teacher": make_llama(root / "sft_teacher", tok, seed=2, vocab_pad=vocab_pad),
        "student": make_llama(root / "student", tok, seed=3, hidden_size=16, num_heads=2, intermediate_size=32),
    }


def state_digest(model: Any) -> str:
    """sha256 over every parameter and buffer of a torch module (name, dtype, bytes), in name order: a test's
    check that a call left a model's weights untouched, or that a restore brought back the same ones."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
