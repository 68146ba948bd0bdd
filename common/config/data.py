"""Where the examples come from and how they are formatted and batched (`data:`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Strict

__all__ = ["ColumnsConfig", "DataConfig"]


class ColumnsConfig(Strict):
    """Column names of an external data set (Dolly-style by default)."""

    instruction: str = "instruction"
    context: str | None = "context"
    response: str = "response"


class DataConfig(Strict):
    # "embedded" (the generated instruction suite), a local .json/.jsonl/.parquet file, or a hub data set.
    train: str = "embedded"
    eval: str | None = "embedded"
    train_split: str = "train"
    eval_split: str = "test"
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig)
    prompt_template: str = "### Instruction:\n{instruction}\n{context}### Response:\n"
    context_template: str = "### Input:\n{context}\n"
    max_length: int = Field(default=256, gt=1)
    overlong: Literal["truncate", "reject"] = "truncate"
    max_train_examples: int | None = Field(default=None, gt=0)
    max_eval_examples: int | None = Field(default=64, gt=0)
    # The validation set for best-checkpoint selection (evaluation.select_best); never the test set.
    validation: str | None = None
    validation_split: str = "validation"
    max_validation_examples: int | None = Field(default=100, gt=0)
    shuffle: bool = True
    # Length-bucketed batching (common.data.batching.BatchPlan): 0 = off (each epoch a plain shuffle).
    # n >= 1: each epoch's examples are sorted by length into n buckets of whole global batches, shuffled
    # within each bucket and batched there, and the batches run in a seeded random order. More buckets,
    # less padding; n >= steps per epoch sorts the whole epoch. Deterministic by step (resume-safe).
    length_buckets: int = Field(default=0, ge=0)
