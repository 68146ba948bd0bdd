"""GPU check at the real shapes on one GPU: random-initialised Qwen2-7B-shaped teachers and a Qwen2-0.5B-shaped
student (nothing downloaded), through the project's own engine, loss, training step and Ray transport.

Parts (`--parts`, default all; `--merge` keeps the other parts' figures of an earlier run in the same JSON, so
benchmarks/gpu_run.sh can run each part under its own timeout and a hang in one leaves the others' results):

1. teacher: tokens/s of the real `TeacherEngine.topk` / `.gather` (every position counted: backbone, head in
   chunks, fp32 log-softmax, top-k / gather, results left on the device) against the model's bare forward
   (full logits), bf16 weights. Goal: top-k tokens/s >= 0.9 x bare forward (7B shape).
2. loss: production `distillation_loss` (delta_kd, k = 64) at V = 152,064 against the naive dense formula
   (bench_loss.naive_delta_kd): forward + backward time and peak memory (torch.cuda.max_memory_allocated
   above what was allocated before the call: what the loss adds, the logits' gradient included). Goals:
   <= 0.3 x naive peak memory, no slower. The fused input (hidden states + head) when the loss has it.
3. student: one optimiser step of the 0.5B-shaped student as the worker runs it (fp32 master weights, bf16
   autocast, AdamW, a frozen base copy in the master's dtype): sft, kd, delta_kd with lp_S0 on the wire,
   delta_kd with the frozen copy scoring lp_S0 in the step. Goal: KD / Delta-KD step <= 1.1 x SFT step.
4. rdt (needs Ray; benchmarks/gpu_check_rdt.py): a 32k-token top-k record from a `TeacherActor` to a
   receiving actor over Ray Direct Transport (`cuda_ipc`, both on the one GPU), the receiver building the
   loss targets from it, against the same in-process. Goal: <= 1.05 x in-process.

`--scale toy` (the default without CUDA, and `--smoke`) runs the same code at tiny shapes on the CPU in
seconds (the RDT part over gloo, its CPU twin); its ratios check the plumbing, not the targets.

    python benchmarks/gpu_check.py [--scale full|toy] [--parts teacher,loss,student,rdt] [--merge]
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from _common import (
    BenchError,
    Target,
    add_ray_args,
    base_parser,
    print_table,
    summarize,
    time_repeats,
    write_result,
)

__all__ = ["QWEN2_SHAPES", "SCALES", "PARTS", "build_qwen2", "main"]

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
SCALES: dict[str, dict[str, Any]] = {
    "full": {"teachers": ["qwen2-7b", "qwen2-0.5b"], "t_batch": 8, "t_seq": 1024, "student": "qwen2-0.5b",
             "s_batch": 4, "s_seq": 1024, "l_vocab": 152064, "l_tokens": 2048, "l_hidden": 896,
             "rdt_teacher": "qwen2-0.5b", "rdt_tokens": 32768, "rdt_seq": 1024},
    "toy": {"teachers": ["tiny-teacher"], "t_batch": 2, "t_seq": 32, "student": "tiny-student", "s_batch": 2,
            "s_seq": 32, "l_vocab": 4000, "l_tokens": 64, "l_hidden": 32,
            "rdt_teacher": "tiny-teacher", "rdt_tokens": 1024, "rdt_seq": 256},
}
PARTS = ("teacher", "loss", "student", "rdt")


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


def _free(device: Any) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def teacher_throughput(shape: str, device: Any, batch: int, seq: int, repeats: int, sync: Any) -> dict[str, Any]:
    import numpy as np
    import torch

    from teacher_service.engine_hf import TeacherEngine

    model = build_qwen2(shape, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    vocab = QWEN2_SHAPES[shape]["vocab_size"]
    engine = TeacherEngine.from_model(model, vocab)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=(batch, seq)).astype(np.int32)
    mask = np.ones_like(ids)
    ids_t = torch.as_tensor(ids, dtype=torch.long, device=device)
    mask_t = torch.as_tensor(mask, dtype=torch.long, device=device)

    @torch.inference_mode()
    def bare() -> None:
        model(input_ids=ids_t, attention_mask=mask_t, use_cache=False)

    rows = np.arange(batch * seq)  # every position counted
    support, _, _ = engine.topk(ids, mask, rows, K)
    tokens = batch * seq
    out: dict[str, Any] = {"shape": shape, "batch": batch, "seq": seq, "k": K, "rows_path": engine.rows_path,
                           "dtype": str(engine.dtype).replace("torch.", "")}
    for name, fn in (("bare_forward", bare), ("engine_topk", lambda: engine.topk(ids, mask, rows, K)),
                     ("engine_gather", lambda: engine.gather(ids, mask, rows, support))):
        secs = time_repeats(fn, repeats, warmup=1, sync=sync)
        out[name] = {"seconds": summarize(secs), "tokens_per_s": tokens / summarize(secs)["median"]}
    bare_s = out["bare_forward"]["seconds"]["median"]
    out["topk_tokens_per_s_over_bare"] = bare_s / out["engine_topk"]["seconds"]["median"]
    out["gather_tokens_per_s_over_bare"] = bare_s / out["engine_gather"]["seconds"]["median"]
    out["gather_over_topk_time"] = out["engine_gather"]["seconds"]["median"] / out["engine_topk"]["seconds"]["median"]
    return out


def _peak(fn: Any, repeats: int, device: Any, sync: Any) -> dict[str, Any]:
    """Median seconds over repeats, and (CUDA) the peak allocated above what was allocated before."""
    import torch

    fn()  # warm-up: kernels, allocator
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    secs = time_repeats(fn, repeats, warmup=0, sync=sync)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    return {"seconds": summarize(secs), "peak_working_bytes": peak}


def loss_check(device: Any, vocab: int, tokens: int, hidden: int, repeats: int, sync: Any) -> dict[str, Any]:
    import torch
    from bench_loss import naive_delta_kd
    from bench_wire import make_record

    import common.losses as losses
    from common.config import LossConfig

    cfg = LossConfig(method="delta_kd", k=K)
    gen = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(1, tokens, vocab, generator=gen, device=device) * 3).requires_grad_(True)
    labels = torch.randint(0, vocab, (1, tokens), generator=gen, device=device)  # every position counted
    record = make_record(1, tokens, K, ["sft", "base", "student_base"], "float32", vocab_size=vocab)
    targets = losses.targets_from_record(record, device)
    dense = [torch.log_softmax(torch.randn(tokens, vocab, generator=gen, device=device) * 3, -1) for _ in range(3)]
    variants: dict[str, Any] = {}

    def production() -> None:
        logits.grad = None
        losses.distillation_loss(logits, targets, labels, cfg, [1.0]).loss_sum.backward()

    def naive() -> None:
        logits.grad = None
        naive_delta_kd(logits.view(tokens, vocab), *dense, labels.view(tokens)).backward()

    variants["production"], variants["naive"] = production, naive
    hidden_states = getattr(losses, "HiddenStates", None)  # the fused input (h-loss); absent before it
    if hidden_states is not None:
        h = (torch.randn(1, tokens, hidden, generator=gen, device=device)).requires_grad_(True)
        w = (torch.randn(vocab, hidden, generator=gen, device=device) / hidden**0.5).requires_grad_(True)

        def fused() -> None:
            h.grad = w.grad = None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = losses.distillation_loss(hidden_states(h, w), targets, labels, cfg, [1.0])
            out.loss_sum.backward()

        variants["fused_autocast"] = fused
    out: dict[str, Any] = {"vocab": vocab, "tokens": tokens, "k": K}
    for name, fn in variants.items():
        out[name] = _peak(fn, repeats, device, sync)
        logits.grad = None
    out["time_ratio"] = out["production"]["seconds"]["median"] / out["naive"]["seconds"]["median"]
    pn = out["naive"]["peak_working_bytes"]
    out["peak_ratio"] = out["production"]["peak_working_bytes"] / pn if pn else None
    if "fused_autocast" in out and pn:
        out["fused_peak_ratio"] = out["fused_autocast"]["peak_working_bytes"] / pn
    return out


def student_steps(shape: str, device: Any, batch: int, seq: int, repeats: int, sync: Any) -> dict[str, Any]:
    """The worker's step: fp32 master weights, autocast bf16 on CUDA, the frozen copy in the master's dtype."""
    import torch
    from bench_wire import make_record

    import student_worker.train_step as ts
    from common.config import LossConfig
    from common.losses import targets_from_record

    model = build_qwen2(shape, device, torch.float32).train()
    frozen = build_qwen2(shape, device, torch.float32).eval().requires_grad_(False)
    wrap = getattr(ts, "loss_forward_module", None)  # the fused path (h-loss) where the loss has it
    student = model if wrap is None else wrap(model, LossConfig(), shape)
    base = frozen if wrap is None else wrap(frozen, LossConfig(), shape)
    vocab = QWEN2_SHAPES[shape]["vocab_size"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen, device=device)
    labels = torch.roll(ids, -1, dims=1)  # every position counted: the records cover them all
    batch_t = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    tokens = int((labels != -100).sum())
    with_base = targets_from_record(make_record(batch, seq, K, ["sft", "base", "student_base"], "bfloat16",
                                                vocab_size=vocab), device)
    without_base = targets_from_record(make_record(batch, seq, K, ["sft", "base"], "bfloat16", vocab_size=vocab),
                                       device)
    variants = {"sft": (LossConfig(method="sft"), None),
                "kd": (LossConfig(method="kd", k=K), without_base),
                "delta_kd_wire_base": (LossConfig(method="delta_kd", k=K), with_base),
                "delta_kd_frozen_base": (LossConfig(method="delta_kd", k=K), without_base)}
    autocast = device.type == "cuda"
    out: dict[str, Any] = {"shape": shape, "batch": batch, "seq": seq, "autocast_bf16": autocast,
                           "path": "logits" if wrap is None else type(student).__name__}
    for name, (cfg, targets) in variants.items():
        def step(cfg: LossConfig = cfg, targets: Any = targets) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss, _ = ts.train_step(student, base, batch_t, targets, cfg, [1.0], tokens, 1)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        secs = time_repeats(step, repeats, warmup=1, sync=sync)
        out[name] = {"seconds": summarize(secs), "tokens_per_s": batch * seq / summarize(secs)["median"]}
    sft_s = out["sft"]["seconds"]["median"]
    for name in ("kd", "delta_kd_wire_base", "delta_kd_frozen_base"):
        out[f"{name}_over_sft_time"] = out[name]["seconds"]["median"] / sft_s
    if device.type == "cuda":
        out["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


def _targets(figures: dict[str, Any], full: bool) -> list[Target]:
    why = "" if full else "toy scale (no CUDA or --scale toy): the figures check the plumbing only"

    def at_scale(value: Any) -> Any:
        return value if full else None

    t7 = (figures.get("teacher") or {}).get("qwen2-7b" if full else "tiny-teacher") or {}
    lf, sf, rf = figures.get("loss") or {}, figures.get("student") or {}, figures.get("rdt") or {}
    return [
        Target("teacher_7b_topk_tokens_per_s_over_bare_forward", at_scale(t7.get("topk_tokens_per_s_over_bare")),
               ">=", 0.9, why or "TeacherEngine.topk, every position counted, bf16"),
        Target("loss_peak_ratio_to_naive", at_scale(lf.get("peak_ratio")), "<=", 0.3,
               why or "max_memory_allocated above the inputs, production (logits input) / naive"),
        Target("loss_time_ratio_to_naive", at_scale(lf.get("time_ratio")), "<=", 1.0, why),
        Target("kd_step_over_sft_step", at_scale(sf.get("kd_over_sft_time")), "<=", 1.1, why or "0.5B student"),
        Target("delta_kd_step_over_sft_step", at_scale(sf.get("delta_kd_wire_base_over_sft_time")), "<=", 1.1,
               why or "lp_S0 on the wire; the frozen-copy variant is in figures.student"),
        Target("rdt_cuda_ipc_32k_over_in_process", at_scale(rf.get("ratio_to_in_process")), "<=", 1.05,
               why or rf.get("error") or "TeacherActor -> receiver actor over cuda_ipc, targets built there"),
    ]


def _earlier(out_dir: Any, scale: str) -> dict[str, Any]:
    """Figures of an earlier run at the same scale in out_dir/gpu_check.json (for --merge)."""
    path = out_dir / "gpu_check.json"
    if not path.is_file():
        return {}
    doc = json.loads(path.read_text())
    figures = doc.get("figures") or {}
    return figures if figures.get("scale") == scale else {}


def main(argv: list[str] | None = None) -> int:
    import torch

    p = base_parser(__doc__.splitlines()[0])
    add_ray_args(p)
    p.add_argument("--scale", choices=sorted(SCALES), default=None, help="full (default on CUDA) or toy")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    p.add_argument("--merge", action="store_true", help="keep the other parts' figures of an earlier run")
    args = p.parse_args(argv)
    parts = [x for x in args.parts.split(",") if x]
    if set(parts) - set(PARTS):
        raise BenchError(f"--parts: unknown {sorted(set(parts) - set(PARTS))}; expected a subset of {PARTS}")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    scale = args.scale or ("toy" if args.smoke or not cuda else "full")
    if scale == "full" and not cuda:
        raise BenchError("--scale full needs CUDA (7B-shaped teachers); use --scale toy on the CPU")
    s = SCALES[scale]
    sync = torch.cuda.synchronize if cuda else None
    repeats = 1 if args.smoke else args.repeats
    figures: dict[str, Any] = _earlier(args.out_dir, scale) if args.merge else {}
    figures.update({"device": str(device), "scale": scale, "scaled_down": scale != "full"})
    wall = figures.setdefault("wall_seconds", {})
    for part in parts:
        t0 = time.perf_counter()
        if part == "teacher":
            figures["teacher"] = {}
            for shape in s["teachers"]:
                figures["teacher"][shape] = teacher_throughput(shape, device, s["t_batch"], s["t_seq"], repeats, sync)
                _free(device)
        elif part == "loss":
            figures["loss"] = loss_check(device, s["l_vocab"], s["l_tokens"], s["l_hidden"], repeats, sync)
        elif part == "student":
            figures["student"] = student_steps(s["student"], device, s["s_batch"], s["s_seq"], repeats, sync)
        else:
            from gpu_check_rdt import rdt_transfer

            figures["rdt"] = rdt_transfer(QWEN2_SHAPES[s["rdt_teacher"]], s["rdt_teacher"], device, s["rdt_tokens"],
                                          s["rdt_seq"], K, repeats, args.ray_address)
        _free(device)
        wall[part] = time.perf_counter() - t0
        _report(figures, part, device)

    notes = [
        "teacher figures: TeacherEngine.from_model over a random model (no checkpoint or tokenizer on disk).",
        "loss peak memory is measured on CUDA only; on CPU see bench_loss.py (fresh subprocess, peak RSS).",
        "student steps: train_step (+ backward, clipping, AdamW step) as the worker runs it; delta_kd_wire_base "
        "takes lp_S0 from the record, delta_kd_frozen_base runs the frozen copy inside the step.",
    ]
    write_result("gpu_check", args, figures, _targets(figures, scale == "full"), notes)
    return 0


def _report(figures: dict[str, Any], part: str, device: Any) -> None:
    if part == "teacher":
        print_table(["teacher", "bare tok/s", "topk tok/s", "gather tok/s", "topk/bare tok/s", "gather/topk time"],
                    [[n, f["bare_forward"]["tokens_per_s"], f["engine_topk"]["tokens_per_s"],
                      f["engine_gather"]["tokens_per_s"], f["topk_tokens_per_s_over_bare"],
                      f["gather_over_topk_time"]] for n, f in figures["teacher"].items()],
                    title=f"teacher engine on {device}")
    elif part == "loss":
        lf = figures["loss"]
        print_table(["variant", "median s", "peak bytes"],
                    [[n, lf[n]["seconds"]["median"], lf[n]["peak_working_bytes"]]
                     for n in ("production", "naive", "fused_autocast") if n in lf],
                    title=f"delta_kd loss at V={lf['vocab']}, {lf['tokens']} tokens")
    elif part == "student":
        sf = figures["student"]
        print_table(["student step", "median s", "tokens/s", "over sft"],
                    [[n, sf[n]["seconds"]["median"], sf[n]["tokens_per_s"], sf.get(f"{n}_over_sft_time", 1.0)]
                     for n in ("sft", "kd", "delta_kd_wire_base", "delta_kd_frozen_base")],
                    title=f"student {sf['shape']} ({sf['path']})")
    else:
        rf = figures["rdt"]
        print("\n== rdt:", json.dumps({k: v for k, v in rf.items() if not isinstance(v, dict)}))
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
