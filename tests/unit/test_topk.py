"""TopKRecord: validation errors name role and batch id; from_dense; the bf16 wire round trip."""

from __future__ import annotations

import numpy as np
import pytest

from common.topk import RecordError, TopKRecord, pair_roles, to_wire_dtype


def dense_logprobs(b=2, t=5, v=23, roles=("sft", "base"), seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for r in roles:
        x = rng.normal(size=(b, t, v)) * 2
        x = x - np.log(np.exp(x).sum(-1, keepdims=True))
        out[r] = x.astype(np.float32)
    return out


def record(k=6, wire="float32", **kw):
    return TopKRecord.from_dense("b42", dense_logprobs(**kw), k, wire_dtype=wire)


def test_good_record_validates():
    rec = record()
    assert rec.validate(required_roles=["sft", "base"]) is rec
    assert rec.shape == (2, 5, 6) and rec.ids.dtype == np.int32


def test_from_dense_support_is_top_k_and_tail_is_the_rest():
    dense = dense_logprobs()
    rec = TopKRecord.from_dense(0, dense, 6)
    top = np.sort(dense["sft"], -1)[..., ::-1][..., :6]
    np.testing.assert_allclose(rec.logprobs["sft"], top, rtol=0, atol=0)
    for role in dense:
        mass = np.exp(rec.logprobs[role].astype(np.float64)).sum(-1) + rec.tail[role]
        np.testing.assert_allclose(mass, 1.0, atol=1e-5)


def test_from_dense_full_support_has_zero_tail():
    rec = record(k=23)
    for role in rec.roles:
        assert np.all(rec.tail[role] == 0.0)
    assert sorted(rec.ids[0, 0].tolist()) == list(range(23))


def test_bf16_round_trip():
    x = np.array([-0.0, -1.0, -3.140625, -12.3456, -80.0, -1e-3], dtype=np.float32)
    back = (to_wire_dtype(x, "bfloat16").astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_allclose(back, x, rtol=2**-8, atol=0)  # bf16: 8 significant bits, round to nearest
    assert back[2] == x[2]  # exactly representable stays exact
    rec = record(wire="bfloat16")
    assert rec.logprobs["sft"].dtype == np.uint16
    ref = record(wire="float32")
    np.testing.assert_allclose(rec.role_logprobs("sft"), ref.role_logprobs("sft"), rtol=2**-8)
    rec.validate(required_roles=["sft", "base"])


def test_to_wire_dtype_unknown():
    with pytest.raises(ValueError, match="float8"):
        to_wire_dtype(np.zeros(2), "float8")


def _bad(mutate):
    rec = record()
    mutate(rec)
    with pytest.raises(RecordError) as info:
        rec.validate(required_roles=["sft", "base"])
    assert "b42" in str(info.value)
    return info.value


def test_shape_mismatch_names_role():
    err = _bad(lambda r: r.logprobs.__setitem__("base", r.logprobs["base"][:, :, :3]))
    assert err.role == "base" and "shape" in str(err)
    err = _bad(lambda r: r.tail.__setitem__("sft", r.tail["sft"][:, :2]))
    assert err.role == "sft" and "tail shape" in str(err)
    assert "mask shape" in str(_bad(lambda r: setattr(r, "mask", r.mask[:1])))


def test_nan_and_posinf_name_role():
    def put(value):
        def f(r):
            r.logprobs["base"][1, 2, 0] = value
        return f
    for value in (np.nan, np.inf):
        err = _bad(put(value))
        assert err.role == "base" and "non-finite" in str(err)
    err = _bad(lambda r: r.tail["sft"].__setitem__((0, 0), np.nan))
    assert err.role == "sft" and "tail" in str(err)


def test_nan_on_masked_position_is_ignored():
    rec = record()
    rec.mask[1, 2] = False
    rec.logprobs["base"][1, 2, 0] = np.nan
    rec.validate(required_roles=["sft", "base"])


def test_ids_out_of_range():
    assert "out of range" in str(_bad(lambda r: r.ids.__setitem__((0, 0, 0), 23)))
    assert "out of range" in str(_bad(lambda r: r.ids.__setitem__((0, 0, 0), -1)))
    assert "int32" in str(_bad(lambda r: setattr(r, "ids", r.ids.astype(np.int64))))


def test_mass_above_one():
    err = _bad(lambda r: r.tail.__setitem__("base", r.tail["base"] + 0.5))
    assert err.role == "base" and ("mass" in str(err))
    err = _bad(lambda r: r.logprobs["sft"].__setitem__((0, 0, 0), 0.5))
    assert err.role == "sft" and "> 0" in str(err)


def test_missing_role():
    rec = record(roles=("sft",))
    with pytest.raises(RecordError, match="role 'base'.*missing") as info:
        rec.validate(required_roles=["sft", "base"])
    assert info.value.batch_id == "b42"
    with pytest.raises(RecordError, match="base"):
        rec.role_logprobs("base")


def test_k_out_of_range():
    assert "k=" in str(_bad(lambda r: setattr(r, "vocab_size", 4)))
    with pytest.raises(RecordError, match="k=24"):
        TopKRecord.from_dense(1, dense_logprobs(), 24)
    with pytest.raises(RecordError, match="k=0"):
        TopKRecord.from_dense(1, dense_logprobs(), 0)


def test_with_role_and_arrays_round_trip():
    rec = record(wire="float16")
    extra = rec.with_role("student_base", rec.role_logprobs("base"), rec.tail["base"])
    assert extra.logprobs["student_base"].dtype == np.float16 and "student_base" not in rec.logprobs
    back = TopKRecord.from_arrays(extra.header(), extra.to_arrays())
    assert back.roles == extra.roles and back.wire_dtype == "float16" and back.batch_id == "b42"
    np.testing.assert_array_equal(back.role_logprobs("student_base"), extra.role_logprobs("student_base"))
    back.validate(required_roles=["sft", "base", "student_base"])


def test_pair_roles():
    assert pair_roles(0) == ("sft", "base") and pair_roles(2) == ("sft_2", "base_2")
