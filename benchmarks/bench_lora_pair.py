"""A LoRA teacher pair (one copy of the base weights, both roles) against two teacher actors, on one machine.

The SFT teacher is a LoRA adapter (rank 16 on every linear layer of the blocks) of a Qwen2-shaped base built
from a config (random weights, fp32, CPU; default ~86M parameters, `--smoke` a tiny one). Two set-ups serve
the same records (sft top-k, k = 64, then base at that support):

- pair: `PairEngine` / one pair actor: the base weights once plus the adapter, sft with the adapter on, base
  with it off (teacher_service/engine_pair.py);
- two:  the base model and the adapter merged into a full copy (`merge_and_unload`), as two engines / actors.

Figures:
- weight_bytes: parameter bytes each set-up holds (exact arithmetic from the loaded models);
- engine: teacher-side tokens/s of one record (sft top-k + base gather) in this process, one torch thread,
  the two set-ups interleaved in each repeat;
- pool: tokens/s of `--batches` records submitted at once through a `TeacherPool` (object store), each actor
  with one CPU: the pair is one actor doing both roles in turn, the two actors can overlap batch n's base
  gather with batch n+1's top-k when the machine has two free cores.

    python benchmarks/bench_lora_pair.py [--smoke] [--repeats N] [--hidden H --layers L] [--ray-address ADDR]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import Target, add_ray_args, base_parser, print_table, ray_session, summarize, write_result

__all__ = ["build_pair", "main"]

K = 64
RANK = 16


def build_pair(root: Path, hidden: int, layers: int, vocab_words: int) -> dict[str, Path]:
    """A Qwen2-shaped base (random, fp32), a random LoRA adapter of it, and the adapter merged into a copy."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from tests.tiny import make_tokenizer

    tok_dir = make_tokenizer(root / "tok", extra_words=" ".join(f"w{i}" for i in range(vocab_words)))
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    heads = max(2, hidden // 64)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64 or 64,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 6),
                      max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    base = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        base.lm_head.weight.mul_(20.0)  # peaked distributions, as tests/tiny.py's models
    paths = {"base": root / "base", "adapter": root / "adapter", "merged": root / "merged"}
    base.save_pretrained(str(paths["base"]))
    tok.save_pretrained(str(paths["base"]))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets,
                                                 init_lora_weights=False))
    peft_model.save_pretrained(str(paths["adapter"]))
    tok.save_pretrained(str(paths["adapter"]))
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(str(paths["merged"]))
    tok.save_pretrained(str(paths["merged"]))
    return paths


def _bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _engine_figures(paths: dict[str, Path], batch: tuple[np.ndarray, np.ndarray, np.ndarray],
                    repeats: int) -> dict[str, Any]:
    from common.config import ModelSpec
    from teacher_service import TeacherEngine
    from teacher_service.engine_pair import PairEngine

    pair = PairEngine(ModelSpec(path=str(paths["base"])), ModelSpec(path=str(paths["adapter"])), device="cpu",
                      dtype="float32")
    base = TeacherEngine(ModelSpec(path=str(paths["base"])), device="cpu", dtype="float32")
    merged = TeacherEngine(ModelSpec(path=str(paths["merged"])), device="cpu", dtype="float32")
    ids, am, rows = batch

    def record_pair() -> None:
        support = pair.topk(ids, am, rows, K, 1.0)[0]
        pair.gather(ids, am, rows, support, 1.0, role="base")

    def record_two() -> None:
        support = merged.topk(ids, am, rows, K, 1.0)[0]
        base.gather(ids, am, rows, support, 1.0)

    calls = {"pair": record_pair, "two": record_two}
    for fn in calls.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {n: [] for n in calls}
    for _ in range(repeats):
        for name, fn in calls.items():  # interleaved: a burst of load hits both alike
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    tokens = int(am.sum())
    rates = {n: [tokens / t for t in ts] for n, ts in times.items()}
    ratio = [p / t for p, t in zip(rates["pair"], rates["two"])]
    return {"weight_bytes": {"pair": pair.weight_bytes(), "two_actors": _bytes(base.model) + _bytes(merged.model),
                             "base": _bytes(base.model), "adapter": pair.weight_bytes() - _bytes(base.model)},
            "engine": {"tokens_per_record": tokens, **{n: {"tokens_per_s": summarize(r)} for n, r in rates.items()},
                       "tokens_per_s_ratio_pair_over_two": summarize(ratio)},
            "params": sum(p.numel() for p in base.model.parameters())}


def _pool_figures(paths: dict[str, Path], batch: tuple[np.ndarray, np.ndarray, np.ndarray], batches: int,
                  repeats: int) -> dict[str, Any]:
    import ray

    from common.config import config_from_dict
    from teacher_service import TeacherPool

    ids, am, _ = batch
    lm = am.astype(bool)
    out: dict[str, Any] = {}
    pools = {}
    try:
        for kind, sft in (("pair", paths["adapter"]), ("two", paths["merged"])):
            cfg = config_from_dict({
                "models": {"base_teacher": {"path": str(paths["base"])}, "sft_teacher": {"path": str(sft)},
                           "student": {"path": str(paths["base"])}},
                "loss": {"k": K},
                "teachers": {"namespace": "bench-lora", "name_prefix": f"bench-lora-{kind}-{time.time_ns()}",
                             "num_cpus": 1, "device": "cpu", "dtype": "float32",
                             "max_inflight_per_replica": batches},
            }, [])
            pools[kind] = TeacherPool.start(cfg)
        counter = iter(range(10**9))
        for p in pools.values():
            ray.get(p.warm_up())
        times: dict[str, list[float]] = {n: [] for n in pools}
        for _ in range(repeats):
            for kind, p in pools.items():
                t0 = time.perf_counter()
                ray.get([p.submit(next(counter), ids, am, lm).ref for _ in range(batches)])
                times[kind].append(time.perf_counter() - t0)
        tokens = int(am.sum()) * batches
        rates = {n: [tokens / t for t in ts] for n, ts in times.items()}
        out = {"batches": batches, "actors": {n: len(p.actors()) for n, p in pools.items()},
               **{n: {"tokens_per_s": summarize(r)} for n, r in rates.items()},
               "tokens_per_s_ratio_pair_over_two": summarize([a / b for a, b in zip(rates["pair"], rates["two"])])}
    finally:
        for p in pools.values():
            p.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    p = base_parser(__doc__.splitlines()[0])
    add_ray_args(p)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab-words", type=int, default=8000)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--batches", type=int, default=4, help="records in flight in the pool part")
    args = p.parse_args(argv)
    repeats = 1 if args.smoke else args.repeats
    hidden, layers, words = (64, 2, 200) if args.smoke else (args.hidden, args.layers, args.vocab_words)
    seq, bsz, batches = (32, 2, 2) if args.smoke else (args.seq, args.batch, args.batches)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="dkb-lora-") as tmp:
        paths = build_pair(Path(tmp), hidden, layers, words)
        rng = np.random.default_rng(0)
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(str(paths["base"])))
        ids = rng.integers(4, vocab, size=(bsz, seq)).astype(np.int32)
        am = np.ones_like(ids)
        rows = np.arange(ids.size, dtype=np.int64)
        figures = _engine_figures(paths, (ids, am, rows), repeats)
        with ray_session(args.ray_address, num_cpus=4):
            figures["pool"] = _pool_figures(paths, (ids, am, rows), batches, repeats)
    w = figures["weight_bytes"]
    figures["weight_bytes_ratio_pair_over_two"] = w["pair"] / w["two_actors"]
    figures.update(k=K, lora_rank=RANK, model={"hidden": hidden, "layers": layers, "vocab": vocab, "seq": seq,
                                               "batch": bsz})
    e, pool = figures["engine"], figures["pool"]
    print_table(["figure", "pair", "two actors", "pair / two"],
                [["teacher weight bytes", w["pair"], w["two_actors"], figures["weight_bytes_ratio_pair_over_two"]],
                 ["engine tokens/s (median)", e["pair"]["tokens_per_s"]["median"], e["two"]["tokens_per_s"]["median"],
                  e["tokens_per_s_ratio_pair_over_two"]["median"]],
                 ["pool tokens/s (median)", pool["pair"]["tokens_per_s"]["median"],
                  pool["two"]["tokens_per_s"]["median"], pool["tokens_per_s_ratio_pair_over_two"]["median"]]],
                title=f"LoRA pair vs two actors ({figures['params'] / 1e6:.1f}M-parameter base, rank {RANK})")
    targets = [Target("weight_bytes_ratio_pair_over_two", figures["weight_bytes_ratio_pair_over_two"], "<=", 0.6,
                      "one copy of the base plus the adapter, against two full copies")]
    notes = [f"Qwen2-shaped base from a config, {figures['params']} parameters, fp32, CPU, one torch thread "
             "per engine/actor; random weights (a random LoRA delta: A and B both random)",
             "engine: one record = sft top-k + base gather in this process, set-ups interleaved per repeat",
             f"pool: {batches} records submitted at once through TeacherPool (object store), one CPU per actor; "
             "on a shared machine the two-actor overlap depends on free cores",
             "measured on the shared 2-core machine under other agents' load: ratios, not absolute rates"]
    write_result("bench_lora_pair", args, figures, targets, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
