"""The production sparse `delta_kd` loss against a naive dense reference: time and peak memory.

Figure 4 of the benchmarks issue. N tokens (2,048), vocabularies V = 32,000 and 152,064, forward +
backward into the student logits `[1, N, V]` fp32.

- production: `common.losses.distillation_loss(logits, targets_from_record(record), labels, cfg)` with a
  k = 64 record holding roles sft, base, student_base (what the student worker sees on the wire).
- naive: the dense formula over the full vocabulary, with dense lp_T1, lp_T0, lp_S0 `[N, V]` fp32:

      target = softmax(lp_S0 + alpha * (lp_T1 - lp_T0))          (detached)
      L = lam * CE + (1 - lam) * tau^2 * sum_t KL(target_t || softmax(s_t / tau))

Memory method: each (variant, V) runs in a fresh subprocess (`--variant`), so one variant's freed pages
never hide in another's figure. torch's CPU allocations are invisible to tracemalloc, so the child reads
the kernel's peak resident set size (VmHWM), reset through /proc/self/clear_refs:
`total` = peak during fwd+bwd minus the RSS before any input was built (inputs each method needs +
working memory); `working` = peak minus the RSS with inputs built (what the loss itself adds, the logits'
gradient included). The target uses `total`; both are in the JSON. On CUDA the same split would use
torch.cuda.max_memory_allocated (see gpu_check.py).

    python benchmarks/bench_loss.py [--smoke] [--repeats N] [--tokens N] [--vocabs 32000,152064]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    BenchError,
    Target,
    base_parser,
    current_rss_bytes,
    peak_rss_bytes,
    print_table,
    reset_peak_rss,
    summarize,
    write_result,
)

__all__ = ["naive_delta_kd", "run_variant", "main"]

K = 64
MEM_TARGET = 0.3  # production total peak <= 0.3 x naive
TIME_TARGET = 1.0  # and no slower


def naive_delta_kd(student_logits: Any, lp_t1: Any, lp_t0: Any, lp_s0: Any, labels: Any, alpha: float = 1.0,
                   tau: float = 1.0, lam: float = 0.0) -> Any:
    """Dense delta_kd summed over counted tokens.

    student_logits [N, V] (requires grad); lp_* [N, V] fp32 log-probs at temperature tau; labels [N]
    (-100 = ignored). Returns the scalar loss sum (the caller divides by the token count).
    """
    import torch
    import torch.nn.functional as F

    mask = labels != -100
    with torch.no_grad():
        target = torch.softmax(lp_s0 + alpha * (lp_t1 - lp_t0), dim=-1)
        log_target = torch.log_softmax(lp_s0 + alpha * (lp_t1 - lp_t0), dim=-1)
    lp_s = torch.log_softmax(student_logits.float() / tau, dim=-1)
    kl = (target * (log_target - lp_s)).sum(-1)
    loss = (1 - lam) * tau**2 * (kl * mask).sum()
    if lam > 0:
        ce = F.cross_entropy(student_logits.float(), labels.clamp_min(0), reduction="none")
        loss = loss + lam * (ce * mask).sum()
    return loss


def _mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise BenchError("/proc/meminfo has no MemAvailable line")


def run_variant(variant: str, vocab: int, tokens: int, repeats: int) -> dict[str, Any]:
    """Build one variant's inputs, then time `repeats` forward+backward passes and read the peak RSS."""
    import torch

    from common.config import LossConfig

    rss0 = current_rss_bytes()
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(1, tokens, vocab, generator=gen) * 3).requires_grad_(True)
    labels = torch.randint(0, vocab, (1, tokens), generator=gen)
    labels[0, : tokens // 8] = -100  # a prompt: ignored positions, as in real batches
    cfg = LossConfig(method="delta_kd", k=K)
    if variant.startswith("production_c"):  # production with another loss.chunk_tokens
        cfg = LossConfig(method="delta_kd", k=K, chunk_tokens=int(variant.removeprefix("production_c")))

    if variant.startswith("production"):
        from bench_wire import make_record

        from common.losses import distillation_loss, targets_from_record

        record = make_record(1, tokens, K, ["sft", "base", "student_base"], "float32", vocab_size=vocab)
        targets = targets_from_record(record, torch.device("cpu"))

        def step() -> float:
            logits.grad = None
            out = distillation_loss(logits, targets, labels, cfg, [cfg.alpha])
            out.loss_sum.backward()
            return float(out.loss_sum)
    elif variant == "naive":
        dense = [torch.log_softmax(torch.randn(tokens, vocab, generator=gen) * 3, dim=-1) for _ in range(3)]
        flat_logits, flat_labels = logits.view(tokens, vocab), labels.view(tokens)

        def step() -> float:
            logits.grad = None
            loss = naive_delta_kd(flat_logits, *dense, flat_labels, cfg.alpha, cfg.tau, cfg.lam)
            loss.backward()
            return float(loss.detach())
    else:
        raise BenchError(f"unknown variant {variant!r}; expected 'production', 'production_c<N>' or 'naive'")

    rss_inputs = current_rss_bytes()
    value = step()  # warm-up (first-touch page faults, lazy init)
    logits.grad = None
    reset_peak_rss()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = peak_rss_bytes()
    return {"variant": variant, "vocab": vocab, "tokens": tokens, "chunk_tokens": cfg.chunk_tokens,
            "loss_sum": value, "seconds": summarize(times),
            "peak_total_bytes": peak - rss0, "peak_working_bytes": peak - rss_inputs,
            "inputs_bytes": rss_inputs - rss0}


def _child(variant: str, vocab: int, tokens: int, repeats: int) -> dict[str, Any]:
    # Each variant in its own interpreter: its peak RSS is its own.
    cmd = [sys.executable, __file__, "--variant", variant, "--vocab", str(vocab), "--tokens", str(tokens),
           "--repeats", str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise BenchError(f"bench_loss child {variant} V={vocab} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _merge(children: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's figures over its child processes: times pooled, memory as the median peak."""
    out = dict(children[0])
    out["seconds"] = summarize([c["seconds"]["median"] for c in children])
    for key in ("peak_total_bytes", "peak_working_bytes", "inputs_bytes"):
        out[key] = sorted(c[key] for c in children)[len(children) // 2]
        out[key + "_all"] = [c[key] for c in children]
    return out


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vocabs", default="32000,152064", help="comma-separated vocabulary sizes")
    p.add_argument("--variant", help="internal: run one variant (production, production_c<N>, naive), print JSON")
    p.add_argument("--alt-chunk", type=int, default=256,
                   help="also measure production with this loss.chunk_tokens (0: skip)")
    p.add_argument("--vocab", type=int, help="internal: the vocabulary of --variant")
    args = p.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.vocab, args.tokens, args.repeats)))
        return 0

    repeats = 1 if args.smoke else args.repeats
    tokens = 64 if args.smoke else args.tokens
    vocabs = [2000] if args.smoke else [int(v) for v in args.vocabs.split(",")]
    rows, per_vocab = [], {}
    for vocab in vocabs:
        # The naive variant holds ~9 dense [N, V] fp32 blocks; refuse rather than push a shared box into OOM.
        need = 10 * tokens * vocab * 4
        if _mem_available_bytes() < need:
            raise BenchError(f"bench_loss V={vocab}: naive variant needs ~{need / 2**30:.1f} GiB, only "
                             f"{_mem_available_bytes() / 2**30:.1f} GiB available; lower --tokens")
        alt = 0 if args.smoke else args.alt_chunk  # the smoke test only checks the plumbing
        variants = ["production", "naive"] + ([f"production_c{alt}"] if alt else [])
        # One timed pass per child, variants alternating within each repeat: a burst of load from other
        # processes on a shared machine then hits every variant alike.
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for _ in range(repeats):
            for v in variants:
                runs[v].append(_child(v, vocab, tokens, 1))
        res = {v: _merge(rs) for v, rs in runs.items()}
        prod, naive = res["production"], res["naive"]
        per_vocab[str(vocab)] = {
            **res,
            "time_ratio": prod["seconds"]["median"] / naive["seconds"]["median"],
            "peak_total_ratio": prod["peak_total_bytes"] / naive["peak_total_bytes"],
            "peak_working_ratio": prod["peak_working_bytes"] / naive["peak_working_bytes"],
        }
        if alt:
            fig = res[f"production_c{alt}"]
            per_vocab[str(vocab)]["alt_chunk"] = {
                "chunk_tokens": alt,
                "time_ratio": fig["seconds"]["median"] / naive["seconds"]["median"],
                "peak_total_ratio": fig["peak_total_bytes"] / naive["peak_total_bytes"],
                "peak_working_ratio": fig["peak_working_bytes"] / naive["peak_working_bytes"]}
        for v in res.values():
            rows.append([vocab, v["variant"], v["seconds"]["median"], v["peak_total_bytes"] / 2**20,
                         v["peak_working_bytes"] / 2**20])
    print_table(["V", "variant", "s fwd+bwd (median)", "peak total MiB", "peak working MiB"], rows,
                title=f"delta_kd loss, {tokens} tokens, k={K}")
    ratio_rows = [[v, "default", f["time_ratio"], f["peak_total_ratio"], f["peak_working_ratio"]]
                  for v, f in per_vocab.items()]
    ratio_rows += [[v, f"chunk {f['alt_chunk']['chunk_tokens']}", f["alt_chunk"]["time_ratio"],
                    f["alt_chunk"]["peak_total_ratio"], f["alt_chunk"]["peak_working_ratio"]]
                   for v, f in per_vocab.items() if "alt_chunk" in f]
    print_table(["V", "production", "time ratio", "peak total ratio", "peak working ratio"], ratio_rows,
                title="production / naive")
    big = per_vocab[str(max(vocabs))]
    targets = [
        Target(f"peak_memory_ratio_V{max(vocabs)}", big["peak_total_ratio"], "<=", MEM_TARGET,
               "peak RSS incl. the inputs each method needs, production / naive"),
        Target(f"time_ratio_V{max(vocabs)}", big["time_ratio"], "<=", TIME_TARGET, "median fwd+bwd, production / naive"),
    ]
    for vocab in vocabs[:-1]:
        f = per_vocab[str(vocab)]
        targets += [Target(f"peak_memory_ratio_V{vocab}", f["peak_total_ratio"], "<=", MEM_TARGET),
                    Target(f"time_ratio_V{vocab}", f["time_ratio"], "<=", TIME_TARGET)]
    notes = [
        "each (variant, V, repeat) is a fresh subprocess with one warm-up and one timed fwd+bwd; variants "
        "alternate within each repeat. production_c<N>: the same loss with loss.chunk_tokens=N.",
        "memory: fresh subprocess per variant; peak RSS (VmHWM, reset via /proc/self/clear_refs) during the "
        "timed fwd+bwd passes. total = peak - RSS before inputs; working = peak - RSS with inputs built.",
        f"production inputs: a k={K} fp32-wire record with roles sft, base, student_base; naive inputs: dense "
        "lp_T1, lp_T0, lp_S0 [N, V] fp32. Both: student logits [1, N, V] fp32 leaf, 1/8 of labels -100.",
        "loss config: LossConfig(method='delta_kd', k=64) defaults (alpha 1, tau 1, lam 0, tail bucket).",
    ]
    write_result("bench_loss", args, {"tokens": tokens, "k": K, "per_vocab": per_vocab}, targets, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
