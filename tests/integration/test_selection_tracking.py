"""Best-checkpoint selection (evaluation.select_best) and experiment tracking (logging.report_to), end to
end on the shared local Ray cluster with tiny real models (method sft: no teachers needed for either).

- A run with selection every 2 steps and TensorBoard: the validation history, best_model/ and the test
  score of the chosen weights; the event files read back equal metrics.jsonl.
- The same run without selection trains exactly the same weights (selection only reads the model).
- The same run interrupted after a checkpoint and resumed: the same history, best model and final
  weights, and TensorBoard holds each step once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.integration.test_student_training import (
    comparable,
    load_weights,
    make_cfg,
    read_rows,
    write_jsonl,
)

pytest.importorskip("tensorboard")

STEPS = 6
SELECT = ["loss.method=sft", "evaluation.enabled=true", "evaluation.max_new_tokens=6", f"training.max_steps={STEPS}",
          "training.num_workers=1", "training.batch_size=4", "training.checkpoint_every=3", "training.warmup_steps=1",
          "evaluation.evaluate_teacher=false", "evaluation.select_best=true", "evaluation.select_every=2"]


def _scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def setup(tiny_world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The session's tiny world (read-only, tests/integration/conftest.py) and a validation set of our own."""
    root = tmp_path_factory.mktemp("sel")
    paths = dict(tiny_world)
    paths["validation"] = write_jsonl(root / "validation.jsonl", 6, seed=2)
    paths["root"] = root
    return paths


def _cfg(setup: dict[str, Path], out: Path, extra: list[str]):
    return make_cfg(setup, out, [*SELECT, f"data.validation={setup['validation']}", *extra])


@pytest.fixture(scope="module")
def selected(ray_cluster, setup: dict[str, Path], warm_ranks) -> tuple[Path, dict]:
    from student_worker.driver import run_training

    out = setup["root"] / "selected"
    report = run_training(_cfg(setup, out, ["logging.report_to=[tensorboard]"]), progress=False, warm=warm_ranks)
    return out, report


def test_selection_keeps_the_best_validation_model_and_scores_it(selected: tuple[Path, dict],
                                                                 setup: dict[str, Path]) -> None:
    from common.config import ModelSpec
    from common.data.examples import load_examples
    from student_worker.evaluate import evaluate_spec

    out, report = selected
    sel = report["selection"]
    assert sel["enabled"] and sel["every"] == 2 and sel["examples"] == 6
    assert [h["step"] for h in sel["history"]] == [2, 4, 6]
    scores = [h["rougeL"] for h in sel["history"]]
    best = sel["history"][int(np.argmax(scores))]  # the first of equal scores: ties keep the earlier step
    assert sel["best_step"] == best["step"] and sel["best_validation_rougeL"] == best["rougeL"]
    assert json.loads((out / "best_model" / "selection.json").read_text())["step"] == best["step"]
    # The reported test score is the chosen model's, on the test set (never the validation set).
    cfg = _cfg(setup, out, [])
    test_examples = load_examples(cfg.data, "eval", cfg.embedded)
    again = evaluate_spec(ModelSpec(path=str(out / "best_model")), test_examples, 6, 8)
    after = report["rouge"]["student_after"]
    assert after["per_example"] == again["per_example"] and after["num_examples"] == len(test_examples) == 4
    # Every checkpoint carries the best model of its step.
    final_ckpt = out / "checkpoints" / f"ckpt-{STEPS:06d}"
    assert json.loads((final_ckpt / "best_model" / "selection.json").read_text())["step"] == best["step"]


def test_tensorboard_events_hold_the_metrics(selected: tuple[Path, dict]) -> None:
    out, report = selected
    scalars = _scalars(out / "tensorboard")
    rows = read_rows(out)
    for key in ("loss", "ce", "grad_norm", "lr", "tokens_per_s"):
        got = scalars[f"train/{key}"]
        assert [s for s, _ in got] == list(range(STEPS))
        np.testing.assert_allclose([v for _, v in got], [r[key] for r in rows], rtol=1e-6)  # stored as float32
    assert [s for s, _ in scalars["validation/rougeL"]] == [2, 4, 6]
    np.testing.assert_allclose([v for _, v in scalars["validation/rougeL"]],
                               [h["rougeL"] for h in report["selection"]["history"]], rtol=1e-6)
    assert scalars["eval/student_after/rougeL"][0][1] == pytest.approx(report["rouge"]["student_after"]["rougeL"],
                                                                       rel=1e-6)


def test_selection_does_not_change_training(selected: tuple[Path, dict], setup: dict[str, Path],
        warm_ranks) -> None:
    from student_worker.driver import run_training

    out, _ = selected
    plain = setup["root"] / "plain"
    report = run_training(make_cfg(setup, plain, [s for s in SELECT if "select" not in s]), progress=False, warm=warm_ranks)
    assert report["selection"] == {"enabled": False} and not (plain / "best_model").exists()
    assert comparable(read_rows(plain)) == comparable(read_rows(out))
    a, b = load_weights(out / "final_model"), load_weights(plain / "final_model")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_resumed_run_selects_the_same_model(selected: tuple[Path, dict], setup: dict[str, Path],
        warm_ranks) -> None:
    from student_worker.driver import run_training

    out, report = selected
    resumed = setup["root"] / "resumed"
    cfg = _cfg(setup, resumed, ["logging.report_to=[tensorboard]"])
    assert run_training(cfg, stop_after=4, progress=False, warm=warm_ranks)["stopped_at"] == 4  # checkpoint at 3, then step 4
    # Stopping writes a checkpoint at 4; resume from it and finish.
    again = run_training(cfg, resume=True, progress=False, warm=warm_ranks)
    assert again["selection"]["history"] == report["selection"]["history"]
    assert again["selection"]["best_step"] == report["selection"]["best_step"]
    a, b = load_weights(out / "best_model"), load_weights(resumed / "best_model")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert again["rouge"]["student_after"]["per_example"] == report["rouge"]["student_after"]["per_example"]
    steps = [s for s, _ in _scalars(resumed / "tensorboard")["train/loss"]]
    assert steps == list(range(STEPS))  # each step once, though two processes logged
