"""student_worker/tracking.py without a training run: what report_to checks, TensorBoard's rewind, and W&B in
offline mode (skipped when wandb is not installed: it is not a dependency). A run writing TensorBoard events
end to end is in tests/integration/test_selection_tracking.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import config_from_dict
from student_worker.tracking import MetricsTracker, TrackingError, check_trackers


def _cfg(tmp_path: Path, report_to: list[str], **logging: object):
    return config_from_dict({"models": {r: {"path": str(tmp_path / r)} for r in ("base_teacher", "sft_teacher", "student")},
                             "output": {"dir": str(tmp_path / "out")},
                             "logging": {"report_to": report_to, **logging}})


def _rows(steps: range, offset: float = 0.0) -> list[dict]:
    return [{"step": s, "loss": 2.0 - 0.1 * s + offset, "batch_ids": [s], "lr": 1e-3, "nan_metric": float("nan")}
            for s in steps]


def test_missing_package_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_wandb(name: str, *args: object, **kwargs: object) -> object:
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(TrackingError, match=r"logging.report_to includes 'wandb' .* install it: pip install wandb"):
        check_trackers(_cfg(tmp_path, ["wandb"]))
    check_trackers(_cfg(tmp_path, []))  # nothing asked, nothing needed


def test_tensorboard_rewind_keeps_each_step_once(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tmp_path, ["tensorboard"])
    out = tmp_path / "out"
    out.mkdir()
    tracker = MetricsTracker(cfg, out)
    for row in _rows(range(5)):
        tracker.log_row(row)
    tracker.rewind(3)  # steps 3 and 4 are replayed (a worker group restored from the checkpoint of step 3)
    for row in _rows(range(3, 6), offset=10.0):
        tracker.log_row(row)
    tracker.close()
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert "train/nan_metric" not in acc.Tags()["scalars"] and "train/batch_ids" not in acc.Tags()["scalars"]
    got = [(e.step, round(e.value, 4)) for e in acc.Scalars("train/loss")]
    assert got == [(0, 2.0), (1, 1.9), (2, 1.8), (3, 11.7), (4, 11.6), (5, 11.5)]


def test_wandb_offline_run_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _cfg(tmp_path, ["wandb"], wandb_mode="offline", wandb_project="deltakd-test")
    out = tmp_path / "out"
    out.mkdir()
    tracker = MetricsTracker(cfg, out)
    run_id = (out / "wandb_run_id").read_text()
    for row in _rows(range(3)):
        tracker.log_row(row)
    tracker.log_scalars("eval/student_after", {"rougeL": 0.5, "per_example": {"rougeL": [0.5]}}, 3)
    tracker.close()
    runs = list((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    # A resumed run continues the same W&B run id.
    again = MetricsTracker(cfg, out, start_step=3)
    assert (out / "wandb_run_id").read_text() == run_id
    again.close()
