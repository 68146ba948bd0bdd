"""The method comparison end to end on the shared local Ray cluster: tiny random Llamas, inline JSONL data,
two methods and a variant with overrides of its own (kd@tau=2,lam=0.5), one seed, 3 steps; then a rerun
that must reuse every finished run. And an experiment whose second run fails mid-training (its teacher
killed for good): exit 3, the first run kept, a rerun completes."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from common.config import dump_config
from common.faults import FaultPlan
from tests.integration.test_student_training import make_cfg, tiny_setup


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


def test_experiment_writes_table_json_plot_and_reuses_finished_runs(ray_cluster, tmp_path, capsys):
    import ray

    from student_worker.research.experiment import main

    paths = tiny_setup(tmp_path)
    cfg = make_cfg(paths, tmp_path / "unused", [
        "evaluation.enabled=true", "evaluation.max_new_tokens=4", "training.max_steps=3",
        "training.num_workers=1", "training.batch_size=4", "training.checkpoint_every=3", "training.warmup_steps=1"])
    cfg_path = tmp_path / "exp.yaml"
    dump_config(cfg, cfg_path)
    out = tmp_path / "exp"
    argv = ["--methods", "sft,delta_kd,kd@tau=2,lam=0.5", "--seeds", "1", "--config", str(cfg_path),
            "--output-dir", str(out), "--shift-batches", "2", "--no-progress", "--baseline", "sft"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "student delta_kd" in printed and "SFT teacher" in printed
    assert "delta_kd - sft = " in printed and "(ROUGE-L, 95% CI, 1 seed x 4 examples)" in printed
    assert "kd@tau=2,lam=0.5 - sft = " in printed
    assert "fewer than --eval-examples 500" in printed  # the inline eval set has 4 rows

    exp = json.loads((out / "experiment.json").read_text())
    labels = ["sft", "delta_kd", "kd@tau=2,lam=0.5"]
    assert exp["status"] == "complete" and exp["methods"] == labels and exp["seeds"] == [0]
    assert exp["variants"] == {"kd@tau=2,lam=0.5": ["loss.tau=2", "loss.lam=0.5"]}
    assert [(r["method"], r["seed"], r["reused"]) for r in exp["runs"]] == [(m, 0, False) for m in labels]
    dirs = {"sft": "sft-seed0", "delta_kd": "delta_kd-seed0", "kd@tau=2,lam=0.5": "kd+tau=2+lam=0.5-seed0"}
    for run in exp["runs"]:
        assert run["report"]["method"] == run["method"].partition("@")[0] and run["report"]["steps"] == 3
        assert set(run["report"]["rouge"]) == {"student_after"}  # references are evaluated once, by the experiment
        assert run["output_dir"] == str(out / "runs" / dirs[run["method"]])
        assert (out / "runs" / dirs[run["method"]] / "report.json").is_file()
    import yaml

    saved = yaml.safe_load((out / "runs" / dirs["kd@tau=2,lam=0.5"] / "config.yaml").read_text())["loss"]
    assert (saved["method"], saved["tau"], saved["lam"]) == ("kd", 2.0, 0.5)  # the variant's own overrides
    assert yaml.safe_load((out / "runs" / "delta_kd-seed0" / "config.yaml").read_text())["loss"]["tau"] == 1.0
    assert set(exp["aggregates"]) == set(labels)
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
    assert comp["baseline"] == "sft" and set(comp["methods"]) == set(labels) and not comp["missing"]
    for run in exp["runs"]:
        per = run["report"]["rouge"]["student_after"]["per_example"]["rougeL"]
        assert len(per) == 4 and comp["methods"][run["method"]]["mean"] == pytest.approx(sum(per) / 4)
    diff = comp["differences"]["delta_kd"]
    assert diff["lo"] <= diff["mean"] <= diff["hi"] and diff["verdict"].startswith("delta_kd - sft = ")
    assert set(comp["references"]) == {"student_base", "sft_teacher"}
    prefix = cfg.teachers.name_prefix
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    assert not [n for n in names if n.startswith(prefix)], names  # the experiment's teachers are gone

    # A rerun trains nothing: every run is reused, its outputs untouched.
    report_paths = [out / "runs" / d / "report.json" for d in dirs.values()]
    before = [p.stat().st_mtime_ns for p in report_paths]
    assert main(argv) == 0
    again = json.loads((out / "experiment.json").read_text())
    assert [r["reused"] for r in again["runs"]] == [True, True, True]
    assert [r["wall_s"] for r in again["runs"]] == [r["wall_s"] for r in exp["runs"]]  # kept beside each run
    assert [p.stat().st_mtime_ns for p in report_paths] == before
    assert again["aggregates"] == exp["aggregates"] and again["shift"] == exp["shift"]
    assert again["comparison"] == exp["comparison"]  # the bootstrap is seeded


def _rows(path: Path) -> list[dict]:
    """metrics.jsonl rows written so far (a line being written is skipped)."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def test_a_run_failing_mid_training_keeps_finished_runs_and_a_rerun_reuses_them(
        ray_cluster, tmp_path, monkeypatch, capsys):
    """The second run (delta_kd) loses its base teacher for good in the middle of training: exit 3 naming the
    run, the first run's outputs and its experiment.json entry kept, no actor left; a rerun (new teachers)
    reuses the first run and resumes the failed one from the checkpoint its failure left."""
    import ray

    from student_worker.research.experiment import main

    steps = 10  # after the step-1 trigger, 8 delayed steps (~2 s) remain for the kill to land in
    paths = tiny_setup(tmp_path)
    cfg = make_cfg(paths, tmp_path / "unused", [
        "evaluation.enabled=true", "evaluation.max_new_tokens=4", f"training.max_steps={steps}",
        "training.num_workers=1", "training.batch_size=4", "training.checkpoint_every=2", "training.warmup_steps=1",
        "training.prefetch=0"])  # no teacher work runs ahead: the steps after the kill do need the teacher
    delayed = FaultPlan(step_delay_s=0.2)  # each step pauses, so the kill lands mid-run
    cfg_path = tmp_path / "exp.yaml"
    dump_config(cfg, cfg_path)
    out = tmp_path / "exp"
    argv = ["--methods", "sft,delta_kd", "--seeds", "1", "--config", str(cfg_path), "--output-dir", str(out),
            "--shift-batches", "1", "--no-progress"]
    ns, prefix = cfg.teachers.namespace, cfg.teachers.name_prefix
    failing = out / "runs" / "delta_kd-seed0"

    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(rc=main(argv, faults=delayed)))
    thread.start()
    try:
        deadline = time.monotonic() + 180
        while not [r for r in _rows(failing / "metrics.jsonl") if r["step"] >= 1]:
            assert thread.is_alive(), f"the experiment ended before delta_kd trained a step: {box}"
            assert time.monotonic() < deadline, "delta_kd did not log step 1 in time"
            time.sleep(0.05)
        base = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == ns and a["name"].startswith(prefix) and a["name"].endswith("-base-0")]
        assert len(base) == 1, base  # the experiment's own pool
        ray.kill(ray.get_actor(base[0], namespace=ns), no_restart=True)
    finally:
        thread.join(timeout=180)
    assert not thread.is_alive()
    assert box.get("rc") == 3, box
    err = capsys.readouterr().err
    assert f"run delta_kd seed 0 ({failing}) failed" in err and "TeacherUnavailableError" in err, err[-3000:]

    exp = json.loads((out / "experiment.json").read_text())
    assert exp["status"].startswith("failed: delta_kd seed 0: "), exp["status"]
    assert [(r["method"], r["seed"], r["reused"]) for r in exp["runs"]] == [("sft", 0, False)]
    sft_report = out / "runs" / "sft-seed0" / "report.json"
    saved = json.loads(sft_report.read_text())
    assert {k: v for k, v in exp["runs"][0]["report"].items() if k != "paths"} == {
        k: v for k, v in saved.items() if k != "paths"}  # the returned report's paths also name report.md etc.
    assert set(exp["aggregates"]) == {"sft"}
    assert not (out / "experiment.md").exists()  # written only when every run finished
    failed_rows = _rows(failing / "metrics.jsonl")
    done = len(failed_rows)
    assert 1 <= done < steps and not (failing / "report.json").exists()
    assert (failing / "checkpoints" / f"ckpt-{done:06d}").is_dir()  # the driver kept every completed step
    left = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == ns]
    assert left == [], f"actors of the failed experiment left running: {left}"

    # A rerun that fails before training (no teacher service to attach to) still lists the finished run. The
    # reruns have no FaultPlan: injected faults are not part of a run's identity, so the runs are reused.
    sft_mtime = sft_report.stat().st_mtime_ns
    assert main([*argv, "--set", "teachers.attach=true"]) == 3
    assert "the teacher pool (attach" in capsys.readouterr().err
    early = json.loads((out / "experiment.json").read_text())
    assert early["status"].startswith("failed: ExperimentError: the teacher pool (attach"), early["status"]
    assert [(r["method"], r["seed"], r["reused"]) for r in early["runs"]] == [("sft", 0, True)]

    # The cause is gone (the rerun starts its own teachers): sft is reused untouched, delta_kd resumes from
    # the checkpoint its failure left.
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"resuming from ckpt-{done:06d}" in printed, printed[:1500]
    again = json.loads((out / "experiment.json").read_text())
    assert again["status"] == "complete"
    assert [(r["method"], r["seed"], r["reused"]) for r in again["runs"]] == [("sft", 0, True), ("delta_kd", 0, False)]
    assert again["runs"][0]["report"] == saved and sft_report.stat().st_mtime_ns == sft_mtime
    assert again["runs"][1]["report"]["steps"] == steps
    rows = _rows(failing / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(steps))  # each step once
    assert rows[:done] == failed_rows  # the steps before the failure were not trained again
    assert (out / "experiment.md").is_file()
