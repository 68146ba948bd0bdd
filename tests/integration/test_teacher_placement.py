"""Teachers larger than one GPU, on the shared local Ray cluster with its declared (fake) GPUs: each replica of
`teachers.num_gpus: 4` gets its own STRICT_PACK placement group of one {CPU, GPU: 4} bundle, runs in it with
the 4 GPU ids Ray assigned, its engine is built for 4 GPUs, and the groups go when the pool is stopped;
layouts the cluster cannot hold are refused before any actor starts, naming the numbers.

The cluster's GPUs are logical (tests/integration/conftest.py RAY_FAKE_GPUS), so the engines run on the CPU
(`teachers.device: cpu`); what a real GPU engine would do with 4 GPUs is checked by the pure functions
(tests/unit/test_teacher_placement.py: `device_map_for`, `vllm_parallel_options`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
from ray.util import placement_group_table

from common.config import RunConfig, config_from_dict
from common.topk import TopKRecord
from teacher_service import TeacherPool
from teacher_service.placement import PlacementError, find_group, reserve_groups
from tests.tiny import make_model_set

NAMESPACE = "deltakd-test"


def _cfg(paths: dict[str, Path], prefix: str, *overrides: str) -> RunConfig:
    data: dict[str, Any] = {
        "models": {"base_teacher": {"path": str(paths["base_teacher"])},
                   "sft_teacher": {"path": str(paths["sft_teacher"])},
                   "student": {"path": str(paths["student"])}},
        "loss": {"k": 4},
        "teachers": {"name_prefix": prefix, "namespace": NAMESPACE, "device": "cpu", "num_cpus": 0.5},
    }
    return config_from_dict(data, list(overrides))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_model_set(tmp_path_factory.mktemp("placement"))


def _absent(prefix: str) -> bool:
    try:
        ray.get_actor(f"{prefix}-sft-0", namespace=NAMESPACE)
    except ValueError:
        return True
    return False


def test_four_gpu_replicas_are_placed_in_their_own_groups(ray_cluster: dict, models: dict[str, Path]) -> None:
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus < 8:
        pytest.skip(f"the session cluster has {gpus:g} GPUs (declared only on hosts without CUDA); needs 8")

    # Refused before any actor: one replica is larger than any node; two of 4 fit, three roles of 4 do not.
    with pytest.raises(PlacementError, match=r"teachers.num_gpus=16 per replica but the largest node has 8 GPUs"):
        TeacherPool.start(_cfg(models, "tp16", "teachers.num_gpus=16"))
    assert _absent("tp16")
    with pytest.raises(PlacementError, match=r"replicas x num_gpus = 3 x 4 = 12 > 8 GPUs in the cluster"):
        TeacherPool.start(_cfg(models, "tp12", "teachers.num_gpus=4", "teachers.student_base_source=teacher"))
    assert _absent("tp12")

    # Served detached (as `python -m teacher_service serve` does), so that `stop` must find the groups by name.
    cfg = _cfg(models, "tp4", "teachers.num_gpus=4")
    pool = TeacherPool.start(cfg, detached=True)
    try:
        assert len(pool.groups) == 2  # sft and base, one group each
        by_id = {pg.id.hex(): placement_group_table(pg) for pg in pool.groups}
        for table in by_id.values():
            assert table["strategy"] == "STRICT_PACK" and table["state"] == "CREATED"
            assert list(table["bundles"].values()) == [{"CPU": 0.5, "GPU": 4.0}]
        health = [h for hs in pool.health().values() for h in hs]
        assert {h["placement_group"] for h in health} == set(by_id)  # each replica runs in its own group
        for h in health:
            assert len(h["gpu_ids"]) == 4 and all(isinstance(g, str) for g in h["gpu_ids"])
            assert h["num_gpus"] == 4 and h["device"] == "cpu"  # the engine was built for 4 GPUs
        assert len({g for h in health for g in h["gpu_ids"]}) == 8  # no GPU given to two replicas
        ids = np.arange(4, 4 + 12, dtype=np.int32).reshape(2, 6) % pool.vocab_size
        mask = np.ones_like(ids)
        rec = ray.get(pool.submit(0, ids, mask, mask.astype(bool)).ref)  # the replicas answer as any other
        assert isinstance(rec, TopKRecord) and rec.ids.shape == (12, 4)

        # A group the nodes cannot reserve now (the replicas hold all 8 GPUs) is refused in time, and removed.
        with pytest.raises(PlacementError, match=r"0 of 1 teacher placement groups of \{'GPU': 4.0\}"):
            reserve_groups(["tp-extra-pg"], {"GPU": 4.0}, detached=False, wait_s=1.0)
        assert find_group("tp-extra-pg") is None

        attached = TeacherPool.attach(cfg)  # what `stop` does: attach, then shut down with force
        assert {pg.id.hex() for pg in attached.groups} == set(by_id)
        attached.shutdown(force=True)
        assert {placement_group_table(pg)["state"] for pg in pool.groups} == {"REMOVED"}
        assert _absent("tp4")
    finally:
        pool.shutdown(force=True)
