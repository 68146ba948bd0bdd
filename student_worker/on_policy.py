"""On-policy batches (GKD style): the student samples responses to its batch's prompts, the teachers score
the sampled tokens, and the step trains on them (`training.on_policy`, common/config.py OnPolicyConfig).

What lives here (no Ray): which steps are on-policy (`is_on_policy_step`, one seeded draw per step), the
prompts (`on_policy_prompts`, cut or refused per `data.overlong`), the student's EOS ids
(`generation_eos_ids`), the sampling itself (`generate_samples`: HF `generate` with the KV cache, seeded by
batch id inside a forked RNG so no other random stream moves), the batch the step trains on
(`sampled_batch`: prompt + sample, the sample's tokens are the labels), the per-step counts of the metrics
row (`sample_stats`), the samples a lag-1 checkpoint must carry (`save_samples` / `load_samples`) and the
driver.s bookkeeping of sample calls (`SampleSchedule`). The Ray calls are in student_worker/on_policy_steps.py.

A sample is one row of `generate_samples`'s result: its tokens up to and including the first EOS (`eos`
true), or `max_new_tokens` tokens without one (truncated). An EOS as the first token is an "empty"
generation: it still trains one position (the student's choice to stop there). So every sampled row has
>= 1 counted position.

Lag (`training.on_policy.lag`): the sample of step s is drawn with the weights after step s - 1 - lag
(W_{s-lag}, the initial weights for s < lag). Lag 0: the current weights. Lag 1: one step old, so the
sample of step s + 1 can be drawn before step s trains, while the teachers score step s. A checkpoint of N
steps then holds W_N, but the sample of step N was drawn with W_{N-1}: the checkpoint carries that sample
(`on_policy_samples.npz`, written by the driver) and a resume uses it instead of drawing it again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import OnPolicyConfig
from common.data.batching import TokenizedExample, collate
from common.data.examples import DataError
from student_worker.checkpoint import CheckpointError

__all__ = ["OnPolicyError", "SAMPLES_FILE", "STAT_KEYS", "is_on_policy_step", "sample_seed", "on_policy_prompts",
           "generation_eos_ids", "student_eos_ids", "generate_samples", "samples_from_generated", "sampled_batch", "sample_stats",
           "save_samples", "load_samples", "SampleSchedule"]

SAMPLES_FILE = "on_policy_samples.npz"
# The per-step counts in a metrics row of a run with on-policy batches (0 on an off-policy step).
STAT_KEYS = ("on_policy", "sampled_sequences", "sampled_tokens", "sampled_eos", "sampled_truncated", "sampled_empty")
_SAMPLE_ARRAYS = ("tokens", "lengths", "eos")


class OnPolicyError(ValueError):
    """On-policy sampling cannot run with this model or data; the message names the culprit."""


def _draw(*key: int) -> float:
    """A uniform draw in [0, 1) that depends on `key` only (no global RNG)."""
    return float(np.random.default_rng(list(key)).random())


def is_on_policy_step(op: OnPolicyConfig, seed: int, step: int) -> bool:
    """Whether step `step` trains on samples: a draw seeded by (seed, step) below `fraction` (0: never,
    1: always). One choice per step, shared by every rank of it."""
    if op.fraction <= 0:
        return False
    return op.fraction >= 1 or _draw(seed, 0x0F0C, step) < op.fraction


def sample_seed(seed: int, batch_id: int) -> int:
    """The torch seed of one batch's sampling (63 bits), from the run seed and the batch id."""
    state = np.random.SeedSequence([seed, 0x5A4D, batch_id]).generate_state(1, np.uint64)[0]
    return int(state) & ((1 << 63) - 1)


def on_policy_prompts(examples: Sequence[TokenizedExample], limit: int, overlong: str,
                      bos_id: int | None) -> list[list[int]]:
    """Each example's prompt ids (`input_ids[:prompt_len]`), at most `limit` tokens
    (data.max_length - training.on_policy.max_new_tokens) so that prompt + sample fits data.max_length.

    Longer prompts: overlong "reject" raises DataError naming the example; "truncate" keeps the prompt's
    LAST tokens (the end of a prompt template, e.g. "### Response:", is what the model continues), with the
    BOS token kept first when the prompt starts with it."""
    if limit < 1:
        raise DataError(f"no room for a prompt: data.max_length - training.on_policy.max_new_tokens = {limit}")
    out: list[list[int]] = []
    for i, ex in enumerate(examples):
        prompt = list(ex.input_ids[: ex.prompt_len])
        if len(prompt) > limit:
            if overlong == "reject":
                raise DataError(f"example {i}: its prompt is {len(prompt)} tokens, over data.max_length - "
                                f"training.on_policy.max_new_tokens = {limit} (data.overlong=reject)")
            keep_bos = bos_id is not None and prompt[0] == bos_id and limit > 1
            head = prompt[:1] if keep_bos else []
            prompt = head + prompt[len(prompt) - (limit - len(head)):]
        out.append(prompt)
    return out


def generation_eos_ids(generation_config: Any, name: str) -> list[int]:
    """The EOS ids of a generation config (an int or a list in transformers); OnPolicyError when none."""
    eos = getattr(generation_config, "eos_token_id", None)
    ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    if not ids:
        raise OnPolicyError(f"student {name}: its generation config has no eos_token_id, so an on-policy sample "
                            "could only end at max_new_tokens; set eos_token_id in its generation_config.json "
                            "(or config.json), or turn training.on_policy off")
    return ids


def student_eos_ids(path: str, revision: str | None = None, trust_remote_code: bool = False) -> list[int]:
    """The student's EOS ids as `from_pretrained` would set them (generation_config.json, else config.json),
    read without loading weights (the driver's preflight)."""
    # deferred: transformers costs ~1.0 s at import (measured); the driver's start-up imports this module
    from transformers import AutoConfig, GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(path, revision=revision)
    except OSError:  # no generation_config.json: transformers derives one from the model config
        gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(
            path, revision=revision, trust_remote_code=trust_remote_code))
    return generation_eos_ids(gen, path)


@torch.no_grad()
def generate_samples(model: Any, prompts: Sequence[Sequence[int]], *, eos_ids: list[int], pad_id: int,
                     temperature: float, top_p: float, max_new_tokens: int, seed: int,
                     autocast: bool = False) -> dict[str, Any]:
    """Sample one response per prompt from `model` (a HF causal LM) with `generate` and its KV cache.

    Prompts are left-padded with `pad_id` into [B, P]. The distribution is softmax(logits / temperature)
    cut to its top_p nucleus and nothing else: the model's own generation defaults (top_k, penalties) are
    set aside for the call. Torch's RNG is seeded with `seed` inside `torch.random.fork_rng`, so the
    process's other random streams are where they were. Returns numpy arrays: tokens int32 [B, G] (G <=
    max_new_tokens; after a row's end: pad_id), lengths int32 [B] (tokens of each sample, its EOS included),
    eos bool [B] (ended with an EOS; false: cut at max_new_tokens), and seconds."""
    from transformers import GenerationConfig  # deferred: as in student_eos_ids

    t0 = time.perf_counter()
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    sampling = GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                                max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id)
    own, was_training = model.generation_config, model.training
    model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=pad_id)  # no model defaults
    model.eval()
    # the CPU generator and (on a GPU) this device's: both forked, so no other stream moves
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     generation_config=sampling)
    finally:
        model.generation_config = own
        model.train(was_training)
    result = samples_from_generated(out[:, width:].cpu(), eos_ids, pad_id)
    result["seconds"] = time.perf_counter() - t0
    return result


def samples_from_generated(new: torch.Tensor, eos_ids: list[int], pad_id: int) -> dict[str, Any]:
    """The samples in `generate`'s new tokens [B, G]: each row ends at its first EOS (included; `eos` true)
    or after G tokens (`eos` false); what follows a row's end is set to pad_id. Returns numpy tokens int32
    [B, G], lengths int32 [B], eos bool [B]."""
    is_eos = torch.isin(new, torch.tensor(eos_ids, dtype=new.dtype))
    has_eos = is_eos.any(dim=1)
    first = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, new.shape[1], dtype=torch.long))
    lengths = torch.where(has_eos, first + 1, first)
    keep = torch.arange(new.shape[1])[None, :] < lengths[:, None]
    tokens = torch.where(keep, new, torch.full_like(new, pad_id))
    return {"tokens": tokens.numpy().astype(np.int32), "lengths": lengths.numpy().astype(np.int32),
            "eos": has_eos.numpy()}


def sampled_batch(prompts: Sequence[Sequence[int]], sample: dict[str, Any], pad_id: int) -> dict[str, np.ndarray]:
    """The arrays a step trains on (`data.collate`'s): each row is prompt + its sample; the labels are
    exactly the sampled tokens (EOS included), so the counted positions are the sampled ones."""
    tokens, lengths = sample["tokens"], sample["lengths"]
    if len(prompts) != len(lengths):
        raise ValueError(f"{len(prompts)} prompts but {len(lengths)} samples")
    examples = [TokenizedExample(input_ids=list(p) + tokens[i, : int(lengths[i])].tolist(), prompt_len=len(p))
                for i, p in enumerate(prompts)]
    return collate(examples, pad_id)


def sample_stats(samples: Sequence[dict[str, Any]] | None) -> dict[str, int]:
    """The metrics row's counts (STAT_KEYS) over a step's per-rank samples; None: an off-policy step."""
    if samples is None:
        return dict.fromkeys(STAT_KEYS, 0)
    lengths = np.concatenate([s["lengths"] for s in samples])
    eos = np.concatenate([s["eos"] for s in samples]).astype(bool)
    return {"on_policy": 1, "sampled_sequences": int(lengths.size), "sampled_tokens": int(lengths.sum()),
            "sampled_eos": int(eos.sum()), "sampled_truncated": int((~eos).sum()),
            "sampled_empty": int((eos & (lengths == 1)).sum())}


def save_samples(ckpt_dir: str | Path, step: int, samples: Sequence[dict[str, Any]]) -> Path:
    """Write a step's per-rank samples (tokens, lengths, eos) into a checkpoint directory (npz, no pickle)."""
    arrays: dict[str, np.ndarray] = {"step": np.asarray(step, dtype=np.int64),
                                     "ranks": np.asarray(len(samples), dtype=np.int64)}
    for r, s in enumerate(samples):
        for key in _SAMPLE_ARRAYS:
            arrays[f"rank{r}_{key}"] = np.asarray(s[key])
    path = Path(ckpt_dir) / SAMPLES_FILE
    with open(path, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
    return path


def load_samples(ckpt_dir: str | Path, step: int, world: int) -> list[dict[str, Any]]:
    """The samples `save_samples` wrote for `step` (one dict per rank). Raises CheckpointError naming the
    file when it is missing or holds another step or world size."""
    path = Path(ckpt_dir) / SAMPLES_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a checkpoint of a training.on_policy.lag=1 run carries the "
                              f"sample of step {step} (drawn with the weights before it)")
    try:
        with np.load(path, allow_pickle=False) as data:
            got_step, ranks = int(data["step"]), int(data["ranks"])
            if got_step != step or ranks != world:
                raise CheckpointError(f"{path}: holds the samples of step {got_step} for {ranks} ranks; expected "
                                      f"step {step} and {world} ranks")
            return [{key: np.array(data[f"rank{r}_{key}"]) for key in _SAMPLE_ARRAYS} for r in range(world)]
    except (OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None


@dataclass
class SampleSchedule:
    """The driver's bookkeeping of on-policy steps and their sample calls (one instance per run).

    `requested[k]`: the per-rank refs of step k's sample calls; `results[k]`: their results once collected
    (or loaded from a checkpoint). `next_request`: the first step not yet considered for a sample call.
    The sample of step k must run on the workers after the train call of step k - 1 - lag and before that of
    step k - lag (student_worker/on_policy.py's module docstring): the driver asks `to_request(j + lag)`
    right before it queues step j's train call."""

    op: OnPolicyConfig
    seed: int
    max_steps: int
    requested: dict[int, list[Any]] = field(default_factory=dict)
    results: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    next_request: int = 0
    _choice: dict[int, bool] = field(default_factory=dict)

    def on_policy(self, step: int) -> bool:
        if step not in self._choice:
            self._choice[step] = is_on_policy_step(self.op, self.seed, step)
        return self._choice[step]

    def restart(self, step: int, stored: list[dict[str, Any]] | None) -> None:
        """The loop (re)starts at `step`: forget every call and result; `stored` is the sample of `step` a
        lag-1 checkpoint carried (then the first sample drawn is step + 1's)."""
        self.requested.clear()
        self.results.clear()
        self.next_request = step
        if stored is not None:
            self.results[step] = stored
            self.next_request = step + 1

    def needs_stored(self, step: int) -> bool:
        """Whether a (re)start at `step` needs the sample a checkpoint carries (lag 1, not the first step)."""
        return self.op.lag == 1 and 0 < step < self.max_steps and self.on_policy(step)

    def to_request(self, upto: int) -> list[int]:
        """On-policy steps from `next_request` through `upto` (and below max_steps) whose sample calls are
        due now, in order; marks them considered."""
        last = min(upto, self.max_steps - 1)
        due = [k for k in range(self.next_request, last + 1) if self.on_policy(k)]
        self.next_request = max(self.next_request, last + 1)
        return due

    def forget_before(self, step: int) -> None:
        for table in (self.requested, self.results):
            for k in [k for k in table if k < step]:
                del table[k]
