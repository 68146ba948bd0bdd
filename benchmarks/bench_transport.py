"""Call overhead: the same batch through the teacher engine in-process, through a Ray actor, through RDT.

Figure 3 of the benchmarks issue. One SFT teacher (a tiny Llama sized so a 32k-token batch takes about a
second on one thread) computes top-k (k = 64) for a batch of 4k and of 32k tokens:

- in_process:        `TeacherEngine.topk(...)` in this process (torch tensors, no conversion);
- object_store_get:  `ray.get(TeacherActor.topk.remote(...))` here (numpy wire arrays via the object store);
- object_store_actor: the TeacherActor's result ref passed to a receiver actor (teacher -> student hop);
- rdt_gloo_actor:    `TeacherActor.topk` as an RDT call (Ray Direct Transport, gloo) to a receiver actor in one
                     collective group with the teacher (the GPU path's CPU twin).

    ratio = median seconds of a path / median seconds in-process      target: <= 1.15 at 32k tokens

Fairness: the engine runs with one torch thread in both places (the actor gets num_cpus=1, so Ray sets
OMP_NUM_THREADS=1 there; this process calls torch.set_num_threads(1)). Every position of the batch is a
counted row (a 32k-token record: what the record path moves). Paths alternate within each repeat
so a burst of load from other processes hits all of them alike. Each call has a fresh batch id (the
actor caches by batch id).

    python benchmarks/bench_transport.py [--smoke] [--repeats N] [--ray-address ADDR]
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    BenchError,
    Target,
    add_ray_args,
    base_parser,
    print_table,
    ray_session,
    summarize,
    write_result,
)

__all__ = ["build_teacher", "main"]

K = 64
TARGET = 1.15
SEQ = 512  # tests/tiny.py models have 512 positions


def build_teacher(root: Path, hidden: int, layers: int) -> Path:
    """A tiny Llama teacher (HF format) with a ~1,100-token word-level vocabulary."""
    from tests.tiny import make_llama, make_tokenizer

    tok = make_tokenizer(root / "tok", extra_words=" ".join(f"w{i}" for i in range(1024)))
    return make_llama(root / "teacher", tok, seed=1, hidden_size=hidden, num_layers=layers, num_heads=4,
                      intermediate_size=2 * hidden)


def _receiver(ray: Any) -> Any:
    @ray.remote(num_cpus=0, enable_tensor_transport=True)
    class Receiver:
        """Stands in for the student worker: receives the teacher's part and touches every array."""

        def consume(self, part: dict[str, Any]) -> int:
            total = 0
            for v in part.values():
                a = v.numpy() if hasattr(v, "numpy") and not isinstance(v, np.ndarray) else np.asarray(v)
                flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
                total += flat.nbytes + int(flat[::4096].sum() < 0)  # one byte per 4 KiB page
            return total

    return Receiver.remote()


def _paths(ray: Any, engine: Any, actor: Any, receiver: Any, ids: np.ndarray, mask: np.ndarray, label: str,
           counter: Iterator[int], with_rdt: bool) -> dict[str, Callable[[], Any]]:
    rows = np.arange(ids.size, dtype=np.int32)  # every position counted
    """The callables timed for one batch: in-process, object store (driver get, to an actor), RDT."""
    expect = ids.size * K * 8  # ids int32 + fp32 log-probs per support entry (tails on top)

    def checked(n: int, path: str) -> int:
        if n < expect:
            raise BenchError(f"transport {label} {path}: receiver saw {n} bytes < {expect}")
        return n

    paths: dict[str, Callable[[], Any]] = {
        "in_process": lambda: engine.topk(ids, mask, rows, K, 1.0),
        "object_store_get": lambda: ray.get(actor.topk.remote(next(counter), ids, mask, rows, K, 1.0)),
        "object_store_actor": lambda: checked(ray.get(receiver.consume.remote(
            actor.topk.remote(next(counter), ids, mask, rows, K, 1.0))), "object_store_actor"),
    }
    if with_rdt:
        paths["rdt_gloo_actor"] = lambda: checked(ray.get(receiver.consume.remote(
            actor.topk.options(tensor_transport="gloo").remote(next(counter), ids, mask, rows, K, 1.0,
                                                               transport="gloo"))), "rdt_gloo_actor")
    return paths


def main(argv: list[str] | None = None) -> int:
    import torch

    p = base_parser(__doc__.splitlines()[0])
    add_ray_args(p)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    args = p.parse_args(argv)
    repeats = 1 if args.smoke else args.repeats
    sizes = {"256": 256, "1k": 1024} if args.smoke else {"4k": 4096, "32k": 32768}
    torch.set_num_threads(1)

    from common.config import ModelSpec
    from teacher_service import TeacherEngine

    with tempfile.TemporaryDirectory(prefix="dkb-transport-") as tmp, \
            ray_session(args.ray_address, num_cpus=4) as ray:
        from ray.experimental.collective import create_collective_group

        from teacher_service import TeacherActor

        path = build_teacher(Path(tmp), 32 if args.smoke else args.hidden, args.layers)
        spec = ModelSpec(path=str(path), dtype="float32")
        engine = TeacherEngine(spec, device="cpu", dtype="float32")
        actor = TeacherActor.options(num_cpus=1).remote("sft", spec.model_dump(), "hf", "cpu", "float32")
        receiver = _receiver(ray)
        ray.get(actor.health.remote())
        rdt_error = None
        try:
            create_collective_group([actor, receiver], backend="gloo")
        except Exception as exc:  # reported in the JSON, the other paths still measured
            rdt_error = f"{type(exc).__name__}: {exc}"

        counter = iter(range(10**9))
        rng = np.random.default_rng(0)
        results: dict[str, Any] = {}
        for label, tokens in sizes.items():
            seq = min(SEQ, tokens)
            ids = rng.integers(4, engine.vocab_size, size=(tokens // seq, seq)).astype(np.int32)
            mask = np.ones_like(ids)

            paths = _paths(ray, engine, actor, receiver, ids, mask, label, counter, rdt_error is None)
            times: dict[str, list[float]] = {n: [] for n in paths}
            for fn in paths.values():
                fn()  # warm-up: first-call allocations, RDT connection set-up
            for _ in range(repeats):
                for name, fn in paths.items():  # alternate paths inside each repeat
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            base = summarize(times["in_process"])["median"]
            results[label] = {"tokens": int(ids.size), "batch": list(ids.shape),
                              **{n: {"seconds": summarize(t), "ratio_to_in_process": summarize(t)["median"] / base}
                                 for n, t in times.items()}}
        ray.kill(actor, no_restart=True)
        ray.kill(receiver, no_restart=True)

    print_table(["tokens", "path", "median s", "min s", "max s", "ratio"],
                [[lab, n, f["seconds"]["median"], f["seconds"]["min"], f["seconds"]["max"], f["ratio_to_in_process"]]
                 for lab, r in results.items() for n, f in r.items() if isinstance(f, dict) and "seconds" in f],
                title=f"teacher top-k (k={K}) call overhead")
    big = results[list(sizes)[-1]]
    targets = [Target(f"object_store_actor_ratio_{list(sizes)[-1]}", big["object_store_actor"]["ratio_to_in_process"],
                      "<=", TARGET, "teacher actor -> receiver actor via the object store")]
    targets.append(Target(f"rdt_gloo_actor_ratio_{list(sizes)[-1]}",
                          big["rdt_gloo_actor"]["ratio_to_in_process"] if "rdt_gloo_actor" in big else None,
                          "<=", TARGET, rdt_error or "RDT gloo, teacher actor -> receiver actor"))
    notes = [f"model: tiny Llama hidden={32 if args.smoke else args.hidden} layers={args.layers}, "
             f"vocab {engine.vocab_size}, fp32, one torch thread on both sides",
             "ratios are medians over repeats with the paths interleaved in each repeat"]
    if rdt_error:
        notes.append(f"RDT path not measured: {rdt_error}")
    write_result("bench_transport", args, {"k": K, "sizes": results, "rdt_error": rdt_error}, targets, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
