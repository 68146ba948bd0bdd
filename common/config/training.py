"""The student side of a run: training, on-policy batches, evaluation, outputs, tracking, compute settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import RESUME_FREE, RUNTIME, Strict, policy

__all__ = ["OnPolicyConfig", "TrainingConfig", "EvaluationConfig", "OutputConfig", "ReproducibilityConfig", "LoggingConfig"]


class OnPolicyConfig(Strict):
    """GKD-style on-policy batches (student_worker/on_policy.py): the student samples responses to the
    batch's prompts, both teachers score the sampled tokens (the SFT teacher's top-k plus the sampled token,
    k + 1 ids, gathered from every role), and the step trains on the sampled positions.

    fraction: share of steps that are on-policy. 0 = off (every batch as the data set has it, exactly the
      run without this section), 1 = every step; in between, step s is on-policy when a uniform draw seeded
      by (seed, s) is below `fraction` (deterministic, so a resume makes the same choice; one choice per
      step, shared by its ranks, so no rank waits for another's sampling).
    temperature, top_p: the sampling distribution, softmax(logits / temperature) cut to its top_p nucleus;
      nothing else (the model's own generation defaults, e.g. top_k or a repetition penalty, are not used).
    max_new_tokens: the sample's length cap; prompts longer than data.max_length - max_new_tokens are cut
      to their last tokens (BOS kept) or refused, per data.overlong.
    lag: 0 = sample with the current weights, then teacher scoring, then the step, in sequence; 1 = the
      next step's sample is drawn with weights one step old while the teachers score the current one.
    """

    fraction: float = Field(default=0.0, ge=0, le=1)
    temperature: float = 1.0
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_new_tokens: int = Field(default=32, gt=0)
    lag: Literal[0, 1] = 0

    @model_validator(mode="after")
    def _sampling(self) -> OnPolicyConfig:
        if self.fraction > 0 and not self.temperature > 0:
            raise ValueError(f"training.on_policy.temperature={self.temperature} with fraction={self.fraction}: "
                             "sampling needs a temperature > 0 (greedy decoding is not the student's policy)")
        return self

    @property
    def enabled(self) -> bool:
        return self.fraction > 0


class TrainingConfig(Strict):
    num_workers: int = Field(default=1, gt=0)
    num_cpus_per_worker: float = Field(default=1.0, ge=0)
    num_gpus_per_worker: float = Field(default=0.0, ge=0)
    # Custom Ray resources each student worker asks for, e.g. {student_gpu: 1} to land on student nodes.
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    batch_size: int = Field(default=8, gt=0)  # global batch (sequences per step), split across workers
    max_steps: int = Field(default=100, gt=0, json_schema_extra=policy(RESUME_FREE))
    lr: float = Field(default=5e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=10, ge=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    grad_clip: float = Field(default=1.0, gt=0)
    prefetch: int = Field(default=2, ge=0)  # batches whose teacher work runs ahead of the student
    checkpoint_every: int = Field(default=50, gt=0)
    keep_checkpoints: int = Field(default=2, gt=0)
    bf16: Literal["auto", "on", "off"] = "auto"  # autocast on GPU when auto
    # DDP gradient all-reduce: "bf16" sends gradients as bfloat16 (half the bytes; a bf16 all-reduce hook on
    # the students' own group, student_worker/distributed.py), "none" as they are.
    grad_compression: Literal["none", "bf16"] = "none"
    # How the student ranks share the work (student_worker/sharding.py): "ddp" replicates the student on every
    # rank and averages gradients; "fsdp2" shards each decoder layer and the rest of the model (and its
    # gradients and AdamW state, and the frozen student base) over the ranks with torch's fully_shard, and
    # checkpoints with torch.distributed.checkpoint (each rank writes its shards). For students larger than
    # one GPU; docs/CLUSTER.md has the per-rank arithmetic.
    strategy: Literal["ddp", "fsdp2"] = "ddp"
    # The progress bar's figures refresh, or (no bar: --no-progress) one console line is printed, every
    # log_every steps; metrics.jsonl always gets every step.
    log_every: int = Field(default=10, gt=0, json_schema_extra=policy(RESUME_FREE))
    # Timeout of every collective of the students' process group (gloo and NCCL). A backstop only: the
    # driver kills the whole group on the first rank error. It must exceed the longest time one rank can
    # wait in a collective for another: at each step's input agreement, a rank whose teacher record is late
    # (a teacher restarting, loading its model) keeps the others waiting.
    collective_timeout_s: float = Field(default=1800.0, gt=0, json_schema_extra=policy(RESUME_FREE))
    # Recompute each decoder layer's activations in backward (less memory, ~1/3 more compute), set in the
    # student worker's setup.
    gradient_checkpointing: bool = Field(default=False, json_schema_extra=policy(RESUME_FREE))
    # On-policy batches (off by default: fraction 0).
    on_policy: OnPolicyConfig = Field(default_factory=OnPolicyConfig)

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainingConfig:
        if self.batch_size % self.num_workers:
            raise ValueError(
                f"training.batch_size={self.batch_size} must be a multiple of "
                f"training.num_workers={self.num_workers}"
            )
        return self

    @model_validator(mode="after")
    def _fsdp2_reduction(self) -> TrainingConfig:
        if self.strategy == "fsdp2" and self.grad_compression != "none":
            raise ValueError(
                f"training.grad_compression={self.grad_compression!r} is a DDP communication hook; with "
                "training.strategy=fsdp2 the gradients are reduce-scattered in fp32 (bf16 compute on GPU): "
                "set training.grad_compression=none"
            )
        return self

    @model_validator(mode="after")
    def _one_rank_per_gpu(self) -> TrainingConfig:
        g = self.num_gpus_per_worker
        if 0 < g < 1 and self.num_workers > 1:
            raise ValueError(
                f"training.num_gpus_per_worker={g} with training.num_workers={self.num_workers} would put "
                f"several student ranks on one GPU, which NCCL refuses (two ranks of one communicator on one "
                f"device): use num_gpus_per_worker: 1 (one GPU per rank), or num_workers: 1"
            )
        return self


class EvaluationConfig(Strict):
    enabled: bool = True
    max_new_tokens: int = Field(default=32, gt=0)
    batch_size: int = Field(default=16, gt=0)
    evaluate_before: bool = True
    evaluate_teacher: bool = True
    # Best-checkpoint selection (MiniLLM's convention), off by default: every `select_every` steps (and at
    # the end) rank 0 scores ROUGE-L on data.validation; the best weights are kept in best_model/ and the
    # test score reported for the student is theirs. Each selection pass costs one greedy evaluation.
    select_best: bool = False
    select_every: int = Field(default=50, gt=0)


class OutputConfig(Strict):
    dir: str = Field(default="runs/{run_name}", json_schema_extra=policy(RESUME_FREE, RUNTIME))
    plot: bool = True
    # The driver checks that every student worker sees output.dir (a shared file system on several nodes);
    # false turns the failed check into a warning (weights then stay on the workers' nodes).
    require_shared_dir: bool = Field(default=True, json_schema_extra=policy(RESUME_FREE))


class ReproducibilityConfig(Strict):
    """What every process that computes (the embedded build, teachers, student workers, evaluation tasks)
    sets before its first tensor operation (common/reproducibility.py).

    torch_threads: intra-op threads (torch.set_num_threads); None leaves torch's own choice, which depends
      on the machine (its cores, OMP_NUM_THREADS), and so can the results.
    cpu_isa: "avx2" pins torch's CPU kernels (ATEN_CPU_CAPABILITY) and MKL (MKL_CBWR) to their AVX2 code
      paths on x86-64 CPUs that have AVX2, so machines with and without AVX-512 compute the same bits;
      "native" lets each library pick the widest path of the CPU. Ignored on other CPUs.
    deterministic: torch.use_deterministic_algorithms(True, warn_only=True) (mostly matters on GPUs; sets
      CUBLAS_WORKSPACE_CONFIG when unset).
    """

    torch_threads: int | None = Field(default=1, gt=0)
    cpu_isa: Literal["avx2", "native"] = "avx2"
    deterministic: bool = False


class LoggingConfig(Strict):
    """Where the training metrics go besides metrics.jsonl (student_worker/tracking.py).

    report_to: "tensorboard" writes event files under <output dir>/tensorboard (needs the `tensorboard`
      package: pip install -e .[tracking]); "wandb" logs to Weights & Biases (needs `wandb`; mode below).
    """

    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)
    wandb_project: str = "deltakd"
    wandb_mode: Literal["online", "offline", "disabled"] = "online"
