"""FaultPlan holds (common/faults.py): every rank waits at the end of a held step until the test releases it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from common.faults import FaultPlan, Hold


def test_holds_travel_as_json_and_are_checked(tmp_path: Path) -> None:
    plan = FaultPlan(holds=(Hold(step=3), Hold(step=1, generation=2)), hold_dir=tmp_path)
    assert plan.hold_dir == str(tmp_path)
    again = FaultPlan.from_json(plan.to_json())  # what fault_run.py hands a CLI subprocess
    assert again == plan and again.holds == (Hold(3, 0), Hold(1, 2))
    with pytest.raises(ValueError, match="needs FaultPlan.hold_dir"):
        FaultPlan(holds=(Hold(step=3),))
    with pytest.raises(ValueError, match="Hold.step must be an integer >= 0"):
        FaultPlan.from_dict({"holds": [{"step": -1}], "hold_dir": str(tmp_path)})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['gen'\] in a hold"):
        FaultPlan.from_dict({"holds": [{"step": 1, "gen": 1}], "hold_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="FaultPlan.holds must be a list of Hold"):
        FaultPlan(holds=(3,), hold_dir=str(tmp_path))


def test_every_rank_waits_at_its_hold_until_released(tmp_path: Path) -> None:
    hold = Hold(step=2, generation=1)
    plan = FaultPlan(holds=(hold,), hold_dir=str(tmp_path))
    plan.step_done(0, 2, 0)  # the same step in another worker group passes straight on
    plan.step_done(0, 1, 1)  # ... and another step of the held group
    assert not plan.held(hold, 2)
    done: list[int] = []
    ranks = [threading.Thread(target=lambda r=r: (plan.step_done(r, 2, 1), done.append(r))) for r in (0, 1)]
    for t in ranks:
        t.start()
    for t in ranks:
        t.join(timeout=0.5)
    assert plan.held(hold, 2) and done == [], "the ranks did not wait at the hold"
    plan.release(hold)
    for t in ranks:
        t.join(timeout=30)
    assert sorted(done) == [0, 1]
    plan.step_done(0, 2, 1)  # released: a later pass does not wait


def test_a_cache_stage_waits_after_its_nth_shard_until_released(tmp_path: Path) -> None:
    plan = FaultPlan(stage_hold_after=2, hold_dir=str(tmp_path))
    assert FaultPlan.from_json(plan.to_json()) == plan
    with pytest.raises(ValueError, match="stage_hold_after needs FaultPlan.hold_dir"):
        FaultPlan(stage_hold_after=2)
    with pytest.raises(ValueError, match="stage_hold_after must be an integer >= 0 or None"):
        FaultPlan(stage_hold_after=-1, hold_dir=str(tmp_path))
    plan.shard_start(0)  # before its first and second shard the stage passes straight on
    plan.shard_start(1)
    assert not plan.stage_held()
    done: list[int] = []
    stage = threading.Thread(target=lambda: (plan.shard_start(2), done.append(2)))
    stage.start()
    stage.join(timeout=0.5)
    assert plan.stage_held() and done == [], "the stage did not wait after its second shard"
    plan.release_stage()
    stage.join(timeout=30)
    assert done == [2]
    plan.shard_start(2)  # released: a restarted stage reaching the hold again passes straight on
