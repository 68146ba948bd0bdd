"""The teacher cache: teacher outputs of a fixed data set, stored once and reused by many runs.

Layout of a cache (a local folder or any pyarrow file system URI):

    manifest.json          what the cache is valid for, how it is stored, its shards (written last)
    build.json             the build's settings, written first (a rerun resumes only the same build)
    shards/shard-NNNNN.parquet      one row per example: its counted positions and encoded teacher rows
    shard_meta/shard-NNNNN.json     the shard's sha256, size and example range (its completion mark)

Modules: `records` (ExampleRecord, split_batch, assemble_batch), `shard` (Parquet shard format),
`manifest` (validity and checks), `identity` (model / data fingerprints, a run's expectations),
`writer` (CacheWriter: plan, resume, finalize), `reader` (CacheReader), `cli` (status, verify).
The compact encoding is `common.codec`.
"""

from .encoded import EncodedShard, read_shard
from .errors import CacheError, CacheIncompleteError, CacheMismatchError, CacheRoleError, ShardError
from .manifest import AddedRole, BuildHead, Manifest, load_manifest
from .reader import CacheReader, check_roles, open_for_run
from .records import ExampleRecord, assemble_batch, encoding_mass_eps, split_batch
from .shard import ShardInfo, ShardLayout, ShardSpec, write_shard
from .writer import CacheWriter

__all__ = [
    "CacheError",
    "CacheIncompleteError",
    "CacheMismatchError",
    "CacheRoleError",
    "ShardError",
    "AddedRole",
    "BuildHead",
    "Manifest",
    "load_manifest",
    "CacheReader",
    "check_roles",
    "open_for_run",
    "ExampleRecord",
    "assemble_batch",
    "encoding_mass_eps",
    "split_batch",
    "EncodedShard",
    "read_shard",
    "ShardInfo",
    "ShardLayout",
    "ShardSpec",
    "write_shard",
    "CacheWriter",
]
