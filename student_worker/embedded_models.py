"""The embedded default's tiny models: built once on the CPU, cached, and loaded like hub models.

`build_embedded_models(ecfg)` returns local paths by role (`tokenizer`, `base_teacher`, `sft_teacher`,
`student`). The build of the `format_shift` preset (the first one; unchanged, bit for bit):

1. trains a word-level tokenizer (`tokenizers`) on the corpus plus the formatted train split, so every
   word of the prompt format is in the vocabulary, and saves it as a PreTrainedTokenizerFast;
2. pretrains a Llama base teacher and a smaller Llama student base on the prose corpus only
   (causal LM on packed blocks of sentences);
3. fine-tunes the SFT teacher from the base teacher on the train split with the default prompt
   template (loss on response tokens only, batches from `student_worker.data`).

The `style_shift` preset (docs/EXPERIMENT.md) differs in what the models read: each base's pretraining
documents are its own prose draw mixed with instruction-formatted examples answered tersely (the bases'
style; `teacher_instruct_fraction` / `student_instruct_fraction` of the documents, from the suite's
pretrain split), and SFT teaches the sentence answer style. Its weights are initialised by this module
from a seeded PCG64 stream (uniform, std 0.02; norms 1), not by transformers' `_init_weights`, so the
initial weights do not depend on the transformers version or on the CPU's vector width.

Cache: `<cache_root>/embedded-<hash>`, where the hash covers every EmbeddedConfig field that affects the
build and BUILD_VERSION (format_shift's key is what it was before presets existed). A build goes into a temp dir beside it that is renamed into place only when
complete, with a `COMPLETE` JSON marker written last. A missing marker or an unreadable weights file
makes the directory invalid: it is removed and rebuilt. An fcntl lock serialises concurrent builders.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from common.config import ConfigError, DataConfig, EmbeddedConfig, EmbeddedModelShape, ModelSpec, RunConfig
from common.embedded_data import generate_corpus, generate_instruction_suite
from common.reproducibility import apply_compute_settings, compute_info
from student_worker.data import collate, format_prompt, tokenize_examples

__all__ = [
    "BUILD_VERSION",
    "EMBEDDED_ROLES",
    "EMBEDDED_PREFIX",
    "EmbeddedBuildError",
    "build_key",
    "cache_root",
    "build_embedded_models",
    "resolve_model_paths",
]

# Bump when the build code changes what it produces: old caches are then ignored, never reused.
BUILD_VERSION = "1"  # format_shift
STYLE_BUILD_VERSION = "1"  # style_shift
# EmbeddedConfig keys that never change a build, and the keys only style_shift reads (left out of
# format_shift's key, so its cache directories keep the names they had before presets existed).
_NOT_BUILD_KEYS = {"cache_dir", "build_threads", "num_test_extra"}
_STYLE_ONLY_KEYS = {"preset", "num_pretrain", "teacher_instruct_fraction", "student_instruct_fraction"}
EMBEDDED_PREFIX = "embedded:"
EMBEDDED_ROLES = ("base_teacher", "sft_teacher", "student")
_MARKER = "COMPLETE"
_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "bos_token": "[BOS]", "eos_token": "[EOS]"}


class EmbeddedBuildError(RuntimeError):
    """The embedded build failed; the message names the step and the cache directory."""


def build_key(ecfg: EmbeddedConfig) -> str:
    """16 hex chars of sha256 over the build-relevant config and the preset's build version."""
    style = ecfg.preset == "style_shift"
    fields = ecfg.model_dump(mode="json", exclude=_NOT_BUILD_KEYS | (set() if style else _STYLE_ONLY_KEYS))
    payload = {"version": BUILD_VERSION, "embedded": fields, "prompt": DataConfig().prompt_template,
               "context": DataConfig().context_template}
    if style:
        payload["style_version"] = STYLE_BUILD_VERSION
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def cache_root(ecfg: EmbeddedConfig) -> Path:
    """ecfg.cache_dir, else $DELTAKD_CACHE, else ~/.cache/deltakd."""
    root = ecfg.cache_dir or os.environ.get("DELTAKD_CACHE") or "~/.cache/deltakd"
    return Path(root).expanduser()


def _role_paths(build_dir: Path) -> dict[str, Path]:
    return {"tokenizer": build_dir / "tokenizer", **{r: build_dir / r for r in EMBEDDED_ROLES}}


def _is_complete(build_dir: Path, key: str) -> bool:
    """True when the marker names `key` and every model's safetensors and the tokenizer read back."""
    from safetensors import safe_open

    try:
        marker = json.loads((build_dir / _MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if marker.get("key") != key:
        return False
    paths = _role_paths(build_dir)
    if not (paths["tokenizer"] / "tokenizer.json").is_file():
        return False
    for role in EMBEDDED_ROLES:
        weights = paths[role] / "model.safetensors"
        if not (paths[role] / "config.json").is_file() or not (paths[role] / "tokenizer.json").is_file():
            return False
        try:  # reading every tensor catches truncated files too; the models are a few MB
            with safe_open(str(weights), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    f.get_tensor(name)
        except Exception:  # any failure to read the weights means the cache cannot be trusted
            return False
    return True


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run the build with n intra-op threads, restoring the caller's setting after. On a 2-core machine
    that other processes share, 2 threads on these tiny matrices spend most of their time spinning: a
    measured step took 14x longer than with 1 thread under load."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_embedded_models(ecfg: EmbeddedConfig, progress: bool = True) -> dict[str, Path]:
    """Paths by role (tokenizer, base_teacher, sft_teacher, student) of the cached build, building if needed."""
    root = cache_root(ecfg)
    key = build_key(ecfg)
    final = root / f"embedded-{key}"
    if _is_complete(final, key):
        return _role_paths(final)
    with _file_lock(root / f"embedded-{key}.lock"):
        if _is_complete(final, key):  # another process finished it while we waited
            return _role_paths(final)
        if final.exists():  # half-written or corrupted: never used, rebuilt from scratch
            shutil.rmtree(final)
        # Holding the lock, no one else builds this key: temp dirs left by a killed builder are garbage.
        for stale in root.glob(f".tmp-embedded-{key}-*"):
            shutil.rmtree(stale)
        tmp = root / f".tmp-embedded-{key}-{os.getpid()}"
        try:
            with _torch_threads(ecfg.build_threads):
                if ecfg.preset == "style_shift":
                    from student_worker.embedded_style import build_style_into

                    info = build_style_into(ecfg, tmp, progress)
                else:
                    info = _build_into(ecfg, tmp, progress)
                info["compute"] = compute_info()
            (tmp / _MARKER).write_text(json.dumps({"key": key, "version": BUILD_VERSION,
                                                   "embedded": ecfg.model_dump(mode="json"), **info}, indent=2))
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if not _is_complete(final, key):
        raise EmbeddedBuildError(f"embedded build in {final} finished but does not read back")
    return _role_paths(final)


def resolve_model_paths(cfg: RunConfig) -> RunConfig:
    """A copy of cfg with every `embedded:<role>` model path replaced by the built local path."""
    out = cfg.model_copy(deep=True)
    specs: list[tuple[str, ModelSpec]] = [
        ("models.base_teacher", out.models.base_teacher),
        ("models.sft_teacher", out.models.sft_teacher),
        ("models.student", out.models.student),
    ]
    if out.models.student_base is not None:
        specs.append(("models.student_base", out.models.student_base))
    for j, pair in enumerate(out.models.extra_pairs):
        specs += [(f"models.extra_pairs.{j}.base", pair.base), (f"models.extra_pairs.{j}.sft", pair.sft)]
    embedded = [(where, s) for where, s in specs if s.path.startswith(EMBEDDED_PREFIX)]
    for where, spec in embedded:
        role = spec.path[len(EMBEDDED_PREFIX):]
        if role not in EMBEDDED_ROLES:
            raise ConfigError(f"{where}.path: unknown embedded role {role!r}; expected one of {list(EMBEDDED_ROLES)}")
    if embedded:
        # This process may build the models: it computes like every other process of the run.
        apply_compute_settings(out.reproducibility, where="embedded build")
        paths = build_embedded_models(out.embedded)
        for _, spec in embedded:
            spec.path = str(paths[spec.path[len(EMBEDDED_PREFIX):]])
    return out


# ----------------------------------------------------------------------------------------------------
# The build


def _train_tokenizer(texts: list[str], vocab_size: int, out: Path) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
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


def _new_llama(shape: EmbeddedModelShape, tokenizer: Any, seed: int, max_positions: int) -> Any:
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


def _train(model: Any, batches: Any, steps: int, lr: float, desc: str, progress: bool) -> float:
    """AdamW on next-token CE; `batches(step)` -> (input_ids [B,T], attention_mask [B,T], labels [B,T])
    with labels already aligned to positions (labels[t] is the token after t, -100 where not trained).
    Returns the mean loss of the last 10% of steps."""
    from tqdm.auto import tqdm

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


def _packed_blocks(corpus: list[str], tokenizer: Any, block: int) -> torch.Tensor:
    """[N, block] long: the corpus as one stream `bos s1 eos bos s2 eos ...`, cut into full blocks."""
    stream: list[int] = []
    for ids in tokenizer(corpus, add_special_tokens=False)["input_ids"]:
        stream += [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    n = len(stream) // block
    if n == 0:
        raise EmbeddedBuildError(f"corpus of {len(stream)} tokens is shorter than one block of {block}")
    return torch.tensor(stream[: n * block], dtype=torch.long).view(n, block)


def _build_into(ecfg: EmbeddedConfig, out: Path, progress: bool) -> dict[str, Any]:
    t0 = time.monotonic()
    out.mkdir(parents=True)
    paths = _role_paths(out)
    suite = generate_instruction_suite(ecfg.seed, ecfg.num_train, ecfg.num_val, ecfg.num_test)
    corpus = generate_corpus(ecfg.seed, ecfg.corpus_sentences)
    data_cfg = DataConfig(max_length=ecfg.max_length, overlong="truncate")
    prompts = [format_prompt(e["instruction"], e["context"], data_cfg) for e in suite["train"]]
    tokenizer = _train_tokenizer(
        corpus + [p + " " + e["response"] for p, e in zip(prompts, suite["train"])], ecfg.vocab_size,
        paths["tokenizer"],
    )
    max_positions = max(512, ecfg.max_length)

    # Pretraining: random blocks of the packed corpus; the sampler is seeded so the build is reproducible.
    blocks = _packed_blocks(corpus, tokenizer, min(ecfg.max_length, 64))
    full_mask = torch.ones_like(blocks[:1], dtype=torch.long)

    def corpus_batches(gen: torch.Generator) -> Any:
        def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            idx = torch.randint(len(blocks), (ecfg.batch_size,), generator=gen)
            x = blocks[idx]
            labels = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)
            return x, full_mask.expand_as(x), labels
        return batch

    info: dict[str, Any] = {"vocab": len(tokenizer)}
    for role, shape, seed in (("base_teacher", ecfg.teacher, ecfg.seed * 1000 + 1),
                              ("student", ecfg.student, ecfg.seed * 1000 + 2)):
        model = _new_llama(shape, tokenizer, seed, max_positions)
        gen = torch.Generator().manual_seed(seed)
        info[f"{role}_pretrain_loss"] = _train(model, corpus_batches(gen), ecfg.pretrain_steps, ecfg.lr,
                                               f"pretrain {role}", progress)
        model.save_pretrained(str(paths[role]))
        tokenizer.save_pretrained(str(paths[role]))
        info[f"{role}_params"] = sum(p.numel() for p in model.parameters())

    info["sft_teacher_train_loss"] = _sft_teacher(paths, prompts, suite, tokenizer, data_cfg, ecfg, progress)
    info["build_seconds"] = round(time.monotonic() - t0, 1)
    return info


def _sft_teacher(paths: dict, prompts: list[str], suite: dict, tokenizer: Any, data_cfg: Any, ecfg: Any,
                 progress: bool) -> float:
    """SFT: the base teacher learns the format and tasks from the train split (loss on response tokens only).

    Loads `paths["base_teacher"]`, saves `paths["sft_teacher"]`; returns the last training loss. Shared by
    both embedded presets (embedded_style.py).
    """
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

    loss = _train(teacher, sft_batches, ecfg.sft_steps, ecfg.lr, "SFT teacher", progress)
    teacher.save_pretrained(str(paths["sft_teacher"]))
    tokenizer.save_pretrained(str(paths["sft_teacher"]))
    return loss
