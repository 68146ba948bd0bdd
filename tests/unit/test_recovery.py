"""Which rank errors are retried and which stop the run, and what the driver reports (no Ray cluster)."""

from __future__ import annotations

import pickle

import ray

from common.config import config_from_dict
from common.faults import InjectedRankError
from common.losses.targets import LossInputError
from student_worker.recovery import WorkerCrash, is_fatal_rank_error, rejection_error, teacher_inflight_cap
from student_worker.worker import PeerInputError, StepRejected
from teacher_service.errors import TeacherUnavailableError

BASE = {"models": {"base_teacher": {"path": "b"}, "sft_teacher": {"path": "s"}, "student": {"path": "st"}}}


def _remote(exc: BaseException) -> BaseException:
    """What the driver's ray.get raises for an exception raised in an actor method (through pickling)."""
    return pickle.loads(pickle.dumps(ray.exceptions.RayTaskError("train_step", "Traceback ...", exc)))


def test_bad_input_after_the_agreement_stops_the_run_other_rank_errors_are_retried():
    assert is_fatal_rank_error(_remote(LossInputError("batch 7: label not in rows")))
    assert not is_fatal_rank_error(_remote(InjectedRankError("FaultPlan.rank_error")))
    assert not is_fatal_rank_error(_remote(RuntimeError("CUDA error: an illegal memory access")))
    crash = WorkerCrash(1, _remote(InjectedRankError("rank 1 raises mid-step at step 5")), raised=True)
    assert str(crash) == ("student worker rank 1 raised mid-step: InjectedRankError: rank 1 raises mid-step at "
                          "step 5") and crash.raised and crash.rank == 1


def test_a_rejected_step_reports_the_typed_teacher_error_not_the_peers():
    dead = TeacherUnavailableError("base", 42, "ActorDiedError: killed")
    own = _remote(StepRejected("rank 0 step 21: TeacherUnavailableError: ...", cause=_remote(dead)))
    peer = _remote(PeerInputError("step 21: 1 other rank(s) had no valid teacher record; rank 1 did not step"))
    typed = rejection_error([peer, own])
    assert isinstance(typed, TeacherUnavailableError) and typed.role == "base" and typed.batch_id == 42
    bad = _remote(StepRejected("rank 1 step 3: ValueError: expected batch 7", cause=ValueError("expected batch 7")))
    picked = rejection_error([peer, bad])
    assert isinstance(picked, StepRejected) and "expected batch 7" in str(picked)


def test_the_pool_cap_covers_the_window():
    cfg = config_from_dict(BASE, ["training.num_workers=4", "training.batch_size=8", "training.prefetch=2"])
    assert teacher_inflight_cap(cfg, ["sft", "base"]) == 4 * 3 + 1  # one replica per role
    more = config_from_dict(BASE, ["training.num_workers=4", "training.batch_size=8", "training.prefetch=2",
                                   "teachers.replicas={sft: 2, base: 3}"])
    assert teacher_inflight_cap(more, ["sft", "base"]) == 7  # ceil(13 / 2): the role with the fewest replicas
