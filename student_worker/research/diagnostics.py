"""What the method comparison measures besides training (student_worker/research/experiment.py runs the comparison).

- `evaluate_references`: ROUGE of the two fixed reference models (student base, SFT teacher), once per
  experiment, as Ray tasks.
- `run_diagnostics`: per-run figures read from a finished run's metrics.jsonl and report.
- `shift_diagnostics`: the size of Delta-KD's shift, measured on a few training batches through the pool.

`ExperimentError` lives here, the lowest of the experiment modules (the diagnostics raise it too), so that
every experiment module and `python -m student_worker.research.experiment` (run as `__main__`) share one class.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from common.config import RunConfig

__all__ = ["ExperimentError", "run_diagnostics", "evaluate_references", "shift_diagnostics"]

# metrics.jsonl keys averaged over a run's steps (when the method logs them).
_STEP_MEANS = ("topk_mass_sft", "topk_mass_base", "topk_mass_student_base", "target_entropy", "grad_norm")
_DIAG_BATCH_ID0 = 10**9  # diagnostic batch ids: far from training ids (teacher caches key on content too)


class ExperimentError(RuntimeError):
    """A run of the comparison failed or its outputs are unusable; the message names the run."""


def run_diagnostics(run_dir: Path, report: dict[str, Any]) -> dict[str, float]:
    """From a run's metrics.jsonl: step means of top-k masses, target entropy and grad norm; the grad
    norm's max; the final loss; the mean loss and CE (when logged) over the last 10 steps."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ExperimentError(f"{path}: no metrics rows")
    out: dict[str, float] = {}
    for key in _STEP_MEANS:
        vals = [r[key] for r in rows if key in r]
        if vals:
            out[key] = float(np.mean(vals))
    out["grad_norm_max"] = float(max(r["grad_norm"] for r in rows))
    out["final_loss"] = float(report["final_loss"])
    out["loss_last10"] = float(np.mean([r["loss"] for r in rows[-10:]]))
    if "ce" in rows[-1]:
        out["ce_last10"] = float(np.mean([r["ce"] for r in rows[-10:]]))
    out["steps_per_s"] = float(report["steps_per_s"])
    return out


def _student_base_spec(cfg: RunConfig) -> Any:
    return cfg.models.student_base if cfg.models.student_base is not None else cfg.models.student


def evaluate_references(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """ROUGE of the student base and the SFT teacher on the eval set, once for every run.

    The same function as the driver's own evaluations (`evaluate_spec`: same examples and generation
    settings), run as Ray tasks that ask for `teachers.num_gpus`, so a GPU cluster evaluates on GPUs."""
    # deferred: Ray (~0.8 s) and the driver (torch, Ray: ~9.5 s measured on the loaded 2-core host), which the
    # experiment CLI's start-up (this module's importer) and its config errors do without
    import ray

    from common.data.examples import load_examples  # alone ~5 ms (measured), also only needed here
    from student_worker.driver import evaluate_spec_task

    e = cfg.evaluation
    examples = load_examples(cfg.data, "eval", cfg.embedded)
    task = evaluate_spec_task.options(num_cpus=min(1.0, cfg.teachers.num_cpus), num_gpus=cfg.teachers.num_gpus)
    specs = {"student_base": _student_base_spec(cfg), "sft_teacher": cfg.models.sft_teacher}
    compute = cfg.reproducibility.model_dump()
    refs = {name: task.remote(spec, examples, e.max_new_tokens, e.batch_size, compute) for name, spec in specs.items()}
    return {name: ray.get(ref) for name, ref in refs.items()}


def shift_diagnostics(cfg: RunConfig, pool: Any, num_batches: int) -> dict[str, float]:
    """How far Delta-KD's target sits from the SFT teacher, measured on the first `num_batches` training
    batches (seed cfg.seed), on the atoms (k support ids + tail bucket) of the pool's records.

    Per counted token, with atoms T1 (sft), T0 (base), S0 (student base, scored here), delta = alpha
    (T1 - T0) and target = Delta-KD's of loss.delta_form (paper: softmax(T1 + alpha (S0 - T0)); student_shift:
    softmax(S0 + delta)), TV(P, Q) = 0.5 sum_a |p_a - q_a|. Returns token means of:
    tv_sft_base (the teachers' shift), tv_target_student_base (the shift Delta-KD puts on the student),
    tv_target_sft (Delta-KD's target vs KD's), tv_student_base_base (student base vs teacher base),
    kl_sft_target = KL(T1 || target), mean_abs_delta = sum_a p_T1 |delta_a|, topk_mass_<role>,
    entropy_<sft|target|student_base>, top1_agree_target_sft (same argmax), top1_label_<sft|target>
    (argmax among the k ids is the label).
    """
    # deferred: torch (~3 s), transformers (~1.7 s), Ray (~0.8 s), measured as in evaluate_references
    import ray
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.data.batching import BatchPlan, collate, tokenize_examples
    from common.data.examples import load_examples
    from common.losses import delta_kd_target, targets_from_record
    from common.losses.loss import teacher_atoms
    from common.topk import ROLE_BASE, ROLE_SFT, ROLE_STUDENT_BASE  # alone ~3 ms (measured)
    from student_worker.train_step import add_student_base

    spec = _student_base_spec(cfg)
    tok = AutoTokenizer.from_pretrained(spec.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    train = tokenize_examples(load_examples(cfg.data, "train", cfg.embedded), tok, cfg.data)
    plan = BatchPlan(len(train), cfg.training.batch_size, 1, cfg.seed, cfg.data.shuffle)
    batches = [collate([train[i] for i in plan.step_indices(s)[0]], pad)
               for s in range(min(num_batches, plan.steps_per_epoch))]
    refs = [pool.submit(_DIAG_BATCH_ID0 + s, b["input_ids"], b["attention_mask"], b["loss_mask"]).ref
            for s, b in enumerate(batches)]
    model = AutoModelForCausalLM.from_pretrained(spec.path, revision=spec.revision, dtype=torch.float32,
                                                 trust_remote_code=spec.trust_remote_code).eval()
    sums: dict[str, float] = {}
    count = 0
    with torch.no_grad():
        for b, record in zip(batches, ray.get(refs)):
            t = {k: torch.as_tensor(np.array(b[k])) for k in ("input_ids", "attention_mask")}
            targets = add_student_base(model, {**t, "input_ids": t["input_ids"].long()}, targets_from_record(record),
                                       cfg.loss.loss_chunk_rows)
            # targets hold the counted positions only (rows = the batch's loss_mask, flat b * T + t)
            ids, label = targets.ids, torch.as_tensor(b["labels"]).reshape(-1)[targets.rows]
            at = {r: teacher_atoms(targets.logprobs[r], targets.tail[r], "bucket")
                  for r in (ROLE_SFT, ROLE_BASE, ROLE_STUDENT_BASE)}
            p = {r: a.exp() for r, a in at.items()}
            delta = cfg.loss.alpha * (at[ROLE_SFT] - at[ROLE_BASE])
            target = delta_kd_target(at, cfg.loss.delta_form, [cfg.loss.alpha])
            pt = target.exp()
            k = ids.shape[1]
            vals = {
                "tv_sft_base": 0.5 * (p[ROLE_SFT] - p[ROLE_BASE]).abs().sum(-1),
                "tv_target_student_base": 0.5 * (pt - p[ROLE_STUDENT_BASE]).abs().sum(-1),
                "tv_target_sft": 0.5 * (pt - p[ROLE_SFT]).abs().sum(-1),
                "tv_student_base_base": 0.5 * (p[ROLE_STUDENT_BASE] - p[ROLE_BASE]).abs().sum(-1),
                "kl_sft_target": (p[ROLE_SFT] * (at[ROLE_SFT] - target)).sum(-1),
                "mean_abs_delta": (p[ROLE_SFT] * delta.abs()).sum(-1),
                "entropy_sft": -(p[ROLE_SFT] * at[ROLE_SFT]).sum(-1),
                "entropy_target": -(pt * target).sum(-1),
                "entropy_student_base": -(p[ROLE_STUDENT_BASE] * at[ROLE_STUDENT_BASE]).sum(-1),
                "top1_agree_target_sft": (target[:, :k].argmax(-1) == at[ROLE_SFT][:, :k].argmax(-1)).double(),
                "top1_label_sft": (ids.gather(1, at[ROLE_SFT][:, :k].argmax(-1, keepdim=True))[:, 0] == label).double(),
                "top1_label_target": (ids.gather(1, target[:, :k].argmax(-1, keepdim=True))[:, 0] == label).double(),
            }
            for r in at:
                vals[f"topk_mass_{r}"] = targets.logprobs[r].exp().sum(-1)
            for key, v in vals.items():
                sums[key] = sums.get(key, 0.0) + float(v.double().sum())
            count += int(targets.rows.numel())
    if count == 0:
        raise ExperimentError("shift diagnostics: the diagnostic batches have no counted tokens")
    return {key: s / count for key, s in sums.items()} | {"tokens": float(count), "batches": float(len(batches))}
