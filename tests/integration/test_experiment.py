"""The method comparison end to end on the shared local Ray cluster: the session's tiny random Llamas, inline
JSONL data, two methods and a variant with overrides of its own (kd@tau=2,lam=0.5), one seed, 10 steps.

ONE experiment carries every check (module fixture `experiment`, four invocations of the CLI's `main`):
1. its second run (delta_kd) fails mid-training (its base teacher killed for good): exit 3, the first run kept;
2. a rerun that fails before training (no service to attach to) still lists the finished run;
3. a rerun completes: the finished run reused, the failed one resumed, the variant trained; the table, JSON
   and plots are written;
4. a third run trains nothing: every run reused, its outputs untouched.
Each test below asserts one of these; the fixture only records what each invocation left."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from common.config import dump_config
from common.faults import FaultPlan
from tests.integration.test_student_training import make_cfg

STEPS = 10  # after the step-1 trigger, 8 delayed steps (~2 s) remain for the kill to land in
LABELS = ["sft", "delta_kd", "kd@tau=2,lam=0.5"]
DIRS = {"sft": "sft-seed0", "delta_kd": "delta_kd-seed0", "kd@tau=2,lam=0.5": "kd+tau=2+lam=0.5-seed0"}


def test_run_key_ignores_where_a_run_writes_but_not_what_it_computes(tmp_path):
    from student_worker.research.experiment import run_key, shared_key

    paths = {k: tmp_path / k for k in ("base_teacher", "sft_teacher", "student", "train", "eval")}
    a = make_cfg(paths, tmp_path / "a", tag="one")
    b = make_cfg(paths, tmp_path / "b", ["teachers.attach=true"], tag="two")
    assert run_key(a) == run_key(b)  # other actor names, attach and output dir: the same run
    steps = make_cfg(paths, tmp_path / "a", ["training.max_steps=11"], tag="one")
    assert run_key(steps) != run_key(a) and shared_key(steps) != shared_key(a)
    kd = make_cfg(paths, tmp_path / "a", ["loss.method=kd", "seed=3"], tag="one")
    assert run_key(kd) != run_key(a) and shared_key(kd) == shared_key(a)


def _rows(path: Path) -> list[dict]:
    """metrics.jsonl rows written so far (a line being written is skipped)."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def experiment(ray_cluster, tiny_world, tmp_path_factory) -> dict[str, Any]:
    """Runs the four invocations; returns what each printed and left (experiment.json, metrics rows, mtimes).
    Only what must happen DURING a run is asserted here (the kill lands while delta_kd trains)."""
    import ray

    from student_worker.research.experiment import main

    root = tmp_path_factory.mktemp("exp")
    cfg = make_cfg(tiny_world, root / "unused", [
        "evaluation.enabled=true", "evaluation.max_new_tokens=4", f"training.max_steps={STEPS}",
        "training.num_workers=1", "training.batch_size=4", "training.checkpoint_every=2", "training.warmup_steps=1",
        "training.prefetch=0"])  # no teacher work runs ahead: the steps after the kill do need the teacher
    cfg_path = root / "exp.yaml"
    dump_config(cfg, cfg_path)
    out = root / "exp"
    argv = ["--methods", ",".join(LABELS), "--seeds", "1", "--config", str(cfg_path), "--output-dir", str(out),
            "--shift-batches", "2", "--no-progress", "--baseline", "sft"]
    ns, prefix = cfg.teachers.namespace, cfg.teachers.name_prefix
    failing = out / "runs" / "delta_kd-seed0"
    sft_report = out / "runs" / "sft-seed0" / "report.json"
    got: dict[str, Any] = {"out": out, "cfg": cfg, "failing": failing, "sft_report": sft_report}

    def invoke(name: str, args: list[str], faults: FaultPlan | None = None, during: Any = None) -> None:
        """main(args) with its stdout/stderr captured apart from pytest's, then experiment.json as it left it."""
        import contextlib
        import io

        box: dict = {}
        stdout, stderr = io.StringIO(), io.StringIO()

        def target() -> None:
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                box["rc"] = main(args, faults=faults)

        thread = threading.Thread(target=target)
        thread.start()
        try:
            if during is not None:
                during(thread, box)
        finally:
            thread.join(timeout=300)
        assert not thread.is_alive(), f"{name}: the experiment did not end"
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == ns]
        got[name] = {"rc": box.get("rc"), "out": stdout.getvalue(), "err": stderr.getvalue(),
                     "exp": _read(out / "experiment.json"), "actors_left": names}

    def kill_base_mid_training(thread: threading.Thread, box: dict) -> None:
        deadline = time.monotonic() + 180
        while not [r for r in _rows(failing / "metrics.jsonl") if r["step"] >= 1]:
            assert thread.is_alive(), f"the experiment ended before delta_kd trained a step: {box}"
            assert time.monotonic() < deadline, "delta_kd did not log step 1 in time"
            time.sleep(0.05)
        base = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == ns and a["name"].startswith(prefix) and a["name"].endswith("-base-0")]
        assert len(base) == 1, base  # the experiment's own pool
        ray.kill(ray.get_actor(base[0], namespace=ns), no_restart=True)

    # 1. delta_kd loses its base teacher for good mid-training (each step pauses, so the kill lands mid-run)
    invoke("failed", argv, faults=FaultPlan(step_delay_s=0.2), during=kill_base_mid_training)
    got["failed"]["rows"] = _rows(failing / "metrics.jsonl")
    got["failed"]["sft_saved"] = _read(sft_report) if sft_report.is_file() else None
    got["failed"]["sft_mtime"] = sft_report.stat().st_mtime_ns if sft_report.is_file() else None
    got["failed"]["md_exists"] = (out / "experiment.md").exists()
    got["failed"]["ckpts"] = sorted(p.name for p in (failing / "checkpoints").iterdir()) \
        if (failing / "checkpoints").is_dir() else []
    got["failed"]["failing_report_exists"] = (failing / "report.json").exists()
    # 2. no teacher service to attach to: fails before training. The reruns have no FaultPlan: injected faults
    # are not part of a run's identity, so the runs are reused.
    invoke("early", [*argv, "--set", "teachers.attach=true"])
    # 3. the cause is gone (the rerun starts its own teachers)
    invoke("complete", argv)
    got["complete"]["rows"] = _rows(failing / "metrics.jsonl")
    got["complete"]["sft_mtime"] = sft_report.stat().st_mtime_ns
    got["report_paths"] = [out / "runs" / d / "report.json" for d in DIRS.values()]
    got["complete"]["mtimes"] = [p.stat().st_mtime_ns for p in got["report_paths"]]
    # 4. nothing left to train
    invoke("reused", argv)
    got["reused"]["mtimes"] = [p.stat().st_mtime_ns for p in got["report_paths"]]
    return got


def test_a_run_failing_mid_training_keeps_finished_runs(experiment):
    """The second run (delta_kd) loses its base teacher for good in the middle of training: exit 3 naming the
    run, the first run's outputs and its experiment.json entry kept, no actor left."""
    failed, failing = experiment["failed"], experiment["failing"]
    assert failed["rc"] == 3, failed["err"][-3000:]
    err = failed["err"]
    assert f"run delta_kd seed 0 ({failing}) failed" in err and "TeacherUnavailableError" in err, err[-3000:]
    exp = failed["exp"]
    assert exp["status"].startswith("failed: delta_kd seed 0: "), exp["status"]
    assert [(r["method"], r["seed"], r["reused"]) for r in exp["runs"]] == [("sft", 0, False)]
    saved = failed["sft_saved"]
    assert {k: v for k, v in exp["runs"][0]["report"].items() if k != "paths"} == {
        k: v for k, v in saved.items() if k != "paths"}  # the returned report's paths also name report.md etc.
    assert set(exp["aggregates"]) == {"sft"}
    assert not failed["md_exists"]  # written only when every run finished
    done = len(failed["rows"])
    assert 1 <= done < STEPS and not failed["failing_report_exists"]
    assert f"ckpt-{done:06d}" in failed["ckpts"]  # the driver kept every completed step
    assert failed["actors_left"] == [], f"actors of the failed experiment left running: {failed['actors_left']}"


def test_a_rerun_failing_before_training_still_lists_the_finished_run(experiment):
    early = experiment["early"]
    assert early["rc"] == 3
    assert "the teacher pool (attach" in early["err"]
    exp = early["exp"]
    assert exp["status"].startswith("failed: ExperimentError: the teacher pool (attach"), exp["status"]
    assert [(r["method"], r["seed"], r["reused"]) for r in exp["runs"]] == [("sft", 0, True)]


def test_a_rerun_reuses_the_finished_run_and_resumes_the_failed_one(experiment):
    """sft is reused untouched, delta_kd resumes from the checkpoint its failure left, the variant trains."""
    failed, complete = experiment["failed"], experiment["complete"]
    assert complete["rc"] == 0, complete["err"][-3000:]
    done = len(failed["rows"])
    assert f"resuming from ckpt-{done:06d}" in complete["out"], complete["out"][:1500]
    again = complete["exp"]
    assert again["status"] == "complete"
    assert [(r["method"], r["seed"], r["reused"]) for r in again["runs"]] == [
        ("sft", 0, True), ("delta_kd", 0, False), ("kd@tau=2,lam=0.5", 0, False)]
    assert again["runs"][0]["report"] == failed["sft_saved"] and complete["sft_mtime"] == failed["sft_mtime"]
    assert again["runs"][1]["report"]["steps"] == STEPS
    rows = complete["rows"]
    assert [r["step"] for r in rows] == list(range(STEPS))  # each step once
    assert rows[:done] == failed["rows"]  # the steps before the failure were not trained again
    assert (experiment["out"] / "experiment.md").is_file()


def test_experiment_writes_table_json_and_plot(experiment):
    out, complete = experiment["out"], experiment["complete"]
    assert complete["rc"] == 0, complete["err"][-3000:]
    printed = complete["out"]
    assert "student delta_kd" in printed and "SFT teacher" in printed
    assert "delta_kd - sft = " in printed and "(ROUGE-L, 95% CI, 1 seed x 4 examples)" in printed
    assert "kd@tau=2,lam=0.5 - sft = " in printed
    assert "fewer than --eval-examples 500" in printed  # the inline eval set has 4 rows

    exp = complete["exp"]
    assert exp["status"] == "complete" and exp["methods"] == LABELS and exp["seeds"] == [0]
    assert exp["variants"] == {"kd@tau=2,lam=0.5": ["loss.tau=2", "loss.lam=0.5"]}
    for run in exp["runs"]:
        assert run["report"]["method"] == run["method"].partition("@")[0] and run["report"]["steps"] == STEPS
        assert set(run["report"]["rouge"]) == {"student_after"}  # references are evaluated once, by the experiment
        assert run["output_dir"] == str(out / "runs" / DIRS[run["method"]])
        assert (out / "runs" / DIRS[run["method"]] / "report.json").is_file()
    import yaml

    saved = yaml.safe_load((out / "runs" / DIRS["kd@tau=2,lam=0.5"] / "config.yaml").read_text())["loss"]
    assert (saved["method"], saved["tau"], saved["lam"]) == ("kd", 2.0, 0.5)  # the variant's own overrides
    assert yaml.safe_load((out / "runs" / "delta_kd-seed0" / "config.yaml").read_text())["loss"]["tau"] == 1.0
    assert set(exp["aggregates"]) == set(LABELS)
    assert "topk_mass_sft" in exp["aggregates"]["kd@tau=2,lam=0.5"]["diagnostics"]
    for agg in exp["aggregates"].values():
        for key in ("rougeL", "rouge1", "rouge2"):
            s = agg[key]
            assert set(s) == {"mean", "std", "min", "max", "n"} and s["n"] == 1 and s["std"] == 0.0
            assert 0.0 <= s["min"] <= s["mean"] <= s["max"] <= 1.0
    assert "topk_mass_student_base" in exp["aggregates"]["delta_kd"]["diagnostics"]
    assert "topk_mass_sft" not in exp["aggregates"]["sft"]["diagnostics"]  # sft has no teacher
    assert set(exp["references"]) == {"student_base", "sft_teacher"}
    assert exp["references"]["student_base"]["num_examples"] == 4
    shift = exp["shift"]
    assert shift["tokens"] > 0 and 0.0 <= shift["tv_sft_base"] <= 1.0 and 0.0 <= shift["tv_target_sft"] <= 1.0
    assert 0.0 < shift["topk_mass_sft"] <= 1.0 + 1e-5
    md = (out / "experiment.md").read_text()
    assert "student delta_kd" in md and "Shift diagnostics" in md and "delta_kd - sft = " in md
    assert (out / "rouge_by_method.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "rougeL_ci_by_method.png").read_bytes()[:4] == b"\x89PNG"
    # Per-example scores are kept, and the statistics are made from them.
    comp = exp["comparison"]
    assert comp["baseline"] == "sft" and set(comp["methods"]) == set(LABELS) and not comp["missing"]
    for run in exp["runs"]:
        per = run["report"]["rouge"]["student_after"]["per_example"]["rougeL"]
        assert len(per) == 4 and comp["methods"][run["method"]]["mean"] == pytest.approx(sum(per) / 4)
    diff = comp["differences"]["delta_kd"]
    assert diff["lo"] <= diff["mean"] <= diff["hi"] and diff["verdict"].startswith("delta_kd - sft = ")
    assert set(comp["references"]) == {"student_base", "sft_teacher"}
    prefix = experiment["cfg"].teachers.name_prefix
    left = [n for n in complete["actors_left"] if n.startswith(prefix)]
    assert not left, left  # the experiment's teachers are gone


def test_a_second_rerun_trains_nothing_and_reuses_every_run(experiment):
    """Every run is reused, its outputs untouched; the same aggregates, shift and (seeded) comparison."""
    exp, again = experiment["complete"]["exp"], experiment["reused"]["exp"]
    assert experiment["reused"]["rc"] == 0, experiment["reused"]["err"][-3000:]
    assert [r["reused"] for r in again["runs"]] == [True, True, True]
    assert [r["wall_s"] for r in again["runs"]] == [r["wall_s"] for r in exp["runs"]]  # kept beside each run
    assert experiment["reused"]["mtimes"] == experiment["complete"]["mtimes"]
    assert again["aggregates"] == exp["aggregates"] and again["shift"] == exp["shift"]
    assert again["comparison"] == exp["comparison"]  # the bootstrap is seeded
