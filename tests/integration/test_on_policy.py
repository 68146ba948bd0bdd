"""On-policy Delta-KD end to end (training.on_policy, student_worker/on_policy.py) on the session's cluster.

Few runs, each checking several things (the CI budget), on one restartable teacher service:

- bad input (in-process CLI entry point, no Ray touched): an over-long prompt under data.overlong=reject and
  a student whose generation config has no EOS exit 2 in the driver's preflight, naming the culprit;
- fraction 0 with every other on-policy key set is today's off-policy run, bit for bit (rows and weights);
- a mixed run (fraction 0.5, loss.objective sampled_token, lag 0): the teachers received the student's own
  samples (the pool's inputs of step 0 equal samples regenerated from the initial student with the same
  seeds), every record's support holds each position's label (K = k + 1, also on off-policy steps), the base
  teacher's log-probs are a gather at those ids, and the rows count the samples;
- lag 1, every step on-policy: one CLI run in which the SFT teacher is killed (Ray restarts it), a student
  worker is killed (the group is restored from a checkpoint that carries the lag-1 sample) and finally the
  driver is SIGKILLed; `--resume` then ends with the rows and weights of an uninterrupted run. The faults land
  where FaultPlan holds (common/faults.py) stop the ranks, in a run that otherwise goes at full speed.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray

from common.config import RunConfig, config_from_dict, dump_config
from common.faults import FaultPlan, Hold
from student_worker import checkpoint as ckpt
from student_worker.on_policy import SAMPLES_FILE
from tests.integration.test_student_training import (
    comparable,
    load_weights,
    make_cfg,
    read_rows,
)

REPO = Path(__file__).resolve().parents[2]
ON = ["training.on_policy.fraction=1", "training.on_policy.max_new_tokens=6"]
LAG1_STEPS = 4  # the teacher killed after step 0, a worker after step 2 (checkpoint 2), the driver after 3
LAG1 = ON + ["training.on_policy.lag=1", f"training.max_steps={LAG1_STEPS}", "training.checkpoint_every=2",
             "training.keep_checkpoints=8", "output.plot=false"]
TIMEOUT_S = 240
RANKS = 2  # make_cfg's training.num_workers

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def tiny(tiny_world):
    return tiny_world  # the session's tiny world (tests/integration/conftest.py)


@pytest.fixture(scope="module")
def service(session_teachers):
    """The session's restartable teacher service every run attaches to (tests/integration/session_teachers.py):
    (tag, overrides that attach)."""
    return session_teachers.ensure()


def _cfg(tiny: dict[str, Path], service: tuple[str, list[str]], out: Path, *overrides: str) -> RunConfig:
    tag, attach = service
    return make_cfg(tiny, out, attach + ["output.plot=false", *overrides], tag=tag)


def _same_run(out: Path, rows: list[dict[str, Any]], weights: dict[str, np.ndarray]) -> None:
    got = read_rows(out)
    assert [r["step"] for r in got] == [r["step"] for r in rows], "a step is missing or was logged twice"
    assert comparable(got) == comparable(rows)  # loss, counts, grad norms, lr: bit for bit
    mine = load_weights(out / "final_model")
    assert mine.keys() == weights.keys()
    for name, w in mine.items():
        assert np.array_equal(w, weights[name]), name


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_on_policy_input_exits_2_in_the_preflight(tiny, tmp_path, capsys) -> None:
    from student_worker.train import main

    def run(cfg: RunConfig, name: str) -> str:
        path = tmp_path / f"{name}.yaml"
        dump_config(cfg, path)
        assert main(["--config", str(path), "--no-progress"]) == 2
        assert not (cfg.output_dir / "metrics.jsonl").exists(), "nothing may be written"
        return capsys.readouterr().err

    long_prompt = make_cfg(tiny, tmp_path / "a", [*ON, "training.on_policy.max_new_tokens=40", "data.overlong=reject"])
    err = run(long_prompt, "long")
    assert "example 0: its prompt is" in err and "data.max_length - training.on_policy.max_new_tokens = 8" in err

    no_eos = tmp_path / "student_no_eos"
    no_eos.mkdir()
    for f in Path(tiny["student"]).iterdir():
        (no_eos / f.name).write_bytes(f.read_bytes())
    gen = json.loads((no_eos / "generation_config.json").read_text())
    gen.pop("eos_token_id")
    (no_eos / "generation_config.json").write_text(json.dumps(gen))
    err = run(make_cfg({**tiny, "student": no_eos}, tmp_path / "b", ON), "eos")
    assert f"student {no_eos}: its generation config has no eos_token_id" in err


# ---------------------------------------------------------------------------------------------- fraction 0
def test_fraction_zero_is_the_off_policy_run_bit_for_bit(tiny, service, tmp_path, warm_ranks) -> None:
    from student_worker.driver import run_training

    steps = ["training.max_steps=3"]
    run_training(_cfg(tiny, service, tmp_path / "off", *steps), progress=False, warm=warm_ranks)
    keys = ["training.on_policy.fraction=0", "training.on_policy.lag=1", "training.on_policy.temperature=0.5",
            "training.on_policy.max_new_tokens=5", "training.on_policy.top_p=0.9"]
    run_training(_cfg(tiny, service, tmp_path / "zero", *steps, *keys), progress=False, warm=warm_ranks)
    off = read_rows(tmp_path / "off")
    assert not any("on_policy" in r for r in off)  # no new keys in an off-policy run's rows
    _same_run(tmp_path / "zero", off, load_weights(tmp_path / "off" / "final_model"))


# ---------------------------------------------------------------------------------------------- what teachers get
@ray.remote(num_cpus=1, max_calls=1)  # a fresh process: the run's compute settings apply before any tensor op
def _regenerate_and_gather(cfg_dict: dict[str, Any], prompts: list[list[list[int]]], batch_ids: list[int],
                           record: dict[str, Any]) -> dict[str, Any]:
    """Step 0's samples drawn again from the initial student with the run's seeds, and the base teacher's
    gather at a record's ids, computed here, not by the run."""
    import torch
    from transformers import AutoTokenizer

    from common.data.model_loading import load_causal_lm
    from common.reproducibility import apply_compute_settings
    from student_worker.on_policy import generate_samples, generation_eos_ids, sample_seed
    from teacher_service.engine_hf import TeacherEngine

    cfg = config_from_dict(cfg_dict)
    apply_compute_settings(cfg.reproducibility, where="test task")
    spec, op = cfg.models.student, cfg.training.on_policy
    lm = load_causal_lm(spec, torch.device("cpu"), torch.float32)
    tok = AutoTokenizer.from_pretrained(spec.path)
    eos = generation_eos_ids(lm.generation_config, spec.path)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    samples = [generate_samples(lm, p, eos_ids=eos, pad_id=pad, temperature=op.temperature, top_p=op.top_p,
                                max_new_tokens=op.max_new_tokens, seed=sample_seed(cfg.seed, b))
               for p, b in zip(prompts, batch_ids)]
    base = TeacherEngine(cfg.models.base_teacher, device="cpu", dtype="float32")
    lp, tail = base.gather(record["input_ids"], record["attention_mask"], record["rows"], record["ids"], cfg.loss.tau)
    return {"samples": samples, "base_logprobs": lp.numpy(), "base_tail": tail.numpy()}


_REGENERATED: dict[str, dict[str, Any]] = {}


def _regenerated(cfg: RunConfig, prompts: list[list[list[int]]], batch_ids: list[int],
                 record: dict[str, Any]) -> dict[str, Any]:
    """`_regenerate_and_gather`'s result, computed once per distinct input: the ddp and the fsdp2 run ask for
    it with the same initial student, prompts, seeds and record (when theirs are equal), and each fresh task
    process costs an interpreter with torch and two models loaded. The key is every input the task reads."""
    used = [cfg.seed, cfg.loss.tau, *(m.model_dump(mode="json") for m in (
        cfg.reproducibility, cfg.models.student, cfg.models.base_teacher, cfg.training.on_policy))]
    key = hashlib.sha256(pickle.dumps((used, prompts, batch_ids, sorted(record.items())))).hexdigest()
    if key not in _REGENERATED:
        _REGENERATED[key] = ray.get(_regenerate_and_gather.remote(cfg.model_dump(mode="json"), prompts, batch_ids,
                                                                  record))
    return _REGENERATED[key]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_teachers_score_the_students_own_samples(tiny, service, tmp_path, strategy: str, warm_ranks) -> None:
    """seed 2, fraction 0.5: steps 0, 1 and 3 are on-policy, step 2 is not (is_on_policy_step). fsdp2: each
    rank samples from a gathered copy of the sharded student; the samples must be the plain model's."""
    from student_worker.driver import Driver
    from student_worker.on_policy import is_on_policy_step, sampled_batch

    class RecordingDriver(Driver):
        """Keeps what the pool was asked to score (test-only subclass: production code is unchanged)."""

        def _start_pool(self) -> Any:
            pool = super()._start_pool()
            submit = pool.submit
            self.submitted: list[dict[str, Any]] = []

            def recording(batch_id, input_ids, attention_mask, loss_mask, include=None, **kwargs):
                handle = submit(batch_id, input_ids, attention_mask, loss_mask, include=include, **kwargs)
                self.submitted.append({"batch_id": batch_id, "input_ids": input_ids, "attention_mask": attention_mask,
                                       "loss_mask": loss_mask, "include": include, "ref": handle.ref})
                return handle

            pool.submit = recording
            return pool

    out = tmp_path / "mixed"
    cfg = _cfg(tiny, service, out, "seed=2", "training.max_steps=4", "training.on_policy.fraction=0.5",
               "training.on_policy.max_new_tokens=6", "loss.objective=sampled_token", f"training.strategy={strategy}")
    kinds = [is_on_policy_step(cfg.training.on_policy, cfg.seed, s) for s in range(4)]
    assert kinds == [True, True, False, True]
    driver = RecordingDriver(cfg, progress=False, warm=warm_ranks)
    driver.run()
    rows = read_rows(out)
    assert [r["on_policy"] for r in rows] == [int(k) for k in kinds]
    for r in rows:
        if r["on_policy"]:
            assert r["sampled_tokens"] == r["tokens"] and r["sampled_sequences"] == cfg.training.batch_size
            assert r["sampled_eos"] + r["sampled_truncated"] == r["sampled_sequences"]
            assert r["advantage"] == r["advantage"]  # the sampled-token objective's metric, finite
            assert r["step_parts"]["sample_s"] > 0
        else:
            assert r["sampled_tokens"] == 0 and r["step_parts"]["sample_s"] == 0
        assert sum(r["step_parts"].values()) == pytest.approx(r["step_s"], rel=1e-9, abs=1e-9)

    by_id = {s["batch_id"]: s for s in driver.submitted if isinstance(s["batch_id"], int)}
    assert sorted(by_id) == list(range(8))
    k = cfg.loss.k
    for bid, s in by_id.items():
        record = ray.get(s["ref"])
        labels = s["include"]  # every batch forces its labels in (sampled_token scores the label's atom)
        assert labels is not None
        rows_t = np.flatnonzero(s["loss_mask"].reshape(-1))
        assert np.array_equal(record.rows, rows_t)
        assert record.ids.shape == (rows_t.size, k + 1)
        assert (record.ids == labels.reshape(-1)[rows_t][:, None]).any(axis=1).all(), f"batch {bid}"

    # the inputs of step 0 are the student's own samples: drawn again, from the initial weights, elsewhere
    driver.preflight()
    prompts = driver.sampling.step_prompts(0)
    first = by_id[0]
    record = ray.get(first["ref"])
    again = _regenerated(cfg, prompts, [0, 1],
                         {"input_ids": first["input_ids"], "attention_mask": first["attention_mask"],
                          "rows": record.rows, "ids": record.ids})
    for rank in (0, 1):
        expected = sampled_batch(prompts[rank], again["samples"][rank], driver.train_set.pad_id)
        assert np.array_equal(by_id[rank]["input_ids"], expected["input_ids"]), f"rank {rank}"
        assert np.array_equal(by_id[rank]["include"], expected["labels"])
    # ... and the base teacher scored exactly the support (sft top-k + the sampled token)
    np.testing.assert_allclose(record.logprobs["base"], again["base_logprobs"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(record.tail["base"], again["base_tail"], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- lag 1, faults
def _wait_for(cond, alive, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if cond():
            return
        assert alive(), f"the run ended before {what}"
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {TIMEOUT_S} s")


def _logged(out: Path, step: int) -> bool:
    return (out / "metrics.jsonl").is_file() and any(r["step"] >= step for r in read_rows(out))


def _latest_step(out: Path) -> int | None:
    latest = ckpt.latest_checkpoint(out / "checkpoints")
    return None if latest is None else int(ckpt.read_state(latest)["step"])


def test_lag1_run_survives_a_killed_teacher_worker_and_driver(tiny, service, ray_cluster, tmp_path,
        warm_ranks) -> None:
    from student_worker.driver import run_training
    from teacher_service.naming import replica_name

    reference = tmp_path / "reference"
    run_training(_cfg(tiny, service, reference, *LAG1), progress=False, warm=warm_ranks)
    ref_rows = read_rows(reference)
    assert [r["on_policy"] for r in ref_rows] == [1] * LAG1_STEPS

    out = tmp_path / "faults"
    cfg = _cfg(tiny, service, out, *LAG1)
    config_path = tmp_path / "faults.yaml"
    dump_config(cfg, config_path)
    log = tmp_path / "driver.log"
    (tmp_path / "holds").mkdir()
    teacher, worker, driver = Hold(step=0), Hold(step=2), Hold(step=3, generation=1)
    plan = FaultPlan(holds=(teacher, worker, driver), hold_dir=str(tmp_path / "holds"))
    with open(log, "w") as f:  # the CLI's own main, with a FaultPlan
        proc = subprocess.Popen([sys.executable, "-m", "tests.integration.fault_run", "--faults", plan.to_json(),
                                 "train", "--config", str(config_path), "--address", ray_cluster["gcs_address"],
                                 "--no-progress"],
                                cwd=REPO, env=dict(os.environ), stdout=f, stderr=subprocess.STDOUT, text=True)
    try:
        alive = lambda: proc.poll() is None  # noqa: E731
        ns = cfg.teachers.namespace
        _wait_for(lambda: plan.held(teacher, RANKS), alive, "step 0")
        sft = ray.get_actor(replica_name(cfg.teachers.name_prefix, "sft", 0), namespace=ns)
        ray.kill(sft, no_restart=False)  # restarted by Ray; its calls in flight are retried
        plan.release(teacher)
        _wait_for(lambda: plan.held(worker, RANKS), alive, "step 2")
        _wait_for(lambda: _latest_step(out) == 2, alive, "checkpoint 2 (with step 2's sample)")
        workers = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                         if a["namespace"] == ns and a["name"].startswith(f"{cfg.run_name}-student-1-"))
        ray.kill(ray.get_actor(workers[0], namespace=ns), no_restart=True)
        plan.release(worker)
        # the group came back from checkpoint 2 and trained step 2 again (logged): the driver dies
        _wait_for(lambda: plan.held(driver, RANKS), alive, "the restored group's step 3")
        _wait_for(lambda: _logged(out, 2), alive, "the replayed step 2")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    restored = re.findall(r"worker group restored at step (\d+)", log.read_text())
    assert restored == ["2"], f"expected one restore, from checkpoint 2:\n{log.read_text()[-3000:]}"
    latest = ckpt.latest_checkpoint(out / "checkpoints")
    assert latest is not None and latest.name == "ckpt-000002" and (latest / SAMPLES_FILE).is_file(), latest
    report = run_training(cfg, resume=True, progress=False, warm=warm_ranks)
    assert report["steps"] == LAG1_STEPS
    _same_run(out, ref_rows, load_weights(reference / "final_model"))
