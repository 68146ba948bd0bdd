"""An SFT teacher given as a LoRA adapter of the base teacher: detection and the config checks.

`models.sft_teacher` may name a PEFT adapter (a directory or hub id holding `adapter_config.json`) whose base
is `models.base_teacher`. The teacher service then loads the base weights once and serves both roles from
them (teacher_service/engine_pair.py): `sft` with the adapter on, `base` with it off. This module only reads
`adapter_config.json` (stdlib json; the hub's copy through huggingface_hub, deferred: it is needed only for
hub ids) and decides whether a run is such a pair; model paths must be resolved (`embedded:` built) first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from common.config import ConfigError, ModelSpec, RunConfig

__all__ = ["ADAPTER_CONFIG", "adapter_config", "lora_pair_base", "same_base"]

ADAPTER_CONFIG = "adapter_config.json"


def adapter_config(spec: ModelSpec) -> dict[str, Any] | None:
    """The spec's `adapter_config.json` as a dict, or None when the spec is a full model.

    A local directory is read directly; any other path is asked of the hub (a file that is missing there, or
    a repository the hub does not know, means "not an adapter": loading the model reports its own errors).
    """
    local = Path(spec.path).expanduser()
    if local.is_dir():
        file = local / ADAPTER_CONFIG
        return json.loads(file.read_text()) if file.is_file() else None
    if spec.path.startswith(("embedded:", "/", ".")):  # unresolved or a missing local path: not a hub id
        return None
    # deferred: huggingface_hub is only needed for hub ids (it comes with transformers)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        path = hf_hub_download(spec.path, ADAPTER_CONFIG, revision=spec.revision)
    except (EntryNotFoundError, RepositoryNotFoundError, LocalEntryNotFoundError):
        return None
    return json.loads(Path(path).read_text())


def _local_dir(path: str, relative_to: Path | None) -> Path | None:
    for root in ([relative_to] if relative_to is not None else []) + [Path.cwd()]:
        p = (root / Path(path).expanduser()) if not os.path.isabs(path) else Path(path)
        if p.is_dir():
            return p.resolve()
    return None


def same_base(adapter_base: str | None, base_path: str, adapter_dir: Path | None = None) -> bool:
    """Whether an adapter's `base_model_name_or_path` names the model at `base_path`.

    Yes when the strings are equal, when both are local directories that resolve to the same place (a relative
    name is read relative to the adapter's directory first: the embedded build writes `../base_teacher`), or
    when their last path components are equal (a local copy of a hub model, e.g. Qwen/Qwen2-7B and
    /models/Qwen2-7B). An adapter that does not name its base (None) is taken on trust.
    """
    if adapter_base is None or adapter_base.rstrip("/") == base_path.rstrip("/"):
        return True
    a, b = _local_dir(adapter_base, adapter_dir), _local_dir(base_path, None)
    if a is not None and b is not None:
        return a == b
    return Path(adapter_base.rstrip("/")).name.lower() == Path(base_path.rstrip("/")).name.lower()


def lora_pair_base(cfg: RunConfig) -> ModelSpec | None:
    """models.base_teacher when models.sft_teacher is a LoRA adapter of it (one pair actor serves both), else None.

    Raises ConfigError, naming both models, when the adapter's base is another model; when teachers.engine is
    vllm (its LoRA support cannot score the base role at the SFT support: docs/TEACHER_SERVICE.md); and when
    an extra pair's SFT teacher is an adapter (only pair 0 may be one).
    """
    for j, pair in enumerate(cfg.models.extra_pairs):
        if adapter_config(pair.sft) is not None or adapter_config(pair.base) is not None:
            raise ConfigError(f"models.extra_pairs.{j}: a LoRA adapter as a teacher is supported for "
                              "models.sft_teacher only (merge the adapter into a full model for an extra pair)")
    m = cfg.models
    if adapter_config(m.base_teacher) is not None:
        raise ConfigError(f"models.base_teacher={m.base_teacher.path!r} is a LoRA adapter; the base teacher must "
                          "be a full model (models.sft_teacher may be an adapter of it)")
    conf = adapter_config(m.sft_teacher)
    if conf is None:
        return None
    if str(conf.get("peft_type", "LORA")).upper() != "LORA":
        raise ConfigError(f"models.sft_teacher={m.sft_teacher.path!r} is a {conf.get('peft_type')} adapter; "
                          "only LoRA adapters are supported")
    local = Path(m.sft_teacher.path).expanduser()
    base_name = conf.get("base_model_name_or_path")
    if not same_base(base_name, m.base_teacher.path, local if local.is_dir() else None):
        raise ConfigError(f"models.sft_teacher={m.sft_teacher.path!r} is a LoRA adapter of {base_name!r}, but "
                          f"models.base_teacher is {m.base_teacher.path!r}: the adapter's base must be the base "
                          "teacher (set models.base_teacher to the adapter's base, or use a merged SFT model)")
    if cfg.teachers.engine == "vllm":
        raise ConfigError(f"teachers.engine=vllm with a LoRA SFT teacher ({m.sft_teacher.path!r}) is not supported: "
                          "vLLM can apply the adapter for the sft role's top-k, but the base role (adapter off) must be "
                          "scored at the SFT support ids, which vLLM's prompt log-probs (the top-n and the prompt "
                          "token) do not give; only vLLM builds with per-position candidate ids "
                          "(SamplingParams.prompt_logprob_token_ids) could, and that pair is not implemented. Use "
                          "teachers.engine=hf, or a merged SFT model with vllm (docs/TEACHER_SERVICE.md, 'A LoRA "
                          "teacher pair')")
    return m.base_teacher
