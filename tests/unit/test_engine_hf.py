"""TeacherEngine (counted rows, tensors on its device) against a direct torch log-softmax of the same tiny
model, and bit for bit against the full-logits computation at the same rows (no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import ModelSpec, config_from_dict
from common.sparse import sparse_gather, sparse_topk
from common.topk import rows_from_mask
from teacher_service import TeacherEngine, TokenizerMismatchError, check_tokenizers, tokenizer_fingerprint
from teacher_service.errors import TeacherOutputError
from tests.tiny import make_llama, make_tokenizer

# fp32 on CPU: the engine and the reference run the same model and the same fp32 log-softmax; differences
# come only from chunking/reduction order, a few ulps of values around 1..30.
ATOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine")
    tok = make_tokenizer(root / "tok")
    return {
        "tok": tok,
        "a": make_llama(root / "a", tok, seed=1),
        "padded": make_llama(root / "padded", tok, seed=2, vocab_pad=5),
        "other_tok": make_tokenizer(root / "other_tok", extra_words="zebra yak"),
    }


def _batch(vocab: int, b: int = 3, t: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """input_ids, attention_mask [B, T] (one row right padded) and the counted rows (a prompt of 2 skipped)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, vocab, size=(b, t)).astype(np.int32)
    mask = np.ones((b, t), dtype=np.int32)
    mask[1, 5:] = 0  # right padding on one row
    ids[1, 5:] = 0
    counted = mask.astype(bool)
    counted[:, :2] = False  # the prompt
    return ids, mask, rows_from_mask(counted)


def _reference(path: Path, ids: np.ndarray, mask: np.ndarray, tau: float) -> torch.Tensor:
    """Naive dense reference: the model's own fp32 log_softmax(logits[..., :V] / tau), flat [B*T, V]."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    v = len(AutoTokenizer.from_pretrained(str(path)))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                       attention_mask=torch.as_tensor(mask, dtype=torch.long)).logits
    return torch.log_softmax(logits[..., :v].double() / tau, dim=-1).reshape(-1, v)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_topk_and_gather_equal_dense_log_softmax(models: dict[str, Path], tau: float) -> None:
    eng = TeacherEngine(ModelSpec(path=str(models["a"])), chunk_tokens=4)  # chunk smaller than N
    assert eng.rows_path == "hidden_states"
    ids, mask, rows = _batch(eng.vocab_size)
    ref = _reference(models["a"], ids, mask, tau)[torch.from_numpy(rows).long()]
    k = 8
    top_ids, top_lp, tail = eng.topk(ids, mask, rows, k, tau)
    assert all(isinstance(x, torch.Tensor) and x.device == eng.device for x in (top_ids, top_lp, tail))
    assert top_ids.dtype == torch.int32 and top_ids.shape == (len(rows), k)
    assert top_lp.dtype == torch.float32 and tail.dtype == torch.float32 and tail.shape == (len(rows),)
    ref_top, ref_idx = ref.topk(k, dim=-1)
    torch.testing.assert_close(top_ids.long(), ref_idx)
    torch.testing.assert_close(top_lp, ref_top.float(), rtol=0, atol=ATOL)
    torch.testing.assert_close(tail, (1 - ref_top.exp().sum(-1)).float(), rtol=0, atol=ATOL)

    rng = np.random.default_rng(1)
    support = rng.integers(0, eng.vocab_size, size=(len(rows), 5)).astype(np.int32)
    g_lp, g_tail = eng.gather(ids, mask, rows, support, tau)
    ref_g = ref.gather(-1, torch.as_tensor(support, dtype=torch.long))
    torch.testing.assert_close(g_lp, ref_g.float(), rtol=0, atol=ATOL)
    # tail off a support with possible repeated ids: mass of the distinct ids only
    for n in range(len(rows)):
        distinct = np.unique(support[n])
        expect = 1 - ref[n, distinct].exp().sum().item()
        assert abs(float(g_tail[n]) - expect) < ATOL


def test_rows_path_equals_full_logits_bitwise(models: dict[str, Path]) -> None:
    """Backbone -> rows -> LM head in chunks == the model's full [B, T, V'] logits at the same rows, bit for bit
    (same fp32 arithmetic on CPU; small chunks are padded so the BLAS takes the same kernel)."""
    for chunk in (1, 3, 1024):
        eng = TeacherEngine(ModelSpec(path=str(models["padded"])), chunk_tokens=chunk)
        ids, mask, rows = _batch(eng.vocab_size, b=4, t=9, seed=2)
        full = eng.full_logits(ids, mask)
        assert full.shape[-1] == eng.vocab_size + 5
        at_rows = full.reshape(-1, full.shape[-1])[torch.from_numpy(rows).long()]
        labels = torch.from_numpy(np.roll(ids, -1, axis=1).reshape(-1)[rows]).long()
        for include in (None, labels):
            got = eng.topk(ids, mask, rows, 6, 1.5, include=include)
            want = sparse_topk(at_rows, 6, 1.5, eng.vocab_size, 1024, include)
            assert torch.equal(got[0].long(), want[0]) and torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
            g = eng.gather(ids, mask, rows, got[0], 1.5)
            w = sparse_gather(at_rows, got[0], 1.5, eng.vocab_size)
            assert torch.equal(g[0], w[0]) and torch.equal(g[1], w[1])


def test_include_semantics(models: dict[str, Path]) -> None:
    eng = TeacherEngine(ModelSpec(path=str(models["a"])))
    ids, mask, rows = _batch(eng.vocab_size)
    ref = _reference(models["a"], ids, mask, 1.0)[torch.from_numpy(rows).long()]
    order = ref.argsort(-1, descending=True)
    forced = order[:, 9].clone()  # outside the top-3 -> the forced id takes slot 3
    forced[0] = order[0, 1]  # inside the top-3 -> slot 3 holds the 4th best
    top_ids, top_lp, tail = eng.topk(ids, mask, rows, 3, 1.0, include=forced.numpy())
    assert top_ids.shape == (len(rows), 4)
    torch.testing.assert_close(top_ids[:, :3].long(), order[:, :3])
    assert int(top_ids[0, 3]) == int(order[0, 3])
    torch.testing.assert_close(top_ids[1:, 3].long(), forced[1:])
    assert all(len(set(r.tolist())) == 4 for r in top_ids)
    torch.testing.assert_close(top_lp, ref.gather(-1, top_ids.long()).float(), rtol=0, atol=ATOL)
    torch.testing.assert_close(tail, (1 - ref.gather(-1, top_ids.long()).exp().sum(-1)).float(), rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="forced id"):
        eng.topk(ids, mask, rows, eng.vocab_size, 1.0, include=forced.numpy())
    with pytest.raises(ValueError, match="include shape"):
        eng.topk(ids, mask, rows, 3, 1.0, include=forced.numpy()[:2])


def test_padded_vocab_rows_are_cut(models: dict[str, Path]) -> None:
    eng = TeacherEngine(ModelSpec(path=str(models["padded"])))
    assert eng.model_vocab_size == eng.vocab_size + 5
    ids, mask, rows = _batch(eng.vocab_size)
    top_ids, top_lp, tail = eng.topk(ids, mask, rows, eng.vocab_size, 1.0)  # k = |V|: the whole (cut) vocabulary
    assert int(top_ids.max()) < eng.vocab_size
    torch.testing.assert_close(tail, torch.zeros_like(tail), rtol=0, atol=ATOL)
    torch.testing.assert_close(top_lp.double().exp().sum(-1), torch.ones(len(rows), dtype=torch.float64),
                               rtol=0, atol=1e-5)
    ref = _reference(models["padded"], ids, mask, 1.0)[torch.from_numpy(rows).long()]
    torch.testing.assert_close(top_lp, ref.sort(-1, descending=True).values.float(), rtol=0, atol=ATOL)


def test_right_padding_does_not_change_valid_positions(models: dict[str, Path]) -> None:
    eng = TeacherEngine(ModelSpec(path=str(models["a"])))
    ids, mask, _ = _batch(eng.vocab_size)
    _, lp_batch, _ = eng.topk(ids, mask, np.arange(7, 12), 4, 1.0)  # row 1, t = 0..4 (its real tokens)
    _, lp_alone, _ = eng.topk(ids[1:2, :5], mask[1:2, :5], np.arange(5), 4, 1.0)
    torch.testing.assert_close(lp_batch, lp_alone, rtol=0, atol=1e-4)


def test_no_rows_and_bad_rows(models: dict[str, Path]) -> None:
    eng = TeacherEngine(ModelSpec(path=str(models["a"])))
    ids, mask, _ = _batch(eng.vocab_size)
    empty = np.zeros(0, dtype=np.int32)
    top_ids, top_lp, tail = eng.topk(ids, mask, empty, 4, 1.0)
    assert top_ids.shape == (0, 4) and top_lp.shape == (0, 4) and tail.shape == (0,)
    lp, tl = eng.gather(ids, mask, empty, np.zeros((0, 4), dtype=np.int32), 1.0)
    assert lp.shape == (0, 4) and tl.shape == (0,)
    with pytest.raises(ValueError, match=r"rows out of range \[0, B\*T=21\)"):
        eng.topk(ids, mask, np.array([3, 21]), 4, 1.0)
    with pytest.raises(ValueError, match="strictly increasing"):
        eng.topk(ids, mask, np.array([3, 3]), 4, 1.0)
    with pytest.raises(ValueError, match=r"\[N, K\] with N = 2"):
        eng.gather(ids, mask, np.array([3, 4]), np.zeros((3, 4), dtype=np.int32), 1.0)


def test_k_out_of_range_names_k_and_vocab(models: dict[str, Path]) -> None:
    eng = TeacherEngine(ModelSpec(path=str(models["a"])))
    ids, mask, rows = _batch(eng.vocab_size)
    for bad_k in (0, eng.vocab_size + 1):
        with pytest.raises(ValueError, match=rf"k={bad_k}.*{eng.vocab_size}"):
            eng.topk(ids, mask, rows, bad_k, 1.0)


def test_nan_weights_raise_teacher_output_error(models: dict[str, Path]) -> None:
    eng = TeacherEngine(ModelSpec(path=str(models["a"])))
    with torch.no_grad():
        eng.model.lm_head.weight.fill_(float("nan"))
    assert eng._choose_rows_path() == "hidden_states"  # the load-time probe does not fail on NaN weights
    ids, mask, rows = _batch(eng.vocab_size)
    with pytest.raises(TeacherOutputError, match=r"batch 17.*NaN.*first at \[b, t\] = \[0, 2\]") as info:
        eng.topk(ids, mask, rows, 4, 1.0, batch_id=17)
    assert str(models["a"]) in str(info.value)


def test_logit_postprocessing_falls_back_to_the_full_forward(models: dict[str, Path], tmp_path: Path) -> None:
    """Gemma-2 soft-caps its logits after the LM head: the engine must use the model's own logits."""
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    tok = AutoTokenizer.from_pretrained(str(models["tok"]))
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, head_dim=16, final_logit_softcapping=3.0,
                       tie_word_embeddings=False, pad_token_id=tok.pad_token_id, max_position_embeddings=64)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)  # logits well beyond the cap, so capping changes them
    model.save_pretrained(str(tmp_path / "gemma"))
    tok.save_pretrained(str(tmp_path / "gemma"))
    eng = TeacherEngine(ModelSpec(path=str(tmp_path / "gemma")))
    assert eng.rows_path.startswith("full_forward (config.final_logit_softcapping")
    assert eng.describe()["rows_path"] == eng.rows_path
    ids, mask, rows = _batch(eng.vocab_size)
    ref = _reference(tmp_path / "gemma", ids, mask, 1.0)[torch.from_numpy(rows).long()]
    _, top_lp, _ = eng.topk(ids, mask, rows, 5, 1.0)
    torch.testing.assert_close(top_lp, ref.topk(5, dim=-1).values.float(), rtol=0, atol=ATOL)


def test_unknown_postprocessing_is_caught_by_the_probe(models: dict[str, Path]) -> None:
    eng = TeacherEngine(ModelSpec(path=str(models["a"])))
    forward = eng.model.forward

    def scaled(*args, **kwargs):  # a model whose logits are not lm_head(last_hidden_state)
        out = forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    eng.model.forward = scaled
    assert eng._choose_rows_path() == "full_forward (lm_head(last_hidden_state) differs from the model's logits)"


def test_weights_are_loaded_straight_onto_the_device(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """device_map={"": device} (accelerate): transformers places each weight as it is read, no host copy first."""
    import transformers

    seen: list[dict] = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    eng = TeacherEngine(ModelSpec(path=str(models["a"])), dtype="bfloat16")
    assert seen and seen[0]["device_map"] == {"": torch.device("cpu")} and seen[0]["dtype"] == torch.bfloat16
    assert next(eng.model.parameters()).dtype == torch.bfloat16


def test_encode_right_pads_with_service_tokenizer(models: dict[str, Path]) -> None:
    eng = TeacherEngine(ModelSpec(path=str(models["a"])))
    ids, mask = eng.encode(["the quick brown fox", "red"])
    assert ids.shape == mask.shape == (2, 4)
    assert mask[1].tolist() == [1, 0, 0, 0] and ids[1, 1] == eng.tokenizer.pad_token_id


def test_fingerprint_and_check_tokenizers(models: dict[str, Path]) -> None:
    same = tokenizer_fingerprint(str(models["a"]))
    assert same == tokenizer_fingerprint(str(models["tok"])) == tokenizer_fingerprint(str(models["padded"]))
    assert same != tokenizer_fingerprint(str(models["other_tok"]))
    base = {"models": {"base_teacher": {"path": str(models["a"])}, "sft_teacher": {"path": str(models["padded"])},
                       "student": {"path": str(models["a"])}}, "loss": {"k": 8}}
    info = check_tokenizers(config_from_dict(base))
    assert info["fingerprint"] == same and info["vocab_size"] == TeacherEngine(ModelSpec(path=str(models["a"]))).vocab_size
    bad = config_from_dict(base, [f"models.student.path={models['other_tok']}"])
    with pytest.raises(TokenizerMismatchError) as err:
        check_tokenizers(bad)
    assert str(models["other_tok"]) in str(err.value) and "sft=" in str(err.value)
    with pytest.raises(ValueError, match=r"loss.k=1000"):
        check_tokenizers(config_from_dict(base, ["loss.k=1000"]))
