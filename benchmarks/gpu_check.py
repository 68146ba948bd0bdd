"""GPU check for the H200 machine: torch + transformers only (that machine has no Ray, no vLLM).

Figure 6 of the benchmarks issue. Random-initialised models with Qwen2-0.5B and Qwen2-7B shapes in bf16:

1. teacher: tokens/s of the real `TeacherEngine.topk` / `.gather` (forward + finiteness check +
   `common.sparse` fp32 log-softmax, top-k/gather, copy to host) against the bare forward pass.
   The engine's constructor loads a saved checkpoint and its tokenizer; a random 7B has neither, so
   `InMemoryEngine` sets the attributes the engine's methods read (model, device, vocab_size,
   chunk_tokens, name) and leaves every scoring method as the engine's own.
2. loss at V = 152,064: production `distillation_loss` (delta_kd, k = 64) vs the naive dense formula
   (bench_loss.naive_delta_kd): forward + backward time and peak memory (torch.cuda.max_memory_allocated
   above what was allocated before the call; inputs are built before the reset, so the figure is what
   the loss adds, the logits' gradient included).
3. student: one optimiser step of a Qwen2-0.5B-shaped student through `student_worker.train_step`:
   delta_kd (student_base on the wire), delta_kd with a frozen base copy, and sft.

On a machine without CUDA it runs a scaled-down version (tiny shapes), so CI can smoke-test it.
The script refuses to run if anything imported Ray. Budget on the H200: well under 8 minutes.

    python benchmarks/gpu_check.py [--smoke] [--repeats N]
"""

from __future__ import annotations

import sys
import time
from typing import Any

from _common import BenchError, Target, base_parser, print_table, summarize, time_repeats, write_result

__all__ = ["QWEN2_SHAPES", "build_qwen2", "main"]

# Shapes from the published Qwen2 configs (num_key_value_heads: grouped-query attention).
QWEN2_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2-0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                   "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                   "tie_word_embeddings": True},
    "qwen2-7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                 "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                 "tie_word_embeddings": False},
    # CPU stand-ins with the same structure, small enough for a smoke test.
    "tiny-student": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 2000,
                     "tie_word_embeddings": True},
    "tiny-teacher": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 2000,
                     "tie_word_embeddings": False},
}
K = 64


def build_qwen2(shape: str, device: Any, dtype: Any) -> Any:
    """A random-initialised Qwen2ForCausalLM of a named shape, created directly on `device` in `dtype`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**QWEN2_SHAPES[shape], max_position_embeddings=32768, rope_theta=1e6)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: a 7B in fp32 first would need 30 GB
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model


def _engine_class() -> type:
    from teacher_service.engine_hf import TeacherEngine

    class InMemoryEngine(TeacherEngine):
        """The real TeacherEngine's methods over a model already in memory (no checkpoint, no tokenizer)."""

        def __init__(self, model: Any, vocab_size: int, chunk_tokens: int = 1024):
            self.model = model.eval()
            self.name = f"random-{type(model).__name__}"
            self.device = next(model.parameters()).device
            self.dtype = next(model.parameters()).dtype
            self.vocab_size = int(vocab_size)
            self.model_vocab_size = int(model.get_output_embeddings().weight.shape[0])
            self.chunk_tokens = int(chunk_tokens)

    return InMemoryEngine



def teacher_throughput(shape: str, device: Any, batch: int, seq: int, repeats: int, sync: Any) -> dict[str, Any]:
    import numpy as np
    import torch

    model = build_qwen2(shape, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    vocab = QWEN2_SHAPES[shape]["vocab_size"]
    engine = _engine_class()(model, vocab)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=(batch, seq)).astype(np.int32)
    mask = np.ones_like(ids)
    ids_t = torch.as_tensor(ids, dtype=torch.long, device=device)
    mask_t = torch.as_tensor(mask, dtype=torch.long, device=device)

    @torch.inference_mode()
    def bare() -> None:
        model(input_ids=ids_t, attention_mask=mask_t, use_cache=False)

    support, _, _ = engine.topk(ids, mask, K)
    tokens = batch * seq
    out: dict[str, Any] = {"shape": shape, "batch": batch, "seq": seq, "k": K}
    for name, fn in (("bare_forward", bare), ("engine_topk", lambda: engine.topk(ids, mask, K)),
                     ("engine_gather", lambda: engine.gather(ids, mask, support))):
        secs = time_repeats(fn, repeats, warmup=1, sync=sync)
        out[name] = {"seconds": summarize(secs), "tokens_per_s": tokens / summarize(secs)["median"]}
    out["topk_over_bare_time"] = out["engine_topk"]["seconds"]["median"] / out["bare_forward"]["seconds"]["median"]
    out["gather_over_bare_time"] = (out["engine_gather"]["seconds"]["median"]
                                    / out["bare_forward"]["seconds"]["median"])
    return out  # the model is freed when this frame goes; main() empties the CUDA cache between parts


def loss_check(device: Any, vocab: int, tokens: int, repeats: int, sync: Any) -> dict[str, Any]:
    import torch
    from bench_loss import naive_delta_kd
    from bench_wire import make_record

    from common.config import LossConfig
    from common.losses import distillation_loss, targets_from_record

    cfg = LossConfig(method="delta_kd", k=K)
    gen = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(1, tokens, vocab, generator=gen, device=device) * 3).requires_grad_(True)
    labels = torch.randint(0, vocab, (1, tokens), generator=gen, device=device)
    record = make_record(1, tokens, K, ["sft", "base", "student_base"], "float32", vocab_size=vocab)
    targets = targets_from_record(record, device)
    dense = [torch.log_softmax(torch.randn(tokens, vocab, generator=gen, device=device) * 3, -1) for _ in range(3)]

    def production() -> None:
        logits.grad = None
        distillation_loss(logits, targets, labels, cfg, [1.0]).loss_sum.backward()

    def naive() -> None:
        logits.grad = None
        naive_delta_kd(logits.view(tokens, vocab), *dense, labels.view(tokens)).backward()

    out: dict[str, Any] = {"vocab": vocab, "tokens": tokens, "k": K}
    for name, fn in (("production", production), ("naive", naive)):
        fn()
        logits.grad = None
        peak = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        secs = time_repeats(fn, repeats, warmup=0, sync=sync)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() - before
        logits.grad = None
        out[name] = {"seconds": summarize(secs), "peak_working_bytes": peak}
    out["time_ratio"] = out["production"]["seconds"]["median"] / out["naive"]["seconds"]["median"]
    pn = out["naive"]["peak_working_bytes"]
    out["peak_ratio"] = out["production"]["peak_working_bytes"] / pn if pn else None
    return out


def student_steps(shape: str, device: Any, batch: int, seq: int, repeats: int, sync: Any) -> dict[str, Any]:
    import torch
    from bench_wire import make_record

    from common.config import LossConfig
    from common.losses import targets_from_record
    from student_worker.train_step import loss_forward_module, train_step

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_qwen2(shape, device, dtype).train()
    frozen = build_qwen2(shape, device, dtype).eval().requires_grad_(False)
    vocab = QWEN2_SHAPES[shape]["vocab_size"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen, device=device)
    # every position counted (the record covers them all; the loss wants labels exactly at its rows)
    labels = torch.roll(ids, -1, dims=1)
    batch_t = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    tokens = int((labels != -100).sum())
    wire = make_record(batch, seq, K, ["sft", "base", "student_base"], "bfloat16", vocab_size=vocab)
    with_base = targets_from_record(wire, device)
    wire_no_base = make_record(batch, seq, K, ["sft", "base"], "bfloat16", vocab_size=vocab)
    without_base = targets_from_record(wire_no_base, device)
    variants = {"sft": (LossConfig(method="sft"), None),
                "delta_kd_wire_base": (LossConfig(method="delta_kd", k=K), with_base),
                "delta_kd_frozen_base": (LossConfig(method="delta_kd", k=K), without_base)}
    # the fused loss (backbone only; the loss applies the head per chunk of counted rows), as the worker runs it
    fused, fused_base = loss_forward_module(model, LossConfig(), shape), loss_forward_module(frozen, LossConfig(), shape)
    out: dict[str, Any] = {"shape": shape, "batch": batch, "seq": seq}
    for name, (cfg, targets) in variants.items():
        def step(cfg: LossConfig = cfg, targets: Any = targets) -> None:
            loss, _ = train_step(fused, fused_base, batch_t, targets, cfg, [1.0], tokens, 1)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        secs = time_repeats(step, repeats, warmup=1, sync=sync)
        out[name] = {"seconds": summarize(secs), "tokens_per_s": batch * seq / summarize(secs)["median"]}
    sft_s = out["sft"]["seconds"]["median"]
    out["kd_over_sft_time"] = out["delta_kd_wire_base"]["seconds"]["median"] / sft_s
    out["kd_frozen_base_over_sft_time"] = out["delta_kd_frozen_base"]["seconds"]["median"] / sft_s
    return out


def _check_imports() -> None:
    """The project's config (pydantic) must import; the H200 image lacks pydantic unless carried."""
    try:
        import pydantic  # noqa: F401
    except ImportError as exc:
        raise BenchError(
            "gpu_check needs pydantic (common.config, imported by the loss and the engine), which the GPU "
            "image lacks: carry wheels of pydantic, pydantic-core, annotated-types and typing-inspection "
            "(see benchmarks/README.md, 'On the GPU machine')") from exc


def main(argv: list[str] | None = None) -> int:
    import torch

    _check_imports()

    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--skip-7b", action="store_true", help="teacher figures for the 0.5B shape only")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else None
    repeats = 1 if args.smoke else args.repeats
    if cuda and not args.smoke:
        teachers = ["qwen2-0.5b"] + ([] if args.skip_7b else ["qwen2-7b"])
        t_batch, t_seq, student, s_batch, s_seq, l_vocab, l_tokens = 8, 1024, "qwen2-0.5b", 4, 1024, 152064, 2048
    else:  # scaled down: CPU (CI) or --smoke
        teachers = ["tiny-teacher"]
        t_batch, t_seq, student, s_batch, s_seq, l_vocab, l_tokens = 2, 32, "tiny-student", 2, 32, 4000, 64

    figures: dict[str, Any] = {"device": str(device), "scaled_down": not (cuda and not args.smoke),
                               "teacher": {}, "loss": None, "student": None}
    for shape in teachers:
        figures["teacher"][shape] = teacher_throughput(shape, device, t_batch, t_seq, repeats, sync)
        if cuda:
            torch.cuda.empty_cache()
    figures["loss"] = loss_check(device, l_vocab, l_tokens, repeats, sync)
    figures["student"] = student_steps(student, device, s_batch, s_seq, repeats, sync)
    figures["wall_seconds"] = time.perf_counter() - t_start
    if "ray" in sys.modules:
        raise BenchError("gpu_check imported ray (directly or through a project module); the GPU machine has none")

    print_table(["teacher", "bare tok/s", "topk tok/s", "gather tok/s", "topk/bare time", "gather/bare time"],
                [[s, f["bare_forward"]["tokens_per_s"], f["engine_topk"]["tokens_per_s"],
                  f["engine_gather"]["tokens_per_s"], f["topk_over_bare_time"], f["gather_over_bare_time"]]
                 for s, f in figures["teacher"].items()], title=f"teacher engine on {device}")
    lf, sf = figures["loss"], figures["student"]
    print_table(["loss V", "prod s", "naive s", "time ratio", "peak ratio"],
                [[lf["vocab"], lf["production"]["seconds"]["median"], lf["naive"]["seconds"]["median"],
                  lf["time_ratio"], lf["peak_ratio"]]], title="delta_kd loss, production vs naive")
    print_table(["student step", "seconds (median)", "tokens/s"],
                [[n, sf[n]["seconds"]["median"], sf[n]["tokens_per_s"]]
                 for n in ("sft", "delta_kd_wire_base", "delta_kd_frozen_base")], title=f"student {student}")
    # The targets are about V = 152,064 on the H200; a scaled-down run only checks the plumbing, so its
    # ratios stay in `figures` and the targets read "not measured".
    full = not figures["scaled_down"]
    why = "" if full else "scaled-down run (no CUDA or --smoke): see figures.loss for the plumbing check"
    targets = [
        Target("loss_peak_ratio_to_naive", lf["peak_ratio"] if full else None, "<=", 0.3,
               why or "max_memory_allocated above the inputs, production / naive"),
        Target("loss_time_ratio_to_naive", lf["time_ratio"] if full else None, "<=", 1.0, why),
    ]
    notes = [
        "teacher figures use TeacherEngine's own topk/gather through InMemoryEngine (constructor bypassed: "
        "random weights, no checkpoint or tokenizer on disk).",
        "loss peak memory is measured on CUDA only; on CPU see bench_loss.py (fresh subprocess, peak RSS).",
        "student steps: train_step + backward + AdamW step; delta_kd_wire_base takes lp_S0 from the record, "
        "delta_kd_frozen_base runs the frozen copy's forward + gather inside the step.",
    ]
    write_result("gpu_check", args, figures, targets, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
