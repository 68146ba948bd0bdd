"""The on-disk cache: shards + manifest written, resumed and read back; every fault of issue 14 named.

Records are synthetic but real (random dense log-probs, the SFT role's top-k, tails), written to real
Parquet files on the local file system (plain paths and file:// URIs).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from teacher_service.cache import (
    BuildHead,
    CacheError,
    CacheIncompleteError,
    CacheMismatchError,
    CacheReader,
    CacheRoleError,
    CacheWriter,
    ShardError,
    assemble_batch,
)
from teacher_service.cache.cli import main as cli_main
from tests.unit.test_cache_records import make_examples

NUM, SHARD = 23, 5
ROLES = {"sft": {"path": "/m/sft", "revision": None, "fingerprint": "f-sft"},
         "base": {"path": "/m/base", "revision": None, "fingerprint": "f-base"}}
VALID_FOR = {"tokenizer_fingerprint": "tok", "vocab_size": 40, "k": 6, "tau": 1.0, "max_length": 32,
             "overlong": "truncate", "prompt_template": "Q: {instruction}", "context_template": "{context}",
             "data": {"source": "embedded", "split": "train", "num_examples": NUM, "examples_sha256": "abc"}}


def head(encoding="fp32", **valid_for):
    return BuildHead(dict(VALID_FOR, encoding=encoding, **valid_for), ROLES, encoding, k=6, vocab_size=40,
                     num_examples=NUM, shard_size=SHARD)


@pytest.fixture(scope="module")
def examples():
    return make_examples(NUM, seed=7)


def build(uri, examples, h=None, only=None):
    w = CacheWriter.open(str(uri), h or head())
    for spec in w.pending():
        if only is not None and spec.index not in only:
            continue
        w.write(spec, examples[spec.start: spec.end])
    return w


def shard_bytes(root):
    return {n: (root / "shards" / n).read_bytes() for n in sorted(os.listdir(root / "shards"))}


def test_fp32_cache_reads_back_bitwise_in_any_batching(tmp_path, examples):
    manifest = build(tmp_path / "c", examples).finalize()
    assert len(manifest.shards) == 5 and manifest.shards[-1].start == 20 and manifest.shards[-1].end == 23
    assert manifest.num_tokens == sum(e.num_rows for e in examples)
    reader = CacheReader(str(tmp_path / "c"))
    order = [17, 3, 22, 0, 9]
    for got, want in zip(reader.examples(order), [examples[i] for i in order]):
        assert got.example == want.example and got.length == want.length
        np.testing.assert_array_equal(got.t, want.t)
        np.testing.assert_array_equal(got.ids, want.ids)
        for r in ROLES:
            assert got.logprobs[r].tobytes() == want.logprobs[r].tobytes()
            assert got.tail[r].tobytes() == want.tail[r].tobytes()
    seq = max(examples[i].length for i in order)
    rec = reader.batch(order, seq, batch_id=3)
    ref = assemble_batch([examples[i] for i in order], seq, 3, 1.0, 40)
    np.testing.assert_array_equal(rec.rows, ref.rows)
    assert rec.logprobs["base"].tobytes() == ref.logprobs["base"].tobytes()
    assert rec.meta["encoding"] == "fp32" and rec.tokenizer_fingerprint == "tok"


def test_compact_encoding_round_trip_and_file_size(tmp_path, examples):
    build(tmp_path / "q", examples, head("q8d10")).finalize()
    build(tmp_path / "f", examples, head("fp32")).finalize()
    q = CacheReader(str(tmp_path / "q"))
    got = q.examples(range(NUM))
    for g, e in zip(got, examples):
        np.testing.assert_array_equal(g.ids, e.ids)
        np.testing.assert_allclose(g.logprobs["sft"], e.logprobs["sft"], atol=0.06)  # uq8 over ~15 nats
        assert g.tail["sft"].tobytes() == e.tail["sft"].tobytes()
    assert q.manifest.num_bytes < CacheReader(str(tmp_path / "f")).manifest.num_bytes


def test_shards_are_plain_parquet_for_other_readers(tmp_path, examples):
    build(tmp_path / "c", examples).finalize()
    table = pq.read_table(str(tmp_path / "c" / "shards"))  # a pyarrow dataset over the shard folder
    assert table.num_rows == NUM and sorted(table.column("example").to_pylist()) == list(range(NUM))
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["layout"]["storage"] == {"sft": "f32", "base": "f32"}
    assert manifest["valid_for"]["k"] == 6 and len(manifest["shards"]) == 5


def test_file_uri(tmp_path, examples):
    uri = f"file://{tmp_path}/u"
    build(uri, examples).finalize()
    assert CacheReader(uri).examples([21])[0].example == 21


def test_interrupted_build_resumes_to_identical_contents(tmp_path, examples):
    whole = tmp_path / "whole"
    build(whole, examples).finalize()
    part = tmp_path / "part"
    build(part, examples, only={0, 1, 2})  # killed after three shards, before the manifest
    with pytest.raises(CacheIncompleteError, match="unfinished build: 3 of 5 shards"):
        CacheReader(str(part))
    # what a kill leaves behind: a torn temporary file, a shard without its sidecar, a corrupted shard
    (part / "shards" / ".shard-00003.parquet.tmp-dead").write_bytes(b"partial")
    (part / "shard_meta" / "shard-00002.json").unlink()
    data = bytearray((part / "shards" / "shard-00001.parquet").read_bytes())
    data[100] ^= 0xFF
    (part / "shards" / "shard-00001.parquet").write_bytes(bytes(data))
    w = CacheWriter.open(str(part), head())
    assert [s.index for s in w.pending()] == [1, 2, 3, 4]  # shard 0 kept (checksum verified)
    assert not any(n.startswith(".") for n in os.listdir(part / "shards"))
    build(part, examples).finalize()
    assert shard_bytes(part) == shard_bytes(whole)
    assert (json.loads((part / "manifest.json").read_text())["shards"]
            == json.loads((whole / "manifest.json").read_text())["shards"])


def test_a_location_with_other_settings_is_refused(tmp_path, examples):
    build(tmp_path / "c", examples, only={0})
    with pytest.raises(CacheMismatchError) as err:
        CacheWriter.open(str(tmp_path / "c"), head(tau=2.0))
    assert "valid_for.tau: cache 1.0, build 2.0" in str(err.value)
    build(tmp_path / "c", examples).finalize()
    with pytest.raises(CacheError, match="already complete"):
        CacheWriter.open(str(tmp_path / "c"), head())
    with pytest.raises(CacheMismatchError, match="never overwritten"):
        CacheWriter.open(str(tmp_path / "c"), head("q8d10"))
    with pytest.raises(ShardError, match=r"shard-00002.parquet \(examples 10..14\)"):
        w = CacheWriter.open(str(tmp_path / "d"), head())
        w.write(w.specs[0], examples[0:5])
        w.finalize()


def test_run_mismatch_lists_every_key_with_both_values(tmp_path, examples):
    build(tmp_path / "c", examples).finalize()
    run = dict(VALID_FOR, k=8, tau=1.0, data=dict(VALID_FOR["data"], examples_sha256="zzz"))
    run_roles = {"sft": dict(ROLES["sft"], path="/elsewhere/sft"),  # same weights at another path: fine
                 "base": dict(ROLES["base"], fingerprint="f-other")}
    with pytest.raises(CacheMismatchError) as err:
        CacheReader(str(tmp_path / "c"), run_valid_for=run, run_roles=run_roles)
    assert err.value.differences == [
        "data.examples_sha256: cache 'abc', run 'zzz'",
        "k: cache 6, run 8",
        "roles.base.fingerprint: cache 'f-base', run 'f-other'",
    ]
    ok = CacheReader(str(tmp_path / "c"), run_valid_for=VALID_FOR, run_roles={"sft": run_roles["sft"]})
    assert ok.num_examples == NUM


def test_missing_role_is_named(tmp_path, examples):
    build(tmp_path / "c", examples).finalize()
    with pytest.raises(CacheRoleError, match=r"lacks role\(s\) \['student_base'\].*student_base_source"):
        CacheReader(str(tmp_path / "c"), roles=["sft", "base", "student_base"],
                    roles_why="delta_kd with teachers.student_base_source: cache")


def test_missing_shard_is_named_at_open(tmp_path, examples):
    build(tmp_path / "c", examples).finalize()
    (tmp_path / "c" / "shards" / "shard-00003.parquet").unlink()
    with pytest.raises(ShardError, match=r"1 shard\(s\) missing: .*shard-00003.parquet \(examples 15..19\)"):
        CacheReader(str(tmp_path / "c"))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_shard_is_named_before_any_record(tmp_path, examples, damage):
    build(tmp_path / "c", examples).finalize()
    path = tmp_path / "c" / "shards" / "shard-00002.parquet"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:50] + bytes([data[50] ^ 1]) + data[51:])
    reader = CacheReader(str(tmp_path / "c"))
    assert len(reader.examples([0, 4])) == 2  # other shards still serve
    with pytest.raises(ShardError, match=r"shard-00002.parquet \(examples 10..14\) is corrupted or truncated"):
        reader.batch([3, 11], seq_len=32, batch_id=1)
    streamed = []
    with pytest.raises(ShardError, match="shard-00002"):
        for shard in reader.iter_shards(prefetch=2):
            streamed.append(shard.start)
    assert streamed == [0, 5]


def test_iter_shards_streams_everything_in_order(tmp_path, examples):
    build(tmp_path / "c", examples).finalize()
    reader = CacheReader(str(tmp_path / "c"), roles=["sft"])
    got = [shard.record(e).example for shard in reader.iter_shards(prefetch=1)
           for e in range(shard.start, shard.start + shard.examples.size)]
    assert got == list(range(NUM)) and reader.shards_read == 5
    assert list(reader.examples([0])[0].logprobs) == ["sft"]


def test_cli_status_and_verify(tmp_path, examples, capsys):
    uri = str(tmp_path / "c")
    assert cli_main(["status", "--cache", uri]) == 2  # nothing there
    build(uri, examples, only={0, 1})
    assert cli_main(["status", "--cache", uri]) == 1
    assert "2 of 5 shards finished" in capsys.readouterr().out
    build(uri, examples).finalize()
    assert cli_main(["verify", "--cache", uri]) == 0
    out = capsys.readouterr().out
    assert "complete" in out and "all good" in out and "role base" in out
    path = tmp_path / "c" / "shards" / "shard-00004.parquet"
    path.write_bytes(path.read_bytes()[:-10])
    assert cli_main(["status", "--cache", uri]) == 0  # status only checks presence
    capsys.readouterr()
    assert cli_main(["verify", "--cache", uri, "--json"]) == 1
    status = json.loads(capsys.readouterr().out)
    assert len(status["problems"]) == 1 and "shard-00004.parquet (examples 20..22)" in status["problems"][0]


def test_bad_teacher_output_is_refused_at_write_and_at_read(tmp_path, examples, monkeypatch):
    """NaN teacher values never enter a shard; and as the checksum vouches only for the bytes, a shard that
    holds them anyway (written by another tool) is refused when read."""
    import dataclasses

    from teacher_service.cache import ExampleRecord

    bad = list(examples)
    lp = dict(bad[6].logprobs, base=bad[6].logprobs["base"].copy())
    lp["base"][0, 0] = np.nan
    bad[6] = dataclasses.replace(bad[6], logprobs=lp)
    with pytest.raises(CacheError, match="example 6, role 'base': NaN or"):
        build(tmp_path / "c", bad)
    monkeypatch.setattr(ExampleRecord, "check", lambda self: self)  # a writer without the check
    build(tmp_path / "c", bad).finalize()  # fp32 stores NaN as it is
    with pytest.raises(ShardError, match=r"shard-00001.parquet \(examples 5..9\), role 'base': log-probs NaN"):
        CacheReader(str(tmp_path / "c")).examples([6])
