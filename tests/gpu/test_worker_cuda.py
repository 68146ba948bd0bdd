"""The student worker's own code on the GPU, in this process (no Ray actors): set-up on CUDA (weights loaded
onto the device, the frozen base copy, the students' NCCL group with DDP `device_ids`), two RDT-path steps
whose record parts are CUDA tensors (`train_step` with an RDT record handle: targets built on the device, the input agreement
all-reduce on NCCL, bf16 autocast), then a checkpoint save and a restore into a new worker that carries
weights, optimizer state and the CUDA RNG state.

Dry run: the same on the CPU (gloo group, no autocast).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("ray", reason="student_worker.worker imports Ray (on the GPU machine: the device bundle)")

from student_worker import checkpoint as ckpt  # noqa: E402
from student_worker.worker import StudentWorkerImpl  # noqa: E402
from teacher_service.assemble import record_meta  # noqa: E402
from teacher_service.record_handle import RecordHandle  # noqa: E402
from tests.integration.test_student_training import make_cfg, tiny_setup  # noqa: E402
from tests.tiny import state_digest  # noqa: E402
from tests.unit.test_train_step import _batch, _record  # noqa: E402

ROLES = ["sft", "base"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, device: torch.device) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("worker-gpu")
    paths = tiny_setup(root)
    tok = AutoTokenizer.from_pretrained(str(paths["tokenizer"]))
    teachers = {r: AutoModelForCausalLM.from_pretrained(str(paths[r]), dtype=torch.float32).eval()
                for r in ("sft_teacher", "base_teacher")}
    batch = _batch(tok)
    record = _record((teachers, tok), batch)  # the teachers' fp32 top-k at the batch's counted positions
    gpus = 1 if device.type == "cuda" else 0
    cfg = make_cfg(paths, root / "out", ["training.num_workers=1", f"training.num_gpus_per_worker={gpus}",
                                         "loss.method=delta_kd", "loss.k=8", "training.warmup_steps=1"])
    return {"cfg": cfg.model_dump(mode="json"), "batch": batch, "record": record, "root": root}


def _parts(record: Any, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """The record's role parts as RDT delivers them: the teachers' tensors, already on the worker's device."""
    parts = []
    for role in ROLES:
        part = {"logprobs": torch.from_numpy(np.ascontiguousarray(record.logprobs[role])).to(device),
                "tail": torch.from_numpy(np.ascontiguousarray(record.tail[role])).to(device)}
        if role == "sft":
            part["ids"] = torch.from_numpy(np.ascontiguousarray(record.ids)).to(device)
        parts.append(part)
    return parts


def _step(worker: StudentWorkerImpl, run: dict[str, Any], step: int, device: torch.device) -> dict[str, Any]:
    batch, record = run["batch"], run["record"]
    meta = record_meta(step, batch["loss_mask"], record.tau, record.vocab_size, record.tokenizer_fingerprint,
                       "float32")
    n = int(batch["loss_mask"].sum())
    labels_batch = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    handle = RecordHandle.rdt(meta, ROLES, _parts(record, device))
    return worker.train_step(step, labels_batch, n, handle.head, *handle.parts)


def test_worker_steps_checkpoints_and_restores_on_the_device(run: dict[str, Any], device: torch.device,
                                                             tmp_path: Path) -> None:
    cuda = device.type == "cuda"
    worker = StudentWorkerImpl(run["cfg"], 0, 1)
    info = worker.setup(worker.rendezvous_address())
    assert worker.device.type == device.type and info["device"].startswith(device.type)
    assert worker.autocast == cuda
    assert next(worker.model.parameters()).device.type == device.type
    assert worker.base_model is not None and next(worker.base_model.parameters()).dtype == worker.dtype
    assert worker.group.size() == 1
    losses = []
    for step in range(2):
        m = _step(worker, run, step, device)
        assert m["tokens"] == int(run["batch"]["loss_mask"].sum()) and np.isfinite(m["loss_sum"])
        losses.append(m["loss_sum"])
    assert losses[1] < losses[0]  # lr 5e-3 on the same batch: the step moved the weights the right way
    if cuda:
        assert worker.optimizer.state[next(iter(worker.model.parameters()))]["exp_avg"].is_cuda

    tmp = ckpt.begin_checkpoint(tmp_path / "checkpoints", 2)
    worker.save_checkpoint(str(tmp), 2)
    final = ckpt.finalize_checkpoint(tmp, {"step": 2, "config": run["cfg"], "metrics": []}, keep=2)
    assert ("cuda" in json.loads((final / "rng-rank0.json").read_text())) == cuda
    saved = state_digest(worker.model)
    draws = torch.rand(3, device=device)  # where the generator stood at the checkpoint
    want = _step(worker, run, 2, device)

    restored = StudentWorkerImpl(run["cfg"], 0, 1, generation=1)  # the driver's restore: a new group name
    restored.setup(restored.rendezvous_address(), str(final))
    assert restored.next_step == 2
    assert state_digest(restored.model) == saved
    assert torch.equal(torch.rand(3, device=device), draws)  # the device's RNG continues from the checkpoint
    got = _step(restored, run, 2, device)
    # the same weights, optimizer state and targets: step 2's forward (the loss) is the same bit for bit
    assert got["loss_sum"] == want["loss_sum"] and got["tokens"] == want["tokens"]
