"""VLLMEngine's own code (requests, the cut checkpoint it serves, conversion, include, device) around a
stand-in for vLLM's `LLM.generate` (vLLM cannot run here). The stand-in is a real tiny transformers model
loaded from the directory the engine hands to `LLM(model=...)`, answering in vLLM's FlatLogprobs layout
(per prompt position: the actual token, then the top-k by rank). So the test also checks the normaliser:
the engine serves the cut view of a checkpoint with padded vocabulary rows, and its log-probs must equal
the HF engine's (log-softmax over the tokenizer's rows only) of the ORIGINAL padded model.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from common.config import ModelSpec
from tests.tiny import make_llama, make_tokenizer


@dataclass
class _FlatLogprobs:
    start_indices: list[int] = field(default_factory=list)
    end_indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)


@dataclass
class _SamplingParams:  # the fields the engine may set (a dataclass: the engine feature-detects fields)
    max_tokens: int = 16
    detokenize: bool = True
    temperature: float = 1.0
    prompt_logprobs: int | None = None
    flat_logprobs: bool = False


class _LLM:
    """Stand-in for vllm.LLM: a real HF model from `model`, prompt log-probs in vLLM's flat layout."""

    created: list[dict[str, Any]] = []

    def __init__(self, model: str, **kwargs: Any):
        from transformers import AutoModelForCausalLM

        _LLM.created.append({"model": model, **kwargs})
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

    def generate(self, prompts: list[dict], params: _SamplingParams, use_tqdm: bool = False) -> list[Any]:
        assert params.flat_logprobs and params.max_tokens == 1 and params.temperature == 1.0
        outs = []
        for prompt in prompts:
            ids = torch.tensor([prompt["prompt_token_ids"]])
            with torch.no_grad():
                lp = torch.log_softmax(self.model(input_ids=ids).logits[0].double(), -1)  # over ALL its rows
            flat = _FlatLogprobs([0], [0])
            for i in range(ids.shape[1] - 1):
                order = torch.argsort(lp[i], descending=True, stable=True)
                actual = int(ids[0, i + 1])
                rank = int((order == actual).nonzero()[0, 0]) + 1
                flat.start_indices.append(len(flat.logprobs))
                for tok, r in [(actual, rank)] + [(int(t), j + 1) for j, t in enumerate(order[:params.prompt_logprobs])]:
                    flat.token_ids.append(tok)
                    flat.logprobs.append(float(lp[i, tok]))
                    flat.ranks.append(r)
                flat.end_indices.append(len(flat.logprobs))
            outs.append(types.SimpleNamespace(prompt_logprobs=flat))
        return outs


@pytest.fixture
def engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = _LLM, _SamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    from teacher_service.engine_vllm import VLLMEngine

    tok = make_tokenizer(tmp_path / "tok")
    padded = make_llama(tmp_path / "padded", tok, seed=7, vocab_pad=6)
    _LLM.created.clear()
    eng = VLLMEngine(ModelSpec(path=str(padded)), max_logprobs=9, cut_dir=str(tmp_path / "cut"))
    return eng, padded


def test_topk_at_rows_equals_the_hf_cut_normaliser(engine) -> None:
    from transformers import AutoModelForCausalLM

    eng, padded = engine
    made = _LLM.created[-1]
    assert made["model"] != str(padded) and made["max_logprobs"] == 9 and made["max_num_batched_tokens"] == 2048
    v = eng.vocab_size
    rng = np.random.default_rng(0)
    ids = rng.integers(4, v, size=(2, 7))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    ids[1, 5:] = 0
    rows = np.array([2, 3, 5, 7 + 1, 7 + 3])  # counted positions (never a sequence's last token)
    model = AutoModelForCausalLM.from_pretrained(str(padded), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits
    ref = torch.log_softmax(logits[..., :v].double(), -1).reshape(-1, v)[rows]  # the HF engine's normaliser
    k = 4
    top_ids, top_lp, tail = eng.topk(ids, mask, rows, k)
    assert top_ids.dtype == torch.int32 and top_lp.dtype == torch.float32 and top_ids.device == eng.device
    ref_lp, ref_ids = ref.topk(k, -1)
    np.testing.assert_array_equal(top_ids.numpy(), ref_ids.numpy())
    np.testing.assert_allclose(top_lp.numpy(), ref_lp.numpy(), atol=1e-5)
    np.testing.assert_allclose(tail.numpy(), 1 - ref_lp.exp().sum(-1).numpy(), atol=1e-5)

    labels = ids.reshape(-1)[rows + 1]
    inc_ids, inc_lp, _ = eng.topk(ids, mask, rows, k, include=labels)
    assert inc_ids.shape == (len(rows), k + 1) and (inc_ids.numpy() == labels[:, None]).any(1).all()
    np.testing.assert_allclose(inc_lp.numpy(), ref.gather(1, inc_ids.long()).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="include must be the next input token"):
        eng.topk(ids, mask, rows, k, include=(labels + 1) % v)
    with pytest.raises(ValueError, match="tau=2.0"):
        eng.topk(ids, mask, rows, k, tau=2.0)
    with pytest.raises(ValueError, match=r"k=9 \+ 1 \(include\) out of range.*max_logprobs 9"):
        eng.topk(ids, mask, rows, 9, include=labels)
    with pytest.raises(NotImplementedError, match="gather roles use the hf engine"):
        eng.gather(ids, mask, rows, inc_ids)


def test_a_four_gpu_replica_asks_vllm_for_tensor_parallelism(engine, tmp_path: Path) -> None:
    """The pool hands a replica of teachers.num_gpus: 4 tensor_parallel_size=4: vLLM gets TP 4 over the
    multiprocessing executor (engine_vllm.vllm_parallel_options says why not its Ray executor); one GPU
    stays on vLLM's default executor."""
    from teacher_service.engine_vllm import VLLMEngine

    eng, padded = engine
    assert _LLM.created[-1]["tensor_parallel_size"] == 1 and "distributed_executor_backend" not in _LLM.created[-1]
    tp = VLLMEngine(ModelSpec(path=str(padded)), max_logprobs=9, cut_dir=str(tmp_path / "cut"), tensor_parallel_size=4)
    made = _LLM.created[-1]
    assert made["tensor_parallel_size"] == 4 and made["distributed_executor_backend"] == "mp"
    assert tp.describe()["tensor_parallel_size"] == 4 and eng.describe()["tensor_parallel_size"] == 1
