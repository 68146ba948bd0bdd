"""common.codec: exact round trips where lossless, error bounds where not, one-call decode of many records,
sizes that match the formula, and errors that name the component."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from common.bitpack import BitPackError
from common.codec import (
    ENCODINGS,
    SPAN_CAP,
    CodecError,
    Segments,
    decode_rows,
    encode_rows,
    get_encoding,
    id_bits,
    pack_bits,
    unpack_bits,
)


def payload(n=7, k=5, vocab=1000, roles=("sft", "base", "student_base"), seed=0, spread=6.0):
    """ids distinct per row; log-probs <= 0 with a realistic spread; tails in [0, 1]."""
    rng = np.random.default_rng(seed)
    ids = np.array([rng.choice(vocab, size=k, replace=False) for _ in range(n)], dtype=np.int32).reshape(n, k)
    lp, tail = {}, {}
    for r in roles:
        x = rng.normal(size=(n, k)) * spread
        lp[r] = (x - np.log(np.exp(x).sum(-1, keepdims=True) * 1.1)).astype(np.float32)
        tail[r] = rng.random(n).astype(np.float32) * 0.1
    return ids, lp, tail


@pytest.mark.parametrize("bits", [1, 3, 8, 9, 17, 18, 25, 32])
def test_pack_unpack_round_trip(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, size=301, dtype=np.uint64)
    codes[:2] = [0, 2**bits - 1]  # both extremes
    buf = pack_bits(codes, bits)
    assert buf.size == (301 * bits + 7) // 8
    got = unpack_bits(buf, np.arange(301) * bits, bits)
    np.testing.assert_array_equal(unpack_bits(buf, np.array([7 * bits]), bits), codes[7:8])  # random access
    np.testing.assert_array_equal(got, codes)


def test_pack_refuses_codes_that_do_not_fit():
    with pytest.raises(BitPackError, match="do not fit in 4"):
        pack_bits(np.array([16]), 4)


@pytest.mark.parametrize("vocab", [2, 3, 512, 2**18, 152_064, 2**18 + 1])
def test_ids_bit_width_and_exact_round_trip(vocab):
    assert id_bits(vocab) == max(1, int(np.ceil(np.log2(vocab))))
    ids, lp, tail = payload(n=4, k=2, vocab=vocab)
    ids[0] = [0, vocab - 1]
    out = decode_rows(encode_rows(ids, lp, tail, vocab, "q8d10"), 4, 2, list(lp), vocab, "q8d10")
    np.testing.assert_array_equal(out.ids, ids)
    assert out.ids.dtype == np.int32


def test_fp32_is_bitwise_lossless_including_minus_inf_and_order():
    ids, lp, tail = payload()
    lp["base"][2, 1] = -np.inf
    lp["sft"][3, 0] = -np.inf
    enc = get_encoding("fp32")
    assert enc.lossless and not get_encoding("q8d10").lossless
    out = decode_rows(encode_rows(ids, lp, tail, 1000, enc), len(ids), ids.shape[1], list(lp), 1000, enc)
    np.testing.assert_array_equal(out.ids, ids)
    for r in lp:
        assert out.logprobs[r].tobytes() == lp[r].tobytes()
        assert out.tail[r].tobytes() == tail[r].tobytes()


@pytest.mark.parametrize("name", sorted(ENCODINGS))
def test_every_encoding_round_trips_within_its_bound(name):
    ids, lp, tail = payload(n=50, k=16, seed=3)
    enc = ENCODINGS[name]
    out = decode_rows(encode_rows(ids, lp, tail, 1000, enc), 50, 16, list(lp), 1000, enc)
    np.testing.assert_array_equal(out.ids, ids)
    for role, (codec, ref) in enc.layout(lp).items():
        assert out.tail[role].tobytes() == tail[role].tobytes()  # tails are kept exactly
        got, want = out.logprobs[role], lp[role]
        assert (got <= 0).all()
        if codec.kind == "f32":
            bound = np.zeros_like(want)
        elif codec.kind == "f16":
            bound = np.abs(want) * 2.0**-11 + 2.0**-25  # half an ulp, relative
        elif codec.kind == "bf16":
            bound = np.abs(want) * 2.0**-8
        else:
            # half a step of a row; a shift adds its reference's rounding to the role's own value
            x = want - lp[ref] if ref else want
            step = (x.max(1) - x.min(1)) / (2**codec.bits - 2)
            bound = np.repeat(step[:, None] * 0.5 * 1.01 + 1e-5, x.shape[1], axis=1)
            if ref:
                rx = lp[ref]
                rc = enc.layout(lp)[ref][0]
                bound = bound + ((rx.max(1) - rx.min(1)) / (2**rc.bits - 2) * 0.5 * 1.01 + 1e-5)[:, None]
        assert (np.abs(got - want) <= bound).all(), (role, float(np.abs(got - want).max()))


def test_shift_form_keeps_the_pair_delta_at_the_shift_precision():
    """delta = lp_sft - lp_base is what delta_kd reads: it carries only the shift's rounding."""
    ids, lp, tail = payload(n=40, k=16, seed=5)
    enc = get_encoding("q8d10")
    assert enc.describe(lp) == {"sft": "uq8", "student_base": "uq10", "base": "uq10 shift from sft"}
    out = decode_rows(encode_rows(ids, lp, tail, 1000, enc), 40, 16, list(lp), 1000, enc)
    d = lp["base"] - lp["sft"]
    step = (d.max(1) - d.min(1)) / (2**10 - 2)
    err = np.abs((out.logprobs["sft"] - out.logprobs["base"]) - (lp["sft"] - lp["base"]))
    assert (err <= step[:, None] * 0.5 * 1.01 + 1e-5).all()
    # ... while the absolute 8-bit form rounds both roles: its delta is several times coarser
    out8 = decode_rows(encode_rows(ids, lp, tail, 1000, "q8"), 40, 16, list(lp), 1000, "q8")
    err8 = np.abs((out8.logprobs["sft"] - out8.logprobs["base"]) - (lp["sft"] - lp["base"]))
    assert err8.mean() > 3 * err.mean()


def test_decoding_a_subset_of_roles_uses_the_stored_layout():
    """base alone decodes through its stored shift (its reference's buffers are needed, not returned)."""
    ids, lp, tail = payload(n=6, k=5, seed=4)
    blobs = encode_rows(ids, lp, tail, 1000, "q8d10")
    full = decode_rows(blobs, 6, 5, list(lp), 1000, "q8d10")
    only = decode_rows(blobs, 6, 5, list(lp), 1000, "q8d10", select=["base"])
    assert list(only.logprobs) == ["base"] and only.logprobs["base"].tobytes() == full.logprobs["base"].tobytes()
    with pytest.raises(CodecError, match="component 'lp.sft' missing"):
        decode_rows({c: b for c, b in blobs.items() if not c.endswith(".sft")}, 6, 5, list(lp), 1000, "q8d10",
                    select=["base"])
    with pytest.raises(CodecError, match=r"roles \['sft_1'\] were not encoded"):
        decode_rows(blobs, 6, 5, list(lp), 1000, "q8d10", select=["sft_1"])


def test_uq_minus_inf_and_far_values_decode_as_minus_inf():
    ids, lp, tail = payload(n=3, k=6, roles=("sft", "base"))
    lp["sft"][0, 5] = -np.inf
    lp["sft"][1, 4] = lp["sft"][1].max() - SPAN_CAP - 1  # far below the row's top: no mass worth a code
    lp["base"][2, 3] = -np.inf
    out = decode_rows(encode_rows(ids, lp, tail, 1000, "q8d10"), 3, 6, ["sft", "base"], 1000, "q8d10")
    assert np.isneginf(out.logprobs["sft"][0, 5]) and np.isneginf(out.logprobs["sft"][1, 4])
    assert np.isneginf(out.logprobs["base"][2, 3])
    assert np.isneginf(out.logprobs["base"][0, 5])  # its reference is -inf: documented, the shift is lost
    finite = np.isfinite(lp["sft"]) & np.isfinite(out.logprobs["sft"])
    assert finite.sum() == 18 - 2


def test_constant_and_empty_rows():
    ids, lp, tail = payload(n=2, k=4, roles=("sft",))
    lp["sft"][0] = -1.5  # all equal: a zero-width range
    lp["sft"][1] = -np.inf
    out = decode_rows(encode_rows(ids, lp, tail, 1000, "q8"), 2, 4, ["sft"], 1000, "q8")
    np.testing.assert_allclose(out.logprobs["sft"][0], -1.5, atol=1e-3)
    assert np.isneginf(out.logprobs["sft"][1]).all()
    zero = decode_rows(encode_rows(ids[:0], {"sft": lp["sft"][:0]}, {"sft": tail["sft"][:0]}, 1000, "q8d10"),
                       0, 4, ["sft"], 1000, "q8d10")
    assert zero.ids.shape == (0, 4) and zero.logprobs["sft"].shape == (0, 4)


@pytest.mark.parametrize("name", ["fp32", "bf16", "q8d10", "q9d9"])
def test_many_segments_decode_in_one_call_like_each_alone(name):
    parts = [payload(n=n, k=8, seed=s) for s, n in enumerate([3, 0, 11, 1, 5])]
    encoded = [encode_rows(i, lp, t, 1000, name) for i, lp, t in parts]
    counts = np.array([len(p[0]) for p in parts])
    segs = {}
    for comp in encoded[0]:
        bufs = [e[comp] for e in encoded]
        segs[comp] = Segments(np.concatenate(bufs), np.cumsum([0] + [b.size for b in bufs]))
    roles = ["sft", "base", "student_base"]
    together = decode_rows(segs, counts, 8, roles, 1000, name)
    alone = [decode_rows(e, int(c), 8, roles, 1000, name) for e, c in zip(encoded, counts)]
    np.testing.assert_array_equal(together.ids, np.concatenate([a.ids for a in alone]))
    for r in roles:
        assert together.logprobs[r].tobytes() == np.concatenate([a.logprobs[r] for a in alone]).tobytes()
        assert together.tail[r].tobytes() == np.concatenate([a.tail[r] for a in alone]).tobytes()


@pytest.mark.parametrize("name", sorted(ENCODINGS))
def test_bytes_per_token_formula_matches_the_buffers(name):
    k, vocab, n = 64, 152_064, 400
    ids, lp, tail = payload(n=n, k=k, vocab=vocab, roles=("sft", "base"))
    nbytes = sum(b.size for b in encode_rows(ids, lp, tail, vocab, name).values())
    # bit-packed buffers round up to a byte once each
    assert abs(nbytes / n - ENCODINGS[name].bytes_per_token(k, vocab, ["sft", "base"])) <= 3 / n


def test_goal_size_of_the_default_encoding():
    """Issue 14's goal: <= 1/1000 of a dense bf16 row at V = 152,064 (304.128 B) for k = 64, sft + base."""
    from common.codec import DEFAULT_ENCODING

    assert ENCODINGS[DEFAULT_ENCODING].bytes_per_token(64, 152_064, ["sft", "base"]) <= 2 * 152_064 / 1000


def test_errors_name_the_culprit():
    ids, lp, tail = payload(n=3, k=4, roles=("sft", "base"))
    with pytest.raises(CodecError, match="ids out of range"):
        encode_rows(ids + 1000, lp, tail, 1000, "q8d10")
    bad = dict(lp, base=lp["base"].copy())
    bad["base"][1, 2] = np.nan
    with pytest.raises(CodecError, match=r"role 'base': NaN or \+inf value \(first in row 1\)"):
        encode_rows(ids, bad, tail, 1000, "q8")
    with pytest.raises(CodecError, match="role 'base': logprobs shape"):
        encode_rows(ids, dict(lp, base=lp["base"][:, :3]), tail, 1000, "fp32")
    with pytest.raises(CodecError, match="roles with log-probs"):
        encode_rows(ids, lp, {"sft": tail["sft"]}, 1000, "fp32")
    with pytest.raises(CodecError, match="unknown encoding 'q7'"):
        get_encoding("q7")
    blobs = encode_rows(ids, lp, tail, 1000, "q8d10")
    with pytest.raises(CodecError, match="component 'lp.base': segment 0 has 26 bytes, expected 27 .*truncated"):
        decode_rows(dict(blobs, **{"lp.base": blobs["lp.base"][:-1]}), 3, 4, ["sft", "base"], 1000, "q8d10")
    with pytest.raises(CodecError, match="component 'tail.sft' missing"):
        decode_rows({k: v for k, v in blobs.items() if k != "tail.sft"}, 3, 4, ["sft", "base"], 1000, "q8d10")


def test_codec_is_pure():
    """common.codec imports with ray, transformers, vllm and pyarrow blocked (it serves the wire too)."""
    code = ("import sys\nfor n in ('ray', 'transformers', 'vllm', 'pyarrow', 'torch'):\n    sys.modules[n] = None\n"
            "import common.codec\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
