"""What every config section shares: strict pydantic models, the config error, the method and dtype names,
and the did-you-mean hint."""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

__all__ = ["ConfigError", "did_you_mean", "RESUME_FREE", "RUNTIME", "policy", "keys_with_policy", "LOSS_METHODS",
           "OBJECTIVE_METHODS", "STUDENT_BASE_TAIL_METHODS",
           "DELTA_FORMS", "DELTA_FORM_METHODS", "PAIR_SHIFT_METHODS", "DType", "WireDType", "LossMethod"]

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


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


# How a key counts beyond its value, declared on the field (`Field(..., json_schema_extra=policy(...))`) and
# read by `keys_with_policy`; a tag on a section covers every key in it.
# - RESUME_FREE: may differ between the run that wrote a checkpoint and the run resuming from it (the budget,
#   where outputs go, evaluation, where the teachers run and where records come from: the teachers' models, k,
#   tau and wire are still compared, and a cache is checked against the run when opened), how often the
#   console logs, the collective timeout, gradient checkpointing (it recomputes the same activations), tracking.
# - RUNTIME: where a run writes, which actors it talks to and where it logs, not what it computes (left out of
#   an experiment run's identity).
RESUME_FREE = "resume_free"
RUNTIME = "runtime"


def policy(*tags: str) -> dict[str, Any]:
    """The `json_schema_extra` of a field with these policy tags."""
    return {"policy": list(tags)}


def keys_with_policy(model: type[BaseModel], tag: str, prefix: str = "") -> list[str]:
    """Dotted keys of `model` tagged `tag`, in schema order; a tagged section is `"name."` (all of it)."""
    out: list[str] = []
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        ann = field.annotation
        section = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        tags = extra.get("policy")
        if isinstance(tags, list) and tag in tags:
            out.append(f"{prefix}{name}." if section is not None else f"{prefix}{name}")
        elif section is not None:
            out.extend(keys_with_policy(section, tag, f"{prefix}{name}."))
    return out
