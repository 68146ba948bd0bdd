"""`CacheFiller`: `teachers.source: auto`'s write-through. It receives the live records of a run's first
epoch and writes them as the shards of the cache a `cache build` of the same config would write.

The driver forwards each epoch-0 batch's record ref (nested, with the batch's example indices and lengths) as
it hands it to the worker; the filler cuts the record into ExampleRecords, keeps those of shards still to
write, and writes a shard as soon as it holds all of its examples. Epoch 0's batches are the build order's
first batches (plan.py), so shards fill in order and about one shard is held at a time. At the end of epoch 0
the driver asks `missing()` and has the teachers score the build batches holding what no batch brought (the
examples epoch 0 drops; after a resume, those of the steps before it), then `finish()` writes the manifest.
A run that stops earlier leaves its finished shards and build.json: a later `auto` run or `cache build` of
the same config continues that build.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray

from .manifest import BuildHead
from .records import ExampleRecord, split_batch
from .writer import CacheWriter

__all__ = ["CacheFiller", "FillerImpl"]


class FillerImpl:
    def __init__(self, uri: str, head: dict[str, Any]):
        self.head = BuildHead.from_json(head, f"{uri} (write-through)")
        self.writer = CacheWriter.open(uri, self.head)  # refuses a finished cache or another build's folder
        self.specs = {s.index: s for s in self.writer.pending()}
        self.need = {i: set(self.head.shard_examples(s)) for i, s in self.specs.items()}
        self.shard_of: dict[int, int] = {e: i for i, s in self.specs.items() for e in self.head.shard_examples(s)}
        self.held: dict[int, dict[int, ExampleRecord]] = {i: {} for i in self.specs}
        self.errors: list[str] = []
        self.shards_written = 0

    def status(self) -> dict[str, Any]:
        return {"pending_shards": len(self.specs), "total_shards": len(self.writer.specs),
                "shards_written": self.shards_written, "errors": list(self.errors)}

    def add(self, examples: Sequence[int], lengths: Sequence[int], box: list[Any]) -> int:
        """Take one live batch record (`box`: [ref], resolved here). Returns the shards written by it.
        A record that failed (a teacher error) is noted, not raised: the training run reports it itself."""
        if not any(int(e) in self.shard_of for e in examples):
            return 0
        try:
            rec = ray.get(box[0])
        except Exception as exc:  # noqa: BLE001 - the run fails on the same record with the real error
            self.errors.append(f"{type(exc).__name__}: {exc}")
            return 0
        roles = list(self.head.role_names)
        exs = split_batch(list(examples), list(lengths), rec.rows, rec.batch_shape, rec.ids,
                          {r: rec.role_logprobs(r) for r in roles}, {r: rec.tail[r] for r in roles})
        touched = set()
        for ex in exs:
            shard = self.shard_of.get(ex.example)
            if shard is not None and ex.example in self.need[shard]:
                self.held[shard][ex.example] = ex
                touched.add(shard)
        written = 0
        for shard in sorted(touched):
            if len(self.held[shard]) == len(self.need[shard]):
                spec = self.specs.pop(shard)
                held = self.held.pop(shard)
                self.writer.write(spec, [held[e] for e in self.head.shard_examples(spec)])
                for e in self.need.pop(shard):
                    self.shard_of.pop(e, None)
                written += 1
        self.shards_written += written
        return written

    def missing(self) -> list[int]:
        """Positions of the build order whose examples no batch has brought yet (in pending shards)."""
        order = self.head.order or list(range(self.head.num_examples))
        return [p for p, e in enumerate(order) if e in self.shard_of and e not in self.held[self.shard_of[e]]]

    def finish(self) -> dict[str, Any]:
        """Write the manifest (raises ShardError naming the shards not written)."""
        manifest = self.writer.finalize()
        return {"shards": len(manifest.shards), "tokens": manifest.num_tokens, "bytes": manifest.num_bytes}


CacheFiller = ray.remote(num_cpus=0, max_restarts=0)(FillerImpl)
