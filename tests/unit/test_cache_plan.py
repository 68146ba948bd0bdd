"""Issue 14 part two without Ray: the build order a cache replays (a run's epoch-0 batches), shards over it,
roles added later (a student base per model), reading only a batch's examples from encoded shards, the
decode tolerance that comes from the encoding, and the teachers.source config keys."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.codec import ENCODINGS
from common.config import ConfigError, config_from_dict
from common.data.batching import BatchPlan
from common.topk import RecordError
from teacher_service.cache import (
    AddedRole,
    BuildHead,
    CacheReader,
    CacheRoleError,
    CacheWriter,
    ShardError,
    assemble_batch,
    encoding_mass_eps,
)
from teacher_service.cache.fs import CacheLocation
from teacher_service.cache.manifest import load_manifest
from teacher_service.cache.shard import ShardLayout, ShardSpec, write_shard
from tests.unit.test_cache_records import make_examples
from tests.unit.test_cache_store import ROLES, VALID_FOR

NUM = 23


@pytest.mark.parametrize("buckets", [0, 2])
def test_build_order_starts_with_epoch_zeros_batches_then_what_it_drops(buckets):
    lengths = tuple(int(x) for x in np.random.default_rng(0).integers(5, 40, size=NUM))
    plan = BatchPlan(NUM, 6, 2, seed=3, length_buckets=buckets, lengths=lengths if buckets else None)
    order = plan.build_order()
    assert sorted(order) == list(range(NUM))  # every example once
    b = plan.per_rank_batch
    chunks = [order[i: i + b] for i in range(0, NUM, b)]
    live = [idx for s in range(plan.steps_per_epoch) for idx in plan.step_indices(s)]
    assert chunks[: len(live)] == live  # the build's first batches are epoch 0's, in step then rank order
    dropped = set(order) - {e for batch in live for e in batch}
    assert len(dropped) == NUM - plan.steps_per_epoch * 6 and set(order[len(live) * b:]) == dropped


def ordered_head(encoding="fp32", order=None, shard_size=6):
    order = list(np.random.default_rng(1).permutation(NUM)) if order is None else order
    return BuildHead(dict(VALID_FOR, encoding=encoding, data=dict(VALID_FOR["data"], num_examples=NUM)), ROLES,
                     encoding, k=6, vocab_size=40, num_examples=NUM, shard_size=shard_size, order=order,
                     scoring={"batch": 3})


@pytest.fixture(scope="module")
def examples():
    return make_examples(NUM, seed=11)


def write_ordered(uri, examples, head):
    w = CacheWriter.open(str(uri), head)
    for spec in w.pending():
        w.write(spec, [examples[e] for e in head.shard_examples(spec)])
    return w.finalize()


def test_shards_over_a_build_order_read_back_by_example(tmp_path, examples):
    head = ordered_head()
    manifest = write_ordered(tmp_path / "c", examples, head)
    first = head.order[:6]
    assert manifest.shards[0].num_tokens == sum(examples[e].num_rows for e in first)
    assert [manifest.shard_of(e).index for e in first] == [0] * 6
    reader = CacheReader(str(tmp_path / "c"))
    want = [19, 0, 7, 22]
    for got, e in zip(reader.examples(want), want):
        assert got.example == e and got.logprobs["base"].tobytes() == examples[e].logprobs["base"].tobytes()
    # a shard written with another build's examples is refused, naming its place in the build order
    with pytest.raises(ShardError, match="holds examples"):
        CacheWriter.open(str(tmp_path / "d"), head).write(head.specs()[1], examples[6:12])
    bad = json.loads((tmp_path / "c" / "manifest.json").read_text())
    bad["order"] = list(range(NUM))  # the identity: shards no longer hold what the manifest says
    bad_dir = tmp_path / "c"
    (bad_dir / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ShardError, match=r"shard-00000.parquet \(build order positions 0..5\): holds examples"):
        CacheReader(str(bad_dir)).examples([0])


def test_a_batch_decodes_only_its_examples_and_memory_stays_bounded(tmp_path, examples):
    write_ordered(tmp_path / "c", examples, ordered_head("q8d10", shard_size=4))
    reader = CacheReader(str(tmp_path / "c"), max_bytes_in_memory=1)  # room for one shard at a time
    whole = {e.example: e for e in (r for s in reader.iter_shards() for r in
                                    (s.record(int(x)) for x in s.examples))}
    picked = reader.examples([5, 17, 2])
    for rec in picked:
        ref = whole[rec.example]
        for r in ("sft", "base"):
            assert rec.logprobs[r].tobytes() == ref.logprobs[r].tobytes()  # same bits as a whole-shard decode
    assert len(reader._shards) == 1 and reader.bytes_in_memory < 10_000
    rec = reader.batch([5, 17, 2], seq_len=20, batch_id=4)
    assert rec.meta["mass_eps"] == pytest.approx(encoding_mass_eps("q8d10", ["sft", "base"]))
    rec.validate(["sft", "base"])  # decoded q8d10 passes with the encoding's tolerance


def add_student_base(uri, examples, head, path, fingerprint):
    """What `cache add-role` writes: per shard, the role's lp/tail components (no ids), then the manifest."""
    loc = CacheLocation(str(uri))
    key = f"student_base-{fingerprint}"
    layout = ShardLayout(head.encoding, head.k, head.vocab_size, ("student_base",), f"bk-{key}")
    infos = []
    for spec in head.specs():
        exs = [examples[e] for e in head.shard_examples(spec)]
        recs = [type(x)(x.example, x.length, x.t, x.ids, {"student_base": x.logprobs["sft"] - np.float32(0.5)},
                        {"student_base": np.clip(x.tail["sft"] + 0.3, 0, 1).astype(np.float32)}) for x in exs]
        s = ShardSpec(spec.index, spec.start, spec.end, True, f"roles/{key}")
        infos.append(write_shard(loc, s, recs, layout, head.shard_examples(spec),
                                 components=["lp.student_base", "tail.student_base"]))
    manifest = load_manifest(loc)
    manifest.added_roles.append(AddedRole("student_base", key, {"path": path, "revision": None,
                                                                 "fingerprint": fingerprint}, infos))
    manifest.write(loc)


def test_a_student_base_added_per_model_is_picked_by_identity(tmp_path, examples):
    head = ordered_head("q8d10")
    write_ordered(tmp_path / "c", examples, head)
    add_student_base(tmp_path / "c", examples, head, "/m/small", "fp-small")
    uri = str(tmp_path / "c")
    small = {"student_base": {"path": "/elsewhere/small", "revision": None, "fingerprint": "fp-small"}}
    reader = CacheReader(uri, roles=["sft", "base", "student_base"], run_roles=small)
    rec = reader.batch([3, 9], seq_len=20, batch_id=0)
    lp = rec.role_logprobs("student_base")
    sft = rec.role_logprobs("sft")
    fin = np.isfinite(sft) & (sft > -20)
    np.testing.assert_allclose(lp[fin], sft[fin] - 0.5, atol=0.08)  # its own 10-bit rounding on top of sft's
    big = {"student_base": {"path": "/m/big", "revision": None, "fingerprint": "fp-big"}}
    with pytest.raises(CacheRoleError, match=r"other models: \['student_base of /m/small'\].*add-role student_base"):
        CacheReader(uri, roles=["sft", "student_base"], run_roles=big)
    assert CacheReader(uri, roles=["sft", "base"], run_roles={}).roles == ["sft", "base"]  # no S0: fine
    (tmp_path / "c" / "roles" / "student_base-fp-small" / "shards" / "shard-00002.parquet").unlink()
    with pytest.raises(ShardError, match="roles/student_base-fp-small/shards/shard-00002.parquet"):
        CacheReader(uri, roles=["sft", "student_base"], run_roles=small)


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_decoded_records_pass_validation_with_their_encodings_tolerance(tmp_path, examples, encoding):
    head = ordered_head(encoding)
    write_ordered(tmp_path / encoding, examples, head)
    reader = CacheReader(str(tmp_path / encoding))
    rec = reader.batch(list(range(NUM)), seq_len=20, batch_id=1)
    rec.validate(["sft", "base"])
    broken = assemble_batch(reader.examples([1, 2]), 20, 2, 1.0, 40, meta=dict(rec.meta))
    broken.logprobs["base"] = broken.logprobs["base"] + np.float32(0.5)  # mass x1.65: a wrong normaliser
    with pytest.raises(RecordError, match="probability mass"):
        broken.validate(["sft", "base"])


BASE = {"models": {"base_teacher": {"path": "a"}, "sft_teacher": {"path": "b"}, "student": {"path": "c"}}}


@pytest.mark.parametrize("teachers, match", [
    ({"source": "cache"}, "teachers.source=cache needs teachers.cache.uri"),
    ({"source": "auto"}, "teachers.source=auto needs teachers.cache.uri"),
    ({"student_base_source": "cache", "source": "auto", "cache": {"uri": "/c"}}, "needs teachers.source=cache"),
    ({"cache": {"encoding": "q8d11"}}, "unknown cache encoding 'q8d11' \\(did you mean 'q8d10'"),
])
def test_cache_keys_are_checked_by_name(teachers, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({**BASE, "teachers": teachers})


def test_cache_keys_defaults_and_resume():
    from student_worker.checkpoint import _ignored

    t = config_from_dict(BASE).teachers
    assert (t.source, t.cache.uri, t.cache.encoding, t.cache.on_error) == ("live", None, "q8d10", "stop")
    cfg = config_from_dict({**BASE, "teachers": {"source": "cache", "cache": {"uri": "s3://b/c"},
                                                 "student_base_source": "cache"}})
    assert cfg.teachers.cache.uri == "s3://b/c"
    # a run may switch between live teachers and the cache on resume (the cache is checked when opened)
    assert _ignored("teachers.source") and _ignored("teachers.cache.uri") and _ignored("teachers.cache.encoding")
    assert not _ignored("teachers.student_base_source")


@pytest.mark.parametrize("extra, match", [
    ({"training": {"on_policy": {"fraction": 0.5}}}, "training.on_policy.fraction=0.5 needs teachers.source=live"),
    ({"loss": {"objective": "sampled_token"}}, "loss.objective=sampled_token needs teachers.source=live"),
])
@pytest.mark.parametrize("source", ["cache", "auto"])
def test_forced_ids_need_live_teachers(extra, match, source):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({**BASE, **extra, "teachers": {"source": source, "cache": {"uri": "/c"}}})


def test_cache_sources_refuse_forced_ids_or_sampled_batches():
    import numpy as np

    from student_worker.record_source import _no_forced_ids

    _no_forced_ids(None, [0, 1])
    for include, examples in ((np.zeros((1, 2), np.int64), [0]), (None, None)):
        with pytest.raises(ValueError, match="training-set batches only"):
            _no_forced_ids(include, examples)
