"""The driver's config keys: the test-only `testing:` section, one GPU per NCCL rank, resume comparisons."""

from __future__ import annotations

import json

import pytest

from common.config import ConfigError, config_from_dict
from student_worker import checkpoint as ckpt

BASE = {"models": {"base_teacher": {"path": "b"}, "sft_teacher": {"path": "s"}, "student": {"path": "st"}}}


def test_fractional_gpus_for_several_ranks_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"training: .*num_gpus_per_worker=0.5 with training.num_workers=2"):
        config_from_dict(BASE, ["training.num_workers=2", "training.batch_size=4",
                                "training.num_gpus_per_worker=0.5"])
    # one rank may share a GPU (teachers beside it); whole GPUs per rank are fine
    assert config_from_dict(BASE, ["training.num_gpus_per_worker=0.5"]).training.num_gpus_per_worker == 0.5
    config_from_dict(BASE, ["training.num_workers=2", "training.batch_size=4", "training.num_gpus_per_worker=1"])


def test_testing_hooks_are_off_by_default_and_typed():
    t = config_from_dict(BASE).testing
    assert t.step_delay_s == 0 and t.teacher_delay_s == 0 and t.crash_in_checkpoint is None and t.rank_error is None
    cfg = config_from_dict(BASE, ["testing.rank_error={rank: 1, step: 3}", "testing.step_delay_s=0.5"])
    assert cfg.testing.rank_error is not None and (cfg.testing.rank_error.rank, cfg.testing.rank_error.step) == (1, 3)
    with pytest.raises(ConfigError, match="unknown key 'testing.step_dealy_s'"):
        config_from_dict(BASE, ["testing.step_dealy_s=1"])
    with pytest.raises(ConfigError, match="testing.step_delay_s"):
        config_from_dict(BASE, ["testing.step_delay_s=-1"])


def test_resume_ignores_hooks_log_every_and_the_collective_timeout(tmp_path):
    saved = config_from_dict(BASE).model_dump(mode="json")
    final = tmp_path / "ckpt-000002"
    final.mkdir()

    def write(config: dict) -> None:
        (final / ckpt.STATE_FILE).write_text(json.dumps({"step": 2, "config": config, "metrics": []}))

    write(saved)
    hooked = config_from_dict(BASE, ["testing.step_delay_s=0.3", "testing.crash_in_checkpoint=4",
                                     "training.log_every=5", "training.collective_timeout_s=60"])
    ckpt.check_resume_config(final, hooked.model_dump(mode="json"))
    # a checkpoint written before the `testing:` section existed still resumes
    del saved["testing"]
    write(saved)
    ckpt.check_resume_config(final, config_from_dict(BASE).model_dump(mode="json"))
    other = config_from_dict(BASE, ["data.length_buckets=4"]).model_dump(mode="json")
    with pytest.raises(ckpt.CheckpointError, match="data.length_buckets"):
        ckpt.check_resume_config(final, other)
