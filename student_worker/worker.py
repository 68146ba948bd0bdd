"""StudentWorker: the Ray actor that trains one rank of the DDP student.

Each worker holds the student (fp32 master weights), optionally a frozen copy of its starting weights for
lp_S0, AdamW with linear warmup + cosine decay to `min_lr_ratio`, gradient clipping, and bf16 autocast on
GPU. Teacher records reach it in one of two ways:

- object store: the driver passes `[record_ref]` NESTED in a list, so the ref is not resolved before the
  call; the worker `ray.get`s it inside the step and times that wait (`teacher_wait_s`).
- Ray Direct Transport: the record's parts are DIRECT arguments (RDT refs must be), resolved by Ray before
  the method runs; the wait is then the worker's idle time between the end of its previous step and the
  start of this one (driver overhead included, so an upper bound).

Before touching the model, all ranks agree (one tiny all-reduce) that every rank has a valid record, so a
failed teacher makes every rank raise instead of leaving the others blocked in DDP's gradient all-reduce.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np
import ray
import torch

from common.config import RunConfig, config_from_dict
from common.losses import targets_from_record
from common.topk import ROLE_STUDENT_BASE, TopKRecord, pair_roles
from student_worker import checkpoint as ckpt
from student_worker.distributed import free_port, make_process_group, node_ip, wrap_ddp
from student_worker.evaluate import evaluate_model
from student_worker.train_step import (
    enable_gradient_checkpointing,
    loss_forward_module,
    lr_factor,
    needs_student_base,
    train_step,
)

__all__ = ["StudentWorker", "StudentWorkerImpl", "PeerInputError", "required_roles"]


class PeerInputError(RuntimeError):
    """Another rank failed to receive or validate its teacher record for this step; nobody stepped."""


def required_roles(cfg: RunConfig) -> list[str]:
    """Roles the loss needs in the record (lp_S0 only when a teacher role supplies it)."""
    method = cfg.loss.method
    if method == "sft":
        return []
    roles = ["sft"]
    uses_shift = method.startswith("delta") or (
        method == "parallelogram" and any(w != 0 and n.startswith("delta") for n, w in cfg.loss.weights.items())
    )
    if uses_shift:
        for j in range(1 + len(cfg.models.extra_pairs)):
            roles.extend(pair_roles(j))
    if needs_student_base(cfg.loss) and cfg.teachers.student_base_source == "teacher":
        roles.append(ROLE_STUDENT_BASE)
    return list(dict.fromkeys(roles))


class StudentWorkerImpl:
    """The worker's logic, plain Python (the Ray actor below is a thin subclass)."""

    def __init__(self, cfg_dict: dict[str, Any], rank: int, world_size: int, step_delay_s: float = 0.0):
        """step_delay_s: test-only pause after each step (the driver's DELTAKD_TEST_STEP_DELAY_S hook, see
        student_worker/recovery.py), so tests can kill things mid-run; 0 in production."""
        self.cfg = config_from_dict(cfg_dict, source="StudentWorker config")
        self.rank, self.world_size = rank, world_size
        self.step_delay_s = float(step_delay_s)
        self._last_step_end: float | None = None

    # ------------------------------------------------------------------ set-up
    def rendezvous_address(self) -> str:
        """Called on rank 0 only: tcp://<this node>:<a free port> for the student process group."""
        return f"tcp://{node_ip()}:{free_port()}"

    def read_probe(self, path: str) -> dict[str, Any]:
        """What this worker sees at the driver's probe file (student_worker/shared_output.py)."""
        from student_worker.shared_output import read_probe

        return read_probe(path)

    def setup(self, init_method: str, resume_dir: str | None = None) -> dict[str, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg = self.cfg
        use_cuda = cfg.training.num_gpus_per_worker > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        self.autocast = use_cuda and cfg.training.bf16 in ("auto", "on")
        torch.manual_seed(cfg.seed)  # explicit: no randomness is consumed, but set it anyway (dropout is 0)
        spec = cfg.models.student
        # fp32 master weights; autocast (GPU) computes in bf16.
        self.model = AutoModelForCausalLM.from_pretrained(
            spec.path, revision=spec.revision, dtype=torch.float32, trust_remote_code=spec.trust_remote_code
        ).to(self.device)
        self.model.train()
        if cfg.training.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.tokenizer = AutoTokenizer.from_pretrained(spec.path, revision=spec.revision,
                                                       trust_remote_code=spec.trust_remote_code)
        self.base_model: torch.nn.Module | None = None
        if (cfg.loss.method != "sft" and needs_student_base(cfg.loss)
                and cfg.teachers.student_base_source == "worker"):
            # Always the run's STARTING weights (also on resume: the checkpoint holds the trained student).
            base = cfg.models.student_base or spec
            base_lm = AutoModelForCausalLM.from_pretrained(
                base.path, revision=base.revision, dtype=torch.float32 if not use_cuda else torch.bfloat16,
                trust_remote_code=base.trust_remote_code,
            ).to(self.device).eval()
            base_lm.requires_grad_(False)
            # backbone only when the fused loss applies (train_step.py): lp_S0 at the counted rows only
            self.base_model = loss_forward_module(base_lm, cfg.loss, base.path)
        self.group = make_process_group(init_method, self.rank, self.world_size, "nccl" if use_cuda else "gloo")
        # DDP wraps what the step's forward runs: the backbone-only module on the fused path (train_step.py)
        self.ddp = wrap_ddp(loss_forward_module(self.model, cfg.loss, spec.path), self.group, self.device)
        t = cfg.training
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        )
        self.pair_alphas = [cfg.loss.alpha] + [p.alpha for p in cfg.models.extra_pairs]
        self.required_roles = required_roles(cfg)
        if resume_dir is not None:
            self.load_checkpoint(resume_dir)
        return {"rank": self.rank, "device": str(self.device),
                "num_params": sum(p.numel() for p in self.model.parameters())}

    # ------------------------------------------------------------------ training
    def train_step(self, step: int, batch: dict[str, np.ndarray], record_box: list[Any] | None,
                   global_tokens: int) -> dict[str, Any]:
        """Object-store path. record_box: `[record_ref]` (nested, resolved here and timed) or None (sft)."""
        t0 = time.perf_counter()
        record, error = None, None
        if record_box is not None:
            try:
                record = ray.get(record_box[0])
            except Exception as exc:  # re-raised below, after every rank knows this one failed
                error = exc
        wait = time.perf_counter() - t0
        return self._step(step, batch, record, error, global_tokens, wait)

    def train_step_rdt(self, step: int, batch: dict[str, np.ndarray], global_tokens: int,
                       meta: dict[str, Any], roles: list[str], *parts: dict[str, Any]) -> dict[str, Any]:
        """RDT path: the record's parts arrive as direct arguments (already fetched by Ray)."""
        from teacher_service import assemble_record

        now = time.perf_counter()
        wait = 0.0 if self._last_step_end is None else now - self._last_step_end
        record, error = None, None
        try:
            record = assemble_record(meta, roles, list(parts))
        except Exception as exc:  # re-raised below, after the agreement
            error = exc
        return self._step(step, batch, record, error, global_tokens, wait)

    def _step(self, step: int, batch_np: dict[str, np.ndarray], record: TopKRecord | None,
              error: BaseException | None, global_tokens: int, wait: float) -> dict[str, Any]:
        t_start = time.perf_counter()
        expected_id = step * self.world_size + self.rank
        if error is None and record is not None:
            try:
                if record.batch_id != expected_id:
                    raise ValueError(f"rank {self.rank} step {step} expected batch {expected_id}, "
                                     f"got the record of batch {record.batch_id}")
                record.validate(self.required_roles)
            except Exception as exc:
                error = exc
        self._agree_inputs_ok(error is None, step)
        if error is not None:
            raise error
        batch = {k: torch.as_tensor(np.array(batch_np[k]), device=self.device)
                 for k in ("input_ids", "attention_mask", "labels")}
        batch["input_ids"] = batch["input_ids"].long()
        batch["attention_mask"] = batch["attention_mask"].long()
        targets = None if record is None else targets_from_record(record, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss, metrics = train_step(self.ddp, self.base_model, batch, targets, self.cfg.loss,
                                       self.pair_alphas, global_tokens, self.world_size)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.training.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        metrics.update({"rank": self.rank, "batch_id": expected_id, "grad_norm": float(grad_norm), "lr": lr,
                        "teacher_wait_s": wait, "compute_s": time.perf_counter() - t_start})
        if self.step_delay_s > 0:
            time.sleep(self.step_delay_s)  # test hook only (see __init__); not part of compute_s
        self._last_step_end = time.perf_counter()
        return metrics

    def _agree_inputs_ok(self, ok: bool, step: int) -> None:
        """All-reduce (sum) of failure flags: if any rank lacks a valid record, every rank raises."""
        flag = torch.tensor([0.0 if ok else 1.0], device=self.device)
        self.group.allreduce(flag).wait()
        if ok and flag.item() > 0:
            raise PeerInputError(f"step {step}: {int(flag.item())} other rank(s) had no valid teacher record; "
                                 f"rank {self.rank} did not step")

    # ------------------------------------------------------------------ checkpoints and weights
    def save_checkpoint(self, tmp_dir: str) -> None:
        """Write this rank's part of a checkpoint into `tmp_dir` (rank 0: model, optimizer; all: RNG)."""
        if self.rank == 0:
            self.model.save_pretrained(f"{tmp_dir}/{ckpt.MODEL_DIR}", safe_serialization=True)
            self.tokenizer.save_pretrained(f"{tmp_dir}/{ckpt.MODEL_DIR}")
            ckpt.write_optimizer_state(tmp_dir, self.optimizer, self.scheduler)
        ckpt.write_rng_state(tmp_dir, self.rank)

    def load_checkpoint(self, ckpt_dir: str) -> int:
        """Load weights, optimizer, scheduler and this rank's RNG states; returns the checkpoint's step."""
        from transformers import AutoModelForCausalLM

        # Our own checkpoint: safetensors only, never remote code (whatever the config says for hub models).
        src = AutoModelForCausalLM.from_pretrained(f"{ckpt_dir}/{ckpt.MODEL_DIR}", dtype=torch.float32,
                                                   use_safetensors=True, trust_remote_code=False)
        self.model.load_state_dict(src.state_dict())
        ckpt.read_optimizer_state(ckpt_dir, self.optimizer, self.scheduler)
        ckpt.read_rng_state(ckpt_dir, self.rank)
        return int(ckpt.read_state(ckpt_dir)["step"])

    def save_model(self, path: str) -> None:
        """Save the student in HF format (safetensors + tokenizer) at `path` (rank 0's copy)."""
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)

    def state_digest(self) -> str:
        """sha256 over every parameter and buffer (name, dtype, bytes), in name order."""
        h = hashlib.sha256()
        for name, t in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(str(t.dtype).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def weights(self) -> dict[str, np.ndarray]:
        """Every parameter as fp32 numpy (for tests on tiny models)."""
        return {n: p.detach().float().cpu().numpy() for n, p in self.model.named_parameters()}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, examples: list[dict[str, str]], max_new_tokens: int, batch_size: int) -> dict[str, Any]:
        return evaluate_model(self.model, self.tokenizer, examples, max_new_tokens, batch_size)

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        from student_worker.evaluate import greedy_generate

        return greedy_generate(self.model, self.tokenizer, prompts, max_new_tokens)

    def ping(self) -> int:
        return self.rank


# The receiving side of RDT needs enable_tensor_transport even without a transport method of its own.
StudentWorker = ray.remote(enable_tensor_transport=True)(StudentWorkerImpl)
