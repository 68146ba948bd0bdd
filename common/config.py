"""The run configuration: one YAML file describes a whole run.

Every section is a pydantic model with unknown keys forbidden, so a typo is an error that names the bad
key and the nearest valid one. `load_config(path, overrides)` reads YAML, applies `--set a.b=value`
overrides (each parsed as a YAML scalar and then typed by the schema) and validates once.
`dump_config(cfg)` writes the resolved config back to YAML; every run saves it beside its outputs.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# The embedded default run (tiny models built on the spot): what the CLIs run without --config.
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "deploy/configs/tiny.yaml"

__all__ = [
    "DEFAULT_CONFIG",
    "ConfigError",
    "ModelSpec",
    "TeacherPair",
    "ModelsConfig",
    "DataConfig",
    "LossConfig",
    "TeachersConfig",
    "TransportConfig",
    "OnPolicyConfig",
    "TrainingConfig",
    "EvaluationConfig",
    "OutputConfig",
    "EmbeddedConfig",
    "EMBEDDED_PRESET_DEFAULTS",
    "ReproducibilityConfig",
    "LoggingConfig",
    "RunConfig",
    "LOSS_METHODS",
    "OBJECTIVE_METHODS",
    "STUDENT_BASE_TAIL_METHODS",
    "DELTA_FORMS",
    "DELTA_FORM_METHODS",
    "PAIR_SHIFT_METHODS",
    "load_config",
    "config_from_dict",
    "with_legacy_delta_form",
    "apply_overrides",
    "parse_override",
    "dump_config",
    "config_hash",
    "config_diff",
    "RETIRED_KEYS",
    "without_retired_keys",
]

LOSS_METHODS = (
    "sft",
    "kd",
    "rkl",
    "jsd",
    "delta_kd",
    "delta_anchor",
    "delta_inverse",
    "delta_match",
    "parallelogram",
)
LossMethod = Literal[
    "sft", "kd", "rkl", "jsd", "delta_kd", "delta_anchor", "delta_inverse", "delta_match", "parallelogram"
]
# loss.objective other than forward_kl: the methods with one target distribution to score samples against.
OBJECTIVE_METHODS = ("kd", "delta_kd")
# loss.tail: student_base: the methods whose target is the student base (moved by the shift, or as it is).
STUDENT_BASE_TAIL_METHODS = ("delta_kd", "delta_inverse")
# loss.delta_form: the paper's target T1 + alpha (S0 - T0) (default) or the project's first form
# S0 + alpha (T1 - T0); they agree at alpha = 1 (docs/LOSSES.md "delta_form").
DELTA_FORMS = ("paper", "student_shift")
# The methods whose loss depends on loss.delta_form (and on loss.alpha).
DELTA_FORM_METHODS = ("delta_kd", "delta_anchor", "delta_inverse", "delta_match")
# The methods that read every teacher pair (models.extra_pairs): the shift sum_j alpha_j (T1_j - T0_j).
PAIR_SHIFT_METHODS = ("delta_kd", "delta_inverse", "delta_match")
DType = Literal["float32", "bfloat16", "float16", "auto"]
WireDType = Literal["float32", "bfloat16", "float16"]


class ConfigError(ValueError):
    """A config file, key or override is wrong. The message names the culprit."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Strict):
    """A causal LM by hub id or local path. `embedded:<role>` names a tiny model the default run builds."""

    path: str
    revision: str | None = None
    dtype: DType = "auto"
    trust_remote_code: bool = False


class TeacherPair(_Strict):
    """One (base, SFT) teacher couple. Its shift `lp_sft - lp_base` enters the target with weight alpha."""

    base: ModelSpec
    sft: ModelSpec
    alpha: float = 1.0


class ModelsConfig(_Strict):
    base_teacher: ModelSpec
    sft_teacher: ModelSpec
    student: ModelSpec
    # The student's frozen starting point lp_S0. None: the student's own starting checkpoint.
    student_base: ModelSpec | None = None
    # Further teacher pairs for the several-pair shift sum_j alpha_j * (lp_T1_j - lp_T0_j).
    extra_pairs: list[TeacherPair] = Field(default_factory=list)


class ColumnsConfig(_Strict):
    """Column names of an external data set (Dolly-style by default)."""

    instruction: str = "instruction"
    context: str | None = "context"
    response: str = "response"


class DataConfig(_Strict):
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


class LossConfig(_Strict):
    """The training objective. See common.losses for each method's formula as implemented."""

    method: LossMethod = "delta_kd"
    # paper: target = softmax(T1 + alpha * (S0 - T0)), alpha = 0 is kd, 1 the full shift softmax(S0 + T1 - T0);
    # student_shift: target = softmax(S0 + alpha * (T1 - T0)) (the project's first form; alpha = 0 is S0).
    # The same at alpha = 1. The paper form is from a secondary transcription (docs/LOSSES.md).
    delta_form: Literal["paper", "student_shift"] = "paper"
    alpha: float = 1.0  # delta_form's alpha (see above); extra pairs carry their own under student_shift
    tau: float = Field(default=1.0, gt=0)  # distillation temperature; the KD part is scaled by tau^2
    lam: float = Field(default=0.0, ge=0, le=1)  # L = lam * CE + (1 - lam) * tau^2 * L_distill
    # jsd: GKD / TRL's generalised JSD, M = beta*T + (1-beta)*S; beta = 0 is forward KL(T||S), 1 is reverse KL
    jsd_beta: float = Field(default=0.5, ge=0, le=1)
    # Off-support mass: one bucket per role, dropped (support renormalised), or (delta_kd, delta_inverse) the
    # student base's own full row moved by the tail bucket's shift (needs teachers.student_base_source: worker)
    tail: Literal["bucket", "drop", "student_base"] = "bucket"
    # kd / delta_kd only: forward KL to the target, reverse KL, or the sampled-token policy-gradient form
    # (the label must be in the support: records built with the label forced in, as on-policy batches are)
    objective: Literal["forward_kl", "reverse_kl", "sampled_token"] = "forward_kl"
    k: int = Field(default=64, gt=0)  # support size chosen by the SFT teacher
    # parallelogram: weights of the component losses (names from LOSS_METHODS except sft/parallelogram)
    weights: dict[str, float] = Field(default_factory=lambda: {"delta_kd": 0.5, "kd": 0.5})
    chunk_tokens: int = Field(default=256, gt=0)  # counted rows per loss chunk (fp32 [chunk, V] blocks)
    # The student's loss from its last hidden states + LM head, chunk by chunk (no [B, T, V] logits): auto =
    # on unless the model post-processes its logits (e.g. softcapping; then the logits path, logged), on =
    # an error for such a model, off = always the logits path.
    fused: Literal["auto", "on", "off"] = "auto"

    @field_validator("weights")
    @classmethod
    def _known_components(cls, v: dict[str, float]) -> dict[str, float]:
        allowed = [m for m in LOSS_METHODS if m not in ("sft", "parallelogram")]
        for name in v:
            if name not in allowed:
                raise ValueError(f"unknown parallelogram component {name!r}{_did_you_mean(name, allowed)}")
        return v

    @model_validator(mode="after")
    def _compatible(self) -> LossConfig:
        if self.objective != "forward_kl" and self.method not in OBJECTIVE_METHODS:
            raise ValueError(f"loss.objective={self.objective!r} applies to loss.method in {OBJECTIVE_METHODS}, "
                             f"not {self.method!r}")
        if self.tail == "student_base" and self.method not in STUDENT_BASE_TAIL_METHODS:
            raise ValueError(f"loss.tail='student_base' applies to loss.method in {STUDENT_BASE_TAIL_METHODS} "
                             f"(the methods whose target is built on the student base), not {self.method!r}")
        if self.tail == "student_base" and self.method == "delta_inverse" and self.objective != "forward_kl":
            raise ValueError("loss.tail='student_base' with loss.method='delta_inverse' has no loss.objective "
                             f"other than 'forward_kl' (got {self.objective!r})")
        return self

    @property
    def components(self) -> list[str]:
        """The methods this loss computes: the parallelogram's weighted components, else the method."""
        return sorted(self.weights) if self.method == "parallelogram" else [str(self.method)]

    @property
    def reads_pair_shift(self) -> bool:
        """True when a component reads every teacher pair's shift (models.extra_pairs enter the loss)."""
        return any(c in PAIR_SHIFT_METHODS for c in self.components)

    @property
    def delta_form_matters(self) -> bool:
        """True when loss.delta_form changes this loss (with one teacher pair): a Delta method and alpha != 1."""
        return self.alpha != 1.0 and any(c in DELTA_FORM_METHODS for c in self.components)


class TeachersConfig(_Strict):
    engine: Literal["hf", "vllm"] = "hf"  # engine of the SFT teacher (it picks the support); others use hf
    replicas: dict[str, int] = Field(default_factory=lambda: {"sft": 1, "base": 1})
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
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
    # live: the teacher actors score every batch; cache: the teacher cache at `cache` (built with
    # `python -m teacher_service.cache build`), no teacher actor is started; auto: read `cache` when it is
    # complete for this run, else run live for the first epoch and write every record through to it, then
    # read it from the second epoch on (and in later runs).
    source: Literal["live", "cache", "auto"] = "live"
    cache: str | None = None  # a folder or a pyarrow file system URI (file://, s3://, gs://)
    # How a build (and auto's write-through) stores records: a common.codec preset (fp32 is lossless; the
    # default q8d10 is 304 B per token at k = 64, V = 152,064; docs/PERFORMANCE.md has the table).
    cache_encoding: str = "q8d10"
    # Examples per cache shard; a build rounds it up to a multiple of the per-rank batch so that each shard
    # holds whole batches of the plan it replays.
    cache_shard_size: int = Field(default=512, gt=0)
    # A shard whose checksum fails while training: stop the run (after a checkpoint of the completed steps),
    # or recompute that batch live through a running teacher service (teachers.namespace / name_prefix).
    cache_on_error: Literal["stop", "live"] = "stop"
    # Encoded shards each rank's reader keeps in memory (about the shard files' size).
    cache_memory_mb: int = Field(default=1024, gt=0)
    namespace: str = "deltakd"
    name_prefix: str = "teacher"
    attach: bool = False  # attach to a running `python -m teacher_service serve` instead of starting teachers
    max_restarts: int = Field(default=3, ge=-1)
    max_task_retries: int = Field(default=3, ge=-1)
    max_inflight_per_replica: int = Field(default=4, gt=0)
    chunk_tokens: int = Field(default=1024, gt=0)
    # vLLM engine (teachers.engine: vllm). Prompt log-probs are formed over the whole vocabulary for every
    # scheduled prompt token, in memory vLLM's start-up profiler does not count (~2 x tokens x V x 4 bytes:
    # 2.5 GB for 2048 tokens at V = 151,646). So the utilisation leaves that room (0.75 of a 24 GB GPU:
    # 15.2 GB of 7B bf16 weights + ~1 GB activations + KV cache, 57 KB a token for Qwen2-7B) and
    # max_num_batched_tokens caps the tokens per scheduler step (chunked prefill), hence that buffer.
    vllm_gpu_memory_utilization: float = Field(default=0.75, gt=0, le=1)
    vllm_max_num_batched_tokens: int | None = Field(default=2048, gt=0)
    vllm_max_model_len: int | None = None
    # vLLM's cap on log-probs per position (its LLM(max_logprobs=...)); None: loss.k + 1 (top-k + the label).
    vllm_max_logprobs: int | None = Field(default=None, gt=0)


    @field_validator("cache_encoding")
    @classmethod
    def _known_encoding(cls, v: str) -> str:
        from common.codec import ENCODINGS

        if v not in ENCODINGS:
            raise ValueError(f"unknown cache encoding {v!r}{_did_you_mean(v, list(ENCODINGS))}; one of {sorted(ENCODINGS)}")
        return v


class TransportConfig(_Strict):
    kind: Literal["object_store", "rdt"] = "object_store"
    # RDT backend: gloo on CPU, nccl across GPUs, cuda_ipc on one node. "auto" picks gloo/nccl by device.
    rdt_backend: Literal["auto", "gloo", "nccl", "cuda_ipc"] = "auto"


class OnPolicyConfig(_Strict):
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


class TrainingConfig(_Strict):
    num_workers: int = Field(default=1, gt=0)
    num_cpus_per_worker: float = Field(default=1.0, ge=0)
    num_gpus_per_worker: float = Field(default=0.0, ge=0)
    # Custom Ray resources each student worker asks for, e.g. {student_gpu: 1} to land on student nodes.
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    batch_size: int = Field(default=8, gt=0)  # global batch (sequences per step), split across workers
    max_steps: int = Field(default=100, gt=0)
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
    # The progress bar's figures refresh, or (no bar: --no-progress) one console line is printed, every
    # log_every steps; metrics.jsonl always gets every step.
    log_every: int = Field(default=10, gt=0)
    # Timeout of every collective of the students' process group (gloo and NCCL). A backstop only: the
    # driver kills the whole group on the first rank error. It must exceed the longest time one rank can
    # wait in a collective for another: at each step's input agreement, a rank whose teacher record is late
    # (a teacher restarting, loading its model) keeps the others waiting.
    collective_timeout_s: float = Field(default=1800.0, gt=0)
    # Recompute each decoder layer's activations in backward (less memory, ~1/3 more compute), set in the
    # student worker's setup.
    gradient_checkpointing: bool = False
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
    def _one_rank_per_gpu(self) -> TrainingConfig:
        g = self.num_gpus_per_worker
        if 0 < g < 1 and self.num_workers > 1:
            raise ValueError(
                f"training.num_gpus_per_worker={g} with training.num_workers={self.num_workers} would put "
                f"several student ranks on one GPU, which NCCL refuses (two ranks of one communicator on one "
                f"device): use num_gpus_per_worker: 1 (one GPU per rank), or num_workers: 1"
            )
        return self


class EvaluationConfig(_Strict):
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


class OutputConfig(_Strict):
    dir: str = "runs/{run_name}"
    plot: bool = True
    # The driver checks that every student worker sees output.dir (a shared file system on several nodes);
    # false turns the failed check into a warning (weights then stay on the workers' nodes).
    require_shared_dir: bool = True


class EmbeddedModelShape(_Strict):
    hidden_size: int = Field(default=64, gt=0)
    num_layers: int = Field(default=2, gt=0)
    num_heads: int = Field(default=4, gt=0)
    intermediate_size: int = Field(default=128, gt=0)


# Field defaults per embedded preset that differ from the schema's (which are format_shift's). A key absent
# from the config takes its preset's default; a key given explicitly wins.
EMBEDDED_PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    "format_shift": {},
    "style_shift": {"num_val": 200, "num_test": 1000, "pretrain_steps": 800, "sft_steps": 300},
}


class EmbeddedConfig(_Strict):
    """How the embedded default builds its tiny models (only used by `embedded:` model paths).

    `preset` picks the world the models are built in (docs/EXPERIMENT.md says why each exists):
    - format_shift: bases pretrained on prose only; SFT teaches the prompt format and the tasks.
    - style_shift: bases pretrained on prose mixed with instruction-formatted examples answered tersely
      (`teacher_instruct_fraction` / `student_instruct_fraction` of their documents); SFT teaches a
      sentence answer style; the student base reads its own draw of the prose.
    Keys a preset does not use are ignored by its build (and left out of its cache key).
    """

    preset: Literal["format_shift", "style_shift"] = "format_shift"
    seed: int = 0
    vocab_size: int = Field(default=512, gt=16)
    num_train: int = Field(default=2000, gt=0)
    num_val: int = Field(default=100, gt=0)
    num_test: int = Field(default=100, gt=0)
    # format_shift: more test examples drawn after the train split (the build does not change).
    num_test_extra: int = Field(default=0, ge=0)
    # style_shift: the pool of instruction examples the bases' pretraining draws from, and the fraction of
    # each base's pretraining documents that are instruction-formatted (the rest is prose).
    num_pretrain: int = Field(default=2000, ge=0)
    teacher_instruct_fraction: float = Field(default=0.30, ge=0, lt=1)
    student_instruct_fraction: float = Field(default=0.15, ge=0, lt=1)
    corpus_sentences: int = Field(default=4000, gt=0)
    teacher: EmbeddedModelShape = Field(
        default_factory=lambda: EmbeddedModelShape(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=256)
    )
    student: EmbeddedModelShape = Field(default_factory=EmbeddedModelShape)
    # Measured on the shared 2-core machine (build_threads=1): the default build takes ~85 s; the SFT
    # teacher scores ROUGE-L ~0.65 on the test split with greedy decoding, the student base ~0.005.
    pretrain_steps: int = Field(default=400, gt=0)
    sft_steps: int = Field(default=1000, gt=0)
    batch_size: int = Field(default=16, gt=0)
    lr: float = Field(default=2e-3, gt=0)
    max_length: int = Field(default=128, gt=8)
    cache_dir: str | None = None  # default: $DELTAKD_CACHE or ~/.cache/deltakd
    # torch intra-op threads during the build (restored after); None keeps the caller's. Not in the cache key.
    build_threads: int | None = Field(default=1, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _preset_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            preset = data.get("preset", "format_shift")
            defaults = EMBEDDED_PRESET_DEFAULTS.get(preset, {})
            data = {**defaults, **data}
        return data


class ReproducibilityConfig(_Strict):
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


class LoggingConfig(_Strict):
    """Where the training metrics go besides metrics.jsonl (student_worker/tracking.py).

    report_to: "tensorboard" writes event files under <output dir>/tensorboard (needs the `tensorboard`
      package: pip install -e .[tracking]); "wandb" logs to Weights & Biases (needs `wandb`; mode below).
    """

    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)
    wandb_project: str = "deltakd"
    wandb_mode: Literal["online", "offline", "disabled"] = "online"


class RunConfig(_Strict):
    run_name: str = "deltakd"
    seed: int = 0
    models: ModelsConfig
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    teachers: TeachersConfig = Field(default_factory=TeachersConfig)
    transport: TransportConfig = Field(default_factory=TransportConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    embedded: EmbeddedConfig = Field(default_factory=EmbeddedConfig)
    reproducibility: ReproducibilityConfig = Field(default_factory=ReproducibilityConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _selection_needs_validation(self) -> RunConfig:
        d = self.data
        if self.evaluation.select_best:
            if d.validation is None:
                raise ValueError("evaluation.select_best needs data.validation (a validation set; never the test set)")
            if d.validation == d.eval and d.validation_split == d.eval_split:
                raise ValueError(f"data.validation ({d.validation!r}, split {d.validation_split!r}) is the test "
                                 "set (data.eval, data.eval_split): best-checkpoint selection must not see it")
        return self

    @model_validator(mode="after")
    def _student_base_tail_source(self) -> RunConfig:
        if self.loss.tail == "student_base" and self.teachers.student_base_source != "worker":
            raise ValueError("loss.tail='student_base' needs the student base's full row, which only the "
                             "worker's frozen copy has: set teachers.student_base_source='worker' (got "
                             f"{self.teachers.student_base_source!r})")
        return self

    @model_validator(mode="after")
    def _delta_form_pairs(self) -> RunConfig:
        if self.loss.delta_form == "paper" and self.models.extra_pairs and self.loss.reads_pair_shift:
            raise ValueError(
                f"models.extra_pairs ({len(self.models.extra_pairs)}) with loss.delta_form='paper' and "
                f"loss.method={self.loss.method!r}: the paper's target T1 + alpha * (S0 - T0) is defined for one "
                "teacher pair (its alpha weighs the student base's correction, not a pair's shift), so extra "
                "pairs and their alpha_j have no meaning there. Set loss.delta_form='student_shift' for the "
                "several-pair target S0 + sum_j alpha_j * (T1_j - T0_j), or drop models.extra_pairs")
        return self

    @model_validator(mode="after")
    def _on_policy_fits(self) -> RunConfig:
        op = self.training.on_policy
        if not op.enabled:
            return self
        if self.loss.method == "sft":
            raise ValueError("training.on_policy.fraction > 0 needs teachers to score the samples; loss.method "
                             "'sft' has none (cross-entropy on the student's own samples teaches it nothing new)")
        if op.max_new_tokens >= self.data.max_length:
            raise ValueError(f"training.on_policy.max_new_tokens={op.max_new_tokens} leaves no room for a prompt "
                             f"in data.max_length={self.data.max_length}")
        return self

    @property
    def output_dir(self) -> Path:
        return Path(self.output.dir.format(run_name=self.run_name))

    @model_validator(mode="after")
    def _cache_source(self) -> RunConfig:
        t = self.teachers
        if t.source != "live" and not t.cache:
            raise ValueError(f"teachers.source={t.source} needs teachers.cache (a folder or URI of the teacher cache)")
        if t.student_base_source == "cache" and t.source != "cache":
            raise ValueError("teachers.student_base_source=cache needs teachers.source=cache (lp_S0 is a role scored "
                             f"once into a finished cache with `cache add-role`), got teachers.source={t.source}")
        if t.source != "live" and self.training.on_policy.fraction > 0:
            raise ValueError(f"training.on_policy.fraction={self.training.on_policy.fraction} needs teachers.source="
                             f"live (the teachers score the student's own samples; a cache holds the training set's "
                             f"records), got teachers.source={t.source}")
        if t.source != "live" and self.loss.objective == "sampled_token":
            raise ValueError("loss.objective=sampled_token needs teachers.source=live (each label is forced into its "
                             f"position's support; the cache holds the top-k alone), got teachers.source={t.source}")
        return self

    @model_validator(mode="after")
    def _vllm_limits(self) -> RunConfig:
        """vLLM's limits, checked when the config loads rather than on the first batch."""
        t = self.teachers
        if t.engine != "vllm":
            return self
        if self.loss.tau != 1.0:
            raise ValueError(f"loss.tau={self.loss.tau} with teachers.engine=vllm: vLLM's prompt log-probs are at "
                             "temperature 1 and their normaliser at another tau is not recoverable from the top-k; "
                             "use loss.tau=1 or teachers.engine=hf")
        if t.vllm_max_logprobs is not None and self.loss.k > t.vllm_max_logprobs:
            raise ValueError(f"loss.k={self.loss.k} exceeds teachers.vllm_max_logprobs={t.vllm_max_logprobs} "
                             "(vLLM returns at most that many log-probs per position); raise it or lower loss.k")
        return self


# ----------------------------------------------------------------------------------------------------
# Loading, overrides and errors


# Top-level keys the schema had and no longer has, with what took their place: a config that sets one is refused
# with this hint; a config this program saved itself (a run's config.yaml, a checkpoint's state.json) drops it
# when read back (`without_retired_keys`), since every dump of the old schema carried it.
RETIRED_KEYS = {
    "testing": "fault injection is no longer configured: a test or benchmark builds a common.faults.FaultPlan "
               "and hands it to the driver (run_training(cfg, faults=...)), the teacher pool or the cache build",
}


def without_retired_keys(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config dict without the RETIRED_KEYS sections (a shallow copy)."""
    return {k: v for k, v in saved.items() if k not in RETIRED_KEYS}


def _did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at `loc` (for the nearest-valid-key hint)."""
    model: Any = RunConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        for c in list(candidates):
            candidates.extend(getattr(c, "__args__", ()))
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden" and len(loc) == 1 and loc[0] in RETIRED_KEYS:
            lines.append(f"  unknown key {key!r} (removed: {RETIRED_KEYS[str(loc[0])]})")
        elif e["type"] == "extra_forbidden":
            owner = _model_at(loc)
            hint = _did_you_mean(str(loc[-1]), list(owner.model_fields)) if owner else ""
            lines.append(f"  unknown key {key!r}{hint}")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {key}: {e['msg']}{got_s}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `a.b.c=value`; the value is read as a YAML scalar/flow value (so 3, 0.5, true, [1,2] work)."""
    if "=" not in text:
        raise ConfigError(f"malformed override {text!r}: expected KEY=VALUE, e.g. loss.alpha=0.5")
    key, _, raw = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p or not p.replace("_", "").replace("-", "").isalnum() for p in parts):
        raise ConfigError(f"malformed override {text!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"malformed override {text!r}: value is not valid YAML ({exc})") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--set` overrides to a raw config dict (before validation). Returns a new dict."""
    out = json.loads(json.dumps(data))
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = {}
                node[p] = child
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {p!r} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None, source: str = "<dict>") -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    raw = apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def with_legacy_delta_form(data: dict[str, Any], source: str = "<dict>") -> dict[str, Any]:
    """A saved config (a run's config.yaml, a checkpoint's state) read as the loss it ran. One saved before
    loss.delta_form existed ran the student_shift form: the key is set to student_shift where the form
    changes that loss (alpha != 1, or extra pairs read by the method), else to the default (the same
    computation). A config that has the key is returned as it is. Raises ConfigError if it does not
    validate either way."""
    loss = data.get("loss") or {}
    if "delta_form" in loss:
        return data
    old = {**data, "loss": {**loss, "delta_form": "student_shift"}}
    cfg = config_from_dict(old, source=source)
    if cfg.loss.delta_form_matters or (cfg.models.extra_pairs and cfg.loss.reads_pair_shift):
        return old
    return {**data, "loss": {**loss, "delta_form": "paper"}}


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read and validate a YAML run config. Errors name the file, the key and the nearest valid key."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    return config_from_dict(data, overrides, source=str(p))


def dump_config(cfg: RunConfig, path: str | Path | None = None) -> str:
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text


def config_hash(cfg: RunConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (for `--resume` from another config)."""
    keys = sorted(set(a) | set(b))
    out: list[str] = []
    for k in keys:
        name = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(config_diff(va, vb, name + "."))
        elif va != vb:
            out.append(f"{name}: {va!r} != {vb!r}")
    return out
