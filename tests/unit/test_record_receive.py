"""The receiving end of the record path, without Ray: targets_from_parts (the RDT path: tensors validated on
the device, one host sync, no numpy) equals targets_from_record (the object store), and bad parts raise
RecordError naming batch and role; the run's RDT transport choice."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from common.losses.targets import targets_from_parts, targets_from_record
from common.topk import RecordError, TopKRecord
from teacher_service.transport import choose_rdt_transport

TORCH_WIRE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _record(wire: str = "float32", roles: tuple[str, ...] = ("sft", "base")) -> TopKRecord:
    rng = np.random.default_rng(0)
    dense = {}
    for r in roles:
        x = rng.normal(size=(3, 6, 30)) * 2
        dense[r] = (x - np.log(np.exp(x).sum(-1, keepdims=True))).astype(np.float32)
    mask = np.zeros((3, 6), dtype=bool)
    mask[0, 2:] = mask[2, 1:4] = True
    return TopKRecord.from_dense(11, dense, 5, mask=mask, wire_dtype=wire).validate(list(roles))


def _parts(rec: TopKRecord) -> tuple[dict, list[str], list[dict[str, torch.Tensor]]]:
    """The record's content as the teachers send it over RDT: torch tensors in the torch wire dtype."""
    meta = {"batch_id": rec.batch_id, "rows": rec.rows, "batch_shape": rec.batch_shape, "tau": rec.tau,
            "vocab_size": rec.vocab_size, "wire_dtype": rec.wire_dtype}
    parts = []
    for role in rec.roles:
        lp = torch.from_numpy(rec.role_logprobs(role).copy()).to(TORCH_WIRE[rec.wire_dtype])
        part = {"logprobs": lp, "tail": torch.from_numpy(rec.tail[role].copy())}
        if role == "sft":
            part["ids"] = torch.from_numpy(rec.ids.copy())
        parts.append(part)
    return meta, rec.roles, parts


def _equal(a, b) -> None:
    assert a.batch_id == b.batch_id and a.tau == b.tau and a.vocab_size == b.vocab_size
    assert a.roles == b.roles
    assert torch.equal(a.ids, b.ids)
    for role in a.roles:
        assert a.logprobs[role].dtype == torch.float32
        assert torch.equal(a.logprobs[role], b.logprobs[role]) and torch.equal(a.tail[role], b.tail[role])
    for name in ("rows", "mask"):  # whichever form SparseTargets has
        if hasattr(a, name):
            assert torch.equal(getattr(a, name), getattr(b, name))


@contextlib.contextmanager
def _host_syncs() -> Iterator[list[str]]:
    """Record every tensor -> host read (scalar reads, tolist, numpy) while active."""
    seen: list[str] = []
    names = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "numpy", "__array__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def spy(name):
        def f(self, *a, **kw):
            seen.append(name)
            return saved[name](self, *a, **kw)
        return f

    for n in names:
        setattr(torch.Tensor, n, spy(n))
    try:
        yield seen
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("wire", ["float32", "float16", "bfloat16"])
def test_parts_give_the_same_targets_as_the_record_with_one_host_sync(wire: str) -> None:
    rec = _record(wire)
    meta, roles, parts = _parts(rec)
    with _host_syncs() as seen:
        got = targets_from_parts(meta, roles, parts, "cpu", required_roles=["sft", "base"])
    assert seen == ["__bool__"], f"a good record costs exactly one host sync (a bool), saw {seen}"
    _equal(got, targets_from_record(rec, "cpu"))


def test_no_counted_rows() -> None:
    rec = _record()
    rec = TopKRecord(rec.batch_id, rec.ids[:0], {r: v[:0] for r, v in rec.logprobs.items()},
                     {r: v[:0] for r, v in rec.tail.items()}, rec.rows[:0], rec.batch_shape, rec.tau, rec.vocab_size)
    meta, roles, parts = _parts(rec.validate())
    _equal(targets_from_parts(meta, roles, parts, "cpu"), targets_from_record(rec))


def _bad(mutate, match: str, role: str | None) -> None:
    meta, roles, parts = _parts(_record())
    by_role = dict(zip(roles, parts))
    mutate(meta, by_role)
    with pytest.raises(RecordError, match=match) as info:
        targets_from_parts(meta, list(by_role), list(by_role.values()), "cpu", required_roles=["sft", "base"])
    assert info.value.batch_id == 11 and info.value.role == role, str(info.value)
    assert "batch 11" in str(info.value)


def test_bad_values_raise_record_error_naming_batch_and_role() -> None:
    _bad(lambda m, p: p["base"]["logprobs"].__setitem__((2, 1), float("nan")), "1 non-finite log-prob", "base")
    _bad(lambda m, p: p["sft"]["logprobs"].__setitem__((0, 0), float("inf")), "non-finite log-prob", "sft")
    _bad(lambda m, p: p["base"]["logprobs"].__setitem__((0, 0), 0.5), "log-prob 0.5 > 0", "base")
    _bad(lambda m, p: p["base"]["tail"].__setitem__(1, float("nan")), "non-finite tail", "base")
    _bad(lambda m, p: p["sft"]["tail"].__setitem__(1, 1.5), r"tail mass outside \[0, 1\]", "sft")
    _bad(lambda m, p: p["base"]["tail"].fill_(1.0), r"probability mass 1\.\d+ > 1", "base")
    _bad(lambda m, p: p["sft"]["ids"].__setitem__((0, 0), 30), r"ids out of range \[0, 30\): .*max 30", None)


def test_bad_structure_raises_record_error() -> None:
    _bad(lambda m, p: p.pop("base"), "role 'base'.*missing", "base")
    _bad(lambda m, p: p["sft"].pop("ids"), "support ids is missing", "sft")
    _bad(lambda m, p: p["base"].__setitem__("logprobs", p["base"]["logprobs"][:, :3]), "logprobs must be", "base")
    _bad(lambda m, p: p["base"].__setitem__("logprobs", p["base"]["logprobs"].half()), "logprobs must be", "base")
    _bad(lambda m, p: p["sft"].__setitem__("tail", p["sft"]["tail"][:2]), "tail must be", "sft")
    _bad(lambda m, p: p["sft"].__setitem__("ids", p["sft"]["ids"].float()), "ids must be", "sft")
    _bad(lambda m, p: m.__setitem__("rows", m["rows"][::-1].copy()), "strictly increasing", None)
    _bad(lambda m, p: m.__setitem__("rows", m["rows"] + 10), r"rows out of range \[0, B\*T=18\)", None)
    _bad(lambda m, p: m.__setitem__("rows", m["rows"][:-1]), "ids must be int32 .N, K. with N = 6", "sft")
    _bad(lambda m, p: m.__setitem__("wire_dtype", "int8"), "unknown wire dtype", None)


def _gpu(role: str, node: str, gpu: int) -> dict:
    return {"role": role, "node_id": node, "gpu_ids": [gpu], "device": "cuda:0"}


def test_rdt_transport_choice() -> None:
    cpu = [{"role": "sft", "node_id": "a", "gpu_ids": [], "device": "cpu"},
           {"role": "base", "node_id": "a", "gpu_ids": [], "device": "cpu"}]
    workers_cpu = [{"node_id": "a", "gpu_ids": []}]
    assert choose_rdt_transport("auto", cpu, None) == "gloo"
    assert choose_rdt_transport("auto", cpu, workers_cpu) == "gloo"
    assert choose_rdt_transport("nccl", cpu, workers_cpu) == "nccl"  # explicit wins
    with pytest.raises(ValueError, match="rdt_backend='nixl'"):
        choose_rdt_transport("nixl", cpu, None)
    one_gpu = [_gpu("sft", "a", 0), _gpu("base", "a", 0)]
    assert choose_rdt_transport("auto", one_gpu, None) == "nccl"  # placement unknown
    assert choose_rdt_transport("auto", one_gpu, [{"node_id": "a", "gpu_ids": [0]}]) == "cuda_ipc"
    assert choose_rdt_transport("auto", one_gpu, workers_cpu) == "gloo"
    own_gpus = [_gpu("sft", "t", 0), _gpu("base", "t", 1)]
    workers = [{"node_id": "s", "gpu_ids": [0]}, {"node_id": "s", "gpu_ids": [1]}]
    assert choose_rdt_transport("auto", own_gpus, workers) == "nccl"  # across nodes
    assert choose_rdt_transport("auto", own_gpus, [{"node_id": "t", "gpu_ids": [2]}]) == "nccl"
    with pytest.raises(ValueError, match="teacher replica 0 and student worker 0 share GPU 0"):
        choose_rdt_transport("auto", own_gpus, [{"node_id": "t", "gpu_ids": [0]}])
