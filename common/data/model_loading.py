"""Loading a Hugging Face causal LM straight onto its device, in the dtype the run asks for.

`from_pretrained(..., device_map={"": device}, dtype=...)` materialises each weight on `device` as it is read,
so a model is never first copied whole into host memory (what `.to(device)` after a CPU load does). In
transformers 5.x a `device_map` needs `accelerate` (a dependency of this project); where it is missing (e.g. a
bare GPU image), the model is loaded on the host and moved, with the same result.
"""

from __future__ import annotations

from typing import Any

import torch

from common.config import ModelSpec

__all__ = ["TORCH_DTYPES", "resolve_dtype", "load_causal_lm", "student_dtype"]

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, auto: torch.dtype) -> torch.dtype:
    """A config dtype name ("float32", "bfloat16", "float16") as torch; "auto" -> `auto`."""
    return auto if name == "auto" else TORCH_DTYPES[name]


def student_dtype(spec: ModelSpec) -> torch.dtype:
    """The student's master-weight dtype: `models.student.dtype`, fp32 when "auto".

    "auto" is fp32 on purpose (not the checkpoint's dtype, bf16 for Qwen2): AdamW updates of bf16 weights lose
    most small steps; on a GPU the forward and backward still run in bf16 under autocast (training.bf16).
    A bf16/fp16 setting trains those weights as they are (half the memory, no fp32 master copy)."""
    return resolve_dtype(spec.dtype, torch.float32)


def load_causal_lm(spec: ModelSpec, device: torch.device, dtype: torch.dtype, path: str | None = None,
                   **kwargs: Any) -> Any:
    """`AutoModelForCausalLM` of `spec` (or of a local `path`, e.g. a checkpoint) on `device` in `dtype`."""
    # deferred: transformers costs ~1.6 s at import (measured); the driver's start-up imports this module
    from transformers import AutoModelForCausalLM
    from transformers.utils import is_accelerate_available

    source = path or spec.path
    options: dict[str, Any] = {"dtype": dtype, "trust_remote_code": spec.trust_remote_code, **kwargs}
    if path is None:
        options["revision"] = spec.revision
    if is_accelerate_available():
        return AutoModelForCausalLM.from_pretrained(source, device_map={"": device}, **options)
    model: Any = AutoModelForCausalLM.from_pretrained(source, **options)
    return model.to(device)
