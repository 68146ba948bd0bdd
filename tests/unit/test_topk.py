"""TopKRecord (rows form): validation errors name role and batch id; from_dense at counted positions; the
forced-id support; the bf16 wire round trip; the (de)serialisation carries rows and batch_shape."""

from __future__ import annotations

import numpy as np
import pytest

from common.topk import (
    RecordError,
    TopKRecord,
    pair_roles,
    rows_from_mask,
    scatter_rows,
    to_wire_dtype,
    topk_with_include,
)


def dense_logprobs(b=2, t=5, v=23, roles=("sft", "base"), seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for r in roles:
        x = rng.normal(size=(b, t, v)) * 2
        x = x - np.log(np.exp(x).sum(-1, keepdims=True))
        out[r] = x.astype(np.float32)
    return out


def loss_mask(b=2, t=5):
    m = np.zeros((b, t), dtype=bool)
    m[0, 2:] = True  # prompt of 2, no padding
    m[1, 1:3] = True  # prompt of 1, padding after 3
    return m


def record(k=6, wire="float32", mask=None, **kw):
    return TopKRecord.from_dense("b42", dense_logprobs(**kw), k, mask=loss_mask() if mask is None else mask,
                                 wire_dtype=wire)


def test_good_record_validates_and_holds_counted_rows_only():
    rec = record()
    assert rec.validate(required_roles=["sft", "base"]) is rec
    assert rec.shape == (5, 6) and rec.ids.dtype == np.int32 and rec.rows.dtype == np.int32
    assert rec.rows.tolist() == [2, 3, 4, 6, 7] and rec.batch_shape == (2, 5)
    np.testing.assert_array_equal(rec.mask, loss_mask())
    assert rec.tail["sft"].shape == (5,)


def test_from_dense_support_is_top_k_and_tail_is_the_rest():
    dense = dense_logprobs()
    rec = TopKRecord.from_dense(0, dense, 6, mask=loss_mask())
    flat = dense["sft"].reshape(10, 23)[rec.rows]
    top = np.sort(flat, -1)[..., ::-1][..., :6]
    np.testing.assert_allclose(rec.logprobs["sft"], top, rtol=0, atol=0)
    for role in dense:
        mass = np.exp(rec.logprobs[role].astype(np.float64)).sum(-1) + rec.tail[role]
        np.testing.assert_allclose(mass, 1.0, atol=1e-5)


def test_from_dense_default_mask_counts_every_position_and_full_support_has_zero_tail():
    rec = TopKRecord.from_dense(0, dense_logprobs(), 23)
    assert rec.rows.tolist() == list(range(10))
    for role in rec.roles:
        assert np.all(rec.tail[role] == 0.0)
    assert sorted(rec.ids[0].tolist()) == list(range(23))


def test_no_counted_position_is_a_valid_empty_record():
    rec = record(mask=np.zeros((2, 5), dtype=bool)).validate(["sft", "base"])
    assert rec.shape == (0, 6) and rec.bytes_per_token() == 0.0 and not rec.mask.any()


def test_include_forces_the_id_into_the_support():
    ref = np.log(np.array([[0.5, 0.2, 0.15, 0.1, 0.05]] * 3, dtype=np.float64))
    # forced id outside the top-2 -> slot 2 is the forced id; inside -> slot 2 is the 3rd best
    got = topk_with_include(ref, 2, np.array([4, 1, 0]))
    assert got.tolist() == [[0, 1, 4], [0, 1, 2], [0, 1, 2]]
    assert topk_with_include(ref, 2).tolist() == [[0, 1]] * 3
    with pytest.raises(ValueError, match="out of range"):
        topk_with_include(ref, 5, np.array([0, 0, 0]))  # k + 1 = 6 distinct ids > V = 5
    with pytest.raises(ValueError, match="forced ids out of range"):
        topk_with_include(ref, 2, np.array([0, 5, 0]))


def test_from_dense_with_include_has_k_plus_one_distinct_ids():
    dense = dense_logprobs()
    labels = np.random.default_rng(3).integers(0, 23, size=(2, 5))
    rec = TopKRecord.from_dense(0, dense, 4, mask=loss_mask(), include=labels).validate(["sft", "base"])
    assert rec.shape == (5, 5)
    for n, r in enumerate(rec.rows):
        assert labels.reshape(-1)[r] in rec.ids[n]
        assert len(set(rec.ids[n].tolist())) == 5
    top4 = np.argsort(-dense["sft"].reshape(10, 23)[rec.rows], -1, kind="stable")[:, :4]
    np.testing.assert_array_equal(rec.ids[:, :4], top4)


def test_scatter_and_rows_from_mask():
    m = loss_mask()
    rows = rows_from_mask(m)
    back = scatter_rows(np.arange(len(rows)), rows, m.shape, -1)
    assert back.shape == (2, 5) and (back[m] == np.arange(len(rows))).all() and (back[~m] == -1).all()
    rec = record()
    dense_ids = rec.scatter(rec.ids, -1)
    assert dense_ids.shape == (2, 5, 6) and (dense_ids[~m] == -1).all()


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
    err = _bad(lambda r: r.logprobs.__setitem__("base", r.logprobs["base"][:, :3]))
    assert err.role == "base" and "shape" in str(err)
    err = _bad(lambda r: r.tail.__setitem__("sft", r.tail["sft"][:2]))
    assert err.role == "sft" and "tail shape" in str(err)


def test_rows_are_checked():
    assert "rows shape" in str(_bad(lambda r: setattr(r, "rows", r.rows[:3])))
    assert "int32" in str(_bad(lambda r: setattr(r, "rows", r.rows.astype(np.int64))))
    assert "strictly increasing" in str(_bad(lambda r: setattr(r, "rows", r.rows[[0, 2, 1, 3, 4]])))
    assert "strictly increasing" in str(_bad(lambda r: r.rows.__setitem__(1, r.rows[0])))
    err = _bad(lambda r: r.rows.__setitem__(4, 10))
    assert "out of range" in str(err) and "B*T=10" in str(err)
    assert "out of range" in str(_bad(lambda r: r.rows.__setitem__(0, -1)))
    assert "batch_shape" in str(_bad(lambda r: setattr(r, "batch_shape", (2,))))


def test_nan_and_posinf_name_role():
    def put(value):
        def f(r):
            r.logprobs["base"][3, 0] = value
        return f
    for value in (np.nan, np.inf):
        err = _bad(put(value))
        assert err.role == "base" and "non-finite" in str(err)
    err = _bad(lambda r: r.tail["sft"].__setitem__(0, np.nan))
    assert err.role == "sft" and "tail" in str(err)


def test_ids_out_of_range():
    assert "out of range" in str(_bad(lambda r: r.ids.__setitem__((0, 0), 23)))
    assert "out of range" in str(_bad(lambda r: r.ids.__setitem__((0, 0), -1)))
    assert "int32" in str(_bad(lambda r: setattr(r, "ids", r.ids.astype(np.int64))))


def test_mass_above_one():
    err = _bad(lambda r: r.tail.__setitem__("base", r.tail["base"] + 0.5))
    assert err.role == "base" and ("mass" in str(err))
    err = _bad(lambda r: r.logprobs["sft"].__setitem__((0, 0), 0.5))
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
    assert back.batch_shape == (2, 5)
    np.testing.assert_array_equal(back.rows, extra.rows)
    np.testing.assert_array_equal(back.role_logprobs("student_base"), extra.role_logprobs("student_base"))
    back.validate(required_roles=["sft", "base", "student_base"])


def test_bytes_per_token_counts_counted_tokens():
    rec = record(k=64, v=100, wire="float16")
    # per counted token: ids int32 [k] + rows int32 + 2 roles x (fp16 [k] + fp32 tail)
    assert rec.bytes_per_token() == 4 * 64 + 4 + 2 * (2 * 64 + 4)


def test_pair_roles():
    assert pair_roles(0) == ("sft", "base") and pair_roles(2) == ("sft_2", "base_2")
