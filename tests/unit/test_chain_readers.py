"""Issue 24's first two defects, without Ray: on the RDT path every RDT object the teacher chain makes has exactly
one reader (a cuda_ipc object read twice is never freed), and GPU ids are kept as Ray gives them (strings,
UUIDs), never parsed as numbers."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from teacher_service.actor import gpu_id_strings
from teacher_service.chain import call_chain
from teacher_service.transport import choose_rdt_transport


class _Ref:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


class _Method:
    def __init__(self, log: list, actor: str, name: str):
        self.log, self.actor, self.name, self.transport = log, actor, name, None

    def options(self, tensor_transport: str | None = None) -> _Method:
        self.transport = tensor_transport
        return self

    def remote(self, *args: Any, **kwargs: Any) -> _Ref:
        ref = _Ref(f"{self.actor}.{self.name}#{len(self.log)}")
        self.log.append({"ref": ref, "method": self.name, "transport": self.transport,
                         "args": list(args) + list(kwargs.values()), "kwargs": kwargs})
        return ref


class _Actor:
    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def __getattr__(self, method: str) -> _Method:
        return _Method(self.log, self.name, method)


ROLES = ["sft", "base", "student_base", "sft_1", "base_1"]


def _chain(tensor_transport: str | None) -> tuple[list[dict], list]:
    log: list[dict] = []
    actors = {role: _Actor(log, role) for role in ROLES}
    calls = call_chain(ROLES, lambda role: (0, actors[role]), 7, "ids", "mask", "rows", 4, 1.0,
                       tensor_transport=tensor_transport)
    return log, calls


def _readers(log: list[dict]) -> Counter:
    return Counter(a for c in log for a in c["args"] if isinstance(a, _Ref))


def test_rdt_objects_have_one_reader_each() -> None:
    log, calls = _chain("cuda_ipc")
    sft_ref = calls[0][2]
    readers = _readers(log)
    assert readers[sft_ref] == 0  # within the chain: the student worker is the sft part's only reader
    supports = [c for c in log if c["method"] == "support"]
    assert len(supports) == len(ROLES) - 1 and all(c["transport"] == "cuda_ipc" for c in supports)
    assert all(readers[c["ref"]] == 1 for c in supports)  # each support part: one gathering teacher
    gathers = [c for c in log if c["method"] == "gather"]
    assert [next(a for a in g["args"] if isinstance(a, _Ref)) for g in gathers] == [c["ref"] for c in supports]
    assert {c["method"] for c in log} == {"topk", "support", "gather"}
    # one method per computation: the transport is the call's option and the method's argument, the same
    assert all(c["transport"] == "cuda_ipc" and c["kwargs"]["transport"] == "cuda_ipc" for c in log)


def test_object_store_chain_passes_the_sft_result_to_every_gatherer() -> None:
    log, calls = _chain(None)
    assert _readers(log)[calls[0][2]] == len(ROLES) - 1  # object-store objects may have many readers
    assert {c["method"] for c in log} == {"topk", "gather"}
    # plain calls (no options, no transport argument): the results go through the object store
    assert all(c["transport"] is None and "transport" not in c["kwargs"] for c in log)


def test_gpu_ids_stay_strings_and_uuids_work() -> None:
    uuid = "GPU-8f2e1c3a-5b6d-4e7f-9a0b-1c2d3e4f5a6b"
    assert gpu_id_strings(["0", "1"]) == ["0", "1"]
    assert gpu_id_strings([0]) == ["0"]
    assert gpu_id_strings([uuid]) == [uuid]
    teachers = [{"role": "sft", "node_id": "a", "gpu_ids": [uuid], "device": "cuda:0"},
                {"role": "base", "node_id": "a", "gpu_ids": [uuid], "device": "cuda:0"}]
    assert choose_rdt_transport("auto", teachers, [{"node_id": "a", "gpu_ids": [uuid]}]) == "cuda_ipc"
    other = "GPU-00000000-0000-0000-0000-000000000001"
    own = [{"role": "sft", "node_id": "a", "gpu_ids": [other], "device": "cuda:0"},
           {"role": "base", "node_id": "a", "gpu_ids": ["GPU-2"], "device": "cuda:0"}]
    with pytest.raises(ValueError, match=f"share GPU {uuid}"):
        choose_rdt_transport("auto", own + [{"role": "base", "node_id": "a", "gpu_ids": [uuid], "device": "cuda:0"}],
                             [{"node_id": "a", "gpu_ids": [uuid]}])
