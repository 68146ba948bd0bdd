"""Config keys of the scale work: vLLM limits checked at load, DDP gradient compression."""

from __future__ import annotations

import pytest

from common.config import ConfigError, config_from_dict

BASE = {"models": {"base_teacher": {"path": "a"}, "sft_teacher": {"path": "b"}, "student": {"path": "c"}}}


@pytest.mark.parametrize("overrides, culprit", [
    (["teachers.engine=vllm", "loss.tau=2"], "loss.tau=2.0 with teachers.engine=vllm"),
    (["teachers.engine=vllm", "teachers.vllm.max_logprobs=20"], "loss.k=64 exceeds teachers.vllm.max_logprobs=20"),
])
def test_vllm_limits_are_config_errors_naming_the_key(overrides: list[str], culprit: str) -> None:
    with pytest.raises(ConfigError, match=culprit):
        config_from_dict(BASE, overrides)


def test_vllm_defaults_and_hf_is_unconstrained() -> None:
    cfg = config_from_dict(BASE, ["teachers.engine=vllm"])
    assert cfg.teachers.vllm.max_logprobs is None  # the pool asks vLLM for loss.k + 1
    assert cfg.teachers.vllm.gpu_memory_utilization == 0.75 and cfg.teachers.vllm.max_num_batched_tokens == 2048
    config_from_dict(BASE, ["loss.tau=2", "teachers.vllm.max_logprobs=20"])  # engine hf: no vLLM limits


def test_grad_compression_key() -> None:
    assert config_from_dict(BASE).training.grad_compression == "none"
    assert config_from_dict(BASE, ["training.grad_compression=bf16"]).training.grad_compression == "bf16"
    with pytest.raises(ConfigError, match="grad_compression"):
        config_from_dict(BASE, ["training.grad_compression=fp8"])
