"""The driver's config keys: fault injection as a FaultPlan (not config), one GPU per NCCL rank, resume
comparisons."""

from __future__ import annotations

import json

import pytest

from common.config import ConfigError, config_from_dict
from common.faults import FaultPlan, RankError
from student_worker import checkpoint as ckpt

BASE = {"models": {"base_teacher": {"path": "b"}, "sft_teacher": {"path": "s"}, "student": {"path": "st"}}}


def test_fractional_gpus_for_several_ranks_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"training: .*num_gpus_per_worker=0.5 with training.num_workers=2"):
        config_from_dict(BASE, ["training.num_workers=2", "training.batch_size=4",
                                "training.num_gpus_per_worker=0.5"])
    # one rank may share a GPU (teachers beside it); whole GPUs per rank are fine
    assert config_from_dict(BASE, ["training.num_gpus_per_worker=0.5"]).training.num_gpus_per_worker == 0.5
    config_from_dict(BASE, ["training.num_workers=2", "training.batch_size=4", "training.num_gpus_per_worker=1"])


def test_fault_plans_are_off_by_default_and_typed():
    t = FaultPlan()
    assert t.step_delay_s == 0 and t.teacher_delay_s == 0 and t.crash_in_checkpoint is None and t.rank_error is None
    plan = FaultPlan.from_json('{"rank_error": {"rank": 1, "step": 3}, "step_delay_s": 0.5}')
    assert plan.rank_error == RankError(rank=1, step=3) and plan.step_delay_s == 0.5
    assert FaultPlan.from_json(plan.to_json()) == plan  # what fault_run.py hands a subprocess
    with pytest.raises(ValueError, match="unknown fault 'step_dealy_s' \\(did you mean 'step_delay_s'\\?\\)"):
        FaultPlan.from_json('{"step_dealy_s": 1}')
    with pytest.raises(ValueError, match="FaultPlan.step_delay_s must be a number >= 0"):
        FaultPlan(step_delay_s=-1)
    with pytest.raises(ValueError, match="FaultPlan.crash_in_checkpoint must be an integer > 0"):
        FaultPlan(crash_in_checkpoint=0)
    with pytest.raises(ValueError, match="FaultPlan.rank_error.rank must be an integer >= 0"):
        FaultPlan.from_dict({"rank_error": {"rank": -1, "step": 3}})


def test_the_old_testing_section_is_refused_naming_the_fault_plan():
    for overrides in (["testing.step_delay_s=0.5"], ["testing.rank_error={rank: 1, step: 3}"]):
        with pytest.raises(ConfigError, match=r"unknown key 'testing' \(removed: fault injection is no longer "
                                              r"configured: .*common\.faults\.FaultPlan"):
            config_from_dict(BASE, overrides)
    with pytest.raises(ConfigError, match="unknown key 'testing'"):
        config_from_dict({**BASE, "testing": {}})


def test_injected_faults_fire_where_planned(tmp_path):
    from common.faults import InjectedRankError

    plan = FaultPlan(rank_error=RankError(rank=1, step=5))
    plan.mid_step(0, 5, 0)  # another rank, another step, a restored group: nothing
    plan.mid_step(1, 4, 0)
    plan.mid_step(1, 5, 1)
    with pytest.raises(InjectedRankError, match="rank 1 raises mid-step at step 5"):
        plan.mid_step(1, 5, 0)
    FaultPlan(crash_in_checkpoint=4).writing_checkpoint(tmp_path, 2)  # not the planned checkpoint: no exit
    assert not (tmp_path / "state.json").exists()


def test_resume_ignores_log_every_and_the_collective_timeout_and_the_old_testing_section(tmp_path):
    saved = config_from_dict(BASE).model_dump(mode="json")
    final = tmp_path / "ckpt-000002"
    final.mkdir()

    def write(config: dict) -> None:
        (final / ckpt.STATE_FILE).write_text(json.dumps({"step": 2, "config": config, "metrics": []}))

    write(saved)
    relaxed = config_from_dict(BASE, ["training.log_every=5", "training.collective_timeout_s=60"])
    ckpt.check_resume_config(final, relaxed.model_dump(mode="json"))
    # a checkpoint written while the config had a `testing:` section (now a FaultPlan) still resumes
    write({**saved, "testing": {"step_delay_s": 0.3, "teacher_delay_s": 0.0, "crash_in_checkpoint": 4,
                                "rank_error": None}})
    ckpt.check_resume_config(final, config_from_dict(BASE).model_dump(mode="json"))
    ckpt.check_resume_config(final, relaxed.model_dump(mode="json"))
    other = config_from_dict(BASE, ["data.length_buckets=4"]).model_dump(mode="json")
    with pytest.raises(ckpt.CheckpointError, match="data.length_buckets"):
        ckpt.check_resume_config(final, other)


def test_a_finished_run_saved_with_the_old_testing_section_is_still_reused(tmp_path):
    import yaml

    from student_worker.research.experiment import _reusable, run_key

    cfg = config_from_dict(BASE)
    old = {**cfg.model_dump(mode="json"), "testing": {"step_delay_s": 0.2, "teacher_delay_s": 0.0,
                                                       "crash_in_checkpoint": None, "rank_error": None}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))  # as dump_config wrote it then
    report = {"method": "kd", "rouge": {"student_after": {"rougeL": 0.5}}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert _reusable(tmp_path, run_key(cfg)) == report
    other = config_from_dict(BASE, ["training.max_steps=7"])
    assert _reusable(tmp_path, run_key(other)) is None
