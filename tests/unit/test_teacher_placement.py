"""Teachers larger than one GPU, without Ray or CUDA: the config refuses GPU counts a replica cannot take, the
layout check refuses what the nodes cannot hold (naming the numbers), and the engines' placement arguments
for a 4-GPU replica (HF device map, vLLM tensor parallelism). Placement on a cluster with declared GPUs:
tests/integration/test_teacher_placement.py."""

from __future__ import annotations

import pytest
import torch

from common.config import ConfigError, config_from_dict
from teacher_service.engine_hf import SPREAD_HEADROOM, device_map_for
from teacher_service.engine_vllm import vllm_parallel_options
from teacher_service.placement import PlacementError, check_layout, engine_gpus, needs_group, replica_bundle
from teacher_service.pool import check_teacher_layout

BASE = {"models": {"base_teacher": {"path": "b"}, "sft_teacher": {"path": "s"}, "student": {"path": "st"}}}
GB = 1 << 30


@pytest.mark.parametrize("gpus", ["0", "0.25", "0.5", "1", "2", "4", "8"])
def test_fractions_and_whole_gpus_are_accepted(gpus: str) -> None:
    assert config_from_dict(BASE, [f"teachers.num_gpus={gpus}"]).teachers.num_gpus == float(gpus)


@pytest.mark.parametrize("gpus", ["1.5", "2.5", "3.25"])
def test_a_part_of_several_gpus_is_refused(gpus: str) -> None:
    with pytest.raises(ConfigError, match=rf"teachers.num_gpus={gpus}: a replica takes a fraction of one GPU"):
        config_from_dict(BASE, [f"teachers.num_gpus={gpus}"])


def test_replica_bundle_and_group() -> None:
    assert replica_bundle(4, 1, {"teacher_gpu": 1}) == {"CPU": 1.0, "GPU": 4.0, "teacher_gpu": 1.0}
    assert replica_bundle(4, 0) == {"GPU": 4.0}  # zero entries left out
    assert [needs_group(g) for g in (0, 0.5, 1, 2, 4)] == [False, False, False, True, True]
    assert [engine_gpus(g) for g in (0, 0.5, 1, 2, 4)] == [1, 1, 1, 2, 4]


NODE8 = {"CPU": 96.0, "GPU": 8.0}


@pytest.mark.parametrize("replicas, bundle, nodes, error", [
    (1, {"CPU": 1, "GPU": 4}, [{"CPU": 16, "GPU": 2}, {"CPU": 16, "GPU": 2}],
     r"teachers.num_gpus=4 per replica but the largest node has 2 GPUs"),
    (2, {"CPU": 1, "GPU": 4}, [{"CPU": 16, "GPU": 4}, {"CPU": 16, "GPU": 2}],
     r"replicas x num_gpus = 2 x 4 = 8 > 6 GPUs in the cluster"),
    # 8 GPUs in all, but only one node holds a replica of 4
    (2, {"CPU": 1, "GPU": 4}, [{"CPU": 16, "GPU": 6}, {"CPU": 16, "GPU": 1}, {"CPU": 16, "GPU": 1}],
     r"2 replicas of .* do not fit: the nodes hold 1 at once"),
    (3, {"CPU": 1, "GPU": 0.5}, [{"CPU": 16, "GPU": 1}], r"replicas x num_gpus = 3 x 0.5 = 1.5 > 1 GPUs"),
    (1, {"CPU": 1, "GPU": 4, "teacher_gpu": 1}, [NODE8], r"no node holds one teacher replica"),
    (20, {"CPU": 1}, [{"CPU": 16}], r"20 replicas of \{'CPU': 1\} do not fit: the nodes hold 16 at once"),
], ids=["larger-than-a-node", "more-than-the-cluster", "fragmented", "fractions", "custom-resource", "cpus"])
def test_layouts_that_cannot_be_placed_are_refused(replicas, bundle, nodes, error) -> None:
    with pytest.raises(PlacementError, match=error):
        check_layout(replicas, bundle, nodes)


def test_layouts_that_fit() -> None:
    check_layout(4, {"CPU": 1, "GPU": 4}, [NODE8, NODE8])  # two replicas a node
    check_layout(4, {"CPU": 1, "GPU": 0.5}, [{"CPU": 4, "GPU": 2}])  # four halves on two GPUs
    check_layout(2, {"CPU": 1, "GPU": 2, "teacher_gpu": 1}, [{**NODE8, "teacher_gpu": 8}, {"CPU": 8}])
    check_layout(0, {"GPU": 99}, [])  # nothing to place (e.g. a cache run)


def test_the_pool_counts_every_role() -> None:
    """sft + base, plus student_base when a teacher scores it: three replicas of 4 need 12 GPUs."""
    cfg = config_from_dict(BASE, ["teachers.num_gpus=4"])
    check_teacher_layout(cfg, [NODE8])
    three = config_from_dict(BASE, ["teachers.num_gpus=4", "teachers.student_base_source=teacher"])
    with pytest.raises(PlacementError, match=r"3 x 4 = 12 > 8 GPUs"):
        check_teacher_layout(three, [NODE8])
    more = config_from_dict(BASE, ["teachers.num_gpus=2", "teachers.replicas={sft: 3, base: 2}"])
    with pytest.raises(PlacementError, match=r"5 x 2 = 10 > 8 GPUs"):
        check_teacher_layout(more, [NODE8])
    # a LoRA pair: the sft replicas answer for base, so only they take GPUs (3 x 2 = 6 fit where 10 did not)
    check_teacher_layout(more, [NODE8], paired=True)


def test_hf_device_map_of_a_four_gpu_replica() -> None:
    """4 GPUs of 80 GB: the layers spread evenly ('balanced') over cuda:0..3, weights filling at most 85% of
    each (the rest for activations and the LM head's chunks); one GPU or a CPU replica keeps one device."""
    cuda0 = torch.device("cuda", 0)
    got = device_map_for(4, cuda0, [80 * GB] * 4)
    assert got["device_map"] == "balanced"
    assert got["max_memory"] == {i: int(80 * GB * (1 - SPREAD_HEADROOM)) for i in range(4)}
    assert device_map_for(1, cuda0, [80 * GB]) == {"device_map": {"": cuda0}}
    cpu = torch.device("cpu")
    assert device_map_for(4, cpu) == {"device_map": {"": cpu}}  # a CPU replica (tests) is not spread
    with pytest.raises(ValueError, match="num_gpus=4 sees 2 GPUs"):
        device_map_for(4, cuda0, [80 * GB] * 2)


def test_vllm_parallel_options_of_a_four_gpu_replica() -> None:
    assert vllm_parallel_options(4) == {"tensor_parallel_size": 4, "distributed_executor_backend": "mp"}
    assert vllm_parallel_options(1) == {"tensor_parallel_size": 1}
    with pytest.raises(ValueError, match="at least one GPU"):
        vllm_parallel_options(0)
