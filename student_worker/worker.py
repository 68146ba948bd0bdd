"""StudentWorker: the Ray actor that trains one rank of the student (DDP replica, or FSDP2 shard).

Each worker holds the student (master weights in `models.student.dtype`, fp32 when "auto"), optionally a
frozen copy of its starting weights for lp_S0 (same dtype, so S0 = S exactly at step 0), AdamW with linear
warmup + cosine decay to `min_lr_ratio`, gradient clipping, and bf16 autocast on GPU. Teacher records reach
it as a record handle (teacher_service/record_handle.py), one `train_step` whatever the transport: an
object-store ref nested in the handle's head is fetched and timed inside the step (`record_wait_s`); RDT parts
are direct arguments that Ray fetches before the method runs, so their wait is the worker's idle gap before
the call (counted as `record_wait_s`).

Before touching the model, all ranks agree (one tiny all-reduce) that every rank has a valid record, so a
failed teacher makes every rank raise `StepRejected` instead of leaving the others blocked in DDP's gradient
all-reduce. An error after that point leaves the other ranks in a collective: the driver kills the group.

The driver queues a worker's next step call (and checkpoint saves) before the current call returns. Calls must
run in order: a step call whose step is not the worker's next one (an earlier step failed) raises
`StepOrderError` at once, touching nothing; a checkpoint save and an on-policy `sample` call (queued between the
right train calls, student_worker/on_policy.py) check the same, so a checkpoint always holds the state after
exactly the steps it is named for. `reset` makes a worker a rank of another run (WarmRanks, worker_group.py).

Timing (student_worker/report.py): each step call returns `step_s`, the time since the end of this worker's
previous step call (evaluation excluded), and `step_parts`, named consecutive intervals summing to it.

`training.strategy: fsdp2` (student_worker/sharding.py): the student (and its frozen base) is sharded over the
ranks instead of replicated; checkpoints are sharded (student_worker/fsdp_checkpoint.py); what needs the whole
model (sampling, evaluation, final_model/) gathers it, on every rank at once (WorkerGroup.call_whole).

Faults (tests, benchmarks): the driver hands its `common.faults.FaultPlan` to each worker; None runs no fault code.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
import torch

from common.config import config_from_dict
from common.data.model_loading import load_causal_lm, student_dtype
from common.faults import FaultPlan
from common.losses import SparseTargets
from common.reproducibility import apply_compute_settings
from common.roles import needs_student_base, record_roles
from student_worker import checkpoint as ckpt
from student_worker.distributed import (
    AllReduceTimer,
    compression_hook,
    make_default_group,
    make_process_group,
    node_ip,
    open_rendezvous_store,
    wrap_ddp,
)
from student_worker.evaluate import evaluate_model
from student_worker.on_policy import generate_samples, generation_eos_ids, sample_seed
from student_worker.shared_output import read_probe
from student_worker.step_clock import COMPUTE_PARTS, STEP_PARTS, TEACHER_WAIT_PARTS, StepClock
from student_worker.step_errors import PeerInputError, StepOrderError, StepRejected
from student_worker.train_step import (
    enable_gradient_checkpointing,
    loss_forward_module,
    lr_factor,
    train_step,
)
from teacher_service.record_handle import RDT, fetch_record, receive_targets

__all__ = ["StudentWorker", "StudentWorkerImpl", "StepRejected", "PeerInputError", "StepOrderError",
           "STEP_PARTS", "TEACHER_WAIT_PARTS", "COMPUTE_PARTS"]



class StudentWorkerImpl:
    """The worker's logic, plain Python (the Ray actor below is a thin subclass)."""

    def __init__(self, cfg_dict: dict[str, Any], rank: int, world_size: int, generation: int = 0,
                 faults: FaultPlan | None = None):
        """generation: how many times the driver has replaced its worker group before this one (0 first; it
        names the process group, and a FaultPlan's rank_error fires in generation 0 only). faults: a test's
        FaultPlan (common/faults.py), None in production."""
        self.cfg = config_from_dict(cfg_dict, source="StudentWorker config")
        self.faults = faults
        self.compute = apply_compute_settings(self.cfg.reproducibility, where=f"student worker rank {rank}")
        self.rank, self.world_size, self.generation = rank, world_size, generation
        self.next_step = 0  # the step this worker trains next (= completed steps)
        self._rendezvous_store: Any = None  # rank 0: the group's store, opened by rendezvous_address
        self._mark = time.perf_counter()  # end of the last call (see _end_call)
        self._idle_s = 0.0  # idle time before calls that count into the next step (checkpoint saves, samples)
        self._checkpoint_s = 0.0
        self._sample_s = 0.0

    def reset(self, cfg_dict: dict[str, Any], rank: int, world_size: int, generation: int = 0,
              faults: FaultPlan | None = None) -> None:
        """Start over as a new rank of another run: drop the last run's model, optimizer and process group
        (collected now: the gloo group's sockets close before the next rendezvous); then `setup` as usual."""
        self.__dict__.clear()
        gc.collect()
        self.__init__(cfg_dict, rank, world_size, generation, faults)  # type: ignore[misc]

    def _end_call(self) -> None:
        """End of a call that is not part of any step (set-up, evaluation): the next step starts here."""
        self._mark = time.perf_counter()
        self._idle_s = self._checkpoint_s = self._sample_s = 0.0

    # ------------------------------------------------------------------ set-up
    def rendezvous_address(self) -> str:
        """Called on rank 0 only: opens the student group's store on a port the OS picks as it binds (no other
        process can take it first) and returns tcp://<this node>:<that port>; `setup` builds on that store."""
        self._rendezvous_store, address = open_rendezvous_store(self.world_size,
                                                                self.cfg.training.collective_timeout_s, node_ip())
        return address

    def read_probe(self, path: str) -> dict[str, Any]:
        """What this worker sees at the driver's probe file (student_worker/shared_output.py)."""
        return read_probe(path)

    def setup(self, init_method: str, resume_dir: str | None = None) -> dict[str, Any]:
        # deferred: transformers costs seconds at import (1.6-6.5 s measured on the loaded 2-core host), and the
        # driver imports this module (to define the actor) without needing it
        from transformers import AutoTokenizer

        cfg = self.cfg
        use_cuda = cfg.training.num_gpus_per_worker > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        self.autocast = use_cuda and cfg.training.bf16 in ("auto", "on")
        torch.manual_seed(cfg.seed)  # explicit: no randomness is consumed, but set it anyway (dropout is 0)
        spec = cfg.models.student
        self.dtype = student_dtype(spec)  # master weights; autocast (GPU) computes in bf16
        self.model = load_causal_lm(spec, self.device, self.dtype)
        self.model.train()
        if cfg.training.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.tokenizer = AutoTokenizer.from_pretrained(spec.path, revision=spec.revision,
                                                       trust_remote_code=spec.trust_remote_code)
        self.base_model: torch.nn.Module | None = None
        self.fsdp = cfg.training.strategy == "fsdp2"
        if (cfg.loss.method != "sft" and needs_student_base(cfg.loss)
                and cfg.teachers.student_base_source == "worker"):
            # Always the run's STARTING weights (also on resume: the checkpoint holds the trained student), in
            # the student's own dtype and under the same autocast: S0 = S exactly at step 0 (a bf16 copy under
            # an fp32 master would differ in the norms, embeddings and residual stream).
            base = cfg.models.student_base or spec
            base_lm = load_causal_lm(base, self.device, self.dtype).eval()
            base_lm.requires_grad_(False)
            # backbone only when the fused loss applies (train_step.py): lp_S0 at the counted rows only
            self.base_model = loss_forward_module(base_lm, cfg.loss, base.path)
        t = cfg.training
        self.group = (make_default_group if self.fsdp else make_process_group)(
            init_method, self.rank, self.world_size, "nccl" if use_cuda else "gloo", timeout_s=t.collective_timeout_s,
            group_name=f"{cfg.run_name}-students-g{self.generation}",
            store=self._rendezvous_store if self.rank == 0 else None)
        self.allreduce_timer = AllReduceTimer()  # DDP's hook times the all-reduce; FSDP2's overlaps are not split
        # DDP wraps (FSDP2 shards) what the step's forward runs: the backbone-only module on the fused path
        # (train_step.py); `self.ddp` is that wrapped module either way
        if self.fsdp:
            # deferred: torch.distributed.{fsdp,checkpoint,tensor} cost ~0.75 s of CPU at import (-X importtime),
            # which the driver and CLI processes (they import this module) never need
            from student_worker import fsdp_checkpoint, sharding

            self.sharding, self.fsdp_checkpoint = sharding, fsdp_checkpoint
            mesh = sharding.student_mesh(self.device, self.world_size)
            self.ddp = sharding.shard_student(loss_forward_module(self.model, cfg.loss, spec.path), self.model, mesh,
                                              self.device, spec.path)
            if self.base_model is not None:
                sharding.shard_student(self.base_model, base_lm, mesh, self.device, base.path)
        else:
            self.ddp = wrap_ddp(loss_forward_module(self.model, cfg.loss, spec.path), self.group, self.device,
                                comm_hook=compression_hook(t.grad_compression), timer=self.allreduce_timer)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        )
        self.pair_alphas = [cfg.loss.alpha] + [p.alpha for p in cfg.models.extra_pairs]
        if t.on_policy.enabled:  # the driver's preflight checked the student's generation config already
            self.eos_ids = generation_eos_ids(self.model.generation_config, spec.path)
            tok = self.tokenizer
            self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else self.eos_ids[0])
        self.required_roles = record_roles(cfg)
        if resume_dir is not None:
            self.load_checkpoint(resume_dir)
        self._end_call()
        return {"rank": self.rank, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "compute": self.compute,
                "num_params": sum(p.numel() for p in self.model.parameters())}

    # ------------------------------------------------------------------ training
    def begin(self, step: int) -> int:
        """The driver's loop starts (or restarts after a restore) at `step`: the next step call must be for
        it. Returns this rank. Step timing starts here (calls before, e.g. evaluation, are not a step's)."""
        self.next_step = int(step)
        self._end_call()
        return self.rank

    def train_step(self, step: int, batch: dict[str, np.ndarray], global_tokens: int,
                   head: dict[str, Any] | None = None, *parts: Any) -> dict[str, Any]:
        """One step on this rank's batch. head, parts: the batch's record handle (teacher_service/record_handle.py;
        None for sft): an object-store head's ref is fetched here and timed, RDT parts arrived as arguments, as
        the teachers' tensors, and the loss targets are built from them on this worker's device."""
        clock = self._start_step(step, rdt=head is not None and head["transport"] == RDT)
        record, error = None, None
        try:
            record = fetch_record(head)
        except Exception as exc:  # re-raised below, after every rank knows this one failed
            error = exc
        clock.lap("record_wait_s")

        def targets() -> SparseTargets | None:
            if head is None:
                return None
            return receive_targets(head, parts, record, self.device, self.required_roles)

        return self._step(step, batch, targets, error, global_tokens, clock)

    def sample(self, step: int, batch_id: int, prompts: list[list[int]]) -> dict[str, Any]:
        """Draw this rank's on-policy sample of step `step` (batch `batch_id`) from the current weights:
        student_worker.on_policy.generate_samples, seeded by (seed, batch id). The call must come after
        the train call of step `step - 1 - lag` and before that of `step - lag` (else StepOrderError,
        nothing drawn). Its time is booked as the next step's `sample_s`."""
        t0 = time.perf_counter()
        self._idle_s += t0 - self._mark
        op = self.cfg.training.on_policy
        if self.next_step != max(step - op.lag, 0):
            self._mark = time.perf_counter()
            raise StepOrderError(f"rank {self.rank}: the sample of step {step} (on_policy.lag {op.lag}) asked for "
                                 f"after {self.next_step} completed steps; nothing drawn")
        model = self.sharding.gathered_copy(self.model, self.device) if self.fsdp else self.model
        out = generate_samples(model, prompts, eos_ids=self.eos_ids, pad_id=self.pad_id,
                               temperature=op.temperature, top_p=op.top_p, max_new_tokens=op.max_new_tokens,
                               seed=sample_seed(self.cfg.seed, batch_id), autocast=self.autocast)
        out["batch_id"] = batch_id
        self._mark = time.perf_counter()
        self._sample_s += self._mark - t0
        return out

    def placement(self) -> dict[str, Any]:
        """{"node_id", "gpu_ids"} of this worker: the teacher pool picks the RDT transport from it."""
        # deferred: teacher_service.actor (the teacher's actor class) adds ~20 ms (measured) to every worker start
        from teacher_service.actor import placement

        return placement()

    def _start_step(self, step: int, rdt: bool) -> StepClock:
        """Check the call order and start the step's clock (the time since the previous call is its first
        part: `dispatch_s`, or on RDT, where Ray fetches the record before the call, `record_wait_s`)."""
        now = time.perf_counter()
        if step != self.next_step:
            self._mark = now  # this call's time is the next step's dispatch lag
            raise StepOrderError(f"rank {self.rank}: step {step} called but the next step is {self.next_step} "
                                 f"(an earlier step failed); nothing was done")
        clock = StepClock(self._mark, now, before=self._idle_s + self._checkpoint_s + self._sample_s)
        clock.add("dispatch_s", self._idle_s + (0.0 if rdt else now - self._mark))
        clock.add("checkpoint_s", self._checkpoint_s)
        clock.add("sample_s", self._sample_s)
        clock.add("record_wait_s", now - self._mark if rdt else 0.0)
        self._idle_s = self._checkpoint_s = self._sample_s = 0.0
        return clock

    def _step(self, step: int, batch_np: dict[str, np.ndarray], make_targets: Callable[[], SparseTargets | None],
              error: BaseException | None, global_tokens: int, clock: StepClock) -> dict[str, Any]:
        """make_targets: validates this rank's record and builds its loss targets (None for sft); run here,
        before the input agreement, so a bad record is one more rank error that every rank learns of."""
        expected_id = step * self.world_size + self.rank
        targets = None
        if error is None:
            try:
                targets = make_targets()
                if targets is not None and targets.batch_id != expected_id:
                    raise ValueError(f"rank {self.rank} step {step} expected batch {expected_id}, "
                                     f"got the record of batch {targets.batch_id}")
            except Exception as exc:
                error = exc
        clock.lap("prepare_s")
        # Every check of this rank's inputs must come before this point: an error after it leaves the other
        # ranks in a collective (the driver then kills the group).
        self._agree_inputs_ok(error, step)
        clock.lap("peer_wait_s")
        batch = {k: torch.as_tensor(np.array(batch_np[k]), device=self.device)
                 for k in ("input_ids", "attention_mask", "labels")}
        batch["input_ids"] = batch["input_ids"].long()
        batch["attention_mask"] = batch["attention_mask"].long()
        self.optimizer.zero_grad(set_to_none=True)
        clock.lap("prepare_s")
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss, metrics = train_step(self.ddp, self.base_model, batch, targets, self.cfg.loss,
                                       self.pair_alphas, global_tokens, self.world_size)
        if self.fsdp and self.base_model is not None:  # the loss is formed: free the base's gathered root unit
            self.base_model.reshard()
        if self.faults is not None:
            self.faults.mid_step(self.rank, step, self.generation)  # FaultPlan.rank_error
        clock.lap("forward_s")
        self.allreduce_timer.reset()
        loss.backward()
        if self.device.type == "cuda":  # host clocks see kernel launches: wait for backward and its all-reduce
            torch.cuda.synchronize(self.device)
        t_done = time.perf_counter()
        compute, exposed = self.allreduce_timer.split(clock.last, t_done)
        clock.add("backward_s", compute)
        clock.add("allreduce_s", exposed)
        clock.last = t_done
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.training.grad_clip)
        if self.fsdp:  # the norm over every rank's shards (a DTensor)
            grad_norm = grad_norm.full_tensor()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        clock.lap("optimizer_s")
        self.next_step = step + 1
        self._mark = clock.last
        parts = clock.parts
        metrics.update({"rank": self.rank, "batch_id": expected_id, "grad_norm": float(grad_norm), "lr": lr,
                        "step_s": clock.total(), "step_parts": parts,
                        "teacher_wait_s": sum(parts[k] for k in TEACHER_WAIT_PARTS),
                        "compute_s": sum(parts[k] for k in COMPUTE_PARTS)})
        if self.faults is not None:
            # FaultPlan.step_delay_s and a FaultPlan hold wait outside every step's clock: after this step's last
            # part, and the next step's clock starts after them (as after a call outside the loop), so the parts
            # still sum to step_s, no part is test-named, and the rows measure the system alone, not the pause.
            self.faults.step_done(self.rank, step, self.generation)
            self._mark = time.perf_counter()
        return metrics

    def _agree_inputs_ok(self, error: BaseException | None, step: int) -> None:
        """All-reduce (sum) of failure flags: if any rank lacks a valid record, every rank raises StepRejected."""
        flag = torch.tensor([0.0 if error is None else 1.0], device=self.device)
        self.group.allreduce(flag).wait()
        failed = int(flag.item())
        if error is not None:
            raise StepRejected(f"rank {self.rank} step {step}: {type(error).__name__}: {error}", cause=error)
        if failed:
            raise PeerInputError(f"step {step}: {failed} other rank(s) had no valid teacher record; "
                                 f"rank {self.rank} did not step")

    # ------------------------------------------------------------------ checkpoints and weights
    def save_checkpoint(self, tmp_dir: str, step: int) -> None:
        """Write this rank's part of the checkpoint of `step` completed steps into `tmp_dir` (rank 0: model,
        optimizer; all: RNG). Raises StepOrderError if this worker has not completed exactly `step` steps."""
        t0 = time.perf_counter()
        self._idle_s += t0 - self._mark
        if step != self.next_step:
            self._mark = time.perf_counter()
            raise StepOrderError(f"rank {self.rank}: checkpoint of {step} steps asked for, but this worker has "
                                 f"completed {self.next_step}; nothing written")
        try:
            if self.fsdp:
                self.fsdp_checkpoint.save_sharded(tmp_dir, self.model, self.optimizer, self.scheduler, self.rank,
                                             self.world_size)
            elif self.rank == 0:
                self.model.save_pretrained(f"{tmp_dir}/{ckpt.MODEL_DIR}", safe_serialization=True)
                self.tokenizer.save_pretrained(f"{tmp_dir}/{ckpt.MODEL_DIR}")
                ckpt.write_optimizer_state(tmp_dir, self.optimizer, self.scheduler)
            ckpt.write_rng_state(tmp_dir, self.rank)
        except Exception as exc:  # a full disk / EIO reaches the driver as a plain OSError naming tmp_dir
            ckpt.raise_io_error(exc, tmp_dir)
            raise
        self._mark = time.perf_counter()
        self._checkpoint_s += self._mark - t0

    def load_checkpoint(self, ckpt_dir: str) -> int:
        """Load weights, optimizer, scheduler and this rank's RNG states; returns the checkpoint's step."""
        if self.fsdp:
            self.fsdp_checkpoint.load_sharded(ckpt_dir, self.model, self.optimizer, self.scheduler, self.world_size)
            return self._load_run_state(ckpt_dir)
        # Our own checkpoint: safetensors only, never remote code (whatever the config says for hub models).
        src = load_causal_lm(self.cfg.models.student.model_copy(update={"trust_remote_code": False}), self.device,
                             self.dtype, path=f"{ckpt_dir}/{ckpt.MODEL_DIR}", use_safetensors=True)
        self.model.load_state_dict(src.state_dict())
        del src
        ckpt.read_optimizer_state(ckpt_dir, self.optimizer, self.scheduler)
        return self._load_run_state(ckpt_dir)

    def _load_run_state(self, ckpt_dir: str) -> int:
        ckpt.read_rng_state(ckpt_dir, self.rank)
        self.next_step = int(ckpt.read_state(ckpt_dir)["step"])
        return self.next_step

    def save_model(self, path: str) -> None:
        """Save the student in HF format (safetensors + tokenizer) at `path` (rank 0's copy; under fsdp2 every
        rank must call it: the weights are gathered on rank 0, which writes them)."""
        try:
            state = self.sharding.full_state_dict(self.model, rank0_only=True) if self.fsdp else None
            if self.rank == 0:
                self.model.save_pretrained(path, safe_serialization=True, state_dict=state)
                self.tokenizer.save_pretrained(path)
        except Exception as exc:  # a full disk / EIO reaches the driver as a plain OSError naming path
            ckpt.raise_io_error(exc, path)
            raise
        finally:
            self._end_call()  # not part of any step (e.g. the best model of a selection pass)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, examples: list[dict[str, str]], max_new_tokens: int,
                 batch_size: int) -> dict[str, Any] | None:
        """ROUGE of the current weights on `examples` (under fsdp2 every rank calls it to gather the weights; rank
        0 evaluates, the others return None)."""
        try:
            model = self.sharding.gathered_copy(self.model, self.device) if self.fsdp else self.model
            if self.rank != 0 and self.fsdp:
                return None
            return evaluate_model(model, self.tokenizer, examples, max_new_tokens, batch_size)
        finally:
            self._end_call()


# The receiving side of RDT needs enable_tensor_transport even without a transport method of its own.
StudentWorker = ray.remote(enable_tensor_transport=True)(StudentWorkerImpl)
