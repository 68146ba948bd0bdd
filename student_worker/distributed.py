"""torch.distributed for the student workers: a PRIVATE process group and a DDP wrapper.

Why not `init_process_group`: Ray Direct Transport's gloo collective (teachers -> students) initialises
torch's *default* process group in each actor, over teachers + students, and reuses it if one exists. Our
DDP group (students only, other ranks) must not collide with it, so it is built explicitly from a TCPStore
and handed to DDP via `process_group=`; the default group stays free for Ray.

Rendezvous: rank 0 opens the group's TCPStore on a port the OS picks as it binds (`open_rendezvous_store`),
so no other process can take the port between its choice and the bind (the race of picking a free port
first); the driver hands `tcp://host:port` to all ranks and rank 0 builds its group on the store it holds.
"""

from __future__ import annotations

import datetime
import queue
import time
from collections.abc import Callable
from typing import Any

import ray
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

__all__ = ["DistributedError", "AllReduceTimer", "node_ip", "open_rendezvous_store", "local_rendezvous", "run_local_ranks", "make_process_group",
           "make_default_group", "wrap_ddp",
           "bf16_allreduce_hook", "compression_hook"]


class DistributedError(RuntimeError):
    """The student process group could not be formed. The message names rank, world size and address."""


def node_ip() -> str:
    """This node's address as Ray sees it (falls back to loopback outside Ray, e.g. in unit tests)."""
    if ray.is_initialized():
        return str(ray.util.get_node_ip_address())
    return "127.0.0.1"


def open_rendezvous_store(world_size: int, timeout_s: float = 1800.0, host: str | None = None,
                          ) -> tuple[dist.TCPStore, str]:
    """Rank 0's store of the group, listening on a port the OS picked when it bound (port 0), and the
    `tcp://host:port` the other ranks connect to. Not waiting for them: they connect in `make_process_group`."""
    host = host or node_ip()
    try:
        store = dist.TCPStore(host, 0, world_size, True, timeout=datetime.timedelta(seconds=timeout_s),
                              wait_for_workers=False)
    except (RuntimeError, OSError) as exc:
        raise DistributedError(f"rank 0/{world_size}: cannot open the rendezvous store on {host}: {exc}") from exc
    return store, f"tcp://{host}:{store.port}"


def local_rendezvous(rank: int, world_size: int, addresses: Any, timeout_s: float = 1800.0,
                     ) -> tuple[dist.TCPStore | None, str]:
    """The rendezvous of `world_size` processes started together on this machine outside Ray (e.g. by
    `torch.multiprocessing.spawn`): rank 0 opens the store on an OS-picked loopback port
    (`open_rendezvous_store`) and puts its address on `addresses` (a multiprocessing queue shared by all
    ranks) once per other rank; the others take it from there, waiting at most `timeout_s`. Returns
    (rank 0's store, None on the others; the `tcp://` address) for `make_process_group(..., store=)`."""
    if rank == 0:
        store, address = open_rendezvous_store(world_size, timeout_s, host="127.0.0.1")
        for _ in range(world_size - 1):
            addresses.put(address)
        return store, address
    try:
        return None, str(addresses.get(timeout=timeout_s))
    except queue.Empty as exc:
        raise DistributedError(f"rank {rank}/{world_size}: no rendezvous address from rank 0 within "
                               f"{timeout_s:.0f} s") from exc


def run_local_ranks(fn: Callable[..., Any], args: tuple[Any, ...], world_size: int, timeout_s: float) -> None:
    """Run `fn(rank, addresses, *args)` in `world_size` spawned processes on this machine, `addresses` being
    the queue `local_rendezvous` takes; return once every rank ended well. DistributedError if a rank fails
    (its traceback in the message; the others are ended) or the ranks still run after `timeout_s`. No rank
    is left running either way (one stuck process would otherwise hold the caller's exit)."""
    addresses = mp.get_context("spawn").Queue()  # held here until the ranks have unpickled it
    ranks = mp.spawn(fn, args=(addresses, *args), nprocs=world_size, join=False)
    deadline = time.monotonic() + timeout_s
    try:  # join returns as each rank ends
        while not ranks.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise DistributedError(f"{world_size} local ranks still ran after {timeout_s:.0f} s")
    except ProcessException as exc:
        raise DistributedError(f"local rank {exc.error_index} of {world_size} failed: {exc}") from exc
    finally:
        for proc in ranks.processes:
            if proc.is_alive():
                proc.kill()


def make_process_group(
    init_method: str, rank: int, world_size: int, backend: str, timeout_s: float = 1800.0,
    group_name: str = "deltakd-students", store: dist.Store | None = None,
) -> dist.ProcessGroup:
    """A process group over the student ranks that is NOT torch's default group.

    init_method: "tcp://host:port" (rank 0 hosts the store); backend: "gloo" (CPU) or "nccl" (GPU).
    timeout_s (`training.collective_timeout_s`): the store's and every collective's timeout (gloo's
    timeout; NCCL's `ProcessGroupNCCL.Options._timeout`, which its watchdog enforces). group_name: names
    the group in torch's logs and NCCL's flight recorder, and prefixes its keys in the store. store: rank 0's
    store from `open_rendezvous_store` (None: rank 0 opens one at init_method's port, as torchrun does).
    """
    if not init_method.startswith("tcp://"):
        raise DistributedError(f"rank {rank}: init_method must be tcp://host:port, got {init_method!r}")
    host, _, port = init_method[len("tcp://"):].rpartition(":")
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        if store is None:
            store = dist.TCPStore(host, int(port), world_size, rank == 0, timeout=timeout)
    except (RuntimeError, OSError) as exc:
        raise DistributedError(
            f"rank {rank}/{world_size}: cannot reach the rendezvous store at {init_method}: {exc}"
        ) from exc
    store = dist.PrefixStore(f"{group_name}/", store)
    group = dist.ProcessGroup(store, rank, world_size)
    ranks = list(range(world_size))
    # ProcessGroup + _register_backend is what init_process_group / new_group do inside
    # (torch.distributed.distributed_c10d._new_process_group_helper); done by hand here so the group is not
    # the default one (see module docstring).
    impl: Any
    if backend == "gloo":
        impl = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        impl.options.global_ranks_in_group = ranks
        impl.options.group_name = group_name
        group._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
        group._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, impl)
    elif backend == "nccl":
        if not dist.is_nccl_available():
            raise DistributedError(f"rank {rank}: backend 'nccl' requested but this torch has no NCCL "
                                   f"(torch {torch.__version__}); GPU training needs a CUDA build")
        options = dist.ProcessGroupNCCL.Options()  # untested here: no GPU on the CI machine
        options.is_high_priority_stream = False
        options._timeout = timeout
        options.global_ranks_in_group = ranks
        options.group_name = group_name
        impl = dist.ProcessGroupNCCL(store, rank, world_size, options)
        group._set_default_backend(dist.ProcessGroup.BackendType.NCCL)
        group._register_backend(torch.device("cuda"), dist.ProcessGroup.BackendType.NCCL, impl)
    else:
        raise DistributedError(f"rank {rank}: unknown backend {backend!r}; expected 'gloo' or 'nccl'")
    impl._set_sequence_number_for_group()
    group._set_group_name(group_name)
    group._set_group_desc(group_name)
    return group


def make_default_group(
    init_method: str, rank: int, world_size: int, backend: str, timeout_s: float = 1800.0,
    group_name: str = "deltakd-students", store: dist.Store | None = None,
) -> dist.ProcessGroup:
    """The student ranks as torch's DEFAULT process group (training.strategy: fsdp2).

    FSDP2's device mesh, DTensor and torch.distributed.checkpoint ask the default group for this process's
    rank (`dist.get_rank()`), so a private group (`make_process_group`) cannot carry them. The price: Ray's
    gloo RDT transport, which would reuse the default group, cannot run beside it (the config refuses
    `transport.rdt_backend: gloo` with fsdp2; the worker group refuses `auto` when it resolves to gloo).
    Arguments as for `make_process_group`; the store's keys are prefixed with `group_name` likewise.
    """
    if not init_method.startswith("tcp://"):
        raise DistributedError(f"rank {rank}: init_method must be tcp://host:port, got {init_method!r}")
    if dist.is_initialized():
        raise DistributedError(f"rank {rank}: torch's default process group already exists in this process "
                               "(an RDT gloo group?); training.strategy=fsdp2 needs it for the student ranks")
    host, _, port = init_method[len("tcp://"):].rpartition(":")
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        if store is None:
            store = dist.TCPStore(host, int(port), world_size, rank == 0, timeout=timeout)
        dist.init_process_group(backend, store=dist.PrefixStore(f"{group_name}/", store), rank=rank,
                                world_size=world_size, timeout=timeout, group_name=group_name)
    except (RuntimeError, OSError, ValueError) as exc:
        raise DistributedError(
            f"rank {rank}/{world_size}: cannot form the {backend} default group at {init_method}: {exc}"
        ) from exc
    return dist.group.WORLD


class AllReduceTimer:
    """Times the part of DDP's gradient all-reduce that backward does not hide.

    A DDP communication hook (`wrap_ddp`) calls `bucket_ready` as each gradient bucket is handed to the
    all-reduce, in backward order; the last bucket is ready when backward's computation is done. So for one
    backward call, `exposed_s(end)` = `end` (when `loss.backward()` returned, DDP having waited for every
    bucket's all-reduce) minus the last bucket's hand-over: the communication (and the wait for the slowest
    rank) that was not overlapped with computation. `reset()` before each backward.
    """

    def __init__(self) -> None:
        self.last_ready: float | None = None

    def reset(self) -> None:
        self.last_ready = None

    def bucket_ready(self) -> None:
        self.last_ready = time.perf_counter()

    def split(self, start: float, end: float) -> tuple[float, float]:
        """(backward compute s, exposed all-reduce s) of a backward that ran from `start` to `end`."""
        if self.last_ready is None or not start <= self.last_ready <= end:
            return end - start, 0.0  # no bucket (e.g. world size 1 without a hook call): all compute
        return self.last_ready - start, end - self.last_ready


def _allreduce_mean(group: dist.ProcessGroup, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's default reduction on our private group: scale by 1 / world size (DDP multiplies by the same
    fp32 scalar when it copies gradients into a hook-less bucket), then sum over ranks."""
    tensor = bucket.buffer()
    tensor.mul_(1.0 / group.size())
    return group.allreduce([tensor]).get_future().then(lambda fut: fut.value()[0])


def bf16_allreduce_hook(group, bucket):  # type: ignore[no-untyped-def]
    """(group: dist.ProcessGroup, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]. The
    annotations live here because DDP inspects real ones and this module's are strings (__future__).

    DDP communication hook: all-reduce a gradient bucket as bfloat16, averaged, cast back in place.

    The same steps as torch's `bf16_compress_hook` (cast, divide by the world size, all-reduce, copy
    back), written here because DDP refuses torch's hook off NCCL/CUDA, and the GPU path should run the
    lines the CPU tests run. It calls the group's own `allreduce`, never the default group (Ray's RDT owns it).
    """
    buffer = bucket.buffer()
    compressed = buffer.to(torch.bfloat16).div_(group.size())
    fut = group.allreduce([compressed]).get_future()

    def decompress(f):  # type: ignore[no-untyped-def]
        buffer.copy_(f.value()[0])
        return buffer

    return fut.then(decompress)


def compression_hook(grad_compression: str) -> Callable[..., Any] | None:
    """The DDP communication hook of `training.grad_compression`: "bf16" -> `bf16_allreduce_hook` (each
    gradient bucket travels as bfloat16: half the all-reduce's bytes for fp32 gradients, ~1 GB instead of
    ~2 GB a step for Qwen2-0.5B; each element rounded to bf16's 8-bit mantissa before the sum); "none" ->
    None (DDP's own fp32 reduction)."""
    if grad_compression == "bf16":
        return bf16_allreduce_hook
    if grad_compression != "none":
        raise DistributedError(f"training.grad_compression={grad_compression!r}: expected 'none' or 'bf16'")
    return None


def wrap_ddp(model: torch.nn.Module, group: dist.ProcessGroup, device: torch.device,
             comm_hook: Callable[..., Any] | None = None,
             timer: AllReduceTimer | None = None) -> torch.nn.Module:
    """DDP over `group`: broadcasts rank 0's weights at construction, averages gradients on backward.

    comm_hook: `hook(group, bucket) -> Future` that reduces one gradient bucket (DDP's communication hook
    protocol with the group as state), e.g. `compression_hook("bf16")`; None: divide by the world size and
    sum (what DDP does without a hook). DDP takes one hook only, so pass it here rather than registering it.
    timer: told when each bucket is handed over (`AllReduceTimer`), to split backward from the all-reduce.
    """
    device_ids = [device.index if device.index is not None else 0] if device.type == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, process_group=group)
    reduce = comm_hook or _allreduce_mean
    if timer is not None:
        # No annotations: DDP compares them with dist.GradBucket, and this module's are postponed (strings).
        def timed(state, bucket):  # type: ignore[no-untyped-def]
            timer.bucket_ready()
            return reduce(state, bucket)

        ddp.register_comm_hook(group, timed)
    elif comm_hook is not None:
        ddp.register_comm_hook(group, comm_hook)
    return ddp
