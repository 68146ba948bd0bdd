"""Peak memory and speed of the loss and of one student step: fused (hidden states + head) vs logits vs naive.

Issue 13's figures at Qwen2-0.5B's shape (hidden 896, V = 151,936; a second V shows what grows with it).

Loss level (`loss_*`): N positions (1/8 of them a prompt, not counted), hidden states [N, 896] and a head
[V, 896] as trainable leaves, a k = 64 delta_kd target with roles sft, base, student_base; forward +
backward to the hidden states and the head.
- `loss_naive`: logits = hidden @ W^T for every position, then the dense formula with dense lp_T1, lp_T0,
  lp_S0 [N, V] fp32 inputs (`naive_delta_kd`);
- `loss_logits` (before): the same logits through autograd, then `distillation_loss(logits, ...)`;
- `loss_fused_c<C>` (after): `distillation_loss(HiddenStates(hidden, W), ...)` with loss.loss_chunk_rows = C.
"loss temporaries" = peak RSS during fwd + bwd minus the RSS with the inputs built, minus the gradients
the loss must return (the head's [V, H] and the hidden states' [N, H], fp32): what the loss itself adds.

Step level (`step_*`): a Qwen2-shaped model with few layers (hidden 896, intermediate 4864, 14 heads, 2 KV
heads, tied embeddings), a frozen copy as the student base (lp_S0 from the worker's copy, as the default
run does), one delta_kd step (`train_step` + backward + AdamW step) on a [B, T] batch with a quarter of
each row a prompt. `step_logits` (before) runs the causal LM (logits [B, T, V] for the student and the
base); `step_fused` (after) runs `HiddenStatesLM`. Peak RSS of the second step (the first allocates
AdamW's state) minus the RSS before the model was built; "beyond weights" subtracts the bytes that scale
with the parameter count: weights + gradients + AdamW's two moments (16 B/param) and the frozen copy
(4 B/param).

Memory method: each (variant, V) runs in a fresh subprocess; the child reads the kernel's peak resident
set size (VmHWM, reset through /proc/self/clear_refs). Timings are medians of `--repeats` passes in that
child; on a shared machine only ratios in one run mean anything. `--smoke` checks the plumbing only: one
child runs every variant at both V in turn (one interpreter start instead of ten), at the smallest shape
of the same structure (hidden 64, intermediate 128, 4 heads / 2 KV heads), so its memory figures are not
each variant's own.

    python benchmarks/bench_loss.py [--smoke] [--repeats N] [--tokens 1024] [--vocabs 75968,151936]
                                    [--chunks 256,128] [--batch 8] [--seq 128] [--layers 2] [--memory-only]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
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

__all__ = ["naive_delta_kd", "random_targets", "run_variant", "main"]

K = 64
HIDDEN = 896
# Qwen2-0.5B's block shape; the smoke's is the smallest with the same structure (grouped-query attention)
SHAPE = {"hidden_size": HIDDEN, "intermediate_size": 4864, "num_attention_heads": 14, "num_key_value_heads": 2}
SMOKE_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
LOSS_TARGET = 0.1  # fused loss temporaries <= 0.1 x the naive dense loss's


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


def random_targets(labels: Any, k: int, roles: list[str], vocab: int, seed: int = 0) -> Any:
    """SparseTargets at the positions with a label (labels [B, T]): distinct ids, descending log-probs
    leaving 5% of the mass to the tail."""
    import torch

    from common.losses import SparseTargets

    g = torch.Generator().manual_seed(seed)
    rows = (labels.reshape(-1) != -100).nonzero().squeeze(1)
    n = int(rows.numel())
    stride = max(1, vocab // (k + 1))
    ids = (torch.randint(0, vocab, (n, 1), generator=g) + torch.arange(k) * stride) % vocab
    lp, tail = {}, {}
    for role in roles:
        x = torch.sort(torch.randn(n, k, generator=g), dim=-1, descending=True).values
        x = x - torch.log(x.exp().sum(-1, keepdim=True) * 1.05)
        lp[role], tail[role] = x, (1.0 - x.exp().sum(-1)).clamp(0.0, 1.0)
    return SparseTargets(ids, lp, tail, rows, tuple(labels.shape), 1.0, vocab, "bench")


def _loss_variant(variant: str, vocab: int, tokens: int, repeats: int, hidden_size: int = HIDDEN) -> dict[str, Any]:
    import torch

    from common.config import LossConfig
    from common.losses import HiddenStates, distillation_loss

    rss0 = current_rss_bytes()
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, tokens, hidden_size, generator=gen).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, generator=gen) * (3.0 / hidden_size**0.5)).requires_grad_(True)
    labels = torch.randint(0, vocab, (1, tokens), generator=gen)
    labels[0, : tokens // 8] = -100  # a prompt: ignored positions, as in real batches
    chunk = int(variant.rsplit("_c", 1)[1]) if "_c" in variant else 256
    cfg = LossConfig(method="delta_kd", k=K, loss_chunk_rows=chunk)
    if variant == "loss_naive":
        dense = [torch.log_softmax(torch.randn(tokens, vocab, generator=gen) * 3, dim=-1) for _ in range(3)]

        def run() -> float:
            loss = naive_delta_kd(hidden[0] @ weight.T, *dense, labels[0], cfg.alpha, cfg.tau, cfg.lam)
            loss.backward()
            return float(loss.detach())
    else:
        targets = random_targets(labels, K, ["sft", "base", "student_base"], vocab)
        fused = variant.startswith("loss_fused")
        if not fused and variant != "loss_logits":
            raise BenchError(f"unknown loss variant {variant!r}")

        def run() -> float:
            student = HiddenStates(hidden, weight) if fused else hidden @ weight.T
            out = distillation_loss(student, targets, labels, cfg, [cfg.alpha])
            out.loss_sum.backward()
            return float(out.loss_sum.detach())

    def step() -> float:
        hidden.grad = weight.grad = None
        return run()

    rss_inputs = current_rss_bytes()
    value = step()  # warm-up (first-touch page faults, lazy init)
    hidden.grad = weight.grad = None
    reset_peak_rss()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = peak_rss_bytes()
    grads_bytes = 4 * (vocab * hidden_size + tokens * hidden_size)
    return {"variant": variant, "vocab": vocab, "tokens": tokens, "counted": int((labels != -100).sum()),
            "chunk_tokens": chunk, "loss_sum": value, "seconds": summarize(times),
            "tokens_per_s": tokens / summarize(times)["median"],
            "peak_working_bytes": peak - rss_inputs, "inputs_bytes": rss_inputs - rss0,
            "grads_bytes": grads_bytes, "temporaries_bytes": peak - rss_inputs - grads_bytes}


def _qwen2_like(vocab: int, layers: int, shape: dict[str, int] = SHAPE) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab, num_hidden_layers=layers, tie_word_embeddings=True,
                      max_position_embeddings=4096, **shape)
    return Qwen2ForCausalLM(cfg)


def _step_variant(variant: str, vocab: int, batch: int, seq: int, layers: int, repeats: int,
                  shape: dict[str, int] = SHAPE) -> dict[str, Any]:
    import torch

    from common.config import LossConfig
    from student_worker.train_step import HiddenStatesLM, train_step

    if variant not in ("step_logits", "step_fused"):
        raise BenchError(f"unknown step variant {variant!r}")
    rss0 = current_rss_bytes()
    torch.manual_seed(0)
    model = _qwen2_like(vocab, layers, shape).train()
    frozen = _qwen2_like(vocab, layers, shape).eval().requires_grad_(False)
    frozen.load_state_dict(model.state_dict())
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, : seq // 4] = -100  # the prompt
    labels[:, -1] = -100
    batch_t = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    targets = random_targets(labels, K, ["sft", "base"], vocab)
    tokens = int(targets.rows.numel())
    student, base = (HiddenStatesLM(model), HiddenStatesLM(frozen)) if variant == "step_fused" else (model, frozen)
    cfg = LossConfig(method="delta_kd", k=K)

    def step() -> None:
        loss, _ = train_step(student, base, batch_t, targets, cfg, [1.0], tokens, 1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # allocates AdamW's state
    reset_peak_rss()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = peak_rss_bytes() - rss0
    weights = n_params * (4 + 4 + 8) + n_params * 4  # weights, grads, AdamW moments; the frozen copy
    return {"variant": variant, "vocab": vocab, "batch": batch, "seq": seq, "layers": layers,
            "counted": tokens, "params": n_params, "seconds": summarize(times),
            "tokens_per_s": batch * seq / summarize(times)["median"], "peak_total_bytes": peak,
            "weights_bytes": weights, "peak_beyond_weights_bytes": peak - weights}


def run_variant(variant: str, vocab: int, args: Any) -> dict[str, Any]:
    shape = SMOKE_SHAPE if args.smoke else SHAPE  # the child gets --smoke from a smoke run
    if variant.startswith("loss_"):
        return _loss_variant(variant, vocab, args.tokens, args.repeats, shape["hidden_size"])
    return _step_variant(variant, vocab, args.batch, args.seq, args.layers, args.repeats, shape)


def _child(variants: list[str], vocabs: list[int], args: Any, repeats: int) -> dict[str, dict[str, Any]]:
    """{str(V): {variant: figures}} from one interpreter running `variants` at each of `vocabs` in turn.

    A full run asks for one variant at one V per child: its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--variant", ",".join(variants), "--vocab", ",".join(map(str, vocabs)),
           "--tokens", str(args.tokens), "--repeats", str(repeats), "--batch", str(args.batch),
           "--seq", str(args.seq), "--layers", str(args.layers)] + (["--smoke"] if args.smoke else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise BenchError(f"bench_loss child {variants} V={vocabs} failed (rc {proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024, help="positions of the loss-level variants")
    p.add_argument("--vocabs", default="75968,151936", help="comma-separated vocabulary sizes")
    p.add_argument("--chunks", default="256,128", help="loss.loss_chunk_rows of the fused loss variants")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--memory-only", action="store_true",
                   help="leave timings out of the result (memory does not depend on the machine's load)")
    p.add_argument("--variant", help="internal: run these variants (comma-separated) in this process, print JSON")
    p.add_argument("--vocab", help="internal: the vocabularies of --variant (comma-separated)")
    args = p.parse_args(argv)
    if args.variant:
        print(json.dumps({str(vocab): {v: run_variant(v, vocab, args) for v in args.variant.split(",")}
                          for vocab in (int(x) for x in args.vocab.split(","))}))
        return 0
    repeats = 1 if args.smoke else args.repeats
    if args.smoke:
        args.tokens, args.batch, args.seq, args.layers = 64, 2, 16, 1
    vocabs = [2000, 4000] if args.smoke else [int(v) for v in args.vocabs.split(",")]
    chunks = [int(c) for c in args.chunks.split(",")][: 1 if args.smoke else None]  # smoke: plumbing only
    variants = ["loss_naive", "loss_logits"] + [f"loss_fused_c{c}" for c in chunks] + ["step_logits", "step_fused"]
    per_vocab: dict[str, dict[str, Any]] = {}
    rows = []
    smoke_res = _child(variants, vocabs, args, repeats) if args.smoke else {}  # plumbing only: all in one child
    for vocab in vocabs:
        if args.smoke:
            res = smoke_res[str(vocab)]
        else:
            res = {v: _child([v], [vocab], args, repeats)[str(vocab)][v] for v in variants}
        naive = res["loss_naive"]["temporaries_bytes"]
        res["ratios"] = {
            **{f"{v}_temporaries_over_naive": res[v]["temporaries_bytes"] / naive for v in variants
               if v.startswith("loss_") and v != "loss_naive"},
            "step_fused_over_logits_peak": res["step_fused"]["peak_total_bytes"] / res["step_logits"]["peak_total_bytes"],
            "step_fused_over_logits_tokens_per_s": res["step_fused"]["tokens_per_s"] / res["step_logits"]["tokens_per_s"],
            "loss_fused_over_logits_tokens_per_s": (res[f"loss_fused_c{chunks[0]}"]["tokens_per_s"]
                                                    / res["loss_logits"]["tokens_per_s"]),
        }
        per_vocab[str(vocab)] = res
        for v in variants:
            r = res[v]
            mem = r["temporaries_bytes"] if v.startswith("loss_") else r["peak_total_bytes"]
            extra = "" if v.startswith("loss_") else r["peak_beyond_weights_bytes"] / 2**20
            rows.append([vocab, v, r["seconds"]["median"], r["tokens_per_s"], mem / 2**20, extra])
    print_table(["V", "variant", "s (median)", "tokens/s", "MiB: loss temporaries | step peak", "step beyond weights MiB"],
                rows, title=f"delta_kd k={K}: loss at {args.tokens} positions; step B={args.batch} T={args.seq} "
                f"layers={args.layers}")
    small, big = (per_vocab[str(v)] for v in (min(vocabs), max(vocabs)))
    growth = {v: big[v]["peak_beyond_weights_bytes"] - small[v]["peak_beyond_weights_bytes"]
              for v in ("step_logits", "step_fused")}
    figures = {"tokens": args.tokens, "k": K, "hidden": (SMOKE_SHAPE if args.smoke else SHAPE)["hidden_size"],
               "per_vocab": per_vocab,
               "step_growth_beyond_weights_bytes": growth, "vocabs": vocabs}
    bv = str(max(vocabs))
    targets = [Target(f"loss_fused_c{c}_temporaries_over_naive_V{bv}",
                      per_vocab[bv]["ratios"][f"loss_fused_c{c}_temporaries_over_naive"], "<=", LOSS_TARGET,
                      "the fused loss's temporaries vs the naive dense loss's, same positions") for c in chunks]
    if args.memory_only:  # drop every timing: figures measured on a loaded machine are not trusted
        for res in per_vocab.values():
            for key in [k for k in res["ratios"] if "tokens_per_s" in k]:
                del res["ratios"][key]
            for v in variants:
                for key in ("seconds", "tokens_per_s"):
                    res[v].pop(key, None)
    else:
        targets.append(Target(f"step_fused_tokens_per_s_over_logits_V{bv}",
                              per_vocab[bv]["ratios"]["step_fused_over_logits_tokens_per_s"], ">=", 1.0,
                              "tokens/s not worse (timing: only a quiet machine's figure counts)"))
    notes = [
        "each (variant, V) is a fresh subprocess; memory = peak RSS (VmHWM reset via /proc/self/clear_refs).",
        "loss temporaries = peak during fwd+bwd - RSS with inputs built - the returned gradients (head [V, H] "
        "and hidden [N, H], fp32). naive inputs: dense lp_T1, lp_T0, lp_S0 [N, V]; the others: a k=64 target.",
        "step: Qwen2-shaped (hidden 896, intermediate 4864, 14/2 heads, tied embeddings), frozen copy as the "
        "student base, delta_kd, AdamW; the second step is measured. beyond weights = peak - 20 B/param.",
    ] + (["--memory-only: timings left out (measured on a loaded machine)."] if args.memory_only else []) + (
        ["--smoke: every variant of both V ran in one child at hidden 64 (intermediate 128, 4/2 heads), so the "
         "memory figures are not each variant's own."]
        if args.smoke else [])
    write_result("bench_loss", args, figures, targets, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
