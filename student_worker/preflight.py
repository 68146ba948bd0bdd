"""The driver's first stage: every check of a run that needs no Ray and writes nothing.

    inputs = check_run_inputs(cfg, out, ckpt_root, resume)   # RunInputs, or CheckpointError / InputError

The resume checkpoint (config, files) first, since a checkpoint of another config is the user's most likely
mistake here; then the data (rows, columns, lengths), one tokenizer for all roles and k in 1..V, the
trackers' packages, with on-policy steps the prompts' lengths (data.overlong), an EOS in the student's
generation config and (lag 1) the sample the resume checkpoint carries, and the teacher cache; last, that a
fresh run does not overwrite a previous one (so a bad row or tokenizer is reported as such wherever the
output goes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import RunConfig
from common.data.batching import TrainingSet, load_training_set
from common.data.examples import DataError, load_examples
from common.data.tokenizer_check import check_tokenizers
from student_worker import checkpoint as ckpt
from student_worker.on_policy import on_policy_prompts, student_eos_ids
from student_worker.on_policy_steps import OnPolicySteps
from student_worker.record_source import CachePlan, check_cache
from student_worker.selection import BestModelSelection
from student_worker.tracking import check_trackers
from teacher_service.errors import TeacherError

__all__ = ["InputError", "RunInputs", "check_run_inputs"]


class InputError(ValueError):
    """Bad input found by `check_run_inputs` (`Driver.preflight`) (data rows, tokenizers, k), before anything was written.

    The message names the culprit (file and line, model paths, key); `__cause__` is the original typed error
    (DataError, TokenizerMismatchError, ...)."""


@dataclass
class RunInputs:
    """What the checks loaded: the tokenised training set, the eval examples, the best-checkpoint selection,
    the on-policy side (None when off), the teacher cache's plan (None for a live run) and the checkpoint a
    resume starts from (None: from step 0)."""

    train_set: TrainingSet
    eval_examples: list[dict[str, str]]
    selection: BestModelSelection
    sampling: OnPolicySteps | None
    cache_plan: CachePlan | None
    resume_dir: Path | None


def check_run_inputs(cfg: RunConfig, out: Path, ckpt_root: Path, resume: bool) -> RunInputs:
    """Run every check (the module docstring's order) and return what they loaded. Raises CheckpointError or
    InputError naming the culprit."""
    resume_dir = None
    if resume:
        resume_dir = ckpt.latest_checkpoint(ckpt_root)
        if resume_dir is not None:
            ckpt.check_resume_config(resume_dir, cfg.model_dump(mode="json"))
            ckpt.verify_checkpoint(resume_dir)
    try:
        train_set = load_training_set(cfg)
        eval_examples = (load_examples(cfg.data, "eval", cfg.embedded)
                         if cfg.evaluation.enabled and cfg.data.eval else [])
        selection = BestModelSelection.from_config(cfg, out)  # evaluation.select_best
        sampling = _on_policy_steps(cfg, train_set)
        check_trackers(cfg)  # logging.report_to: its packages are installed
        if cfg.loss.method != "sft" and cfg.teachers.source != "cache":
            check_tokenizers(cfg)  # tokenizer files only: no weights are loaded yet
        if sampling is not None:
            spec = cfg.models.student
            student_eos_ids(spec.path, spec.revision, spec.trust_remote_code)  # a sample must be able to end
        # the teacher cache (teachers.source cache / auto): settings, models, roles and shards checked now
        cache_plan = check_cache(cfg, train_set)
    except (DataError, TeacherError, ValueError) as exc:
        raise InputError(f"{type(exc).__name__}: {exc}") from exc
    if resume_dir is not None and sampling is not None:  # lag 1: the sample it carries
        sampling.stored(resume_dir, int(ckpt.read_state(resume_dir)["step"]))
    if not resume:
        ckpt.check_no_previous_run(out)
    return RunInputs(train_set, eval_examples, selection, sampling, cache_plan, resume_dir)


def _on_policy_steps(cfg: RunConfig, train_set: Any) -> OnPolicySteps | None:
    """The on-policy side of the run (None when training.on_policy is off): each example's prompt for
    on-policy steps, cut or refused (data.overlong)."""
    op = cfg.training.on_policy
    if not op.enabled:
        return None
    d = cfg.data
    prompts = on_policy_prompts(train_set.examples, d.max_length - op.max_new_tokens, d.overlong, train_set.bos_id)
    return OnPolicySteps(cfg, train_set.plan, prompts)
