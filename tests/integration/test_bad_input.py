"""Bad input: a clear error naming the culprit, a non-zero exit, and nothing already written lost.

Config and argument errors go through the real CLI in a subprocess (`python -m student_worker.train`; they
fail in about a second, before Ray or any model; the module's CLI runs start together). Data, tokenizer, k
and resume errors go through the same CLI entry point in-process (`student_worker.train.main`, stderr
captured), attached to the session cluster: they fail in the driver's preflight, before anything is
written. Every failing command runs against an output directory that already holds a previous run's files,
and must leave them byte-identical.

Two inputs must NOT be rejected: over-long examples under `data.overlong=truncate` are cut, and models whose
padded embedding rows differ (152064 vs 151936 style) train. A teacher returning NaN stops the run (exit 3)
with an error naming the model and the batch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray

from common.config import RunConfig, dump_config
from tests.integration.test_student_training import make_cfg, read_rows, write_jsonl
from tests.tiny import make_llama, make_tokenizer

REPO = Path(__file__).resolve().parents[2]
TINY_YAML = REPO / "deploy/configs/tiny.yaml"


def _previous_run(out: Path) -> dict[str, bytes]:
    """Fill `out` with a previous run's files (metrics, a checkpoint); return their bytes."""
    ck = out / "checkpoints" / "ckpt-000002"
    (ck / "model").mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text('{"step": 0, "loss": 1.5}\n{"step": 1, "loss": 1.25}\n')
    (out / "config.yaml").write_text("run_name: previous\n")
    (ck / "state.json").write_text(json.dumps({"step": 2}))
    (ck / "model" / "model.safetensors").write_bytes(b"not really weights, but bytes to keep")
    return _snapshot(out)


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- CLI subprocess
CONFIG_CASES = {
    "unknown key": (["--set", "training.max_step=3"], ["unknown key 'training.max_step'", "did you mean 'max_steps'"]),
    "malformed --set": (["--set", "training.max_steps"], ["malformed override 'training.max_steps'",
                                                          "KEY=VALUE"]),
    "k <= 0": (["--set", "loss.k=0"], ["loss.k"]),
}


UNWRITABLE = "unwritable output dir"
CLI_TESTS = ("test_config_errors_exit_2_through_the_cli", "test_unwritable_output_dir_exits_2_through_the_cli")


@pytest.fixture(scope="module")
def cli_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The CLI subprocesses of the tests below, all started when the first of those tests runs: each is a
    fresh interpreter that imports torch and Ray and then fails its check, so on 2 cores two side by side take
    about the time of one. Only the cases pytest selected are started; each test waits for and checks its own."""
    wanted = {item.callspec.params["case"] if hasattr(item, "callspec") else UNWRITABLE
              for item in request.session.items if getattr(item, "originalname", None) in CLI_TESTS}
    root = tmp_path_factory.mktemp("cli")
    runs: dict[str, Any] = {}
    try:
        for i, case in enumerate(sorted(wanted)):
            tmp = root / f"case{i}"
            tmp.mkdir()
            if case == UNWRITABLE:  # tests run as root, so chmod cannot make a directory unwritable: put the
                afile = tmp / "afile"  # output under a regular FILE
                afile.write_text("a file, not a directory")
                args, out, before = [], afile / "out", None
            else:
                args, out = CONFIG_CASES[case][0], tmp / "out"
                before = _previous_run(out)
            argv = [sys.executable, "-m", "student_worker.train", "--config", str(TINY_YAML), *args,
                    "--output-dir", str(out), "--no-progress"]
            proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            runs[case] = {"argv": argv, "proc": proc, "out": out, "before": before, "tmp": tmp}
        yield runs
    finally:
        for run in runs.values():
            if run["proc"].poll() is None:
                run["proc"].kill()
                run["proc"].wait()


def _finished(run: dict[str, Any]) -> subprocess.CompletedProcess:
    if "done" not in run:
        stdout, stderr = run["proc"].communicate(timeout=120)
        run["done"] = subprocess.CompletedProcess(run["argv"], run["proc"].returncode, stdout, stderr)
    return run["done"]


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_errors_exit_2_through_the_cli(case: str, cli_runs: dict[str, Any]) -> None:
    _, expected = CONFIG_CASES[case]
    run = cli_runs[case]
    proc = _finished(run)
    assert proc.returncode == 2, f"{case}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    for text in expected:
        assert text in proc.stderr, f"{case}: {text!r} not in stderr:\n{proc.stderr}"
    assert _snapshot(run["out"]) == run["before"]


def test_unwritable_output_dir_exits_2_through_the_cli(cli_runs: dict[str, Any]) -> None:
    run = cli_runs[UNWRITABLE]
    proc = _finished(run)
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert f"output directory {run['out']} is not writable" in proc.stderr, proc.stderr
    assert (run["tmp"] / "afile").read_text() == "a file, not a directory"


# ---------------------------------------------------------------------------------------------- CLI in-process
@pytest.fixture(scope="module")
def tiny(tiny_world):
    return tiny_world  # the session's tiny world (tests/integration/conftest.py); read only here


def _main(cfg: RunConfig, tmp: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """`python -m student_worker.train --config <cfg as YAML> [args]`, in this process; (exit code, stderr)."""
    from student_worker.train import main

    path = tmp / "config.yaml"
    dump_config(cfg, path)
    capsys.readouterr()
    code = main(["--config", str(path), "--no-progress", *args])
    return code, capsys.readouterr().err


def _lines(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"instruction": "reverse the words :", "context": "one two", "response": "two one"}


def _data_case(case: str, tmp: Path, tiny: dict[str, Path]) -> tuple[list[str], list[str]]:
    """(overrides, texts the error must contain) of one bad-data case."""
    if case == "malformed JSONL row":
        path = _lines(tmp / "bad.jsonl", [GOOD, GOOD, '{"instruction": "x", "response": ', GOOD])
        return [f"data.train={path}"], [f"{path}:3", "malformed JSON line"]
    if case == "missing column":
        path = _lines(tmp / "bad.jsonl", [GOOD, {"instruction": "reverse the words :", "context": "one"}])
        return [f"data.train={path}"], [str(path), "row 1", "no column 'response'"]
    if case == "empty column":
        path = _lines(tmp / "bad.jsonl", [GOOD, GOOD, {**GOOD, "instruction": "  "}])
        return [f"data.train={path}"], [str(path), "row 2", "empty or non-text 'instruction'"]
    if case == "over-long example, reject":
        return ["data.max_length=6", "data.overlong=reject"], ["example 0 is", "over data.max_length=6",
                                                                "data.overlong=reject"]
    if case == "k > V":
        return ["loss.k=100000"], ["loss.k=100000 out of range", str(tiny["sft_teacher"])]
    if case == "tokenizers differ":
        # The other tokenizer's model directory has NO weights: the error must come before any weight load.
        other = make_tokenizer(tmp / "other_sft", extra_words="omega psi chi")
        return [f"models.sft_teacher.path={other}"], ["TokenizerMismatchError", str(other),
                                                      str(tiny["base_teacher"])]
    raise AssertionError(case)


DATA_CASES = ["malformed JSONL row", "missing column", "empty column", "over-long example, reject", "k > V",
              "tokenizers differ"]


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_tokenizers_and_k_exit_2_and_keep_previous_files(
        case: str, ray_cluster, tiny, tmp_path, capsys) -> None:
    overrides, expected = _data_case(case, tmp_path, tiny)
    out = tmp_path / "out"
    before = _previous_run(out)
    actors_before = ray.util.list_named_actors(all_namespaces=True)
    code, err = _main(make_cfg(tiny, out, overrides), tmp_path, capsys)
    assert code == 2, f"{case}: exit {code}\n{err}"
    for text in expected:
        assert text in err, f"{case}: {text!r} not in stderr:\n{err}"
    assert _snapshot(out) == before
    assert ray.util.list_named_actors(all_namespaces=True) == actors_before  # no teacher / worker started


def test_over_long_examples_are_truncated_when_so_configured(tiny, tmp_path) -> None:
    from student_worker.driver import Driver

    cfg = make_cfg(tiny, tmp_path / "out", ["data.max_length=17", "data.overlong=truncate"])
    driver = Driver(cfg, progress=False)
    driver.preflight()
    full = Driver(make_cfg(tiny, tmp_path / "out", ["data.max_length=48"]), progress=False)
    full.preflight()
    assert max(len(ex.input_ids) for ex in full.train_set.examples) > 17  # so some examples really are cut
    for cut, whole in zip(driver.train_set.examples, full.train_set.examples):
        assert cut.input_ids == whole.input_ids[:17] and cut.prompt_len == whole.prompt_len < 17
    assert not (tmp_path / "out").exists()  # the preflight writes nothing


def test_resume_from_a_checkpoint_of_another_config_lists_the_keys(ray_cluster, tiny, tmp_path, capsys) -> None:
    from student_worker import checkpoint as ckpt

    out = tmp_path / "out"
    written = make_cfg(tiny, out, ["loss.alpha=0.5", "training.lr=0.001"])
    tmp = ckpt.begin_checkpoint(out / "checkpoints", 2)
    (tmp / ckpt.MODEL_DIR).mkdir()
    (tmp / ckpt.MODEL_DIR / "model.safetensors").write_bytes(b"x")
    (tmp / ckpt.OPTIMIZER_FILE).write_bytes(b"x")
    ckpt.finalize_checkpoint(tmp, {"step": 2, "config": written.model_dump(mode="json"), "metrics": []}, keep=2)
    (out / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n')
    before = _snapshot(out)
    code, err = _main(make_cfg(tiny, out), tmp_path, capsys, "--resume")
    assert code == 2, err
    assert "cannot resume" in err and "loss.alpha" in err and "training.lr" in err, err
    assert _snapshot(out) == before
    # and a fresh run (no --resume) into that directory is refused rather than overwriting it
    code, err = _main(make_cfg(tiny, out), tmp_path, capsys)
    assert code == 2 and "already holds a previous run" in err and "--resume" in err, err
    assert _snapshot(out) == before


def test_padded_embedding_rows_that_differ_train(ray_cluster, tmp_path, warm_ranks) -> None:
    """sft teacher 7 padded rows, base teacher none, student 3: rows beyond the tokenizer are cut."""
    from student_worker.driver import run_training

    tok = make_tokenizer(tmp_path / "tok")
    paths = {"base_teacher": make_llama(tmp_path / "base", tok, seed=1),
             "sft_teacher": make_llama(tmp_path / "sft", tok, seed=2, vocab_pad=7),
             "student": make_llama(tmp_path / "student", tok, seed=3, hidden_size=16, intermediate_size=32,
                                   vocab_pad=3),
             "train": write_jsonl(tmp_path / "train.jsonl", 16, seed=0),
             "eval": write_jsonl(tmp_path / "eval.jsonl", 4, seed=1)}
    out = tmp_path / "run"
    report = run_training(make_cfg(paths, out, ["training.num_workers=1", "training.batch_size=4",
                                                "training.max_steps=3", "output.plot=false",
                                                "teachers.num_cpus=0.5"]), progress=False, warm=warm_ranks)
    rows = read_rows(out)
    assert report["steps"] == 3 and [r["step"] for r in rows] == [0, 1, 2]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["distill"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_nan_teacher_stops_the_run_naming_model_and_batch(ray_cluster, tiny, tmp_path, capsys) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    nan_dir = tmp_path / "nan_base"
    model = AutoModelForCausalLM.from_pretrained(str(tiny["base_teacher"]))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.save_pretrained(str(nan_dir))
    AutoTokenizer.from_pretrained(str(tiny["base_teacher"])).save_pretrained(str(nan_dir))

    out = tmp_path / "run"
    cfg = make_cfg(tiny, out, [f"models.base_teacher.path={nan_dir}", "training.num_workers=1",
                               "training.batch_size=4", "training.max_steps=3", "teachers.num_cpus=0.5",
                               "teachers.max_restarts=0", "teachers.max_task_retries=0"])
    code, err = _main(cfg, tmp_path, capsys)
    assert code == 3, err
    assert "TeacherOutputError" in err and f"teacher model {nan_dir} gave bad output for batch 0" in err, err
    assert read_rows(out) == []  # no step trained on NaN targets
