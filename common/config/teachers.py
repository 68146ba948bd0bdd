"""Where the teachers run and how their records travel (`teachers:`, `transport:`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from common.codec import ENCODINGS

from .base import RESUME_FREE, RUNTIME, DType, Strict, WireDType, did_you_mean, policy

__all__ = ["TeachersConfig", "TeacherCacheConfig", "VLLMConfig", "TransportConfig"]


class TeacherCacheConfig(Strict):
    """`teachers.cache`: where the teacher cache lives and how it stores and reads records. The whole section
    may differ on resume (a cache is checked against the run when it is opened)."""

    # a folder or a pyarrow file system URI (file://, s3://, gs://)
    uri: str | None = None
    # How a build (and auto's write-through) stores records: a common.codec preset (fp32 is lossless; the
    # default q8d10 is 304 B per token at k = 64, V = 152,064; docs/PERFORMANCE.md has the table).
    encoding: str = "q8d10"
    # Examples per cache shard; a build rounds it up to a multiple of the per-rank batch so that each shard
    # holds whole batches of the plan it replays.
    shard_size: int = Field(default=512, gt=0)
    # A shard whose checksum fails while training: stop the run (after a checkpoint of the completed steps),
    # or recompute that batch live through a running teacher service (teachers.namespace / name_prefix).
    on_error: Literal["stop", "live"] = "stop"
    # Encoded shards each rank's reader keeps in memory (about the shard files' size).
    memory_mb: int = Field(default=1024, gt=0)

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str) -> str:
        if v not in ENCODINGS:
            raise ValueError(f"unknown cache encoding {v!r}{did_you_mean(v, list(ENCODINGS))}; one of {sorted(ENCODINGS)}")
        return v


class VLLMConfig(Strict):
    """`teachers.vllm`: the vLLM engine's options (teachers.engine: vllm). Prompt log-probs are formed over the
    whole vocabulary for every scheduled prompt token, in memory vLLM's start-up profiler does not count
    (~2 x tokens x V x 4 bytes: 2.5 GB for 2048 tokens at V = 151,646). So the utilisation leaves that room
    (0.75 of a 24 GB GPU: 15.2 GB of 7B bf16 weights + ~1 GB activations + KV cache, 57 KB a token for
    Qwen2-7B) and max_num_batched_tokens caps the tokens per scheduler step (chunked prefill), hence that
    buffer."""

    gpu_memory_utilization: float = Field(default=0.75, gt=0, le=1)
    max_num_batched_tokens: int | None = Field(default=2048, gt=0)
    max_model_len: int | None = None
    # vLLM's cap on log-probs per position (its LLM(max_logprobs=...)); None: loss.k + 1 (top-k + the label).
    max_logprobs: int | None = Field(default=None, gt=0)


class TeachersConfig(Strict):
    """`teachers:` where the teachers run and how the student reaches them (placement, engine, service names,
    restarts), with two sections: `cache` (the teacher cache) and `vllm` (the vLLM engine's options)."""

    engine: Literal["hf", "vllm"] = "hf"  # engine of the SFT teacher (it picks the support); others use hf
    replicas: dict[str, int] = Field(default_factory=lambda: {"sft": 1, "base": 1})
    num_cpus: float = Field(default=1.0, ge=0)
    # GPUs per replica: a fraction of one GPU (< 1, replicas share it) or whole GPUs (1, 2, 4, ...). Above 1 the
    # replica is placed in its own placement group on ONE node and its engine spreads over those GPUs (hf: a
    # device map; vllm: tensor parallelism); docs/CLUSTER.md "Teachers larger than one GPU".
    num_gpus: float = Field(default=0.0, ge=0)
    # Before it starts any teacher the pool checks the layout against the cluster's nodes. 0: refuse at once a
    # layout the nodes present now cannot hold (a fixed cluster). > 0: an autoscaling cluster (GPU nodes start
    # on demand): warn, start anyway, and wait up to this many seconds for the multi-GPU replicas' placement
    # groups (reserved together; replicas of one GPU or less have none: Ray waits for their nodes as ever).
    placement_wait_s: float = Field(default=0.0, ge=0, json_schema_extra=policy(RESUME_FREE, RUNTIME))
    # Custom Ray resources each teacher actor asks for, e.g. {teacher_gpu: 1} to land on teacher nodes.
    resources: dict[str, float] = Field(default_factory=dict)
    dtype: DType = "auto"
    wire_dtype: WireDType = "float32"
    device: str = "auto"  # "auto": cuda when the actor has a GPU, else cpu
    # Where lp_S0 comes from: a frozen copy inside each student worker, a `student_base` teacher role, or
    # the teacher cache (a role scored once with `python -m teacher_service.cache add-role student_base`;
    # needs source: cache).
    student_base_source: Literal["worker", "teacher", "cache"] = "worker"
    # Where the teacher records come from (issue 14, docs/ARCHITECTURE.md "Teach once, distil many"):
    # live: the teacher actors score every batch; cache: the teacher cache at `cache.uri` (built with
    # `python -m teacher_service.cache build`), no teacher actor is started; auto: read `cache.uri` when it
    # is complete for this run, else run live for the first epoch and write every record through to it,
    # then read it from the second epoch on (and in later runs).
    source: Literal["live", "cache", "auto"] = Field(default="live", json_schema_extra=policy(RESUME_FREE))
    cache: TeacherCacheConfig = Field(default_factory=TeacherCacheConfig, json_schema_extra=policy(RESUME_FREE))
    namespace: str = Field(default="deltakd", json_schema_extra=policy(RESUME_FREE, RUNTIME))
    name_prefix: str = Field(default="teacher", json_schema_extra=policy(RESUME_FREE, RUNTIME))
    # attach to a running `python -m teacher_service serve` instead of starting teachers
    attach: bool = Field(default=False, json_schema_extra=policy(RESUME_FREE, RUNTIME))
    max_restarts: int = Field(default=3, ge=-1)
    max_task_retries: int = Field(default=3, ge=-1)
    max_inflight_per_replica: int = Field(default=4, gt=0)
    # Rows per chunk of a teacher's LM head and log-softmax when it scores a batch (was teachers.chunk_tokens).
    score_chunk_rows: int = Field(default=1024, gt=0)
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)

    @field_validator("num_gpus")
    @classmethod
    def _whole_or_fraction(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError(f"teachers.num_gpus={v:g}: a replica takes a fraction of one GPU (< 1) or whole GPUs "
                             f"(1, 2, 4, ...), not {v:g}: Ray gives a multi-GPU actor whole GPUs, and a tensor-"
                             f"parallel engine needs them; use {int(v)} or {int(v) + 1}")
        return v


class TransportConfig(Strict):
    kind: Literal["object_store", "rdt"] = "object_store"
    # RDT backend: gloo on CPU, nccl across GPUs, cuda_ipc on one node. "auto" picks gloo/nccl by device.
    rdt_backend: Literal["auto", "gloo", "nccl", "cuda_ipc"] = "auto"
