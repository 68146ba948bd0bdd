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

from common.codec import CodecError, encode_rows, get_encoding

from .errors import ShardError
from .fs import CacheLocation
from .records import ExampleRecord

__all__ = ["ShardLayout", "ShardSpec", "ShardInfo", "DecodedShard", "shard_specs", "examples_table",
           "write_shard", "read_shard_table", "SHARD_DIR", "SHARD_META_DIR"]

SHARD_DIR = "shards"
SHARD_META_DIR = "shard_meta"
_COMPRESSION = "zstd"


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
    """Shard `index` holds the examples at positions [start, end) of the build order (manifest.py): the
    examples start .. end - 1 themselves when the build has no order of its own (`ordered` False).
    `folder`: where its files live ("" for the main shards, "roles/<key>" for an added role)."""

    index: int
    start: int
    end: int
    ordered: bool = False
    folder: str = ""

    @property
    def path(self) -> str:
        return f"{self.folder}/{SHARD_DIR}/shard-{self.index:05d}.parquet" if self.folder else \
            f"{SHARD_DIR}/shard-{self.index:05d}.parquet"

    @property
    def meta_path(self) -> str:
        return f"{self.folder}/{SHARD_META_DIR}/shard-{self.index:05d}.json" if self.folder else \
            f"{SHARD_META_DIR}/shard-{self.index:05d}.json"

    def where(self, loc: CacheLocation) -> str:
        what = "build order positions" if self.ordered else "examples"
        return f"{loc.display(self.path)} ({what} {self.start}..{self.end - 1})"


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

    def spec(self, ordered: bool = False) -> ShardSpec:
        folder = self.path.rsplit(f"/{SHARD_DIR}/", 1)[0] if f"/{SHARD_DIR}/" in self.path else ""
        return ShardSpec(self.index, self.start, self.end, ordered, folder)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ShardInfo:
        return cls(**{f: d[f] for f in cls.__dataclass_fields__})


def shard_specs(num_examples: int, shard_size: int, ordered: bool = False, folder: str = "") -> list[ShardSpec]:
    """The shards of a build: contiguous ranges of `shard_size` positions (the last may be shorter)."""
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    return [ShardSpec(i, s, min(s + shard_size, num_examples), ordered, folder)
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
                layout: ShardLayout, expected: Sequence[int] | None = None,
                components: Sequence[str] | None = None) -> ShardInfo:
    """Encode and write one shard (data file, then its sidecar), each atomically. Returns its ShardInfo.

    `examples` must be exactly the shard's examples in stored order: `expected` (the build order's slice,
    BuildHead.shard_examples), default spec.start .. spec.end - 1. components: the codec components to
    store (default all; an added role's shards leave out "ids", which the main shards hold).
    """
    want = list(range(spec.start, spec.end)) if expected is None else [int(e) for e in expected]
    got = [ex.example for ex in examples]
    if got != want:
        raise ShardError(f"shard {spec.index} holds examples {want[:3]}... ({len(want)}); got "
                         f"{len(got)} records starting {got[:3]}")
    table = examples_table(examples, layout)
    if components is not None:
        keep = {"example", "length", "num_rows", "t_start", "t_len", *components}
        table = table.select([c for c in table.column_names if c in keep])
    meta = {"format": "deltakd-teacher-cache-shard", "version": 1, **asdict(layout), "index": spec.index,
            "start": spec.start, "end": spec.end}
    table = table.replace_schema_metadata({"deltakd": json.dumps(meta)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=_COMPRESSION)
    data = sink.getvalue()
    info = ShardInfo(spec.index, spec.start, spec.end, spec.path, hashlib.sha256(memoryview(data)).hexdigest(),
                     data.size, int(sum(ex.num_rows for ex in examples)), layout.build_key)
    loc.makedirs(spec.path.rsplit("/", 1)[0])
    loc.makedirs(spec.meta_path.rsplit("/", 1)[0])
    loc.write_atomic(spec.path, data)
    loc.write_atomic(spec.meta_path, json.dumps(info.to_json(), indent=1).encode())
    return info


@dataclass
class DecodedShard:
    """All examples of one shard, decoded. The i-th stored example's rows are row_offsets[i] ..
    row_offsets[i+1] - 1; `start` is the shard's first position in the build order."""

    start: int
    examples: np.ndarray
    lengths: np.ndarray
    row_offsets: np.ndarray
    t: np.ndarray
    ids: np.ndarray
    logprobs: dict[str, np.ndarray]
    tail: dict[str, np.ndarray]

    def index_of(self, example: int) -> int:
        hits = np.flatnonzero(self.examples == example)
        if not hits.size:
            raise KeyError(f"example {example} is not in this shard (it holds {self.examples[:4].tolist()}...)")
        return int(hits[0])

    def record(self, example: int, roles: Sequence[str] | None = None) -> ExampleRecord:
        i = self.index_of(example)
        s = slice(int(self.row_offsets[i]), int(self.row_offsets[i + 1]))
        keep = list(roles) if roles is not None else list(self.logprobs)
        return ExampleRecord(int(self.examples[i]), int(self.lengths[i]), self.t[s], self.ids[s],
                             {r: self.logprobs[r][s] for r in keep}, {r: self.tail[r][s] for r in keep})


def read_shard_table(loc: CacheLocation, info: ShardInfo, layout: ShardLayout, expected: Sequence[int] | None = None,
                     ordered: bool = False, verify: bool = True) -> tuple[pa.Table, str]:
    """Read and check one shard file (sha256 and size against the manifest, Parquet, its layout metadata,
    the examples it holds: `expected`, default spec.start .. spec.end - 1). Returns (table, where) with
    `where` naming its path and range for messages. Raises ShardError naming them."""
    spec = info.spec(ordered)
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
    want_examples = np.arange(spec.start, spec.end) if expected is None else np.asarray(expected, dtype=np.int64)
    if not np.array_equal(examples, want_examples):
        raise ShardError(f"shard {where}: holds examples {examples[:3].tolist()}..., not the ones it should")
    return table, where
