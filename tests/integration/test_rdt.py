"""Ray Direct Transport (gloo on CPU) through the real teacher actors: the parts travel actor -> actor as the
engines' torch tensors, the receiver builds the loss targets from them with no numpy conversion anywhere from
the teacher's top-k to the loss, and the targets are bit-identical to the object-store path's."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch

from common.config import RunConfig, config_from_dict
from common.losses.targets import targets_from_parts, targets_from_record
from common.roles import teacher_role_specs
from common.topk import RecordError, rows_from_mask, to_wire_dtype
from teacher_service import TeacherPool, assemble_record
from teacher_service.actor import TeacherActor
from tests.integration.numpy_guard import LOG_ENV, read
from tests.tiny import make_model_set

ROOT = Path(__file__).resolve().parents[2]


@ray.remote(enable_tensor_transport=True)
class _Receiver:
    """Stands in for a student worker: builds SparseTargets from the RDT parts (direct arguments)."""

    def take(self, meta: dict[str, Any], roles: list[str], *parts: dict[str, torch.Tensor], corrupt: bool = False):
        assert all(isinstance(v, torch.Tensor) for p in parts for v in p.values())
        if corrupt:  # a teacher part that went bad in flight: NaN in the base role's log-probs
            parts[1]["logprobs"][0, 0] = float("nan")
        return targets_from_parts(meta, roles, list(parts), "cpu", required_roles=roles)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_model_set(tmp_path_factory.mktemp("rdt"))


def _cfg(paths: dict[str, Path], prefix: str, *overrides: str) -> RunConfig:
    return config_from_dict({
        "models": {"base_teacher": {"path": str(paths["base_teacher"])},
                   "sft_teacher": {"path": str(paths["sft_teacher"])}, "student": {"path": str(paths["student"])}},
        "loss": {"k": 8, "tau": 2.0},
        "teachers": {"name_prefix": prefix, "namespace": "deltakd-test", "num_cpus": 0.5},
        "transport": {"kind": "rdt"},
    }, list(overrides))


def _batch(vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """input_ids, attention_mask, loss_mask [2, 10] (prompt of 3, row 1 padded after 7) and labels."""
    rng = np.random.default_rng(5)
    ids = rng.integers(4, vocab, size=(2, 10)).astype(np.int32)
    am = np.ones_like(ids)
    am[1, 7:] = 0
    lm = am.astype(bool)
    lm[:, :3] = False
    lm[1, 6] = False  # the last real token predicts padding
    labels = np.where(lm, np.roll(ids, -1, axis=1), -100)
    return ids, am, lm, labels


@contextlib.contextmanager
def _group(pool: TeacherPool, receivers: list[Any]) -> Iterator[None]:
    from ray.experimental.collective import create_collective_group, destroy_collective_group

    group = create_collective_group([*pool.actors(), *receivers], backend=pool.rdt_backend())
    try:
        yield
    finally:
        destroy_collective_group(group)


def _assert_same_targets(a: Any, b: Any) -> None:
    assert a.batch_id == b.batch_id and a.roles == b.roles
    assert torch.equal(a.ids, b.ids)
    for role in a.roles:
        assert torch.equal(a.logprobs[role], b.logprobs[role]) and torch.equal(a.tail[role], b.tail[role])
    for name in ("rows", "mask"):  # whichever form SparseTargets has
        if hasattr(a, name):
            assert torch.equal(getattr(a, name), getattr(b, name))


@pytest.mark.parametrize("wire", ["float32", "bfloat16"])
def test_rdt_targets_are_bit_identical_to_the_object_store(ray_cluster: dict, models: dict[str, Path],
                                                           wire: str) -> None:
    pool = TeacherPool.start(_cfg(models, f"rdt-{wire}", f"teachers.wire_dtype={wire}"))
    receiver = _Receiver.options(num_cpus=0).remote()
    try:
        with _group(pool, [receiver]):
            assert pool.rdt_backend() == "gloo"
            ids, am, lm, labels = _batch(pool.vocab_size)
            for bid, include in ((3, None), (4, labels)):
                handle = pool.submit(bid, ids, am, lm, include=include, transport="rdt")
                meta, roles, refs = handle.head["meta"], handle.head["roles"], handle.parts
                assert roles == ["sft", "base"] and len(refs) == 2
                np.testing.assert_array_equal(meta["rows"], rows_from_mask(lm))
                with pytest.raises(TypeError, match="no object-store ref"):
                    _ = handle.ref
                via_rdt = ray.get(receiver.take.remote(meta, roles, *refs))
                record = ray.get(pool.submit(bid, ids, am, lm, include=include, transport="object_store").ref)
                assert record.wire_dtype == wire and record.shape[1] == (8 if include is None else 9)
                _assert_same_targets(via_rdt, targets_from_record(record))
            if wire == "float32":  # a bad part is caught on receipt, naming batch and role
                handle = pool.submit(5, ids, am, lm, transport="rdt")
                with pytest.raises(RecordError) as err:
                    ray.get(receiver.take.remote(handle.head["meta"], handle.head["roles"], *handle.parts,
                                                 corrupt=True))
                assert "batch 5" in str(err.value) and "'base'" in str(err.value)
                assert "non-finite log-prob" in str(err.value)
    finally:
        ray.kill(receiver)
        pool.shutdown()


def test_rdt_path_makes_no_numpy_conversion_from_top_k_to_loss(ray_cluster: dict, models: dict[str, Path],
                                                               tmp_path: Path) -> None:
    """Teacher actors and a real StudentWorker run with every torch -> numpy conversion logged (a test-only
    sitecustomize in their processes); a delta_kd step over RDT logs none on the record path."""
    from student_worker.worker import StudentWorker

    log = tmp_path / "numpy_calls.jsonl"
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text("from tests.integration.numpy_guard import install\ninstall()\n")
    path = os.pathsep.join([str(guard), str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {"env_vars": {LOG_ENV: str(log), "PYTHONPATH": path}}
    cfg = _cfg(models, "rdt-guard", "loss.method=delta_kd", "training.num_workers=1")
    handles = {role: [TeacherActor.options(num_cpus=0.5, runtime_env=env).remote(
        role, spec.model_dump(), "hf", "cpu", "auto", 4, "float32")]
        for role, spec in teacher_role_specs(cfg).items()}
    pool = TeacherPool(cfg, handles, owned=True)
    worker = StudentWorker.options(num_cpus=0.5, runtime_env=env).remote(cfg.model_dump(mode="json"), 0, 1)
    try:
        ray.get(worker.setup.remote(ray.get(worker.rendezvous_address.remote())))
        assert pool.rdt_backend([worker]) == "gloo"  # CPU actors: the worker's placement has no GPU
        with _group(pool, [worker]):
            ids, am, lm, labels = _batch(pool.vocab_size)
            batch = {"input_ids": ids, "attention_mask": am, "labels": labels}
            handle = pool.submit(0, ids, am, lm, transport="rdt")
            metrics = ray.get(worker.train_step.remote(0, batch, int(lm.sum()), handle.head, *handle.parts))
        assert metrics["tokens"] == int(lm.sum()) and np.isfinite(metrics["loss_sum"])
        calls = read(log)
        record_path = {"topk", "support", "gather", "_topk", "_gather", "_for_transport", "train_step",
                       "receive_targets", "targets_from_parts", "distillation_loss"}
        on_path = [c for c in calls if record_path & set(c["stack"])]
        assert not on_path, f"numpy conversions on the RDT record path: {on_path}"
        # the guard is live in those processes: the object-store path converts at its edge, and is seen
        ray.get(pool.submit(1, ids, am, lm).ref)
        edge = [c for c in read(log) if "to_numpy_wire" in c["stack"]]
        assert {c["pid"] for c in edge} == {h["pid"] for h in pool.placements}
    finally:
        ray.kill(worker)
        pool.shutdown()


def test_assemble_record_accepts_torch_bf16_and_numpy() -> None:
    rng = np.random.default_rng(0)
    lp = np.log(rng.dirichlet(np.ones(6), size=5)[:, :4]).astype(np.float32)
    ids = np.tile(np.arange(4, dtype=np.int32), (5, 1))
    tail = np.clip(1 - np.exp(lp).sum(-1), 0, 1).astype(np.float32)
    mask = np.zeros((2, 3), dtype=bool)
    mask.reshape(-1)[[0, 1, 2, 4, 5]] = True
    meta = {"batch_id": 9, "rows": rows_from_mask(mask), "batch_shape": (2, 3), "tau": 1.0, "vocab_size": 6,
            "tokenizer_fingerprint": "x", "wire_dtype": "bfloat16"}
    as_numpy = assemble_record(meta, ["sft"], [{"ids": ids, "logprobs": to_wire_dtype(lp, "bfloat16"), "tail": tail}])
    as_torch = assemble_record(meta, ["sft"], [{"ids": torch.from_numpy(ids),
                                                "logprobs": torch.from_numpy(lp).to(torch.bfloat16),
                                                "tail": torch.from_numpy(tail)}])
    np.testing.assert_array_equal(as_numpy.logprobs["sft"], as_torch.logprobs["sft"])
    np.testing.assert_array_equal(as_numpy.mask, mask)
    with pytest.raises(ValueError, match="sft part"):
        assemble_record(meta, ["base"], [{"logprobs": lp, "tail": tail}])
