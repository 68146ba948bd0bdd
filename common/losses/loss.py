"""`distillation_loss`: every method of docs/DESIGN.md section 1 on sparse targets + the student's output.

Per counted position (the rows of the targets; for `sft` the positions whose label is not -100):

    L_token = lam * CE(softmax(z), label) + (1 - lam) * tau^2 * L_method

where z are the student's logits at temperature 1 (CE) and L_method is computed from s = z / tau on the
atoms (`common.losses.atoms`, `common.losses.methods`) or, with `tail: student_base`, on the whole
vocabulary (`common.losses.student_base_tail`). `loss_sum` is the sum of L_token over counted positions;
the caller divides once by the global token count.

The student comes as logits `[B, T, V']` or as `HiddenStates` (last hidden states + LM head); the frozen
student base (lp_S0, when the targets lack the role) likewise. Either way the counted rows are processed
`cfg.loss_chunk_rows` at a time in fp32 `[chunk, V]` blocks allocated once per call (`work`: the chunk's
logits, then their gradient; `scratch`: logsumexp temporaries and the CE softmax; `base`: the student
base's row, only when it is an input). Nothing `[B, T, V]` exists on the hidden-state path, and no fp32
`[N, V]` on either. The gradient with respect to the logits is formed analytically from the gradient of
the small `[chunk, A]` atom tensor (autograd on the atoms only), then pushed to the inputs per chunk
(`common.losses.inputs`): nothing `[chunk, V]` is kept for backward, and `loss_sum` can be
back-propagated once. With dL/ds from the method, dL/dz = (1 - lam) tau dL/ds + lam (softmax(z) - onehot).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from common.config import LossConfig
from common.losses.atoms import (
    atom_grad_into,
    logsumexp_rows,
    row_support,
    student_atoms,
    teacher_atoms,
)
from common.losses.inputs import HiddenStates, StudentInput, batch_shape_of, row_source
from common.losses.methods import delta_move, method_token_loss, required_roles
from common.losses.student_base_tail import student_base_tail_chunk
from common.losses.targets import LossInputError, SparseTargets
from common.topk import ROLE_STUDENT_BASE, pair_roles

__all__ = ["LossOutput", "distillation_loss", "teacher_atoms", "IGNORE_INDEX"]

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    """loss_sum: scalar fp32, sum over counted tokens (grad flows to the student's input);
    num_tokens: counted tokens; metrics: per-token means over counted tokens (0.0 when none)."""

    loss_sum: Tensor
    num_tokens: int
    metrics: dict[str, float] = field(default_factory=dict)


def _vocab_rows(x: StudentInput, what: str) -> int:
    if isinstance(x, HiddenStates):
        if x.hidden.ndim != 3 or x.weight.ndim != 2 or x.hidden.shape[-1] != x.weight.shape[1]:
            raise LossInputError(f"{what}: hidden states {tuple(x.hidden.shape)} [B, T, H] and head weight "
                                 f"{tuple(x.weight.shape)} [V', H] do not fit")
        if x.bias is not None and tuple(x.bias.shape) != (x.weight.shape[0],):
            raise LossInputError(f"{what}: head bias {tuple(x.bias.shape)} != [V'] = {(x.weight.shape[0],)}")
        return int(x.weight.shape[0])
    if x.ndim != 3:
        raise LossInputError(f"{what} logits must be [B, T, V], got shape {tuple(x.shape)}")
    return int(x.shape[-1])


def _check_inputs(student: StudentInput, targets: SparseTargets | None, labels: Tensor, cfg: LossConfig,
                  student_base: StudentInput | None) -> int:
    """Shapes, vocabulary, tau and the roles' sources. Returns the vocabulary size to cut to."""
    b, t = batch_shape_of(student)
    v_pad = _vocab_rows(student, "student")
    if tuple(labels.shape) != (b, t):
        raise LossInputError(f"labels shape {tuple(labels.shape)} != the student's [B, T] {(b, t)}")
    if targets is None:
        if cfg.method != "sft":
            raise LossInputError(f"loss method {cfg.method!r} needs teacher targets, got None")
        return v_pad
    bid = targets.batch_id
    if tuple(targets.batch_shape) != (b, t):
        raise LossInputError(f"batch {bid}: targets were made for [B, T] = {tuple(targets.batch_shape)}, the "
                             f"student's output is {(b, t)}")
    n, k = targets.shape
    if tuple(targets.rows.shape) != (n,):
        raise LossInputError(f"batch {bid}: targets rows {tuple(targets.rows.shape)} != [N] = {(n,)}")
    if v_pad < targets.vocab_size:
        raise LossInputError(f"batch {bid}: the student's output has {v_pad} vocabulary rows < the "
                             f"tokenizer's vocab_size {targets.vocab_size}")
    if not 0 < k <= targets.vocab_size:
        raise LossInputError(f"batch {bid}: support size K={k} out of range (1..{targets.vocab_size})")
    if abs(targets.tau - cfg.tau) > 1e-6 * max(1.0, cfg.tau):
        raise LossInputError(f"batch {bid}: targets were made at tau={targets.tau}, loss.tau={cfg.tau}")
    if student_base is not None:
        if batch_shape_of(student_base) != (b, t) or _vocab_rows(student_base, "student_base") < targets.vocab_size:
            raise LossInputError(f"batch {bid}: student_base output does not match the student's [B, T] {(b, t)} "
                                 f"and vocab_size {targets.vocab_size}")
        if ROLE_STUDENT_BASE in targets.logprobs:
            raise LossInputError(f"batch {bid}: lp_S0 given twice: the targets hold role {ROLE_STUDENT_BASE!r} "
                                 "and a student_base output was passed")
    if cfg.tail == "student_base" and student_base is None:
        raise LossInputError(f"batch {bid}: loss.tail='student_base' needs the student base's full row: pass "
                             "student_base (its hidden states + head, or logits; teachers.student_base_source: "
                             "worker)")
    return int(targets.vocab_size)


def _counted_rows(targets: SparseTargets | None, labels: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """(rows [N], labels at those rows [N]); checks that rows == positions with a label, labels in range."""
    flat = labels.reshape(-1)
    labelled = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    bid = None if targets is None else targets.batch_id
    if targets is not None:
        rows = targets.rows.to(labels.device)
        if rows.numel() != labelled.numel() or not torch.equal(rows, labelled):
            extra = rows[flat[rows.clamp(0, flat.numel() - 1)] == IGNORE_INDEX][:5].tolist() if rows.numel() else []
            have = torch.zeros_like(flat, dtype=torch.bool)
            have[rows] = True
            missing = labelled[~have[labelled]][:5].tolist()
            raise LossInputError(f"batch {bid}: the targets' rows and the positions with a label disagree "
                                 f"({rows.numel()} rows, {labelled.numel()} labelled); rows without a label "
                                 f"(first 5, flat b*T+t): {extra}; labelled positions without a row: {missing}")
    else:
        rows = labelled
    lab = flat[rows]
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= vocab):
        raise LossInputError(f"batch {bid}: labels out of range [0, {vocab}): min {int(lab.min())}, "
                             f"max {int(lab.max())}")
    return rows, lab


def _label_atoms(ids: Tensor, labels: Tensor, bid: object) -> Tensor:
    """[N] index j with ids[n, j] == labels[n]; LossInputError when a label is not in its support."""
    hit = ids == labels[:, None]
    found = hit.any(-1)
    if not bool(found.all()):
        miss = (~found).nonzero().squeeze(1)[:5].tolist()
        raise LossInputError(f"batch {bid}: loss.objective='sampled_token' needs each label in its support "
                             f"(records built with the label forced in); {int((~found).sum())} counted "
                             f"positions lack it, e.g. positions {miss} of the targets")
    return hit.int().argmax(-1)


def _ce_softmax_into(out: Tensor, x: Tensor, tau: float, lse1: Tensor) -> Tensor:
    """softmax(z) = exp(tau * s - lse(z)) into `out`, from x = s = z / tau."""
    if tau == 1.0:
        return torch.sub(x, lse1[:, None], out=out).exp_()
    return torch.mul(x, tau, out=out).sub_(lse1[:, None]).exp_()


class _Chunk(NamedTuple):
    """One chunk's distillation part: dist/entropy [c], advantage [c] | None, components name -> [c];
    grad: the block holding dL/ds (None without gradients); free: a block the caller may overwrite."""

    dist: Tensor
    entropy: Tensor
    advantage: Tensor | None
    components: dict[str, Tensor]
    grad: Tensor | None
    free: Tensor


def _atoms_chunk(x: Tensor, tmp: Tensor, lse1: Tensor, lse_s: Tensor, ids: Tensor, lp: dict[str, Tensor],
                 tl: dict[str, Tensor], roles: list[str], cfg: LossConfig, alphas: list[float],
                 label_atom: Tensor | None, need_grad: bool) -> _Chunk:
    """The method on the atoms (tail bucket / drop): autograd on the [c, A] atoms only, then dL/ds in x.

    x holds s = z / tau (overwritten by dL/ds when need_grad); with lam > 0, softmax(z) goes to tmp first.
    """
    s_atoms, saved = student_atoms(x, ids, cfg.tail, tmp, lse_s)
    atoms = {role: teacher_atoms(lp[role], tl[role], cfg.tail) for role in roles}
    a = s_atoms.detach().requires_grad_(need_grad)
    with torch.enable_grad():
        m = method_token_loss(a, atoms, cfg, alphas, ids.shape[1], label_atom)
        (g,) = torch.autograd.grad(m.loss.sum(), a) if need_grad else (None,)
    comps = {name: v.detach() for name, v in m.components.items()}
    if g is None:
        return _Chunk(m.loss.detach(), m.target_entropy, m.advantage, comps, None, tmp)
    if cfg.lam > 0.0:
        _ce_softmax_into(tmp, x, float(cfg.tau), lse1)  # before x is overwritten
    atom_grad_into(x, ids, g, cfg.tail, saved)
    return _Chunk(m.loss.detach(), m.target_entropy, m.advantage, comps, x, tmp)


def _logit_grad_into(x: Tensor, part: _Chunk, lse1: Tensor, lab: Tensor, lam: float, tau: float) -> None:
    """dL/dz = (1 - lam) tau dL/ds + lam (softmax(z) - onehot(label)), assembled in x.

    part.grad is x itself (atoms path: softmax(z) already in part.free) or another block (x still s)."""
    assert part.grad is not None
    if part.grad is x:
        x.mul_((1.0 - lam) * tau)
        if lam > 0.0:
            x.add_(part.free, alpha=lam)
    elif lam > 0.0:
        _ce_softmax_into(part.free, x, tau, lse1)
        torch.mul(part.grad, (1.0 - lam) * tau, out=x).add_(part.free, alpha=lam)
    else:
        torch.mul(part.grad, (1.0 - lam) * tau, out=x)
    if lam > 0.0:
        x.scatter_add_(-1, lab[:, None], torch.full_like(lse1[:, None], -lam))


def distillation_loss(
    student: StudentInput,
    targets: SparseTargets | None,
    labels: Tensor,
    cfg: LossConfig,
    pair_alphas: list[float] | None = None,
    student_base: StudentInput | None = None,
) -> LossOutput:
    """The configured loss for one batch (formulas in this module's, `methods`' and `student_base_tail`'s
    docstrings; docs/LOSSES.md).

    student: logits [B, T, V'] (any float dtype) or HiddenStates(hidden [B, T, H], weight [V', H], bias);
        V' >= vocab_size, rows beyond vocab_size are cut.
    targets: SparseTargets at the counted rows, or None for method `sft`; labels: [B, T] long, -100 =
        ignored; the labelled positions must be exactly the targets' rows.
    pair_alphas: alpha_j per teacher pair (default [cfg.alpha]); one only under loss.delta_form 'paper'
        when the method reads the pairs' shift.
    student_base: the frozen student base's logits or HiddenStates (no grad), when lp_S0 is not a role of
        the targets; scored at the counted rows and the support (and its full row for tail student_base).
    Returns LossOutput(loss_sum scalar fp32, num_tokens, metrics per-token means).
    """
    vocab = _check_inputs(student, targets, labels, cfg, student_base)
    device = labels.device
    dev_type = device.type
    # The head product's dtype: the autocast dtype when autocast is on (what the model's lm_head would use).
    mm_dtype = torch.get_autocast_dtype(dev_type) if torch.is_autocast_enabled(dev_type) else None
    alphas = [float(cfg.alpha)] if pair_alphas is None else [float(a) for a in pair_alphas]
    if cfg.delta_form == "paper" and len(alphas) != 1 and cfg.reads_pair_shift:
        raise LossInputError(f"loss.delta_form='paper' with loss.method={cfg.method!r} takes one teacher pair, got "
                             f"pair_alphas {alphas}: the paper's alpha weighs S0 - T0, not a pair's shift; "
                             "several pairs need loss.delta_form='student_shift'")
    roles: list[str] = []
    if targets is not None and cfg.method != "sft":
        roles = required_roles(cfg, len(alphas))
        targets.require([r for r in roles if not (r == ROLE_STUDENT_BASE and student_base is not None)],
                        cfg.method)
    rows, flat_labels = _counted_rows(targets if cfg.method != "sft" else None, labels, vocab)
    n = int(rows.numel())
    bid = None if targets is None else targets.batch_id
    tail_mode = cfg.tail
    sampled_atoms = (cfg.objective == "sampled_token" and tail_mode != "student_base" and targets is not None
                     and cfg.method != "sft")
    label_atom = _label_atoms(targets.ids, flat_labels, bid) if sampled_atoms and targets is not None else None

    # metric keys are fixed up front so an all-masked batch reports the same keys (as 0.0)
    keys = ["ce", "distill"]
    if cfg.method != "sft":
        keys += ["target_entropy"]
        keys += [f"loss_{c}" for c in sorted(cfg.weights)] if cfg.method == "parallelogram" else []
        mass_roles = list(targets.roles if targets is not None else [])
        mass_roles += [ROLE_STUDENT_BASE] if student_base is not None else []
        keys += [f"topk_mass_{r}" for r in mass_roles]
        keys += ["advantage"] if cfg.objective == "sampled_token" else []
    sums = torch.zeros(len(keys), dtype=torch.float64, device=device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    lam, tau = float(cfg.lam), float(cfg.tau)
    student_params = [student.hidden, student.weight, student.bias] if isinstance(student, HiddenStates) else [student]
    need_grad = torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in student_params)

    with torch.autocast(dev_type, enabled=False):
        src = row_source(student, vocab, need_grad, mm_dtype)
        base_src = None if student_base is None else row_source(student_base, vocab, False, mm_dtype)
        width = min(cfg.loss_chunk_rows, n)
        work = torch.empty((width, vocab), dtype=torch.float32, device=device)
        scratch = torch.empty_like(work)
        base_block = torch.empty_like(work) if base_src is not None and cfg.method != "sft" else None
        for start in range(0, n, cfg.loss_chunk_rows):
            stop = min(start + cfg.loss_chunk_rows, n)
            r, c = rows[start:stop], stop - start
            lab = flat_labels[start:stop]
            x = src.logits_into(r, work[:c])  # the chunk's fp32 [c, V] logits z
            tmp = scratch[:c]
            lse1 = logsumexp_rows(x, tmp)
            ce = lse1 - x.gather(-1, lab[:, None]).squeeze(1)
            chunk_sums: dict[str, Tensor] = {"ce": ce.sum()}
            if cfg.method == "sft" or targets is None:
                token_loss = ce
                chunk_sums["distill"] = torch.zeros((), device=device)
                if need_grad:
                    x.sub_(lse1[:, None]).exp_().scatter_add_(-1, lab[:, None], torch.full_like(ce[:, None], -1.0))
            else:
                ids = targets.ids[start:stop].to(device)
                lp = {role: targets.logprobs[role][start:stop] for role in targets.roles}
                tl = {role: targets.tail[role][start:stop] for role in targets.roles}
                bx = None
                if base_src is not None:
                    assert base_block is not None
                    bx = base_src.logits_into(r, base_block[:c])
                    if tau != 1.0:
                        bx.div_(tau)
                    sup = row_support(bx, ids, tmp)
                    lp[ROLE_STUDENT_BASE] = sup["s_sup"] - sup["lse"][:, None]
                    tl[ROLE_STUDENT_BASE] = torch.exp(sup["lse_off"] - sup["lse"]).clamp_(0.0, 1.0)
                if tau != 1.0:
                    x.div_(tau)
                lse_s = lse1 if tau == 1.0 else logsumexp_rows(x, tmp)
                if tail_mode == "student_base":
                    assert bx is not None
                    # the move u on the bucket atoms (the paper form's also reads S0's atoms), spread over V
                    pair = [r_ for j in range(len(alphas)) for r_ in pair_roles(j)] + [ROLE_STUDENT_BASE]
                    delta = delta_move({role: teacher_atoms(lp[role], tl[role], "bucket") for role in pair},
                                       cfg.delta_form, alphas)
                    res = student_base_tail_chunk(x, bx, tmp, lse_s, ids, delta, lab, cfg.method, cfg.objective,
                                                  need_grad)
                    part = _Chunk(res.dist, res.entropy, res.advantage, {}, res.grad, res.free)
                else:
                    la = None if label_atom is None else label_atom[start:stop]
                    part = _atoms_chunk(x, tmp, lse1, lse_s, ids, lp, tl, roles, cfg, alphas, la, need_grad)
                token_loss = lam * ce + (1.0 - lam) * tau * tau * part.dist
                chunk_sums["distill"] = part.dist.sum()
                chunk_sums["target_entropy"] = part.entropy.sum()
                for name, comp in part.components.items():
                    chunk_sums[f"loss_{name}"] = comp.sum()
                for role in mass_roles:
                    chunk_sums[f"topk_mass_{role}"] = lp[role].exp().sum()
                if part.advantage is not None:
                    chunk_sums["advantage"] = part.advantage.sum()
                if need_grad:
                    _logit_grad_into(x, part, lse1, lab, lam, tau)
            total += token_loss.sum().double()
            sums += torch.stack([chunk_sums[key].double() for key in keys])
            if need_grad:
                src.add_grad(r, x)

    means = (sums / max(n, 1)).tolist()
    metrics = {key: float(v) for key, v in zip(keys, means)}
    return LossOutput(src.attach(total.float()), n, metrics)
