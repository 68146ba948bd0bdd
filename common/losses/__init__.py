"""Delta-KD losses on sparse teacher targets (DESIGN.md section 1, ARCHITECTURE.md "Loss entry point").

    targets = targets_from_record(record, device)
    out = distillation_loss(student_logits, targets, labels, loss_cfg, pair_alphas=[1.0])
    out.loss_sum / global_token_count  # the caller divides once

Pure torch: never imports Ray, transformers or vLLM (tests/unit/test_import_purity.py).
"""

from common.losses.divergences import (
    LOG_TAIL_FLOOR,
    LOGPROB_FLOOR,
    centred_shift_mse,
    delta_target,
    entropy,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    safe_log,
)
from common.losses.loss import LossOutput, distillation_loss, teacher_atoms
from common.losses.methods import DISTILL_METHODS, method_token_loss, required_roles
from common.losses.targets import LossInputError, SparseTargets, targets_from_record

__all__ = [
    "SparseTargets",
    "LossInputError",
    "LossOutput",
    "targets_from_record",
    "distillation_loss",
    "teacher_atoms",
    "method_token_loss",
    "required_roles",
    "DISTILL_METHODS",
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "delta_target",
    "centred_shift_mse",
    "entropy",
    "safe_log",
    "LOG_TAIL_FLOOR",
    "LOGPROB_FLOOR",
]
