"""`RunConfig`: one YAML file describes a whole run; the checks that span its sections."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from .base import RESUME_FREE, RUNTIME, Strict, policy
from .data import DataConfig
from .embedded import EmbeddedConfig
from .loss import LossConfig
from .models import ModelsConfig
from .teachers import TeachersConfig, TransportConfig
from .training import EvaluationConfig, LoggingConfig, OutputConfig, ReproducibilityConfig, TrainingConfig

__all__ = ["RunConfig"]


class RunConfig(Strict):
    run_name: str = Field(default="deltakd", json_schema_extra=policy(RUNTIME))
    seed: int = 0
    models: ModelsConfig
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    teachers: TeachersConfig = Field(default_factory=TeachersConfig)
    transport: TransportConfig = Field(default_factory=TransportConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, json_schema_extra=policy(RESUME_FREE))
    output: OutputConfig = Field(default_factory=OutputConfig)
    embedded: EmbeddedConfig = Field(default_factory=EmbeddedConfig)
    reproducibility: ReproducibilityConfig = Field(default_factory=ReproducibilityConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig, json_schema_extra=policy(RESUME_FREE, RUNTIME))

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
    def _fsdp2_transport(self) -> RunConfig:
        tr = self.transport
        if self.training.strategy == "fsdp2" and tr.kind == "rdt" and tr.rdt_backend == "gloo":
            raise ValueError("training.strategy=fsdp2 makes the student ranks' group torch's default process "
                             "group, which Ray's gloo RDT transport would take over: use transport.kind="
                             "object_store, or transport.rdt_backend=nccl / cuda_ipc")
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
        if t.source != "live" and not t.cache.uri:
            raise ValueError(f"teachers.source={t.source} needs teachers.cache.uri (a folder or URI of the teacher cache)")
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
        if t.vllm.max_logprobs is not None and self.loss.k > t.vllm.max_logprobs:
            raise ValueError(f"loss.k={self.loss.k} exceeds teachers.vllm.max_logprobs={t.vllm.max_logprobs} "
                             "(vLLM returns at most that many log-probs per position); raise it or lower loss.k")
        return self
