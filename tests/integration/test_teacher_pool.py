"""TeacherPool on the shared local Ray cluster with tiny random Llamas: records equal the engines' numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray

from common.config import ModelSpec, RunConfig, config_from_dict
from common.topk import TopKRecord, rows_from_mask
from teacher_service import TeacherEngine, TeacherPool, TokenizerMismatchError
from tests.tiny import make_llama, make_model_set, make_tokenizer

ATOL = 1e-5  # fp32 on CPU, same model and same math in the actor and here: only summation-order ulps


def _cfg(paths: dict[str, Path], prefix: str, *overrides: str) -> RunConfig:
    data: dict[str, Any] = {
        "models": {"base_teacher": {"path": str(paths["base_teacher"])},
                   "sft_teacher": {"path": str(paths["sft_teacher"])},
                   "student": {"path": str(paths["student"])}},
        "loss": {"k": 8, "tau": 1.5},
        "teachers": {"name_prefix": prefix, "namespace": "deltakd-test"},
    }
    return config_from_dict(data, list(overrides))


def _batch(vocab: int, b: int, t: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, vocab, size=(b, t)).astype(np.int32)
    am = np.ones((b, t), dtype=np.int32)
    am[0, t - 2:] = 0  # right padding
    ids[0, t - 2:] = 0
    lm = am.astype(bool)
    lm[:, 0] = False  # the prompt is not trained on
    return ids, am, lm


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_model_set(tmp_path_factory.mktemp("pool"))


@pytest.fixture(scope="module")
def pool(ray_cluster: dict, models: dict[str, Path]) -> Any:
    # Two sft replicas (routing), a student_base role and one extra teacher pair: every chain shape at once.
    extra = f"models.extra_pairs=[{{base: {{path: {models['sft_teacher']}}}, sft: {{path: {models['base_teacher']}}}, alpha: 0.5}}]"
    # extra pairs are a loss.delta_form=student_shift feature (the paper form refuses them: one pair)
    cfg = _cfg(models, "pooltest", "teachers.student_base_source=teacher", "teachers.replicas={sft: 2}",
               "teachers.max_inflight_per_replica=2", "teachers.num_cpus=0.5", "loss.delta_form=student_shift",
               extra)
    p = TeacherPool.start(cfg)
    yield p
    p.shutdown()


def test_record_equals_engines(pool: TeacherPool, models: dict[str, Path]) -> None:
    sft = TeacherEngine(ModelSpec(path=str(models["sft_teacher"])))
    base = TeacherEngine(ModelSpec(path=str(models["base_teacher"])))
    student = TeacherEngine(ModelSpec(path=str(models["student"])))
    ids, am, lm = _batch(sft.vocab_size, 3, 9, seed=0)
    rec = ray.get(pool.submit(7, ids, am, lm).ref)
    assert isinstance(rec, TopKRecord) and rec.batch_id == 7
    assert set(rec.roles) == {"sft", "base", "student_base", "sft_1", "base_1"}
    rows = rows_from_mask(lm)  # counted positions only: no prompt, no padding
    assert rec.shape == (len(rows), 8) and rec.batch_shape == (3, 9) and rec.tau == 1.5
    assert rec.vocab_size == sft.vocab_size and rec.tokenizer_fingerprint == sft.fingerprint
    np.testing.assert_array_equal(rec.rows, rows)
    np.testing.assert_array_equal(rec.mask, lm)
    e_ids, e_lp, e_tail = (x.numpy() for x in sft.topk(ids, am, rows, 8, 1.5))
    np.testing.assert_array_equal(rec.ids, e_ids)
    np.testing.assert_allclose(rec.role_logprobs("sft"), e_lp, atol=ATOL)
    np.testing.assert_allclose(rec.tail["sft"], e_tail, atol=ATOL)
    # base values = the base model's own log-probs at the SFT teacher's support
    b_lp, b_tail = (x.numpy() for x in base.gather(ids, am, rows, e_ids, 1.5))
    np.testing.assert_allclose(rec.role_logprobs("base"), b_lp, atol=ATOL)
    np.testing.assert_allclose(rec.tail["base"], b_tail, atol=ATOL)
    s_lp, _ = student.gather(ids, am, rows, e_ids, 1.5)
    np.testing.assert_allclose(rec.role_logprobs("student_base"), s_lp.numpy(), atol=ATOL)
    # the extra pair swaps the models, and gathers at pair 0's support
    np.testing.assert_allclose(rec.role_logprobs("sft_1"), b_lp, atol=ATOL)
    assert not np.allclose(rec.role_logprobs("base"), rec.role_logprobs("sft"), atol=1e-2)


def test_include_forces_the_labels_into_every_role_support(pool: TeacherPool, models: dict[str, Path]) -> None:
    """On-policy batches pass the labels: K = k + 1, the label at each counted row is in its support, and every
    role is gathered there."""
    sft = TeacherEngine(ModelSpec(path=str(models["sft_teacher"])))
    ids, am, lm = _batch(sft.vocab_size, 2, 8, seed=4)
    labels = np.roll(ids, -1, axis=1)
    rec = ray.get(pool.submit(8, ids, am, lm, include=labels).ref)
    rows = rows_from_mask(lm)
    assert rec.shape == (len(rows), 9)
    want = labels.reshape(-1)[rows]
    assert all(want[n] in rec.ids[n] for n in range(len(rows)))
    e_ids, e_lp, _ = sft.topk(ids, am, rows, 8, 1.5, include=want)
    np.testing.assert_array_equal(rec.ids, e_ids.numpy())
    np.testing.assert_allclose(rec.role_logprobs("sft"), e_lp.numpy(), atol=ATOL)
    with pytest.raises(ValueError, match="include must be integer token ids"):
        pool.submit(9, ids, am, lm, include=labels[:1])


def test_many_batches_routed_and_bounded(pool: TeacherPool) -> None:
    vocab = pool.vocab_size
    batches = {i: _batch(vocab, 2, 6, seed=i) for i in range(8)}
    refs = {i: pool.submit(i, *b).ref for i, b in batches.items()}
    for slots in pool.inflight.values():  # backpressure: never more than the cap per replica
        assert all(len(s) <= 2 for s in slots)
    recs = {i: ray.get(r) for i, r in refs.items()}
    assert sorted(r.batch_id for r in recs.values()) == list(range(8))
    stats = pool.stats()
    calls = [s["calls"] for s in stats["roles"]["sft"]]
    assert len(calls) == 2 and min(calls) > 0, f"both sft replicas should serve: {calls}"
    assert stats["tokens"]["base"] >= sum(int(b[1].sum()) for b in batches.values())


def test_warm_up_runs_every_role_and_is_not_counted(pool: TeacherPool) -> None:
    before = pool.submitted
    [ref] = pool.warm_up()
    rec = ray.get(ref)
    assert isinstance(rec, TopKRecord) and str(rec.batch_id).startswith("warmup-")
    assert rec.roles == pool.roles and rec.ids.shape[-1] == pool.cfg.loss.k
    parts = ray.get(pool.warm_up(assemble=False))  # the RDT path: teachers only, one part per role
    assert len(parts) == len(pool.roles) and "ids" in parts[0]
    assert pool.submitted == before


def test_tokenizer_mismatch_before_any_actor(ray_cluster: dict, models: dict[str, Path], tmp_path: Path) -> None:
    other = make_llama(tmp_path / "other", make_tokenizer(tmp_path / "tok", extra_words="zebra yak"))
    cfg = _cfg(models, "mismatch", f"models.base_teacher.path={other}")
    with pytest.raises(TokenizerMismatchError) as err:
        TeacherPool.start(cfg)
    assert str(other) in str(err.value) and str(models["sft_teacher"]) in str(err.value)
    with pytest.raises(ValueError):
        ray.get_actor("mismatch-sft-0", namespace="deltakd-test")  # nothing was started


def test_k_out_of_range(ray_cluster: dict, models: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"loss.k=500 .*1\.\.\d+"):
        TeacherPool.start(_cfg(models, "bigk", "loss.k=500"))


def test_attach_finds_running_actors(pool: TeacherPool, models: dict[str, Path]) -> None:
    attached = TeacherPool.attach(pool.cfg)
    assert {r: len(h) for r, h in attached.handles.items()} == {r: len(h) for r, h in pool.handles.items()}
    ids, am, lm = _batch(pool.vocab_size, 1, 5, seed=3)
    a = ray.get(attached.submit(1, ids, am, lm).ref)
    b = ray.get(pool.submit(1, ids, am, lm).ref)
    np.testing.assert_array_equal(a.ids, b.ids)
    attached.shutdown()  # not owned: must not kill the actors
    assert ray.get(pool.handles["sft"][0].health.remote())["ok"]
