"""The run configuration: one YAML file describes a whole run.

Every section is a pydantic model with unknown keys forbidden, so a typo is an error that names the bad
key and the nearest valid one. `load_config(path, overrides)` reads YAML, applies `--set a.b=value`
overrides (each parsed as a YAML scalar and then typed by the schema) and validates once.
`dump_config(cfg)` writes the resolved config back to YAML; every run saves it beside its outputs.
"""

from __future__ import annotations

from pathlib import Path

from .base import (
    DELTA_FORM_METHODS,
    DELTA_FORMS,
    LOSS_METHODS,
    OBJECTIVE_METHODS,
    PAIR_SHIFT_METHODS,
    RESUME_FREE,
    RUNTIME,
    STUDENT_BASE_TAIL_METHODS,
    ConfigError,
    keys_with_policy,
)
from .data import ColumnsConfig, DataConfig
from .embedded import EMBEDDED_PRESET_DEFAULTS, EmbeddedConfig, EmbeddedModelShape
from .loading import (
    RENAMED_KEYS,
    RETIRED_KEYS,
    apply_overrides,
    config_diff,
    config_from_dict,
    config_hash,
    dump_config,
    load_config,
    parse_override,
    with_legacy_delta_form,
    without_retired_keys,
)
from .loss import LossConfig
from .models import ModelsConfig, ModelSpec, TeacherPair
from .run import RunConfig
from .teachers import TeacherCacheConfig, TeachersConfig, TransportConfig, VLLMConfig
from .training import (
    EvaluationConfig,
    LoggingConfig,
    OnPolicyConfig,
    OutputConfig,
    ReproducibilityConfig,
    TrainingConfig,
)

# The embedded default run (tiny models built on the spot): what the CLIs run without --config.
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "deploy/configs/tiny.yaml"

__all__ = [
    "DEFAULT_CONFIG",
    "ConfigError",
    "ModelSpec",
    "TeacherPair",
    "ModelsConfig",
    "ColumnsConfig",
    "DataConfig",
    "LossConfig",
    "TeachersConfig",
    "TeacherCacheConfig",
    "VLLMConfig",
    "TransportConfig",
    "OnPolicyConfig",
    "TrainingConfig",
    "EvaluationConfig",
    "OutputConfig",
    "EmbeddedConfig",
    "EmbeddedModelShape",
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
    "RESUME_FREE",
    "RUNTIME",
    "keys_with_policy",
    "RENAMED_KEYS",
    "without_retired_keys",
]
