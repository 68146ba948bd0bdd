"""A shard held in memory as it is stored (encoded), decoding only the examples a batch asks for.

A reader keeps recently used shards encoded (about the file size: ~300 B per counted token with the default
`q8d10`, against ~776 B decoded at fp32): batches drawn from a shuffled epoch touch every shard, and decoding
only their examples keeps both the memory and the decode work proportional to what is trained on.

    shard = EncodedShard.from_table(table, layout, where, start)      # shard.read_shard_table's output
    shard.add_role(table_of_added_role, "student_base", where)       # an added role's columns (same examples)
    records = shard.records([12, 7], roles=["sft", "base"])           # ExampleRecords, decoded now

`read_shard` decodes a whole shard (verify, streaming).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from common.codec import CodecError, DecodedRows, Segments, decode_rows, get_encoding

from .errors import ShardError
from .fs import CacheLocation
from .records import ExampleRecord
from .shard import DecodedShard, ShardInfo, ShardLayout, read_shard_table

__all__ = ["EncodedShard", "read_shard", "subset_segments"]

_DECODE_ROWS = 16_384  # rows decoded per vectorised call (bounded temporaries: ~ rows * K * 8 bytes an array)
_META = ("example", "length", "num_rows", "t_start", "t_len")


def _segments(col: pa.ChunkedArray | pa.Array) -> Segments:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32)[arr.offset: arr.offset + len(arr) + 1].astype(np.int64)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return Segments(data, offsets)


def subset_segments(seg: Segments, sel: np.ndarray) -> Segments:
    """The segments `sel` (indices, any order) of `seg`, copied into one contiguous buffer in that order."""
    starts, ends = seg.offsets[:-1][sel], seg.offsets[1:][sel]
    sizes = ends - starts
    total = int(sizes.sum())
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    if total == 0:
        return Segments(np.zeros(0, np.uint8), offsets)
    # byte b of the output comes from starts[seg_of(b)] + (b - offsets[seg_of(b)])
    seg_of = np.repeat(np.arange(sel.size), sizes)
    src = starts[seg_of] + (np.arange(total) - offsets[:-1][seg_of])
    return Segments(seg.data[src], offsets)


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


def _check_values(rows: DecodedRows, vocab_size: int, where: str) -> None:
    """What the sha256 cannot vouch for (a shard written from bad teacher output): ids in range, log-probs
    <= 0 and not NaN, tails in [0, 1]. The mass check is the receiver's (TopKRecord.validate, with the
    encoding's tolerance in meta["mass_eps"]); every build checked the mass at fp32 before encoding."""
    ids = rows.ids
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ShardError(f"{where}: support ids out of range [0, {vocab_size}): [{int(ids.min())}, {int(ids.max())}]")
    for r, lp in rows.logprobs.items():
        if np.isnan(lp).any() or (lp.size and float(lp.max()) > 1e-3):
            raise ShardError(f"{where}, role {r!r}: log-probs NaN or above 0")
        t = rows.tail[r]
        if t.size and not (np.isfinite(t).all() and float(t.min()) >= -1e-3 and float(t.max()) <= 1 + 1e-3):
            raise ShardError(f"{where}, role {r!r}: tail mass outside [0, 1]")


@dataclass
class EncodedShard:
    """One shard's examples, encoded. The i-th stored example has counts[i] rows, row_offsets[i] ..
    row_offsets[i + 1] - 1 of `t` ([sum counts] int32 positions); `segments` maps each codec component
    (ids, lp.<role>, tail.<role>, main and added roles) to its per-example buffers."""

    start: int
    examples: np.ndarray
    lengths: np.ndarray
    counts: np.ndarray
    row_offsets: np.ndarray
    t: np.ndarray
    segments: dict[str, Segments]
    layout: ShardLayout
    where: str
    added: list[str] = field(default_factory=list)
    tables: list[pa.Table] = field(default_factory=list, repr=False)  # keeps the buffers alive
    _index: dict[int, int] = field(default_factory=dict, repr=False)

    @classmethod
    def from_table(cls, table: pa.Table, layout: ShardLayout, where: str, start: int = 0) -> EncodedShard:
        examples = table.column("example").to_numpy().astype(np.int64)
        counts = table.column("num_rows").to_numpy().astype(np.int64)
        run_start = table.column("t_start").combine_chunks().values.to_numpy().astype(np.int64)
        run_len = table.column("t_len").combine_chunks().values.to_numpy().astype(np.int64)
        if run_len.sum() != counts.sum():
            raise ShardError(f"{where}: positions cover {int(run_len.sum())} rows, num_rows says {int(counts.sum())}")
        first = np.cumsum(run_len) - run_len
        t = (np.repeat(run_start - first, run_len) + np.arange(int(run_len.sum()))).astype(np.int32)
        segs = {c: _segments(table.column(c)) for c in table.column_names if c not in _META}
        return cls(int(start), examples, table.column("length").to_numpy(), counts,
                   np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), t, segs, layout, where, [], [table],
                   {int(e): i for i, e in enumerate(examples.tolist())})

    def add_role(self, table: pa.Table, role: str, where: str) -> None:
        """Take an added role's components (lp.<role>, tail.<role>) from its shard table, which must hold
        the same examples with the same row counts."""
        ex = table.column("example").to_numpy()
        counts = table.column("num_rows").to_numpy()
        if not (np.array_equal(ex, self.examples) and np.array_equal(counts, self.counts)):
            raise ShardError(f"{where}: its examples or row counts differ from those of {self.where}")
        for c in (f"lp.{role}", f"tail.{role}"):
            if c not in table.column_names:
                raise ShardError(f"{where}: column {c!r} missing")
            self.segments[c] = _segments(table.column(c))
        self.added.append(role)
        self.tables.append(table)

    @property
    def nbytes(self) -> int:
        return int(sum(s.data.nbytes for s in self.segments.values()) + self.t.nbytes)

    @property
    def roles(self) -> list[str]:
        return [*self.layout.roles, *self.added]

    def index_of(self, example: int) -> int:
        i = self._index.get(int(example))
        if i is None:
            raise KeyError(f"example {example} is not in {self.where}")
        return i

    def decode(self, sel: np.ndarray, roles: Sequence[str]) -> DecodedRows:
        """Decoded rows of the stored examples `sel` (indices into this shard, in that order)."""
        enc = get_encoding(self.layout.encoding)
        stored = enc.layout(self.roles)
        unknown = [r for r in roles if r not in stored]
        if unknown:
            raise ShardError(f"{self.where}: roles {unknown} not stored (roles: {self.roles})")
        needed = set(roles) | {ref for r in roles if (ref := stored[r][1]) is not None}
        comps = ["ids", *(f"{p}.{r}" for r in sorted(needed) for p in ("lp", "tail"))]
        counts = self.counts[sel]
        whole = sel.size == self.examples.size and bool((sel == np.arange(sel.size)).all())
        blobs = {c: self.segments[c] if whole else subset_segments(self.segments[c], sel) for c in comps}
        parts = []
        for a, b in _groups(counts, _DECODE_ROWS):
            sub = {c: Segments(seg.data, seg.offsets[a: b + 1]) for c, seg in blobs.items()}
            try:
                parts.append(decode_rows(sub, counts[a:b], self.layout.k, self.roles, self.layout.vocab_size, enc,
                                         select=list(roles)))
            except CodecError as exc:
                raise ShardError(f"{self.where}: {exc}") from None
        k = self.layout.k
        out = DecodedRows(
            np.concatenate([p.ids for p in parts]) if parts else np.zeros((0, k), np.int32),
            {r: np.concatenate([p.logprobs[r] for p in parts]) if parts else np.zeros((0, k), np.float32)
             for r in roles},
            {r: np.concatenate([p.tail[r] for p in parts]) if parts else np.zeros(0, np.float32) for r in roles})
        _check_values(out, self.layout.vocab_size, self.where)
        return out

    def records(self, examples: Sequence[int], roles: Sequence[str]) -> list[ExampleRecord]:
        """ExampleRecords of the given examples (in that order), decoding only them."""
        sel = np.array([self.index_of(e) for e in examples], dtype=np.int64)
        rows = self.decode(sel, roles)
        out, at = [], 0
        for i in sel.tolist():
            n = int(self.counts[i])
            s = slice(at, at + n)
            o = int(self.row_offsets[i])
            out.append(ExampleRecord(int(self.examples[i]), int(self.lengths[i]), self.t[o: o + n], rows.ids[s],
                                     {r: v[s] for r, v in rows.logprobs.items()}, {r: v[s] for r, v in rows.tail.items()}))
            at += n
        return out

    def decode_all(self, roles: Sequence[str] | None = None) -> DecodedShard:
        keep = list(self.roles if roles is None else roles)
        rows = self.decode(np.arange(self.examples.size), keep)
        return DecodedShard(self.start, self.examples, self.lengths, self.row_offsets, self.t, rows.ids, rows.logprobs,
                            rows.tail)


def read_shard(loc: CacheLocation, info: ShardInfo, layout: ShardLayout, roles: Sequence[str] | None = None,
               verify: bool = True, expected: Sequence[int] | None = None, ordered: bool = False) -> DecodedShard:
    """Read, check (sha256, range, layout) and decode one whole shard. Raises ShardError naming path and range."""
    table, where = read_shard_table(loc, info, layout, expected, ordered, verify)
    return EncodedShard.from_table(table, layout, where, info.start).decode_all(roles)
