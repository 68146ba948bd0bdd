"""The per-step metrics row and the run summary: how ranks combine, which rows the speeds count."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import config_from_dict
from student_worker.report import run_summary, step_row
from student_worker.worker import COMPUTE_PARTS, STEP_PARTS, TEACHER_WAIT_PARTS


def _rank(rank: int, tokens: int, loss_sum: float, distill: float, wait: float, compute: float,
          peer_wait: float = 0.0) -> dict:
    parts = dict.fromkeys(STEP_PARTS, 0.0)
    parts.update(record_wait_s=wait, peer_wait_s=peer_wait, forward_s=compute)
    return {"rank": rank, "batch_id": 10 + rank, "tokens": tokens, "loss_sum": loss_sum, "distill": distill,
            "grad_norm": 1.5, "lr": 1e-3, "teacher_wait_s": wait, "compute_s": compute,
            "step_s": sum(parts.values()), "step_parts": parts}


def _arrays(real: int, padded: int) -> dict[str, np.ndarray]:
    am = np.zeros((1, padded), dtype=np.int64)
    am[0, :real] = 1
    return {"attention_mask": am}


def test_step_row_weights_ranks_by_tokens_and_times_the_critical_rank():
    # rank 1 reached the input agreement last (rank 0 waited 0.25 s there for it): the step's critical path
    per_rank = [_rank(0, tokens=3, loss_sum=6.0, distill=1.0, wait=0.05, compute=0.2, peer_wait=0.25),
                _rank(1, tokens=1, loss_sum=4.0, distill=5.0, wait=0.3, compute=0.2, peer_wait=0.001)]
    row = step_row(7, per_rank, [_arrays(5, 8), _arrays(2, 8)], driver_submit_s=0.01)
    assert row["step"] == 7 and row["batch_ids"] == [10, 11]
    assert row["loss"] == pytest.approx(10.0 / 4)  # sum of sums / all tokens, not the mean of rank means
    assert row["distill"] == pytest.approx((3 * 1.0 + 1 * 5.0) / 4)
    assert row["critical_rank"] == 1 and row["step_s"] == pytest.approx(0.501)
    assert row["tokens"] == 4 and row["input_tokens"] == 7 and row["tokens_per_s"] == pytest.approx(7 / 0.501)
    assert row["teacher_wait_s"] == pytest.approx(0.3) and row["teacher_wait_frac"] == pytest.approx(0.3 / 0.501)
    assert row["compute_s"] == 0.2 and row["grad_norm"] == 1.5 and "rank" not in row
    assert row["step_parts"] == per_rank[1]["step_parts"] and sum(row["step_parts"].values()) == pytest.approx(
        row["step_s"])
    assert row["driver_submit_s"] == 0.01


def test_step_parts_are_named_once_and_teacher_wait_and_compute_are_parts():
    assert len(set(STEP_PARTS)) == len(STEP_PARTS) and all(p.endswith("_s") for p in STEP_PARTS)
    assert set(TEACHER_WAIT_PARTS) <= set(STEP_PARTS) and set(COMPUTE_PARTS) <= set(STEP_PARTS)
    assert not set(TEACHER_WAIT_PARTS) & set(COMPUTE_PARTS)


def test_step_row_with_no_loss_tokens_does_not_divide_by_zero():
    row = step_row(0, [_rank(0, tokens=0, loss_sum=0.0, distill=0.0, wait=0.0, compute=0.1)], [_arrays(1, 1)])
    assert row["loss"] == 0.0 and row["tokens"] == 0


def test_run_summary_times_only_this_process_steps():
    cfg = config_from_dict({"models": {"base_teacher": {"path": "b"}, "sft_teacher": {"path": "s"},
                                       "student": {"path": "st"}}})
    rows = [{"step": s, "tokens": 10, "input_tokens": 20, "teacher_wait_s": 0.5 if s < 2 else 0.1,
             "step_s": 1.0, "loss": 5.0 - s,
             "step_parts": {"record_wait_s": 0.5 if s < 2 else 0.1, "forward_s": 0.5 if s < 2 else 0.9}}
            for s in range(4)]
    rep = run_summary(cfg, rows, start_step=2, step=4, loop_s=4.0, rouge={}, restarts=0, teacher_stats=None,
                      paths={"output_dir": "x"})
    assert rep["steps"] == 4 and rep["tokens"] == 40 and rep["final_loss"] == 2.0
    assert rep["steps_per_s"] == pytest.approx(2 / 4.0) and rep["tokens_per_s"] == pytest.approx(40 / 4.0)
    assert rep["teacher_wait_fraction"] == pytest.approx(0.1) and "teacher_stats" not in rep
    assert rep["step_time_fractions"] == pytest.approx({"record_wait_s": 0.1, "forward_s": 0.9})
    assert rep["recoveries"] == [] and rep["worker_restarts"] == 0
