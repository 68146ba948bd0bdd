"""The LoRA teacher pair (PairEngine, no Ray) against two separate engines: the base model, and the adapter
merged into a copy (merge_and_unload); and the config checks that decide when a run is such a pair."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import ConfigError, ModelSpec, config_from_dict
from common.lora import adapter_config, lora_pair_base, same_base
from common.topk import rows_from_mask
from teacher_service import TeacherEngine
from teacher_service.engine_pair import PairEngine
from tests.lora_models import make_lora_adapter, merge_adapter
from tests.tiny import make_llama, make_tokenizer

# fp32 on CPU. The base role runs the base weights themselves (LoRA layers switched off): the same ops as the
# base engine, so equal to the last bit (asserted with atol 0). The sft role computes W x + s * B (A x), the
# merged copy (W + s * B A) x: the same value in a different summation order, a few fp32 ulps of the
# activations, measured <= 2e-6 on log-probs of size ~1..30 here; 1e-5 leaves a 5x margin.
SFT_ATOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pair")
    tok = make_tokenizer(root / "tok")
    base = make_llama(root / "base", tok, seed=1)
    adapter = make_lora_adapter(root / "adapter", base, tok)
    return {"tok": tok, "base": base, "adapter": adapter, "merged": merge_adapter(root / "merged", base, adapter)}


def _batch(vocab: int, b: int = 3, t: int = 9, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, vocab, size=(b, t)).astype(np.int32)
    mask = np.ones((b, t), dtype=np.int32)
    mask[1, 6:] = 0  # right padding
    ids[1, 6:] = 0
    counted = mask.astype(bool)
    counted[:, :2] = False
    return ids, mask, rows_from_mask(counted)


@pytest.mark.parametrize("tau", [1.0, 1.7])
def test_pair_equals_base_and_merged_engines(models: dict[str, Path], tau: float) -> None:
    pair = PairEngine(ModelSpec(path=str(models["base"])), ModelSpec(path=str(models["adapter"])))
    base = TeacherEngine(ModelSpec(path=str(models["base"])))
    merged = TeacherEngine(ModelSpec(path=str(models["merged"])))
    assert pair.rows_path == base.rows_path == "hidden_states"
    ids, mask, rows = _batch(base.vocab_size)
    include = np.random.default_rng(1).integers(4, base.vocab_size, size=rows.shape)
    for forced in (None, include):  # on-policy batches force the label into the support
        p_ids, p_lp, p_tail = pair.topk(ids, mask, rows, 8, tau, include=forced)
        m_ids, m_lp, m_tail = merged.topk(ids, mask, rows, 8, tau, include=forced)
        torch.testing.assert_close(p_ids, m_ids, rtol=0, atol=0)
        torch.testing.assert_close(p_lp, m_lp, rtol=0, atol=SFT_ATOL)
        torch.testing.assert_close(p_tail, m_tail, rtol=0, atol=SFT_ATOL)
        # base role (adapter off) at the SFT support: the base engine's numbers, bit for bit
        g_lp, g_tail = pair.gather(ids, mask, rows, p_ids, tau, role="base")
        b_lp, b_tail = base.gather(ids, mask, rows, p_ids, tau)
        torch.testing.assert_close(g_lp, b_lp, rtol=0, atol=0)
        torch.testing.assert_close(g_tail, b_tail, rtol=0, atol=0)
        # the adapter is on again after the base call, and the roles really differ
        again = pair.gather(ids, mask, rows, p_ids, tau, role="sft")[0]
        torch.testing.assert_close(again, p_lp, rtol=0, atol=SFT_ATOL)
        assert (g_lp - p_lp).abs().max() > 1e-2
    assert pair.topk(ids, mask, rows, 8, tau, role="base")[0].equal(base.topk(ids, mask, rows, 8, tau)[0])
    with pytest.raises(ValueError, match="serves roles"):
        pair.gather(ids, mask, rows, p_ids, tau, role="student_base")
    # one copy of the base weights: the pair holds the base's bytes plus the adapter's A and B only
    base_bytes = sum(p.numel() * p.element_size() for p in base.model.parameters())
    assert base_bytes < pair.weight_bytes() < 1.3 * base_bytes
    assert pair.describe()["roles"] == ["sft", "base"]


def _cfg(sft: Path | str, base: Path | str, *overrides: str):
    return config_from_dict({"models": {"base_teacher": {"path": str(base)}, "sft_teacher": {"path": str(sft)},
                                        "student": {"path": str(base)}}}, list(overrides))


def test_lora_pair_detection_and_refusals(models: dict[str, Path], tmp_path: Path) -> None:
    assert adapter_config(ModelSpec(path=str(models["base"]))) is None
    assert adapter_config(ModelSpec(path=str(models["adapter"])))["peft_type"] == "LORA"
    assert lora_pair_base(_cfg(models["merged"], models["base"])) is None  # two full models: two actors
    assert lora_pair_base(_cfg(models["adapter"], models["base"])).path == str(models["base"])
    # a mismatched base is refused, naming both models
    with pytest.raises(ConfigError) as err:
        lora_pair_base(_cfg(models["adapter"], models["merged"]))
    assert str(models["adapter"]) in str(err.value) and str(models["merged"]) in str(err.value)
    # vLLM cannot gather the base role at the SFT support: refused with the reason
    with pytest.raises(ConfigError, match="prompt log-probs"):
        lora_pair_base(_cfg(models["adapter"], models["base"], "teachers.engine=vllm"))
    with pytest.raises(ConfigError, match="base teacher must be a full model"):
        lora_pair_base(_cfg(models["base"], models["adapter"]))
    # another adapter type is refused
    other = tmp_path / "ia3"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "base_model_name_or_path": None}))
    with pytest.raises(ConfigError, match="IA3"):
        lora_pair_base(_cfg(other, models["base"]))


def test_same_base_rules(tmp_path: Path) -> None:
    (tmp_path / "base_teacher").mkdir()
    (tmp_path / "adapter").mkdir()
    assert same_base("Qwen/Qwen2-7B", "Qwen/Qwen2-7B")
    assert same_base("Qwen/Qwen2-7B", "/models/Qwen2-7B/")  # a local copy of the hub model
    assert not same_base("Qwen/Qwen2-7B", "Qwen/Qwen2-72B")
    assert same_base("../base_teacher", str(tmp_path / "base_teacher"), tmp_path / "adapter")  # relative to it
    assert not same_base(str(tmp_path / "adapter"), str(tmp_path / "base_teacher"))
    assert same_base(None, "anything")  # an adapter that does not name its base is taken on trust
