"""Ray Direct Transport (gloo on CPU): teacher parts go actor -> actor as torch tensors, and the record the
receiving actor assembles equals the object-store record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch

from common.config import config_from_dict
from common.topk import TopKRecord, to_wire_dtype
from teacher_service import TeacherPool, assemble_record
from tests.tiny import make_model_set


@ray.remote(enable_tensor_transport=True)
class _Receiver:
    """Stands in for a student worker: receives RDT parts as direct arguments and assembles the record."""

    def take(self, meta: dict[str, Any], roles: list[str], *parts: dict[str, torch.Tensor]) -> TopKRecord:
        assert all(isinstance(v, torch.Tensor) for p in parts for v in p.values())
        return assemble_record(meta, roles, list(parts))


@pytest.mark.parametrize("wire", ["float32", "bfloat16"])
def test_rdt_record_equals_object_store_record(ray_cluster: dict, tmp_path: Path, wire: str) -> None:
    from ray.experimental.collective import create_collective_group, destroy_collective_group

    paths = make_model_set(tmp_path)
    cfg = config_from_dict({
        "models": {"base_teacher": {"path": str(paths["base_teacher"])},
                   "sft_teacher": {"path": str(paths["sft_teacher"])}, "student": {"path": str(paths["student"])}},
        "loss": {"k": 8, "tau": 2.0},
        "teachers": {"name_prefix": f"rdt-{wire}", "namespace": "deltakd-test", "num_cpus": 0.5,
                     "wire_dtype": wire},
        "transport": {"kind": "rdt"},
    })
    pool = TeacherPool.start(cfg)
    receiver = _Receiver.options(num_cpus=0).remote()
    group = create_collective_group([*pool.actors(), receiver], backend=pool.rdt_backend())
    try:
        rng = np.random.default_rng(5)
        ids = rng.integers(4, pool.vocab_size, size=(2, 10)).astype(np.int32)
        am = np.ones_like(ids)
        am[1, 7:] = 0
        lm = am.astype(bool)
        meta, roles, refs = pool.submit_parts(3, ids, am, lm)
        assert roles == ["sft", "base"] and len(refs) == 2
        via_rdt = ray.get(receiver.take.remote(meta, roles, *refs))
        via_store = ray.get(pool.submit(3, ids, am, lm))
        assert via_rdt.wire_dtype == via_store.wire_dtype == wire
        np.testing.assert_array_equal(via_rdt.ids, via_store.ids)
        np.testing.assert_array_equal(via_rdt.mask, via_store.mask)
        for role in roles:
            assert via_rdt.logprobs[role].dtype == via_store.logprobs[role].dtype
            np.testing.assert_array_equal(via_rdt.logprobs[role], via_store.logprobs[role])
            np.testing.assert_array_equal(via_rdt.tail[role], via_store.tail[role])
    finally:
        destroy_collective_group(group)
        ray.kill(receiver)
        pool.shutdown()


def test_assemble_record_accepts_torch_bf16_and_numpy() -> None:
    rng = np.random.default_rng(0)
    lp = np.log(rng.dirichlet(np.ones(6), size=(2, 3))[..., :4]).astype(np.float32)
    ids = np.tile(np.arange(4, dtype=np.int32), (2, 3, 1))
    tail = np.clip(1 - np.exp(lp).sum(-1), 0, 1).astype(np.float32)
    meta = {"batch_id": 9, "mask": np.ones((2, 3), bool), "tau": 1.0, "vocab_size": 6,
            "tokenizer_fingerprint": "x", "wire_dtype": "bfloat16"}
    as_numpy = assemble_record(meta, ["sft"], [{"ids": ids, "logprobs": to_wire_dtype(lp, "bfloat16"), "tail": tail}])
    as_torch = assemble_record(meta, ["sft"], [{"ids": torch.from_numpy(ids),
                                                "logprobs": torch.from_numpy(lp).to(torch.bfloat16),
                                                "tail": torch.from_numpy(tail)}])
    np.testing.assert_array_equal(as_numpy.logprobs["sft"], as_torch.logprobs["sft"])
    with pytest.raises(ValueError, match="sft part"):
        assemble_record(meta, ["base"], [{"logprobs": lp, "tail": tail}])
