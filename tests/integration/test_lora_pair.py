"""A LoRA teacher pair on the shared Ray cluster: one pair actor (one copy of the base weights) against two
actors (the base, and the adapter merged into a full SFT copy).

- the pool starts one actor kind, named as the sft role, which serves base too; no base actor exists;
- its records equal the two actors' (with and without an on-policy `include`): support ids equal, the base
  role bit for bit (the same weights and ops), the sft role within fp32 ulps (LoRA vs merged weights);
- RDT (gloo) parts from the pair give the object-store record's targets bit for bit;
- the client finds the pair, serves `record`, `topk` and `gather` for both roles;
- a teacher cache built with the pair (no base stage) stores the two actors' numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray

from common.losses.targets import targets_from_record
from common.topk import rows_from_mask
from teacher_service import TeacherClient, TeacherPool
from tests.integration.test_rdt import _assert_same_targets, _Receiver
from tests.integration.test_student_training import make_cfg
from tests.lora_models import make_lora_adapter, merge_adapter

# fp32 on CPU: the sft role runs W x + s B (A x) in the pair and (W + s B A) x in the merged copy, the same value
# summed in another order: measured <= 2e-6 on log-probs (tests/unit/test_engine_pair.py); 1e-5 is the margin.
SFT_ATOL = 1e-5
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def tiny(tiny_world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """The session's tiny world (read-only, tests/integration/conftest.py) plus an adapter on its base teacher
    and that adapter merged into a full copy, both written here."""
    root = tmp_path_factory.mktemp("lora")
    paths = dict(tiny_world)
    adapter = make_lora_adapter(root / "models" / "sft_adapter", paths["base_teacher"], paths["tokenizer"])
    merged = merge_adapter(root / "models" / "sft_merged", paths["base_teacher"], adapter)
    return {"pair": {**paths, "sft_teacher": adapter}, "two": {**paths, "sft_teacher": merged}}


@pytest.fixture(scope="module")
def pools(ray_cluster: dict, tiny: dict[str, dict[str, Path]], tmp_path_factory) -> Iterator[dict[str, Any]]:
    out = tmp_path_factory.mktemp("pools")
    started: dict[str, Any] = {}
    try:
        for kind in ("pair", "two"):
            cfg = make_cfg(tiny[kind], out / kind, ["teachers.num_cpus=0.5", "transport.kind=rdt"], tag=f"lora{kind}")
            started[kind] = TeacherPool.start(cfg)
        yield started
    finally:
        for p in started.values():
            p.shutdown()


def _batch(vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    ids = rng.integers(4, vocab, size=(3, 11)).astype(np.int32)
    am = np.ones_like(ids)
    am[2, 8:] = 0
    ids[2, 8:] = 0
    lm = am.astype(bool)
    lm[:, :3] = False
    labels = np.where(lm, np.roll(ids, -1, axis=1), 0)
    return ids, am, lm, labels


def _assert_records_match(pair: Any, two: Any) -> None:
    assert pair.roles == two.roles == ["sft", "base"]
    np.testing.assert_array_equal(pair.ids, two.ids)
    np.testing.assert_array_equal(pair.rows, two.rows)
    np.testing.assert_array_equal(pair.role_logprobs("base"), two.role_logprobs("base"))
    np.testing.assert_array_equal(pair.tail["base"], two.tail["base"])
    np.testing.assert_allclose(pair.role_logprobs("sft"), two.role_logprobs("sft"), rtol=0, atol=SFT_ATOL)
    np.testing.assert_allclose(pair.tail["sft"], two.tail["sft"], rtol=0, atol=SFT_ATOL)


def test_one_pair_actor_serves_both_roles(pools: dict[str, Any]) -> None:
    pair, two = pools["pair"], pools["two"]
    assert pair.roles == two.roles == ["sft", "base"]
    assert pair.paired == ["base"] and two.paired == []
    assert len(pair.actors()) == 1 and len(two.actors()) == 2  # no second copy of the base weights
    assert pair.handles["base"] is pair.handles["sft"]
    (health,) = pair.health()["sft"]
    assert health["roles"] == ["sft", "base"] and "+" in health["model"]
    t = pair.cfg.teachers
    with pytest.raises(ValueError):  # no actor was started for the base role
        ray.get_actor(f"{t.name_prefix}-base-0", namespace=t.namespace)
    attached = TeacherPool.attach(pair.cfg)  # `serve` + attach find the pair by its sft name
    assert attached.paired == ["base"] and len(attached.actors()) == 1


def test_pair_records_equal_two_actors(pools: dict[str, Any]) -> None:
    pair, two = pools["pair"], pools["two"]
    ids, am, lm, labels = _batch(pair.vocab_size)
    for bid, include in ((1, None), (2, labels)):  # on-policy batches force the label into the support
        got = ray.get(pair.submit(bid, ids, am, lm, include=include).ref)
        want = ray.get(two.submit(bid, ids, am, lm, include=include).ref)
        assert got.shape == (int(lm.sum()), 16 if include is None else 17)
        _assert_records_match(got, want)
    stats = pair.stats()
    assert set(stats["roles"]) == {"sft"} and stats["roles"]["sft"][0]["roles"] == ["sft", "base"]


@contextlib.contextmanager
def _group(actors: list[Any]) -> Iterator[None]:
    from ray.experimental.collective import create_collective_group, destroy_collective_group

    group = create_collective_group(actors, backend="gloo")
    try:
        yield
    finally:
        destroy_collective_group(group)


def test_pair_rdt_parts_equal_the_object_store_record(pools: dict[str, Any]) -> None:
    pair = pools["pair"]
    receiver = _Receiver.options(num_cpus=0).remote()
    try:
        with _group([*pair.actors(), receiver]):
            ids, am, lm, labels = _batch(pair.vocab_size)
            for bid, include in ((11, None), (12, labels)):
                handle = pair.submit(bid, ids, am, lm, include=include, transport="rdt")
                assert handle.head["roles"] == ["sft", "base"] and len(handle.parts) == 2
                via_rdt = ray.get(receiver.take.remote(handle.head["meta"], handle.head["roles"], *handle.parts))
                record = ray.get(pair.submit(bid, ids, am, lm, include=include).ref)
                _assert_same_targets(via_rdt, targets_from_record(record))
    finally:
        ray.kill(receiver)


def test_client_serves_the_pair(pools: dict[str, Any]) -> None:
    pair, two = pools["pair"], pools["two"]
    t = pair.cfg.teachers
    client = TeacherClient(namespace=t.namespace, name_prefix=t.name_prefix)
    assert client.roles == ["sft", "base"] and client.paired == ["base"]
    ids, am, lm, _ = _batch(pair.vocab_size)
    rec = client.record(ids, k=16, attention_mask=am, loss_mask=lm)
    _assert_records_match(rec, ray.get(two.submit(21, ids, am, lm).ref))
    sft_ids, _, _ = client.topk(ids, k=16, attention_mask=am, positions=lm)
    lp_base, _ = client.gather(ids, sft_ids, attention_mask=am, positions=lm, role="base")
    lp_sft, _ = client.gather(ids, sft_ids, attention_mask=am, positions=lm, role="sft")
    rows = rows_from_mask(lm)
    np.testing.assert_array_equal(lp_base.reshape(-1, 16)[rows], rec.role_logprobs("base"))
    np.testing.assert_allclose(lp_sft.reshape(-1, 16)[rows], rec.role_logprobs("sft"), rtol=0, atol=SFT_ATOL)
    base_top, _, _ = client.topk(ids, k=16, attention_mask=am, positions=lm, role="base")
    assert not np.array_equal(base_top, sft_ids)  # the adapter is off for the base role


def test_cache_build_with_the_pair_stores_the_two_actor_records(pools: dict[str, Any], tiny, tmp_path: Path) -> None:
    """The pair's build (one top-k stage that scores base too, no base stage) holds, example by example, what
    the two actors give for that example (batched alone here, padded in the build: fp32 ulps)."""
    from common.data.batching import load_training_set
    from teacher_service.cache.build import build_cache
    from teacher_service.cache.encoded import read_shard
    from teacher_service.cache.fs import CacheLocation

    cfg = make_cfg(tiny["pair"], tmp_path / "run", ["teachers.num_cpus=0.5", "teachers.cache.encoding=fp32",
                                                    "teachers.cache.shard_size=24", "output.plot=false"])
    manifest, stats = build_cache(cfg, str(tmp_path / "cache"), progress=False, say=lambda _: None)
    head = manifest.head
    assert stats["shards_written"] == 2 and head.role_names == ("base", "sft")
    info = manifest.shards[1]
    shard = read_shard(CacheLocation(str(tmp_path / "cache")), info, head.layout(), roles=list(head.role_names),
                       expected=head.shard_examples(info.spec(head.order is not None)), ordered=head.order is not None)
    examples = load_training_set(cfg).examples
    for example in shard.examples[:3].tolist():
        rec = shard.record(int(example))
        ids = np.asarray(examples[example].input_ids, dtype=np.int32)[None]
        lm = np.zeros(ids.shape, dtype=bool)
        lm[0, rec.t] = True
        want = ray.get(pools["two"].submit(100 + example, ids, np.ones_like(ids), lm).ref)
        np.testing.assert_array_equal(rec.ids, want.ids)
        for role in ("sft", "base"):
            np.testing.assert_allclose(rec.logprobs[role], want.role_logprobs(role), rtol=0, atol=SFT_ATOL)
            np.testing.assert_allclose(rec.tail[role], want.tail[role], rtol=0, atol=SFT_ATOL)
