"""Optional vLLM engine for the SFT teacher's top-k (prompt logprobs). vLLM is imported only here, lazily.

vLLM returns, per prompt, `prompt_logprobs`: a list over positions (the first is None) of
dict[token_id, Logprob(.logprob, .rank)] with the top-k plus the actual prompt token (k or k+1 entries).
prompt_logprobs[i] is the distribution of token i given tokens < i, so our position t (the distribution
after reading token t) is prompt_logprobs[t + 1]; the last position comes from the one generated token's
`logprobs[0]`. Limits: vLLM prompt logprobs are at temperature 1 and over its (possibly padded)
vocabulary, and the normaliser is not returned, so tau != 1 cannot be applied exactly: we raise instead of
approximating. `gather` is not possible with vLLM 0.33 and raises.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common.config import ModelSpec

from .tokenizer_check import load_tokenizer, tokenizer_fingerprint

__all__ = ["VLLMEngine", "prompt_logprobs_to_topk"]


def prompt_logprobs_to_topk(positions: Sequence[Mapping[int, Any] | None], k: int, tau: float = 1.0,
                            vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """vLLM per-position logprob dicts -> (ids int32 [T, k], logprobs fp32 [T, k], tail fp32 [T]).

    positions[t]: dict token_id -> obj with .logprob and .rank for our position t (already shifted: the
    caller drops prompt_logprobs[0] and appends the generated token's dict). Entries with rank > k (the
    actual prompt token when it is outside the top-k) are dropped; entries are ordered by rank.
    tail = 1 - sum exp(logprob). Raises ValueError on tau != 1, a missing position, fewer than k entries
    or an id beyond vocab_size.
    """
    if tau != 1.0:
        raise ValueError(f"the vLLM engine supports tau=1 only (got tau={tau}): vLLM prompt logprobs are at "
                         "temperature 1 and lack the normaliser; use teachers.engine=hf for tau != 1")
    n = len(positions)
    ids = np.empty((n, k), dtype=np.int32)
    lps = np.empty((n, k), dtype=np.float32)
    for t, entry in enumerate(positions):
        if entry is None:
            raise ValueError(f"position {t}: no logprobs (pass prompt_logprobs[1:] plus the generated token's)")
        top = sorted(((int(v.rank), int(tok), float(v.logprob)) for tok, v in entry.items() if v.rank <= k))
        if len(top) < k:
            raise ValueError(f"position {t}: {len(top)} entries with rank <= {k}; raise max_logprobs to >= k")
        for j, (_, tok, lp) in enumerate(top[:k]):
            if vocab_size is not None and not 0 <= tok < vocab_size:
                raise ValueError(f"position {t}: token id {tok} outside the tokenizer's vocabulary [0, {vocab_size})")
            if math.isnan(lp) or lp > 1e-4:
                raise ValueError(f"position {t}: bad log-prob {lp} for token {tok}")
            ids[t, j], lps[t, j] = tok, lp
    tail = np.clip(1.0 - np.exp(lps.astype(np.float64)).sum(-1), 0.0, 1.0).astype(np.float32)
    return ids, lps, tail


class VLLMEngine:
    """The SFT teacher through vLLM. Only `topk`; `gather` raises (vLLM cannot score given ids here)."""

    def __init__(self, spec: ModelSpec, max_logprobs: int = 64, gpu_memory_utilization: float = 0.85,
                 max_model_len: int | None = None, dtype: str = "auto"):
        from vllm import LLM  # optional extra: pip install deltakd[vllm]

        self.spec = spec
        self.name = spec.path
        self.tokenizer = load_tokenizer(spec)
        self.vocab_size = len(self.tokenizer)
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.max_logprobs = int(max_logprobs)
        self.llm = LLM(model=spec.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code,
                       dtype=dtype, max_logprobs=self.max_logprobs, gpu_memory_utilization=gpu_memory_utilization,
                       max_model_len=max_model_len, tensor_parallel_size=1)

    def topk(self, input_ids: np.ndarray, attention_mask: np.ndarray, k: int, tau: float = 1.0,
             batch_id: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Same contract as TeacherEngine.topk; padded positions get a uniform filler (masked out later)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not 0 < k <= min(self.vocab_size, self.max_logprobs):
            raise ValueError(f"k={k} out of range for vLLM model {self.name}: 1..{min(self.vocab_size, self.max_logprobs)}"
                             f" (vocabulary {self.vocab_size}, max_logprobs {self.max_logprobs})")
        b, t = input_ids.shape
        lengths = np.asarray(attention_mask).sum(1).astype(int)
        params = SamplingParams(max_tokens=1, prompt_logprobs=k, logprobs=k, detokenize=False, temperature=1.0)
        prompts = [TokensPrompt(prompt_token_ids=[int(x) for x in input_ids[i, : lengths[i]]]) for i in range(b)]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        ids = np.tile(np.arange(k, dtype=np.int32), (b, t, 1))
        lps = np.full((b, t, k), -math.log(self.vocab_size), dtype=np.float32)
        tail = np.full((b, t), 1.0 - k / self.vocab_size, dtype=np.float32)
        for i, out in enumerate(outs):
            positions = list(out.prompt_logprobs[1:]) + [out.outputs[0].logprobs[0]]
            try:
                r_ids, r_lps, r_tail = prompt_logprobs_to_topk(positions, k, tau, self.vocab_size)
            except ValueError as err:
                raise ValueError(f"vLLM model {self.name}, batch {batch_id}, row {i}: {err}") from err
            n = lengths[i]
            ids[i, :n], lps[i, :n], tail[i, :n] = r_ids, r_lps, r_tail
        return ids, lps, tail

    def gather(self, *args: Any, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError(f"vLLM engine ({self.name}) cannot gather log-probs at given ids; only the sft "
                                  "role may use teachers.engine=vllm, other roles use the hf engine")

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tokenizer(list(texts), padding=True, return_tensors="np", padding_side="right")
        return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)

    def describe(self) -> dict[str, Any]:
        return {"model": self.name, "device": "cuda (vllm)", "dtype": "vllm", "vocab_size": self.vocab_size,
                "model_vocab_size": self.vocab_size, "fingerprint": self.fingerprint}
