"""The pieces every tiny-world preset builds its models with: a word-level tokenizer, a small Llama, the
causal-LM training loop, packed pretraining blocks and the SFT teacher's fine-tune. No cache logic here
(common/tiny_world/build.py owns the cache, the lock and the marker).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

from common.config import EmbeddedModelShape
from common.data.batching import collate, tokenize_examples

__all__ = ["EMBEDDED_ROLES", "EmbeddedBuildError", "role_paths", "train_tokenizer", "new_llama", "train_causal_lm",
           "packed_blocks", "train_sft_teacher", "save_built"]

EMBEDDED_ROLES = ("base_teacher", "sft_teacher", "student")
# embedded.sft_teacher: lora puts the adapter on every linear layer of the Llama blocks (not the LM head)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "bos_token": "[BOS]", "eos_token": "[EOS]"}


class EmbeddedBuildError(RuntimeError):
    """The embedded build failed; the message names the step and the cache directory."""


def role_paths(build_dir: Path) -> dict[str, Path]:
    """Where a build directory keeps the tokenizer and each role's model."""
    return {"tokenizer": build_dir / "tokenizer", **{r: build_dir / r for r in EMBEDDED_ROLES}}




def train_tokenizer(texts: list[str], vocab_size: int, out: Path) -> Any:
    # deferred: transformers costs ~1.4 s at import (measured); build.py imports this module on every run,
    # also when the models are already built
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=_SPECIALS["unk_token"]))
    # Whitespace splits words from punctuation ("Instruction:" -> "Instruction", ":"), so the format
    # costs a handful of tokens and every generated word is one token.
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=list(_SPECIALS.values()))
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **_SPECIALS)
    fast.save_pretrained(str(out))
    return fast


def new_llama(shape: EmbeddedModelShape, tokenizer: Any, seed: int, max_positions: int) -> Any:
    # deferred: transformers costs ~3.9 s with its Llama classes at import (measured); build.py imports this module on every run,
    # also when the models are already built
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=max_positions,
        attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def _lr_at(step: int, total: int, peak: float) -> float:
    """Linear warmup over 5% of the steps, then cosine decay to 10% of the peak."""
    warm = max(1, total // 20)
    if step < warm:
        return peak * (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train_causal_lm(model: Any, batches: Any, steps: int, lr: float, desc: str, progress: bool) -> float:
    """AdamW on next-token CE; `batches(step)` -> (input_ids [B,T], attention_mask [B,T], labels [B,T])
    with labels already aligned to positions (labels[t] is the token after t, -100 where not trained).
    Returns the mean loss of the last 10% of steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    model.train()
    tail: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        input_ids, attention_mask, labels = batches(step)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        if not torch.isfinite(loss):
            raise EmbeddedBuildError(f"{desc}: loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return sum(tail) / len(tail)


def packed_blocks(corpus: list[str], tokenizer: Any, block: int) -> torch.Tensor:
    """[N, block] long: the corpus as one stream `bos s1 eos bos s2 eos ...`, cut into full blocks."""
    stream: list[int] = []
    for ids in tokenizer(corpus, add_special_tokens=False)["input_ids"]:
        stream += [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    n = len(stream) // block
    if n == 0:
        raise EmbeddedBuildError(f"corpus of {len(stream)} tokens is shorter than one block of {block}")
    return torch.tensor(stream[: n * block], dtype=torch.long).view(n, block)


def train_sft_teacher(paths: dict, prompts: list[str], suite: dict, tokenizer: Any, data_cfg: Any, ecfg: Any,
                 progress: bool) -> float:
    """SFT: the base teacher learns the format and tasks from the train split (loss on response tokens only).

    Loads `paths["base_teacher"]`, saves `paths["sft_teacher"]`; returns the last training loss. Shared by
    both presets (format_shift.py, style.py). ecfg.sft_teacher: "full" fine-tunes every weight; "lora" trains
    a LoRA adapter (rank ecfg.lora_rank, alpha ecfg.lora_alpha, lr ecfg.lora_lr; LORA_TARGETS) and saves the
    adapter alone with the tokenizer beside it (the base stays at `paths["base_teacher"]`).
    """
    # deferred: transformers costs ~1.6 s at import (measured); build.py imports this module on every run,
    # also when the models are already built
    from transformers import AutoModelForCausalLM

    examples = [{"prompt": p, "response": e["response"]} for p, e in zip(prompts, suite["train"])]
    tokenized = tokenize_examples(examples, tokenizer, data_cfg)
    teacher = AutoModelForCausalLM.from_pretrained(str(paths["base_teacher"]), dtype=torch.float32)
    gen = torch.Generator().manual_seed(ecfg.seed * 1000 + 3)

    def sft_batches(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(tokenized), (ecfg.batch_size,), generator=gen).tolist()
        b = collate([tokenized[i] for i in idx], tokenizer.pad_token_id)
        return (torch.from_numpy(b["input_ids"]).long(), torch.from_numpy(b["attention_mask"]).long(),
                torch.from_numpy(b["labels"]))

    if ecfg.sft_teacher == "lora":
        return _train_lora(teacher, sft_batches, tokenizer, paths["sft_teacher"], ecfg, progress)
    loss = train_causal_lm(teacher, sft_batches, ecfg.sft_steps, ecfg.lr, "SFT teacher", progress)
    save_built(teacher, tokenizer, paths["sft_teacher"])
    return loss


def _train_lora(base: Any, batches: Any, tokenizer: Any, out: Path, ecfg: Any, progress: bool) -> float:
    """A LoRA adapter of `base` trained on the SFT batches (the base weights frozen); saved with the tokenizer."""
    # deferred: peft imports transformers' model classes; only a LoRA build needs it
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base, LoraConfig(r=ecfg.lora_rank, lora_alpha=ecfg.lora_alpha, lora_dropout=0.0,
                                            target_modules=LORA_TARGETS))
    loss = train_causal_lm(model, batches, ecfg.sft_steps, ecfg.lora_lr, "SFT teacher (LoRA)", progress)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return loss


def save_built(model: Any, tokenizer: Any, path: Path) -> int:
    """Save a built model with its tokenizer beside it (loads like a hub model); returns its parameter count."""
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return sum(p.numel() for p in model.parameters())
