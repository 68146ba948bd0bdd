"""Delta-KD losses on sparse teacher targets (docs/DESIGN.md section 1, ARCHITECTURE.md "Loss entry point").

    targets = targets_from_record(record, device)          # SparseTargets at the counted rows
    out = distillation_loss(student, targets, labels, loss_cfg, pair_alphas=[1.0], student_base=None)
    out.loss_sum / global_token_count  # the caller divides once

`student` (and `student_base`) is logits [B, T, V'] or HiddenStates(hidden, head weight, bias).
Pure torch: never imports Ray, transformers or vLLM (tests/unit/test_import_purity.py).
"""

from common.losses.atoms import teacher_atoms
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
from common.losses.inputs import HiddenStates, StudentInput
from common.losses.loss import LossOutput, distillation_loss
from common.losses.methods import (
    DISTILL_METHODS,
    delta_kd_target,
    delta_move,
    method_token_loss,
    required_roles,
)
from common.losses.scoring import support_logprobs
from common.losses.targets import LossInputError, SparseTargets, targets_from_record

__all__ = [
    "SparseTargets",
    "HiddenStates",
    "StudentInput",
    "LossInputError",
    "LossOutput",
    "targets_from_record",
    "distillation_loss",
    "support_logprobs",
    "teacher_atoms",
    "method_token_loss",
    "delta_kd_target",
    "delta_move",
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
