"""gpu_check part 4: a 32k-token top-k record over Ray Direct Transport vs handing it over in-process.

Both paths do the same work on the same random model (saved once with a generated word-level tokenizer of
the shape's vocabulary size, since the actor loads a checkpoint):

- in_process: `TeacherEngine.topk` in this process, then `targets_from_parts` on the same device (what a
  student worker does with a record it received), one host sync (its validation);
- rdt: `TeacherActor.topk` (an RDT call: `.options(tensor_transport=...)`, `transport=`) in a teacher actor, its result sent over RDT to a receiver actor that
  runs the same `targets_from_parts` on its device: `cuda_ipc` on a GPU (both actors share it, fractional
  num_gpus), `gloo` on the CPU (its twin, in a collective group).

    ratio = median seconds of rdt / median seconds of in_process        goal <= 1.05 at 32k tokens

The paths alternate inside each repeat; every call has a fresh batch id (the actor caches by batch id).
Ray is imported here only; without it the part reports the error and the other parts are unaffected.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import ray_session, summarize

__all__ = ["rdt_transfer", "save_random_checkpoint"]


def save_random_checkpoint(root: Path, shape: dict[str, Any], dtype: Any, device: Any = "cpu") -> Path:
    """A random Qwen2 of `shape` (initialised on `device`: fast on a GPU) and a word-level tokenizer with
    exactly its vocabulary size, in HF format."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    v = shape["vocab_size"]
    # transformers loads a tokenizer saved beside a Qwen2 config as Qwen2Tokenizer, which adds
    # <|endoftext|> when it is missing: it is the last id here, so len(tokenizer) == vocab_size
    vocab = {"[UNK]": 0, "[PAD]": 1, **{f"w{i}": i for i in range(2, v - 1)}, "<|endoftext|>": v - 1}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   eos_token="<|endoftext|>")
    cfg = Qwen2Config(**shape, max_position_embeddings=32768, rope_theta=1e6)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    out = root / "teacher"
    model.save_pretrained(str(out))
    fast.save_pretrained(str(out))
    return out


def _receiver(ray: Any, num_gpus: float) -> Any:
    @ray.remote(num_cpus=1, num_gpus=num_gpus, enable_tensor_transport=True)
    class Receiver:
        """Stands in for the student worker: builds the loss targets from the received part on its device."""

        def __init__(self) -> None:
            import torch

            torch.set_num_threads(1)
            cuda = torch.cuda.is_available()
            self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

        def take(self, meta: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
            from common.losses.targets import targets_from_parts

            t = targets_from_parts(meta, ["sft"], [part], self.device, ["sft"])
            rows = getattr(t, "rows", None)  # rows-form targets; the [B, T, K] + mask form before them
            return {"rows": int(rows.numel()) if rows is not None else int(t.mask.sum()), "device": t.ids.device.type,
                    "arrived_on": sorted({v.device.type for v in part.values()})}

    return Receiver.remote()


def rdt_transfer(shape: dict[str, Any], shape_name: str, device: Any, tokens: int, seq: int, k: int, repeats: int,
                 ray_address: str | None) -> dict[str, Any]:
    import torch

    try:
        import ray  # noqa: F401
    except ImportError as exc:
        return {"error": f"Ray not importable ({exc}); on the GPU machine it comes from the device bundle"}
    from common.config import ModelSpec
    from common.losses.targets import targets_from_parts
    from teacher_service.assemble import record_meta
    from teacher_service.engine_hf import TeacherEngine

    cuda = device.type == "cuda"
    backend = "cuda_ipc" if cuda else "gloo"
    share = 0.4 if cuda else 0.0
    torch.set_num_threads(1)  # the actors run with one thread too (num_cpus=1); matters on the CPU only
    out: dict[str, Any] = {"shape": shape_name, "tokens": tokens, "k": k, "backend": backend}
    with tempfile.TemporaryDirectory(prefix="dkb-gpu-rdt-") as tmp, ray_session(ray_address, num_cpus=4) as ray:
        from ray.experimental.collective import create_collective_group

        from teacher_service import TeacherActor

        dtype = "bfloat16" if cuda else "float32"
        path = save_random_checkpoint(Path(tmp), shape, getattr(torch, dtype), device)
        spec = ModelSpec(path=str(path), dtype=dtype)
        engine = TeacherEngine(spec, device=str(device))
        actor = TeacherActor.options(num_cpus=1, num_gpus=share).remote("sft", spec.model_dump(), "hf", "auto",
                                                                       dtype, 1024, "float32")
        receiver = _receiver(ray, share)
        health = ray.get(actor.health.remote())
        out["actor_device"], out["actor_gpu_ids"] = health["device"], health["gpu_ids"]
        if backend != "cuda_ipc":  # two-sided transports need a group; cuda_ipc is one-sided
            create_collective_group([actor, receiver], backend=backend)
        rng = np.random.default_rng(0)
        ids = rng.integers(2, engine.vocab_size, size=(tokens // seq, seq)).astype(np.int32)
        mask = np.ones_like(ids)
        rows = np.arange(ids.size, dtype=np.int32)  # every position counted: a 32k-token record
        counter = iter(range(10**9))

        def meta() -> dict[str, Any]:
            return record_meta(next(counter), mask.astype(bool), 1.0, engine.vocab_size, engine.fingerprint,
                               "float32")

        def in_process() -> Any:
            m = meta()
            sup, lp, tail = engine.topk(ids, mask, rows, k, 1.0, batch_id=m["batch_id"])
            return targets_from_parts(m, ["sft"], [{"ids": sup, "logprobs": lp, "tail": tail}], device, ["sft"])

        def rdt() -> Any:
            m = meta()
            part = actor.topk.options(tensor_transport=backend).remote(
                m["batch_id"], ids, mask, rows, k, 1.0, transport=backend)
            return ray.get(receiver.take.remote(m, part))

        paths = {"in_process": in_process, "rdt": rdt}
        first = {name: fn() for name, fn in paths.items()}  # warm-up: kernels, allocator, RDT set-up
        out["receiver"] = first["rdt"]
        times: dict[str, list[float]] = {n: [] for n in paths}
        for _ in range(repeats):
            for name, fn in paths.items():
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()  # both end in a host sync: the targets' validation
                times[name].append(time.perf_counter() - t0)
        ray.kill(actor, no_restart=True)
        ray.kill(receiver, no_restart=True)
    for name, t in times.items():
        out[name] = {"seconds": summarize(t), "tokens_per_s": tokens / summarize(t)["median"]}
    out["ratio_to_in_process"] = out["rdt"]["seconds"]["median"] / out["in_process"]["seconds"]["median"]
    return out
