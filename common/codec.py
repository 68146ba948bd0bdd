"""Compact encodings of sparse teacher records in rows form (counted positions only).

A record's numeric payload for N counted positions and K support ids:

    ids       [N, K] int32   the support (the SFT teacher's top-k, descending; K = k or k + 1)
    logprobs  role -> [N, K] fp32 log-probs at ids (-inf allowed: zero mass)
    tail      role -> [N] fp32 mass off the support

is encoded into one byte buffer per component ("ids", "lp.<role>", "tail.<role>"). Encode and decode are
pure numpy, free of file I/O: the teacher cache stores the buffers in Parquet, and the live wire can send
the same buffers through the object store.

Components:
- ids: bit-packed at ceil(log2 V) bits each, LSB first, order kept. Lossless.
- tails: raw fp32. Lossless.
- log-probs, per role, one of
  - `f32` raw (lossless), `f16` (round to nearest), `bf16` (round to nearest even, stored as 16 bits);
  - `uq<b>`: per row, b-bit codes on a uniform grid lo + (c - 1) * step, c = 1 .. 2^b - 1; code 0 means
    -inf. lo and step are fp16 numbers stored in front of the codes (4 bytes a row), lo rounded down and
    step up so every finite value in [lo, hi] has a code and the error is <= step / 2. Values more than
    `SPAN_CAP` nats below the row's maximum (mass < e^-80 of the top atom) are stored as -inf. Decoded
    log-probs are clamped at 0 (the rounding may overshoot a log-prob of ~0 by up to step / 2).
  - a *shift* form for a teacher pair's base role: the encoding stores d = lp_base - lp_sft of the same
    pair (its `uq<b>` codes) and decodes lp_base = dec(lp_sft) + dec(d). The pair's delta
    lp_sft - lp_base then carries only d's rounding, which is what delta_kd reads; lp_base itself carries
    both roundings. Where lp_sft decodes to -inf (zero mass or far below its row's top), lp_base decodes
    to -inf too; so does a d more than `SPAN_CAP` below the row's largest d (lp_base then lies ~60 nats or
    more below its own top atom for any sft row spanning less than 20 nats).

`ENCODINGS` names the presets; `ENCODINGS[name].bytes_per_token(k, vocab_size, roles)` is exact.
The choice of the default (`DEFAULT_ENCODING`) and the measured accuracy of each preset are in
docs/PERFORMANCE.md (benchmarks/bench_cache.py).

Several records (e.g. the examples of one cache shard) decode in one vectorised call: each component's
buffers are concatenated and described by `Segments(data, offsets)`, with `counts[e]` rows in segment e.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from common.bitpack import BitPackError, pack_bits, unpack_bits

__all__ = [
    "CodecError",
    "ValueCodec",
    "Encoding",
    "Segments",
    "DecodedRows",
    "ENCODINGS",
    "DEFAULT_ENCODING",
    "SPAN_CAP",
    "id_bits",
    "pack_bits",
    "unpack_bits",
    "shift_reference",
    "encode_rows",
    "decode_rows",
    "get_encoding",
]

# Values more than this many nats below their row's maximum are stored as -inf by `uq` codecs: their mass
# relative to the row's top atom is below e^-80 ~ 1.8e-35, under the loss's tail floor of 1e-30.
SPAN_CAP = 80.0
# The smallest positive fp16 (subnormal): the step of a row whose finite values are all equal.
_MIN_STEP = float(np.float16(2.0**-24))

ValueKind = Literal["f32", "f16", "bf16", "uq"]


class CodecError(BitPackError):
    """Input the codec cannot encode or decode. The message names the component and what is wrong."""


@dataclass(frozen=True)
class ValueCodec:
    """How one role's [N, K] log-probs are stored: raw f32 / f16 / bf16, or `uq` with `bits` per value."""

    kind: ValueKind
    bits: int = 0

    def __post_init__(self) -> None:
        if self.kind == "uq" and not 2 <= self.bits <= 24:
            raise CodecError(f"uq codec needs 2..24 bits, got {self.bits}")

    @property
    def name(self) -> str:
        return f"uq{self.bits}" if self.kind == "uq" else self.kind

    def nbytes(self, n: int, k: int) -> int:
        """Encoded size of n rows of k values."""
        if self.kind == "f32":
            return 4 * n * k
        if self.kind in ("f16", "bf16"):
            return 2 * n * k
        return 4 * n + (n * k * self.bits + 7) // 8


@dataclass(frozen=True)
class Encoding:
    """A named preset: the codec of the support-picking roles, of the base roles, and of the others.

    reference: roles `sft`, `sft_j` (each pair's SFT teacher) and any role not covered below;
    shift:     roles `base`, `base_j`, stored as a shift from their pair's SFT role (None: stored
               absolutely with `other`);
    other:     the remaining roles (e.g. `student_base`), and base roles when `shift` is None.
    """

    name: str
    reference: ValueCodec
    shift: ValueCodec | None
    other: ValueCodec

    @property
    def lossless(self) -> bool:
        return self.shift is None and self.reference.kind == "f32" and self.other.kind == "f32"

    def layout(self, roles: Iterable[str]) -> dict[str, tuple[ValueCodec, str | None]]:
        """role -> (codec, reference role or None), in decode order (references first)."""
        present = set(roles)
        out: dict[str, tuple[ValueCodec, str | None]] = {}
        for role in sorted(present, key=lambda r: (shift_reference(r) is not None, r)):
            ref = shift_reference(role)
            if ref is not None and self.shift is not None and ref in present:
                out[role] = (self.shift, ref)
            elif ref is not None or role == "student_base":
                out[role] = (self.other, None)
            else:
                out[role] = (self.reference, None)
        return out

    def describe(self, roles: Iterable[str]) -> dict[str, str]:
        """role -> a readable storage form, e.g. {'sft': 'uq8', 'base': 'uq10 shift from sft'}."""
        return {r: c.name + (f" shift from {ref}" if ref else "") for r, (c, ref) in self.layout(roles).items()}

    def bytes_per_token(self, k: int, vocab_size: int, roles: Iterable[str]) -> float:
        """Encoded bytes per counted position, amortised (bit-packing rounds up once per buffer)."""
        per = k * id_bits(vocab_size) / 8
        for codec, _ in self.layout(roles).values():
            per += 4 * k if codec.kind == "f32" else 2 * k if codec.kind in ("f16", "bf16") else 4 + k * codec.bits / 8
            per += 4  # the role's fp32 tail
        return per


def shift_reference(role: str) -> str | None:
    """The SFT role a base role is a shift from: base -> sft, base_j -> sft_j; None for other roles."""
    if role == "base":
        return "sft"
    if role.startswith("base_") and role[5:].isdigit():
        return f"sft_{role[5:]}"
    return None


def _preset(name: str, ref: str, shift: str | None, other: str) -> Encoding:
    def vc(s: str) -> ValueCodec:
        return ValueCodec("uq", int(s[2:])) if s.startswith("uq") else ValueCodec(s)  # type: ignore[arg-type]
    return Encoding(name, vc(ref), vc(shift) if shift else None, vc(other))


# Presets measured in benchmarks/bench_cache.py (bytes per token at k = 64, V = 152,064, roles sft + base).
ENCODINGS: dict[str, Encoding] = {e.name: e for e in (
    _preset("fp32", "f32", None, "f32"),        # 664 B: lossless
    _preset("fp16", "f16", None, "f16"),        # 408 B
    _preset("bf16", "bf16", None, "bf16"),      # 408 B
    _preset("q8", "uq8", None, "uq8"),          # 288 B: both roles absolute, 8 bits
    _preset("q8d9", "uq8", "uq9", "uq10"),      # 296 B
    _preset("q8d10", "uq8", "uq10", "uq10"),    # 304 B
    _preset("q9d9", "uq9", "uq9", "uq10"),      # 304 B
)}
DEFAULT_ENCODING = "q8d10"


def get_encoding(name: str) -> Encoding:
    if name not in ENCODINGS:
        raise CodecError(f"unknown encoding {name!r}; expected one of {sorted(ENCODINGS)}")
    return ENCODINGS[name]


def id_bits(vocab_size: int) -> int:
    """Bits per packed id: ceil(log2 V), at least 1."""
    if vocab_size < 1:
        raise CodecError(f"vocab_size must be >= 1, got {vocab_size}")
    return max(1, math.ceil(math.log2(vocab_size)))


# ----------------------------------------------------------------------------------------------------
# Value codecs


def _f16_down(x: np.ndarray) -> np.ndarray:
    """fp16 numbers <= x (x finite fp32, within fp16's range)."""
    h = x.astype(np.float16)
    return np.where(h.astype(np.float32) > x, np.nextafter(h, np.float16(-np.inf)), h)


def _f16_up(x: np.ndarray) -> np.ndarray:
    h = x.astype(np.float16)
    return np.where(h.astype(np.float32) < x, np.nextafter(h, np.float16(np.inf)), h)


def _uq_encode(x: np.ndarray, bits: int, what: str) -> np.ndarray:
    """[N, K] fp32 (finite or -inf) -> params fp16 [N, 2] (lo, step) as bytes + packed codes."""
    n, k = x.shape
    if np.isnan(x).any() or np.isposinf(x).any():
        row = int(np.argwhere(np.isnan(x) | np.isposinf(x))[0, 0])
        raise CodecError(f"{what}: NaN or +inf value (first in row {row}); log-probs must be finite or -inf")
    levels = (1 << bits) - 1  # codes 1..levels are finite, 0 is -inf
    finite = np.isfinite(x)
    hi = np.where(finite, x, -np.inf).max(axis=1) if k else np.full(n, -np.inf, dtype=np.float32)
    empty = ~np.isfinite(hi)  # rows with no finite value
    hi = np.where(empty, 0.0, hi).astype(np.float32)
    floor = (hi - SPAN_CAP).astype(np.float32)
    lo = np.where(finite & (x >= floor[:, None]), x, np.inf).min(axis=1) if k else hi
    lo = np.where(empty, 0.0, lo).astype(np.float32)
    if np.abs(np.concatenate([lo, hi])).max(initial=0.0) > 6.0e4:
        raise CodecError(f"{what}: values beyond +-6e4 cannot be stored with fp16 row parameters")
    lo16 = _f16_down(lo)
    step = (hi - lo16.astype(np.float32)) / max(levels - 1, 1)
    step16 = _f16_up(np.maximum(step, _MIN_STEP).astype(np.float32))
    lo32, step32 = lo16.astype(np.float32)[:, None], step16.astype(np.float32)[:, None]
    q = np.rint((x - lo32) / step32)
    keep = finite & (x >= floor[:, None])
    codes = np.where(keep, np.clip(q, 0, levels - 1) + 1, 0).astype(np.uint32)
    params = np.stack([lo16, step16], axis=1).astype(np.float16)
    return np.concatenate([params.view(np.uint8).reshape(-1), pack_bits(codes, bits)])


def _encode_values(x: np.ndarray, codec: ValueCodec, what: str) -> np.ndarray:
    if codec.kind == "f32":
        return np.ascontiguousarray(x, dtype=np.float32).view(np.uint8).reshape(-1)
    if codec.kind == "f16":
        return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8).reshape(-1)
    if codec.kind == "bf16":
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
        return ((bits + rounding) >> 16).astype(np.uint16).view(np.uint8).reshape(-1)
    return _uq_encode(x, codec.bits, what)


@dataclass(frozen=True)
class Segments:
    """Concatenated buffers of one component: segment e is data[offsets[e]:offsets[e + 1]]."""

    data: np.ndarray
    offsets: np.ndarray

    @classmethod
    def single(cls, buf: np.ndarray | bytes) -> Segments:
        data = np.frombuffer(buf, dtype=np.uint8) if isinstance(buf, bytes | bytearray) else np.asarray(buf)
        return cls(data.reshape(-1).view(np.uint8), np.array([0, data.size], dtype=np.int64))


def _check_sizes(seg: Segments, counts: np.ndarray, per_segment: np.ndarray, what: str) -> None:
    sizes = np.diff(seg.offsets)
    if sizes.shape != counts.shape:
        raise CodecError(f"{what}: {sizes.size} segments but {counts.size} row counts")
    bad = np.nonzero(sizes != per_segment)[0]
    if bad.size:
        e = int(bad[0])
        raise CodecError(f"{what}: segment {e} has {int(sizes[e])} bytes, expected {int(per_segment[e])} "
                         f"for {int(counts[e])} rows (truncated or written with another encoding)")


def _raw_rows(seg: Segments, dtype: type, width: int) -> np.ndarray:
    """Raw fixed-size rows (no padding between segments): the concatenation is the array (a copy)."""
    start, end = int(seg.offsets[0]), int(seg.offsets[-1])
    return seg.data[start:end].copy().view(dtype).reshape(-1, width)


def _packed(seg: Segments, counts: np.ndarray, k: int, bits: int, head: int) -> np.ndarray:
    """[sum(counts), k] codes of `bits` bits stored after `head` bytes per row in each segment."""
    n_total = int(counts.sum())
    if n_total == 0 or k == 0:
        return np.zeros((n_total, k), dtype=np.uint32)
    row_seg = np.repeat(np.arange(counts.size), counts)
    row_start = np.cumsum(counts) - counts
    row_local = np.arange(n_total) - row_start[row_seg]
    first_bit = (seg.offsets[:-1] + head * counts) * 8  # where each segment's codes begin
    row_bit = first_bit[row_seg] + row_local * (k * bits)
    offsets = row_bit[:, None] + np.arange(k, dtype=np.int64)[None, :] * bits
    return unpack_bits(seg.data, offsets.reshape(-1), bits).reshape(n_total, k)


def _uq_params(seg: Segments, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    row_seg = np.repeat(np.arange(counts.size), counts)
    row_local = np.arange(int(counts.sum())) - (np.cumsum(counts) - counts)[row_seg]
    at = seg.offsets[:-1][row_seg] + 4 * row_local
    raw = np.stack([seg.data[at + i] for i in range(4)], axis=1).astype(np.uint8)
    params = np.ascontiguousarray(raw).view(np.float16).astype(np.float32)
    return params[:, 0], params[:, 1]


def _decode_values(seg: Segments, counts: np.ndarray, k: int, codec: ValueCodec, what: str) -> np.ndarray:
    _check_sizes(seg, counts, np.array([codec.nbytes(int(c), k) for c in counts], dtype=np.int64), what)
    if codec.kind == "f32":
        return _raw_rows(seg, np.float32, k)
    if codec.kind == "f16":
        return _raw_rows(seg, np.float16, k).astype(np.float32)
    if codec.kind == "bf16":
        return (_raw_rows(seg, np.uint16, k).astype(np.uint32) << 16).view(np.float32)
    lo, step = _uq_params(seg, counts)
    codes = _packed(seg, counts, k, codec.bits, head=4)
    vals = lo[:, None] + (codes.astype(np.float32) - 1.0) * step[:, None]
    return np.where(codes == 0, -np.inf, vals).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# Records


@dataclass
class DecodedRows:
    """Decoded payload: ids [N, K] int32, logprobs role -> [N, K] fp32, tail role -> [N] fp32."""

    ids: np.ndarray
    logprobs: dict[str, np.ndarray]
    tail: dict[str, np.ndarray]


def encode_rows(ids: np.ndarray, logprobs: Mapping[str, np.ndarray], tail: Mapping[str, np.ndarray],
                vocab_size: int, encoding: Encoding | str) -> dict[str, np.ndarray]:
    """Encode one record's payload. Returns component name -> uint8 buffer.

    ids [N, K] int in [0, vocab_size); logprobs role -> [N, K] fp32 (finite or -inf); tail role -> [N].
    """
    enc = get_encoding(encoding) if isinstance(encoding, str) else encoding
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise CodecError(f"ids must be [N, K], got shape {tuple(ids.shape)}")
    n, k = ids.shape
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise CodecError(f"ids out of range [0, {vocab_size}): min {int(ids.min())}, max {int(ids.max())}")
    if set(logprobs) != set(tail):
        raise CodecError(f"roles with log-probs {sorted(logprobs)} != roles with tail {sorted(tail)}")
    out = {"ids": pack_bits(ids.astype(np.uint32), id_bits(vocab_size))}
    for role, (codec, ref) in enc.layout(logprobs).items():
        lp = np.asarray(logprobs[role], dtype=np.float32)
        tl = np.asarray(tail[role], dtype=np.float32)
        if lp.shape != (n, k):
            raise CodecError(f"role {role!r}: logprobs shape {tuple(lp.shape)} != ids shape {(n, k)}")
        if tl.shape != (n,):
            raise CodecError(f"role {role!r}: tail shape {tuple(tl.shape)} != {(n,)}")
        if ref is not None:
            ref_lp = np.asarray(logprobs[ref], dtype=np.float32)
            with np.errstate(invalid="ignore"):
                lp = np.where(np.isfinite(ref_lp), lp - ref_lp, -np.inf).astype(np.float32)
        out[f"lp.{role}"] = _encode_values(lp, codec, f"role {role!r}")
        out[f"tail.{role}"] = np.ascontiguousarray(tl).view(np.uint8).reshape(-1)
    return out


def decode_rows(blobs: Mapping[str, Segments | np.ndarray | bytes], counts: np.ndarray | int, k: int,
                roles: Iterable[str], vocab_size: int, encoding: Encoding | str,
                select: Iterable[str] | None = None) -> DecodedRows:
    """Inverse of `encode_rows` over one or many segments (rows of all segments, concatenated in order).

    blobs: component -> Segments (or one buffer for a single segment); counts: rows per segment;
    roles: every role that was encoded (the storage layout depends on it); select: the roles to decode
    (default all). A shift role needs its reference's components too; only selected roles are returned.
    """
    enc = get_encoding(encoding) if isinstance(encoding, str) else encoding
    cnt = np.atleast_1d(np.asarray(counts, dtype=np.int64))
    segs = {name: b if isinstance(b, Segments) else Segments.single(b) for name, b in blobs.items()}
    layout = enc.layout(roles)
    wanted = list(layout) if select is None else list(select)
    unknown = [r for r in wanted if r not in layout]
    if unknown:
        raise CodecError(f"roles {unknown} were not encoded (encoded roles: {sorted(layout)})")
    todo = set(wanted) | {ref for r in wanted if (ref := layout[r][1]) is not None}
    for name in ["ids", *(f"{p}.{r}" for r in sorted(todo) for p in ("lp", "tail"))]:
        if name not in segs:
            raise CodecError(f"component {name!r} missing; have {sorted(segs)}")
    bits = id_bits(vocab_size)
    ids_seg = segs["ids"]
    _check_sizes(ids_seg, cnt, (cnt * k * bits + 7) // 8, "component 'ids'")
    ids = _packed(ids_seg, cnt, k, bits, head=0).astype(np.int32)
    logprobs: dict[str, np.ndarray] = {}
    tails: dict[str, np.ndarray] = {}
    for role, (codec, ref) in layout.items():  # references come first
        if role not in todo:
            continue
        vals = _decode_values(segs[f"lp.{role}"], cnt, k, codec, f"component 'lp.{role}'")
        if ref is not None:
            vals = np.where(np.isfinite(logprobs[ref]), logprobs[ref] + vals, -np.inf).astype(np.float32)
        if codec.kind == "uq":
            vals = np.minimum(vals, np.float32(0.0))  # a log-prob is <= 0; rounding may overshoot by step / 2
        logprobs[role] = vals
        tseg = segs[f"tail.{role}"]
        _check_sizes(tseg, cnt, 4 * cnt, f"component 'tail.{role}'")
        tails[role] = _raw_rows(tseg, np.float32, 1).reshape(-1)
    return DecodedRows(ids, {r: logprobs[r] for r in wanted}, {r: tails[r] for r in wanted})
