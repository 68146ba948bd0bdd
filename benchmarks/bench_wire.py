"""Wire size and object-store throughput of the sparse TopKRecord against a dense bf16 row.

Figure 1 of the benchmarks issue.

Size: bytes per *trained* (counted) token of a real `TopKRecord` (`record.bytes_per_token()`: ids int32 [k],
the row index int32, per role log-probs [k] in the wire dtype and tail fp32) for k = 16, 64, 256, two roles
(sft + base; also three with a `student_base` teacher role), fp32, fp16 and bf16 wire, against one dense
bf16 row of V = 152,064 (2 * V = 304,128 bytes). Records carry the counted positions only (prompt and
padding are neither scored nor sent), so the bytes of a batch are N_counted x bytes/token.

    ratio = record bytes/token / dense bytes/token          target: k = 64, two roles, <= 1/400

Counted fraction: over one epoch of the embedded default's training batches (deploy/configs/tiny.yaml:
its tokenizer, max_length, batch size and workers), the share of the padded [B, T] positions and of the
attended tokens that the loss trains on, and the record bytes per batch against a record of every
position (the form before records were cut to the counted rows).

Throughput: tokens/s of a producer actor returning a precomputed payload (the record, or a dense bf16
[B, T, V] array) to a consumer actor that receives it as an argument and touches every page, i.e.
teacher -> object store -> student, as in the real data path. Sparse and dense in the same run.

    python benchmarks/bench_wire.py [--smoke] [--repeats N] [--ray-address ADDR]
"""

from __future__ import annotations

import time
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

from common.topk import TopKRecord, rows_from_mask, to_wire_dtype

__all__ = ["make_record", "dense_row_bytes", "counted_fraction", "main"]

QWEN2_VOCAB = 152_064
TARGET_RATIO = 1 / 400
WIRE_DTYPES_MEASURED = ("float32", "float16", "bfloat16")  # float32 first: the reference


def make_record(batch: int, seq: int, k: int, roles: list[str], wire_dtype: str, vocab_size: int = QWEN2_VOCAB,
                seed: int = 0, mask: np.ndarray | None = None) -> TopKRecord:
    """A valid record of the given shape filled with plausible values (descending log-probs, small tails).

    mask [B, T] bool: the counted positions (default: every position). ids [N, k] int32 distinct per row;
    logprobs per role [N, k]; tail per role [N].
    """
    rng = np.random.default_rng(seed)
    rows = rows_from_mask(np.ones((batch, seq), dtype=bool) if mask is None else mask)
    n = len(rows)
    # Distinct ids per row: a random offset plus a stride never wraps onto itself while k*stride < V.
    stride = max(1, vocab_size // (k + 1))
    base = rng.integers(0, vocab_size, size=(n, 1))
    ids = ((base + np.arange(k) * stride) % vocab_size).astype(np.int32)
    logprobs, tails = {}, {}
    for role in roles:
        lp = np.sort(rng.standard_normal((n, k)).astype(np.float32), axis=-1)[..., ::-1]
        lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True) * 1.05)  # 5% mass left for the tail
        logprobs[role] = to_wire_dtype(lp, wire_dtype)
        tails[role] = np.clip(1.0 - np.exp(lp.astype(np.float64)).sum(-1), 0.0, 1.0).astype(np.float32)
    return TopKRecord("bench", ids, logprobs, tails, rows, (batch, seq), 1.0, vocab_size, "bench",
                      wire_dtype).validate()


def dense_row_bytes(vocab_size: int = QWEN2_VOCAB) -> int:
    """One dense bf16 distribution per token: 2 bytes x V."""
    return 2 * vocab_size


def size_table() -> list[dict[str, Any]]:
    rows = []
    dense = dense_row_bytes()
    for roles in (["sft", "base"], ["sft", "base", "student_base"]):
        for wire in WIRE_DTYPES_MEASURED:
            for k in (16, 64, 256):
                rec = make_record(2, 16, k, roles, wire)
                bpt = rec.bytes_per_token()
                rows.append({"k": k, "roles": len(roles), "wire_dtype": wire, "bytes_per_token": bpt,
                             "ratio_to_dense_bf16": bpt / dense, "one_in": dense / bpt})
    return rows


def _embedded_tokenizer(cfg: Any, out: Path) -> Any:
    """The embedded default's tokenizer: the cached build's when present, else trained here by the build's
    own recipe (the same deterministic training, so the same token ids) without building the models."""
    from transformers import AutoTokenizer

    from common.config import DataConfig
    from common.data.examples import format_prompt
    from common.tiny_world.build import _is_complete, build_key, cache_root
    from common.tiny_world.suite import generate_corpus, generate_instruction_suite
    from common.tiny_world.training import train_tokenizer

    ecfg = cfg.embedded
    built = cache_root(ecfg) / f"embedded-{build_key(ecfg)}"
    if _is_complete(built, build_key(ecfg)):
        return AutoTokenizer.from_pretrained(str(built / "tokenizer"))
    suite = generate_instruction_suite(ecfg.seed, ecfg.num_train, ecfg.num_val, ecfg.num_test)
    data_cfg = DataConfig(max_length=ecfg.max_length, overlong="truncate")
    prompts = [format_prompt(e["instruction"], e["context"], data_cfg) for e in suite["train"]]
    texts = generate_corpus(ecfg.seed, ecfg.corpus_sentences) + [p + " " + e["response"]
                                                                 for p, e in zip(prompts, suite["train"])]
    return train_tokenizer(texts, ecfg.vocab_size, out)


def counted_fraction(k: int = 64, roles: int = 2, wire_dtype: str = "float32") -> dict[str, Any]:
    """Counted positions in one epoch of the embedded default's training batches, and the record bytes per
    batch in the rows form vs a record of every [B, T] position (k, roles, wire as given)."""
    import tempfile

    from common.config import load_config
    from common.data.batching import BatchPlan, collate, tokenize_examples
    from common.data.examples import load_examples

    cfg = load_config(Path(__file__).resolve().parents[1] / "deploy" / "configs" / "tiny.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        tok = _embedded_tokenizer(cfg, Path(tmp) / "tokenizer")
    train = tokenize_examples(load_examples(cfg.data, "train", cfg.embedded), tok, cfg.data)
    t = cfg.training
    plan = BatchPlan(len(train), t.batch_size, t.num_workers, cfg.seed, cfg.data.shuffle)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    positions = attended = counted = 0
    fractions = []
    for step in range(plan.steps_per_epoch):
        for idx in plan.step_indices(step):
            b = collate([train[i] for i in idx], pad)
            positions += b["loss_mask"].size
            attended += int(b["attention_mask"].sum())
            counted += int(b["loss_mask"].sum())
            fractions.append(b["loss_mask"].mean())
    per_row = make_record(1, 1, k, ["sft", "base", "student_base"][:roles], wire_dtype, vocab_size=QWEN2_VOCAB)
    rows_form = per_row.bytes_per_token()
    every_position = rows_form - 4 + 1  # the old form: no row index, a 1-byte mask per position
    return {"config": "deploy/configs/tiny.yaml", "batches": len(fractions), "positions": positions,
            "attended_tokens": attended, "counted_tokens": counted,
            "counted_over_positions": counted / positions, "counted_over_attended": counted / attended,
            "per_batch_counted_over_positions": summarize(fractions),
            "k": k, "roles": roles, "wire_dtype": wire_dtype,
            "record_bytes_rows_form": counted * rows_form, "record_bytes_every_position": positions * every_position,
            "rows_form_over_every_position": counted * rows_form / (positions * every_position)}


def _actors(ray: Any) -> tuple[Any, Any]:
    @ray.remote(num_cpus=0)
    class Producer:
        """Holds a precomputed payload; `emit` returns it, so Ray copies it into the object store."""

        def __init__(self) -> None:
            self.payloads: dict[str, Any] = {}

        def load(self, name: str, spec: dict[str, Any]) -> int:
            if spec["kind"] == "sparse":
                rec = make_record(spec["batch"], spec["seq"], spec["k"], ["sft", "base"], spec["wire"])
                self.payloads[name] = rec
                return rec.nbytes()
            arr = np.random.default_rng(0).integers(0, 2**16, size=(spec["batch"], spec["seq"], QWEN2_VOCAB),
                                                    dtype=np.uint16)  # bf16 bits
            self.payloads[name] = arr
            return int(arr.nbytes)

        def emit(self, name: str) -> Any:
            return self.payloads[name]

    @ray.remote(num_cpus=0)
    class Consumer:
        """Receives the payload as an argument (zero-copy view of shared memory) and touches every page."""

        def consume(self, payload: Any) -> int:
            arrays = ([payload] if isinstance(payload, np.ndarray) else
                      [payload.ids, payload.rows, *payload.logprobs.values(), *payload.tail.values()])
            touched = 0
            for a in arrays:
                flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
                touched += int(flat[::4096].sum() >= 0) + flat.nbytes  # one byte per 4 KiB page
            return touched

    return Producer.remote(), Consumer.remote()


def throughput(ray: Any, specs: dict[str, dict[str, Any]], repeats: int, calls: int) -> dict[str, Any]:
    """tokens/s per payload kind: `calls` sequential producer -> consumer round trips per repeat."""
    producer, consumer = _actors(ray)
    out: dict[str, Any] = {}
    for name, spec in specs.items():
        nbytes = ray.get(producer.load.remote(name, spec))
        tokens = spec["batch"] * spec["seq"]
        got = ray.get(consumer.consume.remote(producer.emit.remote(name)))  # warm-up
        if got < nbytes:
            raise BenchError(f"throughput {name}: consumer saw {got} bytes < payload {nbytes}")
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                ray.get(consumer.consume.remote(producer.emit.remote(name)))
            rates.append(tokens * calls / (time.perf_counter() - t0))
        out[name] = {"tokens_per_batch": tokens, "payload_bytes": nbytes, "bytes_per_token": nbytes / tokens,
                     "tokens_per_s": summarize(rates), **spec}
    for h in (producer, consumer):
        ray.kill(h)
    return out


def wire_accuracy(vocab: int, tokens: int, k: int = 64, seeds: int = 3) -> list[dict[str, Any]]:
    """What each wire dtype costs: loss and logit-gradient error of `kd` and `delta_kd` vs the fp32 wire.

    Random teacher log-probs (log_softmax of N(0, 4^2) logits, a spread like real LM rows), three roles,
    tail bucket; the same fp32 numbers encoded at each wire dtype; relative error of loss_sum and of the
    gradient's norm, max over seeds. Delta-KD reads differences of two teachers' log-probs, so it amplifies
    the wire's rounding more than KD does.
    """
    import torch

    from common.config import LossConfig
    from common.losses import distillation_loss, targets_from_record
    from common.topk import TopKRecord

    rows = []
    for method in ("kd", "delta_kd"):
        cfg = LossConfig(method=method, k=k)
        results: dict[str, list[tuple[float, torch.Tensor]]] = {}
        for wire in WIRE_DTYPES_MEASURED:
            results[wire] = []
            for seed in range(seeds):
                g = torch.Generator().manual_seed(seed)
                dense = {r: torch.log_softmax(torch.randn(1, tokens, vocab, generator=g) * 4, -1).numpy()
                         for r in ("sft", "base", "student_base")}
                z = (torch.randn(1, tokens, vocab, generator=g) * 4).requires_grad_(True)
                labels = torch.randint(0, vocab, (1, tokens), generator=g)
                rec = TopKRecord.from_dense(seed, dense, k, wire_dtype=wire)
                out = distillation_loss(z, targets_from_record(rec, torch.device("cpu")), labels, cfg)
                out.loss_sum.backward()
                assert z.grad is not None
                results[wire].append((float(out.loss_sum.detach()), z.grad.clone()))
        for wire in WIRE_DTYPES_MEASURED[1:]:
            pairs = list(zip(results[wire], results["float32"]))
            rows.append({"method": method, "wire_dtype": wire,
                         "loss_rel_err": max(abs(a[0] - b[0]) / abs(b[0]) for a, b in pairs),
                         "grad_rel_err": max(float((a[1] - b[1]).norm() / b[1].norm()) for a, b in pairs)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    add_ray_args(p)
    args = p.parse_args(argv)
    repeats = 1 if args.smoke else args.repeats

    sizes = size_table()
    print_table(["roles", "wire", "k", "bytes/token", "x dense", "1 in"],
                [[r["roles"], r["wire_dtype"], r["k"], r["bytes_per_token"], r["ratio_to_dense_bf16"],
                  r["one_in"]] for r in sizes], title=f"bytes/token vs a dense bf16 row at V={QWEN2_VOCAB}")

    sparse_tokens = (1, 256) if args.smoke else (8, 1024)
    dense_tokens = (1, 16) if args.smoke else (1, 256)
    specs = {
        "sparse_k64_fp32": {"kind": "sparse", "batch": sparse_tokens[0], "seq": sparse_tokens[1], "k": 64,
                            "wire": "float32"},
        "sparse_k64_bf16": {"kind": "sparse", "batch": sparse_tokens[0], "seq": sparse_tokens[1], "k": 64,
                            "wire": "bfloat16"},
        "dense_bf16": {"kind": "dense", "batch": dense_tokens[0], "seq": dense_tokens[1]},
    }
    with ray_session(args.ray_address, num_cpus=4) as ray:
        tput = throughput(ray, specs, repeats, calls=2 if args.smoke else 5)
    print_table(["payload", "tokens/batch", "bytes/token", "tokens/s min", "median", "max"],
                [[n, f["tokens_per_batch"], f["bytes_per_token"], f["tokens_per_s"]["min"],
                  f["tokens_per_s"]["median"], f["tokens_per_s"]["max"]] for n, f in tput.items()],
                title="object store throughput, producer actor -> consumer actor")
    dense_rate = tput["dense_bf16"]["tokens_per_s"]["median"]
    speedups = {n: f["tokens_per_s"]["median"] / dense_rate for n, f in tput.items() if n != "dense_bf16"}

    accuracy = wire_accuracy(vocab=512 if args.smoke else 32_000, tokens=16 if args.smoke else 256)
    print_table(["method", "wire", "loss rel err", "grad rel err"],
                [[r["method"], r["wire_dtype"], r["loss_rel_err"], r["grad_rel_err"]] for r in accuracy],
                title="error vs the fp32 wire (k=64, tail bucket, max over 3 seeds)")

    counted = counted_fraction()
    print_table(["batches", "counted/positions", "counted/attended", "record bytes rows form",
                 "every position", "ratio"],
                [[counted["batches"], counted["counted_over_positions"], counted["counted_over_attended"],
                  counted["record_bytes_rows_form"], counted["record_bytes_every_position"],
                  counted["rows_form_over_every_position"]]],
                title="the embedded default's training batches, one epoch (k=64, two roles, fp32 wire)")

    by_key = {(r["roles"], r["wire_dtype"], r["k"]): r for r in sizes}
    targets = [
        Target("k64_two_roles_bf16_wire_ratio_to_dense", by_key[(2, "bfloat16", 64)]["ratio_to_dense_bf16"],
               "<=", TARGET_RATIO, "bf16 log-probs + int32 ids + fp32 tails"),
        Target("k64_two_roles_fp16_wire_ratio_to_dense", by_key[(2, "float16", 64)]["ratio_to_dense_bf16"],
               "<=", TARGET_RATIO, "fp16 log-probs: bf16's size, 8x less rounding (deploy/configs/qwen2_7b_dolly.yaml)"),
        Target("k64_two_roles_fp32_wire_ratio_to_dense", by_key[(2, "float32", 64)]["ratio_to_dense_bf16"],
               "<=", TARGET_RATIO, "fp32 log-probs (the config default teachers.wire_dtype=float32)"),
    ]
    figures = {"vocab_size": QWEN2_VOCAB, "dense_bf16_bytes_per_token": dense_row_bytes(), "sizes": sizes,
               "throughput": tput, "sparse_over_dense_tokens_per_s": speedups, "accuracy_vs_fp32": accuracy,
               "counted_positions_embedded_default": counted}
    notes = [
        "bytes/token = TopKRecord.nbytes() / N per counted (trained) token: ids int32 [k] + row index int32 + "
        "per role logprobs [k] (wire dtype) + tail fp32. Prompt and padding positions are not in the record.",
        "counted fraction: one epoch of deploy/configs/tiny.yaml's training batches (its tokenizer, max_length, "
        "batch size, workers); 'every position' = the earlier record form (all B*T positions, 1-byte mask, no "
        "row index).",
        "dense = one bf16 row of V per token (a second role would double it); the target compares to one row.",
        "accuracy: same fp32 teacher log-probs encoded per wire dtype; fp16 and bf16 are the same size, and "
        "for log-probs in [-1e4, 0] fp16 keeps 3 more mantissa bits.",
        "throughput: producer actor returns a precomputed payload; consumer actor gets it as an argument "
        "(zero-copy shared memory) and reads one byte per 4 KiB page; tokens/s over sequential round trips.",
    ]
    write_result("bench_wire", args, figures, targets, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
