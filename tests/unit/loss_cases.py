"""Random loss test cases, run through `distillation_loss` (both input kinds) and the dense reference.

A case holds a student head (hidden [B, T, H], weight [V + pad, H], bias) whose logits z = h W^T + b are
the student logits of the `logits` kind, dense teacher log-probs per role, labels (-100 where the
position is not counted) and the sparse targets of the counted positions. The padded head rows get a
bias of 50, so anything that fails to cut them moves the loss a lot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from common.config import LossConfig
from common.losses import HiddenStates, SparseTargets, distillation_loss, targets_from_record
from common.topk import TopKRecord
from tests.unit.loss_reference import reference_loss
from tests.unit.tolerances import Tol

__all__ = ["Case", "make_case", "run_both", "assert_match", "forced_label_targets", "cfg_for", "ROLES",
           "PAIR_ROLES", "METHODS", "TAILS", "KINDS", "PARALLELOGRAM"]

METHODS = ["kd", "rkl", "jsd", "delta_kd", "delta_anchor", "delta_inverse", "delta_match", "parallelogram"]
TAILS = ["bucket", "drop"]
KINDS = ["logits", "hidden"]
ROLES = ["sft", "base", "student_base"]
PAIR_ROLES = ROLES + ["sft_1", "base_1"]
PARALLELOGRAM = {"delta_kd": 0.4, "kd": 0.2, "delta_match": 0.1, "jsd": 0.1, "delta_anchor": 0.1,
                 "delta_inverse": 0.05, "rkl": 0.05}


def cfg_for(method: str, tail: str = "bucket", **kw) -> LossConfig:
    base = dict(method=method, tail=tail, lam=0.25, jsd_beta=0.3, loss_chunk_rows=8, weights=PARALLELOGRAM)
    base.update(kw)
    return LossConfig(**base)


@dataclass
class Case:
    dense: dict[str, Tensor]  # role -> [B, T, V] fp32 log-probs at tau
    targets: SparseTargets
    labels: Tensor  # [B, T], -100 off the counted positions
    hidden: Tensor  # [B, T, H]
    weight: Tensor  # [V + pad, H]
    bias: Tensor  # [V + pad]
    base_head: tuple[Tensor, Tensor, Tensor] | None = None  # student base (hidden, weight, bias), if any

    @property
    def z(self) -> Tensor:
        """The student logits of the `logits` kind (fp32 [B, T, V + pad])."""
        return (self.hidden.double() @ self.weight.double().T + self.bias.double()).float()


def _head(g: torch.Generator, b: int, t: int, v: int, pad: int, h: int, scale: float):
    hidden = torch.randn(b, t, h, generator=g)
    weight = torch.randn(v + pad, h, generator=g) * (scale / h**0.5)
    bias = torch.randn(v + pad, generator=g) * 0.1
    bias[v:] = 50.0  # padded vocabulary rows: junk that must be cut
    return hidden, weight, bias


def make_case(b=3, t=17, v=101, k=None, roles=ROLES, tau=1.0, wire="float32", seed=0, pad=3, scale=3.0,
              h=16, base_kind: str | None = None) -> Case:
    """Random case. base_kind None: role student_base (if in roles) is in the record; "logits"/"hidden":
    it is left out of the record and the case carries the base's own head (`base_head`), whose dense
    log-probs are the reference's student_base."""
    g = torch.Generator().manual_seed(seed)
    dense = {r: torch.log_softmax(torch.randn(b, t, v, generator=g, dtype=torch.float64) * scale / tau, -1)
             .float() for r in roles}
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :3] = -100
    labels[torch.rand(b, t, generator=g) < 0.15] = -100
    hidden, weight, bias = _head(g, b, t, v, pad, h, scale)
    base_head = None
    if base_kind is not None:
        base_head = _head(g, b, t, v, pad, h, scale)
        z0 = base_head[0].double() @ base_head[1].double().T + base_head[2].double()
        dense["student_base"] = torch.log_softmax(z0[..., :v] / tau, -1).float()
    mask = (labels != -100).numpy()
    on_wire = {r: d.numpy() for r, d in dense.items() if base_kind is None or r != "student_base"}
    rec = TopKRecord.from_dense(7, on_wire, k or v, mask, tau, wire_dtype=wire)
    rec.validate(required_roles=list(on_wire))
    return Case(dense, targets_from_record(rec), labels, hidden, weight, bias, base_head)


def forced_label_targets(case: Case, k: int, tau: float = 1.0) -> SparseTargets:
    """Targets whose support is the SFT teacher's top-k plus the label (K = k + 1, ids distinct): the
    (k+1)-th slot holds the label, or the (k+1)-th best id when the label is already in the top k."""
    counted = case.labels != -100
    lab = case.labels[counted]
    dense = {r: d[counted].double() for r, d in case.dense.items() if r in case.targets.logprobs}
    order = torch.argsort(-dense["sft"], dim=-1, stable=True)
    top = order[:, :k]
    in_top = (top == lab[:, None]).any(-1)
    extra = torch.where(in_top, order[:, k], lab)
    ids = torch.cat([top, extra[:, None]], dim=-1)
    lp = {r: d.gather(-1, ids).float() for r, d in dense.items()}
    tail = {r: (1.0 - d.exp().gather(-1, ids).sum(-1)).clamp(0, 1).float() for r, d in dense.items()}
    t = case.targets
    return SparseTargets(ids, lp, tail, t.rows, t.batch_shape, tau, t.vocab_size, t.batch_id)


def _student(case: Case, kind: str, dtype: torch.dtype):
    if kind == "logits":
        zs = case.z.to(dtype).requires_grad_()
        return zs, [zs]
    hs, ws, bs = (x.detach().clone().requires_grad_() for x in (case.hidden.to(dtype), case.weight, case.bias))
    return HiddenStates(hs, ws, bs), [hs, ws, bs]


def _base(case: Case, kind: str | None, tau: float):
    if case.base_head is None:
        return None
    h0, w0, b0 = case.base_head
    if kind == "hidden":
        return HiddenStates(h0, w0, b0)
    return (h0.double() @ w0.double().T + b0.double()).float()


def run_both(case: Case, cfg: LossConfig, alphas=None, atoms=False, kind="logits", student_dtype=torch.float32,
             targets: SparseTargets | None = None, base_kind: str | None = None):
    """(mean loss, its grads, reference mean loss, reference grads); grads per input (logits, or hidden,
    weight, bias), fp64."""
    targets = case.targets if targets is None else targets
    student, params = _student(case, kind, student_dtype)
    out = distillation_loss(student, targets, case.labels, cfg, pair_alphas=alphas,
                            student_base=_base(case, base_kind, cfg.tau))
    assert out.num_tokens > 0
    (out.loss_sum / out.num_tokens).backward()
    if kind == "logits":
        ref_params = [case.z.to(student_dtype).double().requires_grad_()]
        zr = ref_params[0]
    else:
        ref_params = [x.to(student_dtype).double().requires_grad_() if i == 0 else x.double().requires_grad_()
                      for i, x in enumerate((case.hidden, case.weight, case.bias))]
        zr = ref_params[0] @ ref_params[1].T + ref_params[2]
    ref, n = reference_loss(zr, {r: d.double() for r, d in case.dense.items()}, case.labels, cfg, alphas,
                            ids=targets.ids if atoms or cfg.tail == "student_base" else None)
    (ref / n).backward()
    assert n == out.num_tokens
    return (out.loss_sum.detach().double() / n, [p.grad.double() for p in params], ref.detach() / n,
            [p.grad for p in ref_params])


def assert_match(got, got_grads, want, want_grads, tol: Tol):
    torch.testing.assert_close(got, want, rtol=tol.rtol, atol=tol.atol)
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        # each input's gradient to its own absolute tolerance: the head weight's entries sum over rows
        atol = tol.grad_atol if i == 0 else tol.head_grad_atol
        torch.testing.assert_close(a, b, rtol=0.0, atol=atol, msg=lambda m, i=i: f"grad {i}: {m}")
        assert torch.isfinite(a).all()

