"""Security promises (docs/DESIGN.md section 4), no Ray cluster needed.

- Checkpoints are safetensors + JSON; the optimizer file loads with `weights_only=True`: a crafted pickle
  (a `__reduce__` that would create a marker file) in place of `optimizer.pt` is refused, by the loader and
  by `--resume` (the driver's preflight), and the marker is never created.
- Nothing untrusted is unpickled: no `pickle.load(s)` and no `torch.load` without `weights_only=True` in
  the packages.
- `trust_remote_code` is off unless the config turns it on: a model directory whose config points at
  custom code (which would create a marker file on import) is loaded by the teacher engine and the student
  worker without that code ever running.

Ray clusters keep token authentication on and the dashboard on localhost: tested on the deploy configs in
tests/integration/test_deploy_configs.py (not repeated here).
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch

from common.config import ModelSpec, config_from_dict
from student_worker import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "student_worker", "teacher_service")
CFG = {"models": {"base_teacher": {"path": "b"}, "sft_teacher": {"path": "s"}, "student": {"path": "st"}},
       "output": {"dir": "unused"}}


class _Evil:
    """Unpickling this object runs `open(marker, "w")`: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _checkpoint_with_evil_optimizer(root: Path, marker: Path, as_torch_zip: bool, config: dict) -> Path:
    """A complete-looking checkpoint (safetensors weights, JSON state) whose optimizer.pt is a crafted pickle."""
    from safetensors.torch import save_file

    tmp = ckpt.begin_checkpoint(root, 3)
    (tmp / ckpt.MODEL_DIR).mkdir()
    save_file({"w": torch.zeros(2, 2)}, str(tmp / ckpt.MODEL_DIR / "model.safetensors"))
    opt_path = tmp / ckpt.OPTIMIZER_FILE
    payload = {"optimizer": _Evil(marker), "scheduler": {}}
    if as_torch_zip:
        torch.save(payload, opt_path)  # the pickle inside torch's zip container
    else:
        opt_path.write_bytes(pickle.dumps(payload))  # a bare pickle stream
    return ckpt.finalize_checkpoint(tmp, {"step": 3, "config": config, "metrics": [], "rouge": {}}, keep=2)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("as_torch_zip", [True, False])
def test_crafted_pickle_optimizer_is_refused_and_never_runs(tmp_path: Path, as_torch_zip: bool) -> None:
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Evil(marker)))  # control: a plain unpickle DOES run it
    assert marker.exists()
    marker.unlink()

    final = _checkpoint_with_evil_optimizer(tmp_path / "ckpts", marker, as_torch_zip, CFG)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(ckpt.CheckpointError, match=r"optimizer\.pt: refused to load"):
        ckpt.read_optimizer_state(final, opt, sched)
    with pytest.raises(ckpt.CheckpointError, match=r"optimizer\.pt: refused to load"):
        ckpt.verify_checkpoint(final)
    assert not marker.exists()


def test_resume_refuses_a_crafted_pickle_before_anything_starts(tmp_path: Path) -> None:
    """`--resume` runs the driver's preflight first: the pickle is refused, no file of the run changes."""
    from student_worker.driver import Driver

    out = tmp_path / "run"
    cfg = config_from_dict(CFG, [f"output.dir={out}"])
    marker = tmp_path / "pwned"
    _checkpoint_with_evil_optimizer(out / "checkpoints", marker, True, cfg.model_dump(mode="json"))
    (out / "metrics.jsonl").write_text('{"step": 0}\n')
    before = _snapshot(out)
    with pytest.raises(ckpt.CheckpointError, match=r"ckpt-000003/optimizer\.pt: refused to load"):
        Driver(cfg, resume=True, progress=False).preflight()
    assert not marker.exists()
    assert _snapshot(out) == before


def test_safetensors_only_a_pickled_weight_file_is_refused(tmp_path: Path) -> None:
    final = _checkpoint_with_evil_optimizer(tmp_path / "ckpts", tmp_path / "m", True, CFG)
    torch.save({"opt": 1}, final / ckpt.OPTIMIZER_FILE)  # a clean optimizer file this time
    with pytest.raises(ckpt.CheckpointError, match="optimizer"):
        ckpt.verify_checkpoint(final)  # still not a valid {"optimizer", "scheduler"} dict
    torch.save({"optimizer": {}, "scheduler": {}}, final / ckpt.OPTIMIZER_FILE)
    ckpt.verify_checkpoint(final)  # accepted
    (final / ckpt.MODEL_DIR / "pytorch_model.bin").write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(ckpt.CheckpointError, match="pytorch_model.bin"):
        ckpt.verify_checkpoint(final)


def test_no_unsafe_unpickling_in_the_packages() -> None:
    offenders = []
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            text = path.read_text()
            for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
                if "weights_only=True" not in m.group(1):
                    offenders.append(f"{path.relative_to(REPO)}: torch.load without weights_only=True")
            if re.search(r"\bpickle\.loads?\(|\bdill\.|\bcloudpickle\.loads?\(", text):
                offenders.append(f"{path.relative_to(REPO)}: unpickles")
            if re.search(r"trust_remote_code\s*=\s*True", text):
                offenders.append(f"{path.relative_to(REPO)}: hard-codes trust_remote_code=True")
    assert offenders == []


def _remote_code_model(root: Path, marker: Path) -> Path:
    """A real tiny model directory whose config.json points at custom code that creates `marker` on import."""
    from tests.tiny import make_llama, make_tokenizer

    tok = make_tokenizer(root / "tok")
    model_dir = make_llama(root / "model", tok, hidden_size=16, num_layers=1, intermediate_size=32)
    (model_dir / "evil_modeling.py").write_text(
        f"open({str(marker)!r}, 'w').close()  # would run on import\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil_llama'\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n"
    )
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = "evil_llama"  # unknown to transformers: only the custom code could load it
    config["auto_map"] = {"AutoConfig": "evil_modeling.EvilConfig",
                          "AutoModelForCausalLM": "evil_modeling.EvilForCausalLM"}
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


def test_trust_remote_code_is_off_by_default_in_engine_and_worker(tmp_path: Path) -> None:
    from student_worker.worker import StudentWorkerImpl
    from teacher_service.engine_hf import TeacherEngine

    marker = tmp_path / "remote_code_ran"
    model_dir = _remote_code_model(tmp_path, marker)
    assert ModelSpec(path=str(model_dir)).trust_remote_code is False

    with pytest.raises(ValueError, match="trust_remote_code"):
        TeacherEngine(ModelSpec(path=str(model_dir)), device="cpu", dtype="float32")
    assert not marker.exists()

    cfg = config_from_dict({"models": {"base_teacher": {"path": "b"}, "sft_teacher": {"path": "s"},
                                       "student": {"path": str(model_dir)}}, "loss": {"method": "sft"}})
    worker = StudentWorkerImpl(cfg.model_dump(mode="json"), rank=0, world_size=1)
    with pytest.raises(ValueError, match="trust_remote_code"):
        worker.setup("tcp://127.0.0.1:1")  # fails at the model load, before any process group
    assert not marker.exists()
