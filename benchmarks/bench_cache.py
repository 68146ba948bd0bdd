"""The teacher cache's encodings (bytes vs gradient error), codec and read throughput, batch invariance.

Issue 14, first part. Figures:

1. `encodings`: per `common.codec` preset, encoded bytes per counted token at k = 64, V = 152,064 for the
   roles kd and delta_kd read (sft, base; also with student_base), against a dense bf16 row (2 V bytes).
   Goal: <= 1/1000 of that row (304 B/token) with the logit gradient within 0.5% of the fp32 wire's.
2. `accuracy`: bench_wire's accuracy method: random teacher log-probs (log_softmax of N(0, 4^2) logits),
   one record built at fp32 (`TopKRecord.from_dense`), the same numbers encoded and decoded per preset,
   the loss (`common.losses.distillation_loss` with logits, tail bucket) and its logit gradient compared
   with the fp32 record's: relative error of loss_sum and of the gradient (norm of the difference over
   the norm), max over seeds. kd; delta_kd with lp_S0 at fp32 (the worker's frozen copy); delta_kd with
   student_base encoded too (a cache holding it). `accuracy_correlated`: the same with a base teacher
   whose logits are the SFT teacher's plus N(0, 1) noise (a pair closer to a real SFT/base pair).
3. `codec`: encode / decode tokens per second per preset (one process, 2 roles, k = 64, V = 152,064).
4. `read`: a local Parquet cache of synthetic examples: file bytes per token; tokens per second per reader
   streaming every shard (read + sha256 + decode) and assembling shuffled batches of 8 examples (shards
   kept encoded in memory, each batch decodes its own examples).
5. `batch_invariance`: a random-initialised Llama (tests/tiny.py sizes and the embedded teacher's shape),
   fp32 on this CPU: are an example's log-probs bitwise equal when scored alone vs inside a right-padded
   batch, and is the LM head over a set of rows equal to the LM head over each row alone?

Issue 14, second part (Ray; benchmarks/_cache_runs.py, on the tiny default's embedded models):

6. `pipeline.build` vs `pipeline.live_pool`: cache build tokens/s (the Ray Data pipeline) vs the live teacher
   pool's tokens/s over the same batches and teachers; bytes per counted token on disk per encoding.
7. `pipeline.train`: delta_kd steps/s from the cache (with and without student_base cached) over sft steps/s
   of the same budget (goal >= 0.9 with student_base cached); `pipeline.read_per_rank`: feeder rows/s.

    python benchmarks/bench_cache.py [--smoke] [--repeats N] [--steps N] [--ray-address ADDR] [--no-pipeline]
                                     [--models-dir D] [--teachers-namespace NS]
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    Target,
    add_ray_args,
    base_parser,
    print_table,
    ray_session,
    summarize,
    time_repeats,
    write_result,
)
from bench_e2e import add_models_dir_arg, add_teachers_namespace_arg

from common.codec import DEFAULT_ENCODING, ENCODINGS, decode_rows, encode_rows

__all__ = ["encode_record", "accuracy", "main"]

QWEN2_VOCAB = 152_064
K = 64
DENSE_BF16 = 2 * QWEN2_VOCAB
SIZE_GOAL = DENSE_BF16 / 1000
GRAD_GOAL = 0.005


def encode_record(rec: Any, encoding: str, roles: list[str]) -> Any:
    """The record with `roles` encoded and decoded by `encoding` (other roles and ids untouched).

    Works for the [B, T, k] record of main and for the rows form: arrays are flattened to [N, K] and back.
    """
    kk = rec.ids.shape[-1]
    ids = rec.ids.reshape(-1, kk)
    lps = {r: np.asarray(rec.logprobs[r], dtype=np.float32).reshape(-1, kk) for r in roles}
    tails = {r: np.asarray(rec.tail[r], dtype=np.float32).reshape(-1) for r in roles}
    dec = decode_rows(encode_rows(ids, lps, tails, rec.vocab_size, encoding), ids.shape[0], kk, roles,
                      rec.vocab_size, encoding)
    lp = dict(rec.logprobs)
    tl = dict(rec.tail)
    for r in roles:
        lp[r] = dec.logprobs[r].reshape(rec.logprobs[r].shape)
        tl[r] = dec.tail[r].reshape(rec.tail[r].shape)
    return dataclasses.replace(rec, logprobs=lp, tail=tl)


def accuracy(vocab: int, tokens: int, seeds: int, base_noise: float | None = None) -> list[dict[str, Any]]:
    """Loss and logit-gradient error of each preset vs the fp32 record (module docstring, figure 2)."""
    import torch

    from common.config import LossConfig
    from common.losses import distillation_loss, targets_from_record
    from common.topk import TopKRecord

    cases = {"kd": ("kd", ["sft", "base"]), "delta_kd": ("delta_kd", ["sft", "base"]),
             "delta_kd_s0_cached": ("delta_kd", ["sft", "base", "student_base"])}
    errs: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        sft = torch.randn(1, tokens, vocab, generator=g) * 4
        base = sft + torch.randn(1, tokens, vocab, generator=g) * base_noise if base_noise else \
            torch.randn(1, tokens, vocab, generator=g) * 4
        s0 = torch.randn(1, tokens, vocab, generator=g) * 4
        dense = {r: torch.log_softmax(x, -1).numpy() for r, x in (("sft", sft), ("base", base), ("student_base", s0))}
        z0 = torch.randn(1, tokens, vocab, generator=g) * 4
        labels = torch.randint(0, vocab, (1, tokens), generator=g)
        rec = TopKRecord.from_dense(seed, dense, K, wire_dtype="float32")
        for name in ENCODINGS:  # how far decoding moves each role's mass (support + tail)
            dec = encode_record(rec, name, ["sft", "base", "student_base"])
            drift = max(float(np.abs(np.exp(dec.logprobs[r].astype(np.float64)).sum(-1)
                                     - np.exp(rec.logprobs[r].astype(np.float64)).sum(-1)).max())
                        for r in ("sft", "base", "student_base"))
            errs.setdefault(("mass_drift", name), []).append((drift, drift))
        for case, (method, roles) in cases.items():
            cfg = LossConfig(method=method, k=K)

            def run(r: Any, cfg: Any = cfg, z0: Any = z0, labels: Any = labels) -> tuple[float, Any]:
                z = z0.clone().requires_grad_(True)
                out = distillation_loss(z, targets_from_record(r, torch.device("cpu")), labels, cfg)
                out.loss_sum.backward()
                return float(out.loss_sum.detach()), z.grad

            ref_loss, ref_grad = run(rec)
            for name in ENCODINGS:
                loss, grad = run(encode_record(rec, name, roles))
                errs.setdefault((case, name), []).append(
                    (abs(loss - ref_loss) / abs(ref_loss), float((grad - ref_grad).norm() / ref_grad.norm())))
    return [{"case": case, "encoding": name, "loss_rel_err": max(e[0] for e in v),
             "grad_rel_err": max(e[1] for e in v)} if case != "mass_drift" else
            {"case": case, "encoding": name, "max_abs_mass_change": max(e[0] for e in v)}
            for (case, name), v in errs.items()]


def size_table() -> list[dict[str, Any]]:
    rows = []
    for name, enc in ENCODINGS.items():
        two = enc.bytes_per_token(K, QWEN2_VOCAB, ["sft", "base"])
        three = enc.bytes_per_token(K, QWEN2_VOCAB, ["sft", "base", "student_base"])
        rows.append({"encoding": name, "storage": enc.describe(["sft", "base", "student_base"]),
                     "lossless": enc.lossless, "bytes_per_token_2roles": two, "bytes_per_token_3roles": three,
                     "one_in_2roles": DENSE_BF16 / two, "one_in_3roles": DENSE_BF16 / three})
    return rows


def _payload(n: int, vocab: int, roles: list[str], seed: int = 0) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    rng = np.random.default_rng(seed)
    ids = (rng.integers(0, vocab, size=(n, 1)) + np.arange(K) * (vocab // (K + 1))) % vocab
    lps, tails = {}, {}
    for r in roles:
        x = rng.normal(size=(n, K)) * 4
        lps[r] = (x - np.log(np.exp(x).sum(-1, keepdims=True) * 1.05)).astype(np.float32)
        tails[r] = np.full(n, 0.05, dtype=np.float32)
    return ids.astype(np.int32), lps, tails


def codec_throughput(n: int, repeats: int) -> dict[str, Any]:
    roles = ["sft", "base"]
    ids, lps, tails = _payload(n, QWEN2_VOCAB, roles)
    out = {}
    for name in ENCODINGS:
        blobs = encode_rows(ids, lps, tails, QWEN2_VOCAB, name)
        enc_t = time_repeats(lambda name=name: encode_rows(ids, lps, tails, QWEN2_VOCAB, name), repeats)
        dec_t = time_repeats(lambda name=name, blobs=blobs: decode_rows(blobs, n, K, roles, QWEN2_VOCAB, name),
                             repeats)
        out[name] = {"rows": n, "encode_tokens_per_s": summarize([n / t for t in enc_t]),
                     "decode_tokens_per_s": summarize([n / t for t in dec_t])}
    return out


def read_throughput(num_examples: int, shard_size: int, encoding: str, repeats: int) -> dict[str, Any]:
    """Build a synthetic local cache, then time one reader streaming it and assembling batches."""
    from teacher_service.cache import BuildHead, CacheReader, CacheWriter, ExampleRecord

    roles = ["sft", "base"]
    rng = np.random.default_rng(1)
    lengths = rng.integers(64, 256, size=num_examples)
    root = tempfile.mkdtemp(prefix="bench-cache-", dir="/tmp")
    try:
        head = BuildHead({"encoding": encoding, "k": K}, {r: {"path": r, "revision": None, "fingerprint": r}
                                                         for r in roles}, encoding, K, QWEN2_VOCAB,
                         num_examples, shard_size)
        w = CacheWriter.open(root, head)
        t0 = time.perf_counter()
        tokens = 0
        for spec in w.pending():
            exs = []
            for e in range(spec.start, spec.end):
                n = int(lengths[e]) // 2  # a response of half the example
                ids, lps, tails = _payload(n, QWEN2_VOCAB, roles, seed=e)
                exs.append(ExampleRecord(e, int(lengths[e]), np.arange(int(lengths[e]) - n - 1, int(lengths[e]) - 1,
                                                                       dtype=np.int32), ids, lps, tails))
                tokens += n
            w.write(spec, exs)
        manifest = w.finalize()
        write_s = time.perf_counter() - t0

        def stream() -> None:
            reader = CacheReader(root)
            for _ in reader.iter_shards(prefetch=1):
                pass

        order = np.random.default_rng(2).permutation(num_examples)
        batches = [order[i: i + 8].tolist() for i in range(0, num_examples - 7, 8)]

        def batched() -> None:
            reader = CacheReader(root, max_bytes_in_memory=2 * manifest.num_bytes)  # every shard, kept encoded
            for i, b in enumerate(batches):
                reader.batch(b, int(lengths[b].max()), i)

        stream_t = time_repeats(stream, repeats)
        batch_t = time_repeats(batched, repeats)
        return {"encoding": encoding, "examples": num_examples, "tokens": tokens, "shards": len(manifest.shards),
                "file_bytes_per_token": manifest.num_bytes / tokens, "write_tokens_per_s": tokens / write_s,
                "stream_tokens_per_s": summarize([tokens / t for t in stream_t]),
                "shuffled_batches_tokens_per_s": summarize([tokens / t for t in batch_t])}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def batch_invariance(shapes: dict[str, dict[str, int]], seq_lens: list[int]) -> dict[str, Any]:
    """Example alone vs in a padded batch, and LM head per row vs over many rows (module docstring, 5)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out: dict[str, Any] = {}
    for name, shape in shapes.items():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=2 * shape["hidden"],
                          num_hidden_layers=shape["layers"], num_attention_heads=4, num_key_value_heads=4,
                          max_position_embeddings=1024, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg).eval()
        gen = torch.Generator().manual_seed(1)
        ids = [torch.randint(0, shape["vocab"], (n,), generator=gen) for n in seq_lens]
        bsz, seq = len(ids), max(seq_lens)
        batch = torch.zeros(bsz, seq, dtype=torch.long)
        mask = torch.zeros(bsz, seq, dtype=torch.long)
        for b, x in enumerate(ids):
            batch[b, : x.numel()], mask[b, : x.numel()] = x, 1
        with torch.inference_mode():
            hb = model.model(input_ids=batch, attention_mask=mask).last_hidden_state
            lp_batch = torch.log_softmax(model.lm_head(hb).float(), -1)
            lp_batch2 = torch.log_softmax(model.lm_head(model.model(input_ids=batch, attention_mask=mask)
                                                        .last_hidden_state).float(), -1)
            rows = mask.bool()
            head_all = model.lm_head(hb[rows])
            head_one = torch.cat([model.lm_head(h[None]) for h in hb[rows]])
            res = []
            for b, x in enumerate(ids):
                n = x.numel()
                alone = torch.log_softmax(model(input_ids=x[None]).logits.float(), -1)[0]
                # the same example alone but right-padded to the batch's T: separates padding from batch size
                padded = torch.log_softmax(model(input_ids=batch[b: b + 1], attention_mask=mask[b: b + 1])
                                           .logits.float(), -1)[0, :n]
                diff = (alone - lp_batch[b, :n]).abs()
                dpad = (padded - lp_batch[b, :n]).abs()
                res.append({"len": n, "bitwise_equal_frac": float((diff == 0).float().mean()),
                            "max_abs_diff": float(diff.max()),
                            "padded_alone_vs_batch_bitwise_equal_frac": float((dpad == 0).float().mean()),
                            "padded_alone_vs_batch_max_abs_diff": float(dpad.max())})
        out[name] = {"shape": shape, "seq_lens": seq_lens, "alone_vs_batch": res,
                     "same_batch_twice_bitwise": bool(torch.equal(lp_batch, lp_batch2)),
                     "lm_head_rows_together_vs_alone_bitwise": bool(torch.equal(head_all, head_one)),
                     "lm_head_rows_max_abs_diff": float((head_all - head_one).abs().max())}
    return out


def main(argv: list[str] | None = None, warm: Any = None) -> int:
    """The script (module docstring). warm: an in-process caller's WarmRanks (student_worker/worker_group.py)
    that the training runs of part 7 take their student ranks from (the smoke suite shares one between its
    smokes); None: the runs share ranks of their own."""
    p = base_parser(__doc__.splitlines()[0])
    add_ray_args(p)
    add_models_dir_arg(p)
    add_teachers_namespace_arg(p)
    p.add_argument("--steps", type=int, default=40, help="training.max_steps of each training run (part 7)")
    p.add_argument("--no-pipeline", action="store_true", help="skip the Ray part (6, 7)")
    args = p.parse_args(argv)
    smoke = args.smoke
    repeats = 1 if smoke else args.repeats
    import torch

    torch.set_num_threads(1)

    sizes = size_table()
    vocab, tokens, seeds = (512, 16, 1) if smoke else (32_000, 256, 3)
    acc = accuracy(vocab, tokens, seeds)
    acc_corr = accuracy(vocab, tokens, seeds, base_noise=1.0)
    by = {(r["case"], r["encoding"]): r for r in acc}
    by_corr = {(r["case"], r["encoding"]): r for r in acc_corr}
    print_table(["encoding", "storage", "B/tok 2 roles", "1 in", "B/tok +S0", "kd grad err", "dkd grad err",
                 "dkd(S0 cached)", "dkd corr. pair", "max mass drift"],
                [[s["encoding"], ", ".join(f"{r}:{v}" for r, v in s["storage"].items()), s["bytes_per_token_2roles"],
                  s["one_in_2roles"], s["bytes_per_token_3roles"], by[("kd", s["encoding"])]["grad_rel_err"],
                  by[("delta_kd", s["encoding"])]["grad_rel_err"],
                  by[("delta_kd_s0_cached", s["encoding"])]["grad_rel_err"],
                  by_corr[("delta_kd", s["encoding"])]["grad_rel_err"],
                  by[("mass_drift", s["encoding"])]["max_abs_mass_change"]] for s in sizes],
                title=f"encodings at k={K}, V={QWEN2_VOCAB} (dense bf16 row {DENSE_BF16} B); gradient error vs fp32 "
                      f"(V={vocab}, {tokens} tokens, max over {seeds} seeds)")

    codec = codec_throughput(256 if smoke else 8192, repeats)
    print_table(["encoding", "encode tok/s (median)", "decode tok/s (median)"],
                [[n, f["encode_tokens_per_s"]["median"], f["decode_tokens_per_s"]["median"]] for n, f in codec.items()],
                title="codec throughput, one process, 2 roles")

    read = {enc: read_throughput(40 if smoke else 2000, 16 if smoke else 250, enc, repeats)
            for enc in (DEFAULT_ENCODING, "fp32")}
    print_table(["encoding", "tokens", "file B/tok", "stream tok/s", "shuffled batches tok/s"],
                [[e, f["tokens"], f["file_bytes_per_token"], f["stream_tokens_per_s"]["median"],
                  f["shuffled_batches_tokens_per_s"]["median"]] for e, f in read.items()],
                title="local Parquet cache, one reader (read + sha256 + decode)")

    shapes = {"tiny_test_llama": {"hidden": 32, "layers": 2, "vocab": 96},
              "embedded_teacher_shape": {"hidden": 128, "layers": 4, "vocab": 512}}
    inv_lens = [37, 64, 12, 50] if not smoke else [9, 16, 5]
    inv = batch_invariance(shapes if not smoke else {"tiny_test_llama": shapes["tiny_test_llama"]}, inv_lens)
    print_table(["model", "len", "alone == in batch (frac bitwise)", "max |diff|", "padded alone == in batch",
                 "max |diff|"],
                [[m, r["len"], r["bitwise_equal_frac"], r["max_abs_diff"], r["padded_alone_vs_batch_bitwise_equal_frac"],
                  r["padded_alone_vs_batch_max_abs_diff"]] for m, f in inv.items() for r in f["alone_vs_batch"]],
                title=f"batch invariance of a teacher's log-probs (fp32, CPU, batch of {len(inv_lens)} right padded)")
    for m, f in inv.items():
        print(f"{m}: same batch twice bitwise {f['same_batch_twice_bitwise']}; LM head over rows together vs alone "
              f"bitwise {f['lm_head_rows_together_vs_alone_bitwise']} (max |diff| {f['lm_head_rows_max_abs_diff']:.3g})")

    default = ENCODINGS[DEFAULT_ENCODING].bytes_per_token(K, QWEN2_VOCAB, ["sft", "base"])
    worst = max(by[(c, DEFAULT_ENCODING)]["grad_rel_err"] for c in ("kd", "delta_kd"))
    targets = [
        Target("default_encoding_bytes_per_token_k64_2roles", default, "<=", SIZE_GOAL,
               f"{DEFAULT_ENCODING}: <= 1/1000 of a dense bf16 row at V={QWEN2_VOCAB}"),
        Target("default_encoding_grad_rel_err_kd_and_delta_kd", worst, "<=", GRAD_GOAL,
               "max of kd and delta_kd (lp_S0 fp32), vs the fp32 record"),
    ]
    figures = {"k": K, "vocab_size": QWEN2_VOCAB, "dense_bf16_bytes_per_token": DENSE_BF16,
               "default_encoding": DEFAULT_ENCODING, "encodings": sizes,
               "accuracy": {"vocab": vocab, "tokens": tokens, "seeds": seeds, "rows": acc},
               "accuracy_correlated": {"vocab": vocab, "tokens": tokens, "seeds": seeds, "base_noise": 1.0,
                                       "rows": acc_corr},
               "codec": codec, "read": read, "batch_invariance": inv}
    notes = [
        "bytes per token: ids at ceil(log2 V) = 18 bits, per role its values (+ 4 bytes of row parameters for uq "
        "codecs) and a 4-byte fp32 tail; exact arithmetic (common.codec.Encoding.bytes_per_token).",
        "file bytes per token add Parquet framing, positions (runs) and zstd; synthetic random values.",
        "accuracy as bench_wire: random N(0, 4^2) teacher logits, fp32 record vs encoded record, same student "
        "logits; 'dkd corr. pair' uses base logits = sft logits + N(0, 1) noise.",
        "throughputs are single-process and noisy on a shared machine; compare encodings within one run.",
    ]
    if not args.no_pipeline:
        pipe = pipeline(smoke, 4 if smoke else args.steps, args.ray_address, args.models_dir, args.teachers_namespace,
                        warm)
        figures["pipeline"] = pipe
        targets.append(Target("delta_kd_from_cache_s0_steady_steps_per_s_over_sft", pipe["steady_steps_per_s_over_sft"]
                              ["delta_kd_cache_s0"], ">=", 0.9,
                              "delta_kd from the cache with student_base cached / sft, steady-state steps/s"))
        notes.append("pipeline: tiny default's embedded models (smoke: miniature ones, 1 worker, 16 examples, the sft "
                     "and delta_kd_cache_s0 runs only); each training run's steps/s covers its whole loop "
                     "(report.json); build and pool times include model load.")
    write_result("bench_cache", args, figures, targets, notes)
    return 0


def pipeline(smoke: bool, steps: int, address: str | None, models_dir: Path | None = None,
             teachers_namespace: str | None = None, warm: Any = None) -> dict[str, Any]:
    """Parts 6 and 7 (benchmarks/_cache_runs.py) on the cluster at `address` or a private one."""
    from _cache_runs import cache_runs

    with ray_session(address, num_cpus=8):
        pipe = cache_runs(smoke, steps, models_dir, teachers_namespace, warm)
    pool = pipe["live_pool"]
    print_table(["what", "tokens", "seconds", "tokens/s", "vs live pool", "file B/tok"],
                [["live pool", pool["tokens"], pool["seconds"], pool["tokens_per_s"], 1.0, "-"]]
                + [[f"build {e}", b["tokens"], b["seconds"], b["tokens_per_s"],
                    pipe["build_over_live_pool_tokens_per_s"].get(e), b["file_bytes_per_token"]]
                   for e, b in pipe["build"].items()],
                title="scoring the build order's batches once: live pool vs cache build (model load included)")
    print_table(["run", "steps", "steps/s", "over sft", "steady over sft", "teacher wait", "steady wait"],
                [[m, r["steps"], r["steps_per_s"], pipe["steps_per_s_over_sft"][m],
                  pipe["steady_steps_per_s_over_sft"][m], r["teacher_wait_fraction"], r["steady_teacher_wait_fraction"]]
                 for m, r in pipe["train"].items()], title=f"training, {steps} steps per run")
    print_table(["rank", "batches", "rows", "rows/s", "shards read"],
                [[r["rank"], r["batches"], r["rows"], r["rows_per_s"], r["shards_read"]] for r in pipe["read_per_rank"]],
                title="cache feeders (delta_kd, student_base cached)")
    return pipe


if __name__ == "__main__":
    raise SystemExit(main())
