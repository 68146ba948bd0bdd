"""The `style_shift` preset's build (docs/EXPERIMENT.md: why it exists, and its conditions).

Called by `common.tiny_world.build.build_embedded_models` for `embedded.preset: style_shift`; the
cache, lock and marker are that module's, the training loop common/tiny_world/training.py's. What differs from `format_shift`:

- Pretraining documents. Each base reads its own prose draw (`generate_corpus`, the student base another
  stream) mixed with instruction-formatted examples from the suite's pretrain split, answered in the terse
  style: `round(f / (1 - f) * corpus_sentences)` of them for instruct fraction f, so they are f of the
  documents (base teacher 0.30, student base 0.15 by default). Each base samples its examples and shuffles
  its documents with its own seeded rng: another mix and another order.
- SFT teaches the sentence answer style (`common.tiny_world.suite.sentence_answer`) on the train split.
- Initial weights come from this module (`portable_init`): a PCG64 stream per model, uniform with std
  0.02 (norm weights 1), computed with numpy's exactly rounded float64 operations and cast to float32, so
  they are the same bits on every machine and for every transformers version.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import DataConfig, EmbeddedConfig
from common.data.batching import collate, tokenize_examples
from common.data.examples import format_prompt
from common.tiny_world.suite import generate_corpus, generate_style_suite
from common.tiny_world.training import (
    new_llama,
    packed_blocks,
    role_paths,
    save_built,
    train_causal_lm,
    train_sft_teacher,
    train_tokenizer,
)

__all__ = ["INIT_STD", "portable_init", "pretraining_documents", "build_style_into", "STUDENT_PLUS_STEPS",
           "STUDENT_PLUS_LADDER", "train_student_plus_into"]

INIT_STD = 0.02


def portable_init(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter, in name order: `*norm*` weights 1, biases 0, the rest uniform(-a, a)
    with a = INIT_STD * sqrt(3) (std INIT_STD), drawn from PCG64(seed) as float64 and rounded to float32."""
    rng = np.random.Generator(np.random.PCG64(seed))
    bound = INIT_STD * np.sqrt(3.0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                u = rng.random(tuple(p.shape))  # [0, 1) from 53 random bits: exact on every platform
                p.copy_(torch.from_numpy(((2.0 * u - 1.0) * bound).astype(np.float32)))


def pretraining_documents(ecfg: EmbeddedConfig, suite: dict[str, list[dict[str, str]]], role: str,
                          data_cfg: DataConfig) -> list[str]:
    """One base's pretraining documents: its prose draw and its share of terse instruction examples,
    shuffled by its own rng. role: "base_teacher" or "student"."""
    fraction = ecfg.teacher_instruct_fraction if role == "base_teacher" else ecfg.student_instruct_fraction
    prose = generate_corpus(ecfg.seed, ecfg.corpus_sentences, stream="" if role == "base_teacher" else "-student")
    n_instruct = round(fraction / (1.0 - fraction) * len(prose))
    pool = suite["pretrain"]
    if n_instruct > len(pool):
        raise ValueError(f"embedded.{role.replace('base_teacher', 'teacher')}_instruct_fraction={fraction} needs "
                         f"{n_instruct} instruction documents but embedded.num_pretrain is {len(pool)}")
    rng = random.Random(f"deltakd-style-mix-{ecfg.seed}-{role}")
    chosen = rng.sample(pool, n_instruct)
    docs = prose + [format_prompt(e["instruction"], e["context"], data_cfg) + " " + e["terse"] for e in chosen]
    rng.shuffle(docs)
    return docs


def build_style_into(ecfg: EmbeddedConfig, out: Path, progress: bool) -> dict[str, Any]:
    """Build the style_shift models into `out` (see the module docstring); returns the marker's info."""
    t0 = time.monotonic()
    out.mkdir(parents=True)
    paths = role_paths(out)
    suite = generate_style_suite(ecfg.seed, ecfg.num_train, ecfg.num_val, ecfg.num_test, ecfg.num_pretrain)
    data_cfg = DataConfig(max_length=ecfg.max_length, overlong="truncate")
    docs = {role: pretraining_documents(ecfg, suite, role, data_cfg) for role in ("base_teacher", "student")}
    prompts = [format_prompt(e["instruction"], e["context"], data_cfg) for e in suite["train"]]
    sft_texts = [p + " " + e["response"] for p, e in zip(prompts, suite["train"])]
    tokenizer = train_tokenizer(docs["base_teacher"] + docs["student"] + sft_texts, ecfg.vocab_size,
                                    paths["tokenizer"])
    max_positions = max(512, ecfg.max_length)
    block = min(ecfg.max_length, 64)
    info: dict[str, Any] = {"vocab": len(tokenizer), "preset": "style_shift"}
    for role, shape, seed in (("base_teacher", ecfg.teacher, ecfg.seed * 1000 + 1),
                              ("student", ecfg.student, ecfg.seed * 1000 + 2)):
        blocks = packed_blocks(docs[role], tokenizer, block)
        full_mask = torch.ones_like(blocks[:1], dtype=torch.long)
        gen = torch.Generator().manual_seed(seed)

        def batch(step: int, blocks: torch.Tensor = blocks, full_mask: torch.Tensor = full_mask,
                  gen: torch.Generator = gen) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            x = blocks[torch.randint(len(blocks), (ecfg.batch_size,), generator=gen)]
            labels = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)
            return x, full_mask.expand_as(x), labels

        model = new_llama(shape, tokenizer, seed, max_positions)
        portable_init(model, seed)
        info[f"{role}_pretrain_loss"] = train_causal_lm(model, batch, ecfg.pretrain_steps, ecfg.lr, f"pretrain {role}",
                                                  progress)
        info[f"{role}_pretrain_documents"] = len(docs[role])
        info[f"{role}_pretrain_blocks"] = int(len(blocks))
        info[f"{role}_params"] = save_built(model, tokenizer, paths[role])

    info["sft_teacher_train_loss"] = train_sft_teacher(paths, prompts, suite, tokenizer, data_cfg, ecfg, progress)
    info["build_seconds"] = round(time.monotonic() - t0, 1)
    return info


# ----------------------------------------------------------------------------------------------------
# S0+ (issue 23, world B): the style_shift student base further trained on the train split's questions
# answered in its own terse style with the right content. Pre-registered: the fewest steps of the ladder
# that give >= 80 % exact terse answers on the validation split. Measured (scripts/student_plus_ladder.py,
# docs/results/paper_axis/style-B1/student_plus_ladder.md): no rung up to 6400 reaches it (0.685 at
# 6400, the highest), so S0+ is the 6400-step model (docs/EXPERIMENT.md, world B, says so). The cache
# (build.py `build_student_plus`) keys on the steps.
STUDENT_PLUS_STEPS = 6400
STUDENT_PLUS_LADDER = (50, 100, 200, 400, 800, 1600, 3200, 6400)


def train_student_plus_into(ecfg: EmbeddedConfig, student_dir: Path, out: Path, steps: int,
                            progress: bool) -> dict[str, Any]:
    """Fine-tune the student base in `student_dir` on `prompt + " " + terse` for every train example
    (loss on the answer and its eos only; batches of ecfg.batch_size drawn by a generator seeded from
    ecfg.seed, AdamW at ecfg.lr with train_causal_lm's schedule) for `steps` steps; save it with its
    tokenizer into `out`. Returns the marker's info."""
    # deferred: transformers costs ~1.7 s at import (measured); a run whose tiny world is built already
    # imports this module (through common/tiny_world/build.py) without needing it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    suite = generate_style_suite(ecfg.seed, ecfg.num_train, ecfg.num_val, ecfg.num_test, ecfg.num_pretrain)
    data_cfg = DataConfig(max_length=ecfg.max_length, overlong="truncate")
    tokenizer = AutoTokenizer.from_pretrained(str(student_dir))
    examples = [{"prompt": format_prompt(e["instruction"], e["context"], data_cfg), "response": e["terse"]}
                for e in suite["train"]]
    tokenized = tokenize_examples(examples, tokenizer, data_cfg)
    model = AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=torch.float32)
    gen = torch.Generator().manual_seed(ecfg.seed * 1000 + 4)

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(tokenized), (ecfg.batch_size,), generator=gen).tolist()
        b = collate([tokenized[i] for i in idx], tokenizer.pad_token_id)
        return (torch.from_numpy(b["input_ids"]).long(), torch.from_numpy(b["attention_mask"]).long(),
                torch.from_numpy(b["labels"]))

    out.mkdir(parents=True)
    loss = train_causal_lm(model, batches, steps, ecfg.lr, "S0+ (terse answers)", progress)
    save_built(model, tokenizer, out)
    return {"role": "student_plus", "steps": steps, "train_loss": loss, "build_seconds": round(time.monotonic() - t0, 1)}
