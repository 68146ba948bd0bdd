"""Checkpoint files: atomic rename, keep-last-K, incomplete ones ignored, RNG round trip, config check."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import torch

from common.config import config_from_dict
from student_worker import checkpoint as ckpt
from student_worker.train_step import lr_factor

CFG = {"models": {"base_teacher": {"path": "b"}, "sft_teacher": {"path": "s"}, "student": {"path": "st"}}}


def _write(root, step, model, opt, sched, config=None):
    tmp = ckpt.begin_checkpoint(root, step)
    assert tmp.name.endswith(".tmp") and tmp.is_dir()
    model_dir = tmp / ckpt.MODEL_DIR
    model_dir.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(model_dir / "model.safetensors"))
    ckpt.write_optimizer_state(tmp, opt, sched)
    ckpt.write_rng_state(tmp, 0)
    return ckpt.finalize_checkpoint(tmp, {"step": step, "config": config or CFG, "metrics": []}, keep=2)


def _train_objects():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 2, 10, 0.1))
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def test_keep_last_k_and_latest(tmp_path):
    model, opt, sched = _train_objects()
    for step in (2, 4, 6):
        final = _write(tmp_path, step, model, opt, sched)
        assert final.name == ckpt.checkpoint_name(step) and not (tmp_path / f"{final.name}.tmp").exists()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-000004", "ckpt-000006"]
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "ckpt-000006"
    assert ckpt.read_state(tmp_path / "ckpt-000006")["step"] == 6


def test_incomplete_checkpoints_are_ignored(tmp_path):
    model, opt, sched = _train_objects()
    _write(tmp_path, 2, model, opt, sched)
    # a crash mid-write leaves a .tmp; a hand-truncated copy lacks state.json: both skipped
    ckpt.begin_checkpoint(tmp_path, 8)
    bad = tmp_path / "ckpt-000009"
    shutil.copytree(tmp_path / "ckpt-000002", bad)
    (bad / "state.json").unlink()
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "ckpt-000002"
    assert ckpt.latest_checkpoint(tmp_path / "nothing-here") is None
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.finalize_checkpoint(ckpt.begin_checkpoint(tmp_path, 10), {"step": 10}, keep=2)


def test_optimizer_scheduler_round_trip_exactly(tmp_path):
    model, opt, sched = _train_objects()
    final = _write(tmp_path, 1, model, opt, sched)
    model2 = torch.nn.Linear(4, 3)
    model2.load_state_dict(model.state_dict())
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: lr_factor(s, 2, 10, 0.1))
    ckpt.read_optimizer_state(final, opt2, sched2)
    x = torch.randn(5, 4)
    for m, o, s in ((model, opt, sched), (model2, opt2, sched2)):
        o.zero_grad()
        m(x).sum().backward()
        o.step()
        s.step()
    assert torch.equal(model.weight, model2.weight) and sched.get_last_lr() == sched2.get_last_lr()


def test_rng_states_round_trip(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    ckpt.write_rng_state(tmp_path, rank=1)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    ckpt.read_rng_state(tmp_path, rank=1)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]
    with pytest.raises(ckpt.CheckpointError, match="rank 0"):
        ckpt.read_rng_state(tmp_path, rank=0)


def test_resume_config_check_lists_differing_keys(tmp_path):
    model, opt, sched = _train_objects()
    saved = config_from_dict(CFG).model_dump(mode="json")
    final = _write(tmp_path, 2, model, opt, sched, config=saved)
    allowed = config_from_dict(CFG, ["training.max_steps=7", "output.dir=elsewhere",
                                     "evaluation.max_new_tokens=3", "teachers.namespace=svc2",
                                     "teachers.name_prefix=t2", "teachers.attach=true"]).model_dump(mode="json")
    ckpt.check_resume_config(final, allowed)  # may legitimately differ (budget, outputs, where teachers run)
    other = config_from_dict(CFG, ["loss.alpha=0.5", "training.lr=0.1", "loss.k=8"]).model_dump(mode="json")
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.check_resume_config(final, other)
    assert "loss.alpha" in str(err.value) and "training.lr" in str(err.value) and "loss.k" in str(err.value)
    assert "max_steps" not in str(err.value)


def test_a_checkpoint_from_before_delta_form_resumes_only_the_form_it_trained(tmp_path):
    """A checkpoint saved before loss.delta_form existed trained the student_shift form: at alpha != 1 it
    does not resume under the paper form (the new default), only with delta_form: student_shift; at
    alpha = 1 the forms compute the same, and it resumes as before."""
    model, opt, sched = _train_objects()
    for alpha, resumes_as in ((0.5, "student_shift"), (1.0, "paper")):
        saved = config_from_dict(CFG, [f"loss.alpha={alpha}"]).model_dump(mode="json")
        del saved["loss"]["delta_form"]  # as written before the key existed
        final = _write(tmp_path / str(alpha), 2, model, opt, sched, config=saved)
        for form in ("paper", "student_shift"):
            now = config_from_dict(CFG, [f"loss.alpha={alpha}", f"loss.delta_form={form}"]).model_dump(mode="json")
            if form == resumes_as:
                ckpt.check_resume_config(final, now)
            else:
                with pytest.raises(ckpt.CheckpointError, match="loss.delta_form"):
                    ckpt.check_resume_config(final, now)


def test_lr_schedule_warmup_then_cosine_to_min():
    assert lr_factor(0, 4, 20, 0.1) == pytest.approx(0.25)
    assert lr_factor(3, 4, 20, 0.1) == pytest.approx(1.0)
    assert lr_factor(4, 4, 20, 0.1) == pytest.approx(1.0)
    assert lr_factor(12, 4, 20, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)
    assert lr_factor(0, 0, 20, 0.1) == pytest.approx(1.0)


# ---- storage failures (issue 22): found behind the wrappers the libraries put around them

def test_io_error_of_finds_a_full_disk_behind_each_library() -> None:
    import errno

    from student_worker.checkpoint import io_error_of, raise_io_error

    plain = OSError(errno.ENOSPC, "No space left on device")
    assert io_error_of(plain) is plain
    # torch.save into a file object on a full disk raises this, with the OSError as its __context__
    wrapped = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    wrapped.__context__ = plain
    assert io_error_of(wrapped) is plain

    class SafetensorError(Exception):  # safetensors' Rust error names the OS error only in its message
        pass

    found = io_error_of(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert found is not None and found.errno == errno.ENOSPC
    assert io_error_of(FileNotFoundError(errno.ENOENT, "No such file")) is None  # not a storage failure
    assert io_error_of(ValueError("bad row")) is None
    with pytest.raises(OSError) as raised:
        raise_io_error(SafetensorError("I/O error: Input/output error (os error 5)"), "/out/ckpt-000004.tmp")
    assert raised.value.errno == errno.EIO and raised.value.filename == "/out/ckpt-000004.tmp"
    raise_io_error(ValueError("not storage"), "/x")  # returns: the caller re-raises the original


def test_checkpoint_write_error_message(tmp_path) -> None:
    import errno

    from student_worker.checkpoint import CheckpointWriteError

    err = CheckpointWriteError(6, tmp_path / "ckpt-000006.tmp", tmp_path / "ckpt-000004",
                               OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ckpt-000006.tmp")))
    assert str(err) == (f"cannot write checkpoint ckpt-000006 (step 6) in {tmp_path}: No space left on device "
                        f"[ENOSPC] ({tmp_path / 'ckpt-000006.tmp'})")


def test_resume_command_adds_resume_once() -> None:
    from student_worker.train import resume_command

    cmd = resume_command(["--config", "my run.yaml", "--set", "loss.alpha=0.5"])
    assert cmd.endswith("-m student_worker.train --config 'my run.yaml' --set loss.alpha=0.5 --resume")
    assert resume_command(["--resume"]).count("--resume") == 1


def _write_sharded(root, step, world_size=2, metadata: bytes | None = None):
    """A sharded (training.strategy=fsdp2) checkpoint's layout: a real single-process DCP save of a small
    state dict in sharded/ (or `metadata` written over its index), scheduler.json, sharding.json."""
    import json
    import warnings

    import torch.distributed.checkpoint as dcp

    tmp = ckpt.begin_checkpoint(root, step)
    with warnings.catch_warnings():  # "no process group: saving in a single process" is the point here
        warnings.simplefilter("ignore")
        dcp.save({"model": {"w": torch.arange(6.0).reshape(2, 3)}}, checkpoint_id=str(tmp / ckpt.SHARDED_DIR))
    if metadata is not None:
        (tmp / ckpt.SHARDED_DIR / ".metadata").write_bytes(metadata)
    (tmp / ckpt.SCHEDULER_FILE).write_text(json.dumps({"last_epoch": step}))
    (tmp / ckpt.SHARDING_FILE).write_text(json.dumps({"strategy": "fsdp2", "world_size": world_size}))
    ckpt.write_rng_state(tmp, 0)
    return ckpt.finalize_checkpoint(tmp, {"step": step, "config": CFG, "metrics": []}, keep=2)


def test_sharded_layout_is_complete_verified_and_kept_like_the_ddp_one(tmp_path):
    root = tmp_path / "ckpts"
    for step in (2, 4, 6):
        _write_sharded(root, step)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["ckpt-000004", "ckpt-000006"]  # keep=2
    latest = ckpt.latest_checkpoint(root)
    assert not (latest / ckpt.MODEL_DIR).exists() and not (latest / ckpt.OPTIMIZER_FILE).exists()
    ckpt.verify_checkpoint(latest)  # the index passes the allow-list unpickler
    (latest / ckpt.SHARDING_FILE).unlink()  # half-copied by hand: skipped
    assert ckpt.latest_checkpoint(root).name == "ckpt-000004"
    tmp = ckpt.begin_checkpoint(root, 8)
    (tmp / ckpt.SHARDED_DIR).mkdir()
    with pytest.raises(ckpt.CheckpointError, match=r"incomplete checkpoint, missing \['sharding.json', 'scheduler.json'\]"):
        ckpt.finalize_checkpoint(tmp, {"step": 8}, keep=2)


def test_sharded_index_with_a_foreign_global_is_refused_and_never_runs(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    final = _write_sharded(tmp_path / "ckpts", 2, metadata=pickle.dumps({"state_dict_metadata": Evil()}))
    with pytest.raises(ckpt.CheckpointError, match=r"\.metadata: refused to load.*global io\.open is not allowed"):
        ckpt.verify_checkpoint(final)
    assert not marker.exists()


def test_sharded_resume_on_another_number_of_ranks_is_refused_naming_both(tmp_path):
    from student_worker import fsdp_checkpoint

    final = _write_sharded(tmp_path / "ckpts", 2, world_size=2)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(ckpt.CheckpointError, match=r"written by 2 student ranks, this run has 4"):
        fsdp_checkpoint.load_sharded(final, model, opt, sched, world_size=4)
    ddp_like = tmp_path / "ddp"
    ddp_like.mkdir()
    with pytest.raises(ckpt.CheckpointError, match=r"not a sharded .*training.strategy=ddp"):
        fsdp_checkpoint.load_sharded(ddp_like, model, opt, sched, world_size=2)
