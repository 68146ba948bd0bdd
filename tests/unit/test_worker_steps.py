"""The student worker's step protocol without Ray: calls in order, checkpoints at the right step, and a
step time whose named parts add up, with a FaultPlan's step delay outside them (one rank, a real gloo group
of one, a tiny real Llama, method sft)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from common.config import config_from_dict
from common.data.batching import TokenizedExample, collate
from common.faults import FaultPlan
from student_worker import checkpoint as ckpt
from student_worker.worker import COMPUTE_PARTS, STEP_PARTS, StepOrderError, StudentWorkerImpl
from tests.tiny import make_llama, make_tokenizer, state_digest


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("worker")
    return {"student": make_llama(root / "student", make_tokenizer(root / "tok"), seed=1)}


def _worker(models: dict[str, Path], tmp: Path, *overrides: str, faults: FaultPlan | None = None) -> StudentWorkerImpl:
    spec = {"path": str(models["student"])}
    cfg = config_from_dict({"models": {"base_teacher": spec, "sft_teacher": spec, "student": spec},
                            "loss": {"method": "sft"}, "output": {"dir": str(tmp)}}, list(overrides))
    worker = StudentWorkerImpl(cfg.model_dump(mode="json"), rank=0, world_size=1, faults=faults)
    worker.setup(worker.rendezvous_address())
    return worker


def _batch() -> dict[str, np.ndarray]:
    examples = [TokenizedExample(input_ids=[2, 10, 11, 12, 13, 3], prompt_len=3),
                TokenizedExample(input_ids=[2, 14, 15, 16, 3], prompt_len=2)]
    return collate(examples, pad_id=0)


def test_steps_run_in_order_and_their_parts_add_up(models: dict[str, Path], tmp_path: Path) -> None:
    delay = 0.1
    worker = _worker(models, tmp_path, faults=FaultPlan(step_delay_s=delay))
    batch = _batch()
    tokens = int(batch["loss_mask"].sum())
    with pytest.raises(StepOrderError, match="step 1 called but the next step is 0"):
        worker.train_step(1, batch, tokens)  # nothing is trained out of order
    before = state_digest(worker.model)
    with pytest.raises(StepOrderError, match="checkpoint of 1 steps"):
        worker.save_checkpoint(str(ckpt.begin_checkpoint(tmp_path / "c", 1)), 1)
    assert state_digest(worker.model) == before

    def timed_step(s: int) -> dict:
        t0 = time.perf_counter()
        row = worker.train_step(s, batch, tokens)
        return {**row, "call_s": time.perf_counter() - t0, "ended": time.perf_counter()}

    rows = [timed_step(s) for s in range(2)]
    worker.save_checkpoint(str(ckpt.begin_checkpoint(tmp_path / "c", 2)), 2)  # exactly 2 steps done
    rows.append(timed_step(2))
    for i, row in enumerate(rows):
        parts = row["step_parts"]
        assert list(parts) == list(STEP_PARTS)
        assert sum(parts.values()) == pytest.approx(row["step_s"], rel=1e-12, abs=1e-12)
        assert all(v >= 0 for v in parts.values()), parts
        # the planned sleep ran in the call, and outside every part: neither this step's nor the next one's
        assert row["call_s"] >= delay
        if i > 0:
            assert row["step_s"] <= row["ended"] - rows[i - 1]["ended"] - delay / 2, (row, rows[i - 1]["ended"])
        assert row["compute_s"] == pytest.approx(sum(parts[k] for k in COMPUTE_PARTS))
        assert row["teacher_wait_s"] == parts["record_wait_s"]
    assert rows[2]["step_parts"]["checkpoint_s"] > 0 and rows[1]["step_parts"]["checkpoint_s"] == 0
    # the driver restarts its loop elsewhere (a restore): `begin` moves the expected step
    assert worker.begin(7) == 0
    worker.train_step(7, batch, tokens)
    with pytest.raises(StepOrderError):
        worker.train_step(7, batch, tokens)
