"""TeacherEngine against a direct torch log-softmax of the same tiny model (no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import ModelSpec, config_from_dict
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


def _batch(vocab: int, b: int = 3, t: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, vocab, size=(b, t)).astype(np.int32)
    mask = np.ones((b, t), dtype=np.int32)
    mask[1, 5:] = 0  # right padding on one row
    ids[1, 5:] = 0
    return ids, mask


def _reference(path: Path, ids: np.ndarray, mask: np.ndarray, tau: float) -> torch.Tensor:
    """Naive dense reference: the model's own fp32 log_softmax(logits[..., :V] / tau)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    v = len(AutoTokenizer.from_pretrained(str(path)))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                       attention_mask=torch.as_tensor(mask, dtype=torch.long)).logits
    return torch.log_softmax(logits[..., :v].double() / tau, dim=-1)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_topk_and_gather_equal_dense_log_softmax(models: dict[str, Path], tau: float) -> None:
    eng = TeacherEngine(ModelSpec(path=str(models["a"])), chunk_tokens=4)  # chunk smaller than B*T
    ids, mask = _batch(eng.vocab_size)
    ref = _reference(models["a"], ids, mask, tau)
    k = 8
    top_ids, top_lp, tail = eng.topk(ids, mask, k, tau)
    assert top_ids.dtype == np.int32 and top_ids.shape == (3, 7, k)
    assert top_lp.dtype == np.float32 and tail.dtype == np.float32 and tail.shape == (3, 7)
    ref_top, ref_idx = ref.topk(k, dim=-1)
    valid = mask.astype(bool)
    np.testing.assert_array_equal(top_ids[valid], ref_idx.numpy()[valid])
    np.testing.assert_allclose(top_lp[valid], ref_top.numpy()[valid], atol=ATOL)
    np.testing.assert_allclose(tail[valid], (1 - ref_top.exp().sum(-1)).numpy()[valid], atol=ATOL)

    rng = np.random.default_rng(1)
    support = rng.integers(0, eng.vocab_size, size=(3, 7, 5)).astype(np.int32)
    g_lp, g_tail = eng.gather(ids, mask, support, tau)
    ref_g = ref.gather(-1, torch.as_tensor(support, dtype=torch.long))
    np.testing.assert_allclose(g_lp[valid], ref_g.numpy()[valid], atol=ATOL)
    # tail off a support with possible repeated ids: mass of the distinct ids only
    for b, t in zip(*np.nonzero(valid)):
        distinct = np.unique(support[b, t])
        expect = 1 - ref[b, t, distinct].exp().sum().item()
        assert abs(g_tail[b, t] - expect) < ATOL


def test_padded_vocab_rows_are_cut(models: dict[str, Path]) -> None:
    eng = TeacherEngine(ModelSpec(path=str(models["padded"])))
    assert eng.model_vocab_size == eng.vocab_size + 5
    ids, mask = _batch(eng.vocab_size)
    top_ids, top_lp, tail = eng.topk(ids, mask, eng.vocab_size, 1.0)  # k = |V|: the whole (cut) vocabulary
    assert top_ids.max() < eng.vocab_size
    valid = mask.astype(bool)
    np.testing.assert_allclose(tail[valid], 0.0, atol=ATOL)
    np.testing.assert_allclose(np.exp(top_lp.astype(np.float64)).sum(-1)[valid], 1.0, atol=1e-5)
    ref = _reference(models["padded"], ids, mask, 1.0)
    np.testing.assert_allclose(top_lp[valid], ref.sort(-1, descending=True).values.numpy()[valid], atol=ATOL)


def test_right_padding_does_not_change_valid_positions(models: dict[str, Path]) -> None:
    eng = TeacherEngine(ModelSpec(path=str(models["a"])))
    ids, mask = _batch(eng.vocab_size)
    _, lp_batch, _ = eng.topk(ids, mask, 4, 1.0)
    _, lp_alone, _ = eng.topk(ids[1:2, :5], mask[1:2, :5], 4, 1.0)
    np.testing.assert_allclose(lp_batch[1, :5], lp_alone[0], atol=1e-4)


def test_k_out_of_range_names_k_and_vocab(models: dict[str, Path]) -> None:
    eng = TeacherEngine(ModelSpec(path=str(models["a"])))
    ids, mask = _batch(eng.vocab_size)
    for bad_k in (0, eng.vocab_size + 1):
        with pytest.raises(ValueError, match=rf"k={bad_k}.*{eng.vocab_size}"):
            eng.topk(ids, mask, bad_k, 1.0)


def test_nan_weights_raise_teacher_output_error(models: dict[str, Path]) -> None:
    eng = TeacherEngine(ModelSpec(path=str(models["a"])))
    with torch.no_grad():
        eng.model.lm_head.weight.fill_(float("nan"))
    ids, mask = _batch(eng.vocab_size)
    with pytest.raises(TeacherOutputError, match=r"batch 17.*NaN") as info:
        eng.topk(ids, mask, 4, 1.0, batch_id=17)
    assert str(models["a"]) in str(info.value)


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
