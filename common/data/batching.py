"""Examples tokenised and batched (the examples themselves come from common/data/examples.py).

- `tokenize_examples(examples, tokenizer, data_cfg)` -> `[TokenizedExample(input_ids, prompt_len)]`, where
  `input_ids = [bos]? + prompt + response + [eos]` and `prompt_len` counts the bos.
- `collate(examples, pad_id)` -> right-padded numpy arrays that follow the position convention of
  docs/ARCHITECTURE.md: `labels[b, t] = input_ids[b, t + 1]` where token t+1 is a response token.
- `BatchPlan` gives each step's example indices per rank as a pure function of the step, so the data
  cursor of a checkpoint is just its step number and a resume is exact; optionally length-bucketed
  (`data.length_buckets`: examples of similar length batched together, still a pure function of the step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.config import DataConfig
from common.data.examples import DataError, load_examples
from common.data.tokenizer_check import tokenizer_fingerprint

__all__ = [
    "TokenizedExample",
    "BatchPlan",
    "encode_prompt",
    "tokenize_examples",
    "collate",
    "padding_stats",
    "TrainingSet",
    "load_training_set",
    "IGNORE_INDEX",
]

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------------
# Tokenisation and batching


@dataclass(frozen=True)
class TokenizedExample:
    """input_ids = [bos]? + prompt + response + [eos]; the first `prompt_len` tokens (bos included) are prompt."""

    input_ids: list[int]
    prompt_len: int


def encode_prompt(prompt: str, tokenizer: Any) -> list[int]:
    """[bos]? + prompt tokens: exactly the prefix `tokenize_examples` builds (use it for generation)."""
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + ids


def tokenize_examples(examples: Sequence[dict[str, str]], tokenizer: Any, data_cfg: DataConfig) -> list[TokenizedExample]:
    """Tokenise prompt and response separately (so the boundary is exact) and join them.

    Longer than `data_cfg.max_length`: "truncate" cuts the end but keeps >= 1 response token (else a
    DataError); "reject" raises a DataError naming the example index and its length.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no eos token")
    max_len = data_cfg.max_length
    out: list[TokenizedExample] = []
    for i, ex in enumerate(examples):
        prompt_ids = encode_prompt(ex["prompt"], tokenizer)
        response_ids = list(tokenizer(ex["response"], add_special_tokens=False)["input_ids"]) + [eos]
        ids = prompt_ids + response_ids
        if len(ids) > max_len:
            if data_cfg.overlong == "reject":
                raise DataError(
                    f"example {i} is {len(ids)} tokens long, over data.max_length={max_len} (data.overlong=reject)"
                )
            if len(prompt_ids) + 1 > max_len:
                raise DataError(
                    f"example {i}: its prompt alone is {len(prompt_ids)} tokens, so truncating to "
                    f"data.max_length={max_len} would leave no response token"
                )
            ids = ids[:max_len]
        out.append(TokenizedExample(input_ids=ids, prompt_len=len(prompt_ids)))
    return out


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad a batch.

    Returns `input_ids` int32 [B, T], `attention_mask` bool [B, T], `labels` int64 [B, T] with
    `labels[b, t] = input_ids[b, t+1]` when position t+1 is a response token (prompt_len <= t+1 < len_b),
    else -100, and `loss_mask = labels != -100` bool [B, T]. T is the longest example.
    """
    if not examples:
        raise DataError("collate got an empty batch")
    lengths = [len(ex.input_ids) for ex in examples]
    bsz, seq = len(examples), max(lengths)
    input_ids = np.full((bsz, seq), pad_id, dtype=np.int32)
    attention_mask = np.zeros((bsz, seq), dtype=bool)
    labels = np.full((bsz, seq), IGNORE_INDEX, dtype=np.int64)
    for b, ex in enumerate(examples):
        n = lengths[b]
        input_ids[b, :n] = ex.input_ids
        attention_mask[b, :n] = True
        # Position t predicts token t+1; the first response token sits at prompt_len, predicted at prompt_len-1.
        start = max(ex.prompt_len - 1, 0)
        labels[b, start : n - 1] = ex.input_ids[start + 1 : n]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "loss_mask": labels != IGNORE_INDEX}


@dataclass(frozen=True)
class BatchPlan:
    """Deterministic batches by step: the data cursor is the step number.

    steps_per_epoch = num_examples // global_batch_size (the last incomplete batch is dropped).
    Step s is in epoch e = s // steps_per_epoch, which uses a permutation seeded by (seed, e) (the
    identity when shuffle is off); the global batch is that permutation's slice
    [(s % steps_per_epoch) * G, ... + G), and rank r gets its r-th contiguous G / num_workers share.

    Length buckets (`length_buckets` = n >= 1, needs `lengths`: one token count per example): the epoch's
    examples are those of the same permutation minus the dropped tail (so the same examples are kept as
    without buckets), sorted by length (ties in permutation order) and cut into n buckets of whole global
    batches (the first `steps_per_epoch % n` buckets one batch larger); each bucket is shuffled (seed, e,
    bucket) and cut into global batches, and the epoch's batches run in a random order (seed, e). So
    examples of similar length share a batch, every kept example is used once per epoch, and the plan is
    still a pure function of the step. shuffle=False: no randomness (buckets in length order).
    """

    num_examples: int
    global_batch_size: int
    num_workers: int = 1
    seed: int = 0
    shuffle: bool = True
    length_buckets: int = 0
    lengths: tuple[int, ...] | None = None
    _epochs: dict[int, np.ndarray] = field(default_factory=dict, init=False, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if self.global_batch_size <= 0 or self.num_workers <= 0:
            raise DataError(f"BatchPlan needs positive sizes, got global_batch_size={self.global_batch_size}, "
                            f"num_workers={self.num_workers}")
        if self.global_batch_size % self.num_workers:
            raise DataError(f"global batch size {self.global_batch_size} is not a multiple of "
                            f"{self.num_workers} workers")
        if self.num_examples < self.global_batch_size:
            raise DataError(f"{self.num_examples} examples cannot fill one batch of {self.global_batch_size}")
        if self.length_buckets < 0:
            raise DataError(f"data.length_buckets must be >= 0, got {self.length_buckets}")
        if self.length_buckets and (self.lengths is None or len(self.lengths) != self.num_examples):
            raise DataError(f"data.length_buckets={self.length_buckets} needs one length per example "
                            f"({self.num_examples}), got {None if self.lengths is None else len(self.lengths)}")

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """[num_examples] int64: the example order of one epoch (without buckets)."""
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def _bucketed_order(self, epoch: int) -> np.ndarray:
        """[steps_per_epoch * G] int64: the epoch's examples in batch order, with length buckets."""
        cached = self._epochs.get(epoch)
        if cached is not None:
            return cached
        assert self.lengths is not None  # checked in __post_init__
        g, steps = self.global_batch_size, self.steps_per_epoch
        kept = self.epoch_order(epoch)[: steps * g]
        lengths = np.asarray(self.lengths, dtype=np.int64)[kept]
        by_length = kept[np.argsort(lengths, kind="stable")]  # stable: ties keep the permutation's order
        n = min(self.length_buckets, steps)
        sizes = [steps // n + (1 if b < steps % n else 0) for b in range(n)]  # batches per bucket
        batches: list[np.ndarray] = []
        start = 0
        for b, size in enumerate(sizes):
            bucket = by_length[start : start + size * g]
            start += size * g
            if self.shuffle:
                bucket = np.random.default_rng([self.seed, epoch, 1, b]).permutation(bucket)
            batches.extend(bucket[i * g : (i + 1) * g] for i in range(size))
        order = (np.random.default_rng([self.seed, epoch, 2]).permutation(len(batches)) if self.shuffle
                 else np.arange(len(batches)))
        out = np.concatenate([batches[i] for i in order])
        if len(self._epochs) > 2:  # a run moves forward: keep only recent epochs
            self._epochs.clear()
        self._epochs[epoch] = out
        return out

    @property
    def per_rank_batch(self) -> int:
        return self.global_batch_size // self.num_workers

    def build_order(self) -> list[int]:
        """Every example once, in the order a teacher cache build scores them (teacher_service/cache/plan.py):
        epoch 0's per-rank batches in step then rank order (batch (s, r) is positions
        (s * W + r) * b .. + b - 1, b = per_rank_batch), then the examples epoch 0 drops (the tail of its
        permutation, in that order). Cut into batches of b, its first steps_per_epoch * W batches are exactly
        the batches epoch 0 trains on."""
        g, steps = self.global_batch_size, self.steps_per_epoch
        kept = (self._bucketed_order(0) if self.length_buckets else self.epoch_order(0))[: steps * g]
        dropped = self.epoch_order(0)[steps * g:]
        return [int(e) for e in np.concatenate([kept, dropped])]

    def step_indices(self, step: int) -> list[list[int]]:
        """Example indices of `step`, one list of global_batch_size / num_workers per rank."""
        if step < 0:
            raise DataError(f"step must be >= 0, got {step}")
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch_size
        order = self._bucketed_order(epoch) if self.length_buckets else self.epoch_order(epoch)
        batch = order[start : start + self.global_batch_size]
        per_rank = self.global_batch_size // self.num_workers
        return [batch[r * per_rank : (r + 1) * per_rank].tolist() for r in range(self.num_workers)]


@dataclass
class TrainingSet:
    """What the driver (and a teacher cache build) batches: the tokenized training examples, the pad id of
    the student's tokenizer, the batch plan, and the tokenizer's fingerprint and size."""

    examples: list[TokenizedExample]
    pad_id: int
    plan: BatchPlan
    tokenizer_fingerprint: str
    vocab_size: int
    bos_id: int | None = None  # the student tokenizer's BOS (on-policy prompts keep it when cut)


def load_training_set(cfg: Any) -> TrainingSet:
    """The run's training set as the driver batches it (`cfg`: common.config.RunConfig, model paths resolved):
    the student's tokenizer, data.* and the plan of training.batch_size over training.num_workers."""
    # deferred: transformers costs ~1.4 s at import (measured); the driver's start-up imports this module
    from transformers import AutoTokenizer

    spec = cfg.models.student
    tok = AutoTokenizer.from_pretrained(spec.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    train = tokenize_examples(load_examples(cfg.data, "train", cfg.embedded), tok, cfg.data)
    d = cfg.data
    plan = BatchPlan(len(train), cfg.training.batch_size, cfg.training.num_workers, cfg.seed, d.shuffle,
                     length_buckets=d.length_buckets,
                     lengths=tuple(len(e.input_ids) for e in train) if d.length_buckets else None)
    return TrainingSet(train, int(pad_id), plan, tokenizer_fingerprint(tok), len(tok), tok.bos_token_id)


def padding_stats(plan: BatchPlan, examples: Sequence[TokenizedExample], steps: int) -> dict[str, float]:
    """Token counts of the first `steps` steps as `collate` pads them (each rank's batch to its own longest):
    {"positions", "real_tokens", "counted_tokens", "padding_fraction", "counted_fraction"}, where counted
    tokens are the loss positions (response tokens) and fractions are of all padded positions."""
    positions = real = counted = 0
    for s in range(steps):
        for idx in plan.step_indices(s):
            lens = [len(examples[i].input_ids) for i in idx]
            positions += len(idx) * max(lens)
            real += sum(lens)
            counted += sum(len(examples[i].input_ids) - max(examples[i].prompt_len, 1) for i in idx)
    return {"positions": positions, "real_tokens": real, "counted_tokens": counted,
            "padding_fraction": 1.0 - real / positions, "counted_fraction": counted / positions}
