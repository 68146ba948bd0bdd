"""One cache shard: a Parquet file holding the ExampleRecords of a contiguous range of examples.

Columns (one row per example, every example of the range present, in order):

    example  int64          index in the tokenized training set
    length   int32          the example's token count
    num_rows int32          its counted positions n
    t_start  list<int32>    the counted positions t as runs: t_start[i] .. t_start[i] + t_len[i] - 1
    t_len    list<int32>    (a response is one run)
    ids      binary         common.codec buffers of the example's n rows ...
    lp.<role>, tail.<role>  binary   ... one column per component

The file's key-value metadata `deltakd` holds the layout (encoding, K, vocab size, roles, range). Beside
it, a small JSON sidecar `shard_meta/shard-NNNNN.json` records the file's sha256, size and range; it is
written after the data file, so a shard counts as finished only when both exist and the checksum holds.
Everything here works on one shard at a time with no shared state, so a Ray Data stage (map_batches over
one block per shard) can call `write_shard` itself.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.codec import CodecError, Segments, decode_rows, encode_rows, get_encoding

from .errors import ShardError
from .fs import CacheLocation
from .records import ExampleRecord

__all__ = ["ShardLayout", "ShardSpec", "ShardInfo", "DecodedShard", "shard_specs", "examples_table",
           "write_shard", "read_shard", "decode_table", "SHARD_DIR", "SHARD_META_DIR"]

SHARD_DIR = "shards"
SHARD_META_DIR = "shard_meta"
_COMPRESSION = "zstd"
_DECODE_ROWS = 16_384  # rows decoded per vectorised call


@dataclass(frozen=True)
class ShardLayout:
    """What every shard of one build shares: encoding, K (support ids per row), vocab size, roles, build key."""

    encoding: str
    k: int
    vocab_size: int
    roles: tuple[str, ...]
    build_key: str


@dataclass(frozen=True)
class ShardSpec:
    """Shard `index` holds examples [start, end)."""

    index: int
    start: int
    end: int

    @property
    def path(self) -> str:
        return f"{SHARD_DIR}/shard-{self.index:05d}.parquet"

    @property
    def meta_path(self) -> str:
        return f"{SHARD_META_DIR}/shard-{self.index:05d}.json"

    def where(self, loc: CacheLocation) -> str:
        return f"{loc.display(self.path)} (examples {self.start}..{self.end - 1})"


@dataclass(frozen=True)
class ShardInfo:
    """A finished shard: what the manifest lists."""

    index: int
    start: int
    end: int
    path: str
    sha256: str
    bytes: int
    num_tokens: int
    build_key: str

    def spec(self) -> ShardSpec:
        return ShardSpec(self.index, self.start, self.end)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ShardInfo:
        return cls(**{f: d[f] for f in cls.__dataclass_fields__})


def shard_specs(num_examples: int, shard_size: int) -> list[ShardSpec]:
    """The shards of a build: contiguous ranges of `shard_size` examples (the last may be shorter)."""
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    return [ShardSpec(i, s, min(s + shard_size, num_examples))
            for i, s in enumerate(range(0, num_examples, shard_size))]


def _runs(t: np.ndarray) -> tuple[list[int], list[int]]:
    if t.size == 0:
        return [], []
    breaks = np.nonzero(np.diff(t) != 1)[0] + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [t.size]])
    return t[starts].astype(int).tolist(), (ends - starts).astype(int).tolist()


def examples_table(examples: Sequence[ExampleRecord], layout: ShardLayout) -> pa.Table:
    """Encode ExampleRecords into a shard table (columns in the module docstring)."""
    enc = get_encoding(layout.encoding)
    cols: dict[str, list[Any]] = {"example": [], "length": [], "num_rows": [], "t_start": [], "t_len": []}
    comps = ["ids", *(f"{p}.{r}" for r in layout.roles for p in ("lp", "tail"))]
    blobs: dict[str, list[bytes]] = {c: [] for c in comps}
    for ex in examples:
        ex.check()
        if ex.ids.shape[1] != layout.k:
            raise ShardError(f"example {ex.example}: K = {ex.ids.shape[1]}, the build stores K = {layout.k}")
        missing = [r for r in layout.roles if r not in ex.logprobs]
        if missing:
            raise ShardError(f"example {ex.example}: roles {missing} missing (the build stores {list(layout.roles)})")
        try:
            parts = encode_rows(ex.ids, {r: ex.logprobs[r] for r in layout.roles},
                                {r: ex.tail[r] for r in layout.roles}, layout.vocab_size, enc)
        except CodecError as exc:
            raise ShardError(f"example {ex.example}: {exc}") from None
        starts, lens = _runs(ex.t)
        cols["example"].append(ex.example)
        cols["length"].append(ex.length)
        cols["num_rows"].append(ex.num_rows)
        cols["t_start"].append(starts)
        cols["t_len"].append(lens)
        for c in comps:
            blobs[c].append(parts[c].tobytes())
    arrays = {
        "example": pa.array(cols["example"], pa.int64()),
        "length": pa.array(cols["length"], pa.int32()),
        "num_rows": pa.array(cols["num_rows"], pa.int32()),
        "t_start": pa.array(cols["t_start"], pa.list_(pa.int32())),
        "t_len": pa.array(cols["t_len"], pa.list_(pa.int32())),
        **{c: pa.array(blobs[c], pa.binary()) for c in comps},
    }
    return pa.table(arrays)


def write_shard(loc: CacheLocation, spec: ShardSpec, examples: Sequence[ExampleRecord],
                layout: ShardLayout) -> ShardInfo:
    """Encode and write one shard (data file, then its sidecar), each atomically. Returns its ShardInfo.

    `examples` must be exactly the examples spec.start .. spec.end - 1, in order.
    """
    got = [ex.example for ex in examples]
    if got != list(range(spec.start, spec.end)):
        raise ShardError(f"shard {spec.index} holds examples {spec.start}..{spec.end - 1}; got "
                         f"{len(got)} records starting {got[:3]}")
    table = examples_table(examples, layout)
    meta = {"format": "deltakd-teacher-cache-shard", "version": 1, **asdict(layout), "index": spec.index,
            "start": spec.start, "end": spec.end}
    table = table.replace_schema_metadata({"deltakd": json.dumps(meta)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=_COMPRESSION)
    data = sink.getvalue()
    info = ShardInfo(spec.index, spec.start, spec.end, spec.path, hashlib.sha256(memoryview(data)).hexdigest(),
                     data.size, int(sum(ex.num_rows for ex in examples)), layout.build_key)
    loc.makedirs(SHARD_DIR)
    loc.makedirs(SHARD_META_DIR)
    loc.write_atomic(spec.path, data)
    loc.write_atomic(spec.meta_path, json.dumps(info.to_json(), indent=1).encode())
    return info


@dataclass
class DecodedShard:
    """All examples of one shard, decoded. Example e's rows are row_offsets[e] .. row_offsets[e+1] - 1."""

    start: int
    examples: np.ndarray
    lengths: np.ndarray
    row_offsets: np.ndarray
    t: np.ndarray
    ids: np.ndarray
    logprobs: dict[str, np.ndarray]
    tail: dict[str, np.ndarray]

    def record(self, example: int, roles: Sequence[str] | None = None) -> ExampleRecord:
        i = example - self.start
        if not 0 <= i < self.examples.size:
            raise KeyError(f"example {example} is not in this shard ({self.start}..{self.start + self.examples.size - 1})")
        s = slice(int(self.row_offsets[i]), int(self.row_offsets[i + 1]))
        keep = list(roles) if roles is not None else list(self.logprobs)
        return ExampleRecord(int(self.examples[i]), int(self.lengths[i]), self.t[s], self.ids[s],
                             {r: self.logprobs[r][s] for r in keep}, {r: self.tail[r][s] for r in keep})


def _segments(col: pa.ChunkedArray | pa.Array) -> Segments:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32)[arr.offset: arr.offset + len(arr) + 1].astype(np.int64)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return Segments(data, offsets)


def _groups(counts: np.ndarray, max_rows: int) -> list[tuple[int, int]]:
    """Consecutive example ranges [a, b) of at most max_rows rows each (an example is never split)."""
    out, a, rows = [], 0, 0
    for i, c in enumerate(counts.tolist()):
        if rows and rows + c > max_rows:
            out.append((a, i))
            a, rows = i, 0
        rows += c
    if a < counts.size:
        out.append((a, int(counts.size)))
    return out


def _check_values(ids: np.ndarray, lps: dict[str, np.ndarray], tails: dict[str, np.ndarray], vocab_size: int,
                  where: str) -> None:
    """What the sha256 cannot vouch for (a shard written from bad teacher output): ids in range, log-probs
    <= 0 and not NaN, tails in [0, 1]. The mass check of TopKRecord.validate is left to the receiver: a
    lossy encoding moves the support's mass by up to a few percent (the loss renormalises the atoms)."""
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ShardError(f"{where}: support ids out of range [0, {vocab_size}): [{int(ids.min())}, {int(ids.max())}]")
    for r, lp in lps.items():
        if np.isnan(lp).any() or (lp.size and float(lp.max()) > 1e-3):
            raise ShardError(f"{where}, role {r!r}: log-probs NaN or above 0")
        t = tails[r]
        if t.size and not (np.isfinite(t).all() and float(t.min()) >= -1e-3 and float(t.max()) <= 1 + 1e-3):
            raise ShardError(f"{where}, role {r!r}: tail mass outside [0, 1]")


def decode_table(table: pa.Table, layout: ShardLayout, roles: Sequence[str] | None = None,
                 where: str = "shard") -> DecodedShard:
    """Decode a shard table (all its examples in one vectorised call per component)."""
    keep = list(layout.roles) if roles is None else list(roles)
    examples = table.column("example").to_numpy()
    counts = table.column("num_rows").to_numpy().astype(np.int64)
    starts = table.column("t_start").combine_chunks()
    lens = table.column("t_len").combine_chunks()
    run_start = starts.values.to_numpy().astype(np.int64)
    run_len = lens.values.to_numpy().astype(np.int64)
    if run_len.sum() != counts.sum():
        raise ShardError(f"{where}: positions cover {int(run_len.sum())} rows, num_rows says {int(counts.sum())}")
    first = np.cumsum(run_len) - run_len
    t = (np.repeat(run_start - first, run_len) + np.arange(int(run_len.sum()))).astype(np.int32)
    # decode reads only the roles asked for, and the references of those stored as a shift
    enc = get_encoding(layout.encoding)
    stored = enc.layout(layout.roles)
    unknown = [r for r in keep if r not in stored]
    if unknown:
        raise ShardError(f"{where}: roles {unknown} not stored (roles: {list(layout.roles)})")
    needed = set(keep) | {stored[r][1] for r in keep if stored[r][1] is not None}
    comps = ["ids", *(f"{p}.{r}" for r in sorted(needed) for p in ("lp", "tail"))]
    blobs = {c: _segments(table.column(c)) for c in comps}
    parts = []
    for a, b in _groups(counts, _DECODE_ROWS):  # bounded temporaries: ~ rows * K * 8 bytes per array
        sub = {c: Segments(seg.data, seg.offsets[a: b + 1]) for c, seg in blobs.items()}
        try:
            parts.append(decode_rows(sub, counts[a:b], layout.k, layout.roles, layout.vocab_size, enc, select=keep))
        except CodecError as exc:
            raise ShardError(f"{where}: {exc}") from None
    ids = np.concatenate([p.ids for p in parts]) if parts else np.zeros((0, layout.k), np.int32)
    lps = {r: np.concatenate([p.logprobs[r] for p in parts]) if parts else np.zeros((0, layout.k), np.float32)
           for r in keep}
    tails = {r: np.concatenate([p.tail[r] for p in parts]) if parts else np.zeros(0, np.float32) for r in keep}
    _check_values(ids, lps, tails, layout.vocab_size, where)
    return DecodedShard(int(examples[0]) if examples.size else 0, examples,
                        table.column("length").to_numpy(), np.concatenate([[0], np.cumsum(counts)]), t, ids,
                        lps, tails)


def read_shard(loc: CacheLocation, info: ShardInfo, layout: ShardLayout, roles: Sequence[str] | None = None,
               verify: bool = True) -> DecodedShard:
    """Read, check (sha256, range, layout) and decode one shard. Raises ShardError naming path and examples."""
    spec = info.spec()
    where = spec.where(loc)
    try:
        data = loc.read_bytes(info.path)
    except (FileNotFoundError, OSError) as exc:
        raise ShardError(f"shard {where} is missing or unreadable: {exc}") from None
    if verify:
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.sha256 or len(data) != info.bytes:
            raise ShardError(f"shard {where} is corrupted or truncated: sha256 {digest[:16]}..., {len(data)} bytes; "
                             f"the manifest says {info.sha256[:16]}..., {info.bytes} bytes")
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as exc:
        raise ShardError(f"shard {where} is not a readable Parquet file: {exc}") from None
    meta = json.loads((table.schema.metadata or {}).get(b"deltakd", b"{}"))
    for key, want in (("encoding", layout.encoding), ("k", layout.k), ("vocab_size", layout.vocab_size),
                      ("start", spec.start), ("end", spec.end)):
        if meta.get(key) != want:
            raise ShardError(f"shard {where}: its {key} is {meta.get(key)!r}, the manifest says {want!r}")
    examples = table.column("example").to_numpy()
    if not np.array_equal(examples, np.arange(spec.start, spec.end)):
        raise ShardError(f"shard {where}: holds examples {examples[:3].tolist()}..., not the range it should")
    return decode_table(table, layout, roles, where)
