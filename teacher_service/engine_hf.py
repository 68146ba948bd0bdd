"""The transformers teacher engine: one causal LM that scores batches of token ids. No Ray here.

`topk` gives the SFT teacher's support (its top-k ids at temperature tau, their log-probs and the tail
mass); `gather` gives any other model's log-probs at given ids plus its tail mass off those ids. The math
is `common.sparse` (fp32 log-softmax, chunked over tokens, padded vocabulary rows cut).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from common.config import ModelSpec
from common.sparse import sparse_gather, sparse_topk

from .errors import TeacherOutputError
from .tokenizer_check import load_tokenizer, tokenizer_fingerprint

__all__ = ["TeacherEngine", "resolve_device", "resolve_dtype"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, spec_dtype: str, device: torch.device) -> torch.dtype:
    """Explicit engine dtype, else the model spec's, else bf16 on cuda / fp32 on cpu."""
    for choice in (dtype, spec_dtype):
        if choice != "auto":
            if choice not in _DTYPES:
                raise ValueError(f"unknown dtype {choice!r}; expected one of {sorted(_DTYPES)} or 'auto'")
            return _DTYPES[choice]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class TeacherEngine:
    """A Hugging Face causal LM serving sparse distributions.

    vocab_size = len(tokenizer); logits' rows beyond it (padded embeddings) are cut before the softmax.
    Inputs are right padded: input_ids, attention_mask [B, T].
    """

    def __init__(self, spec: ModelSpec, device: str = "auto", dtype: str = "auto", chunk_tokens: int = 1024):
        from transformers import AutoModelForCausalLM

        self.spec = spec
        self.name = spec.path if spec.revision is None else f"{spec.path}@{spec.revision}"
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, spec.dtype, self.device)
        self.chunk_tokens = int(chunk_tokens)
        self.tokenizer = load_tokenizer(spec)
        self.vocab_size = len(self.tokenizer)
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        if self.tokenizer.pad_token is None and self.tokenizer.eos_token is not None:
            # Base LMs often ship without a pad token; padded positions are masked, so eos is a safe filler.
            # Set after the fingerprint, which describes the tokenizer as shipped.
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(spec.path, revision=spec.revision, dtype=self.dtype,
                                                     trust_remote_code=spec.trust_remote_code)
        self.model = model.to(self.device).eval()
        self.model_vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        if self.model_vocab_size < self.vocab_size:
            raise ValueError(f"model {self.name} has {self.model_vocab_size} output rows, fewer than its "
                             f"tokenizer's {self.vocab_size} tokens")

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> None:
        if input_ids.ndim != 2:
            raise ValueError(f"{self.name}: input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"{self.name}: attention_mask shape {tuple(attention_mask.shape)} != "
                             f"input_ids shape {tuple(input_ids.shape)}")
        if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= self.vocab_size):
            raise ValueError(f"{self.name}: token ids out of range [0, {self.vocab_size}): "
                             f"min {input_ids.min()}, max {input_ids.max()}")

    @torch.inference_mode()
    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray, batch_id: Any = None) -> torch.Tensor:
        """Raw logits [B, T, V'] (model dtype, V' >= vocab_size), checked finite at attended positions."""
        input_ids = np.asarray(input_ids)
        attention_mask = np.asarray(attention_mask)
        self._check_inputs(input_ids, attention_mask)
        ids_t = torch.tensor(input_ids, dtype=torch.long, device=self.device)  # copy: Ray hands read-only views
        mask_t = torch.tensor(attention_mask, dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids_t, attention_mask=mask_t, use_cache=False).logits
        # Only attended positions matter (padding positions are masked out of every loss); a NaN there
        # means broken weights or overflow, never something to pass on.
        bad = ~torch.isfinite(out[..., : self.vocab_size]).all(-1) & mask_t.bool()
        if bool(bad.any()):
            where = bad.nonzero()[0].tolist()
            raise TeacherOutputError(self.name, batch_id,
                                     f"{int(bad.sum())} positions with NaN/inf logits (first at [b, t] = {where})")
        return out

    def _check_k(self, k: int) -> None:
        if not 0 < k <= self.vocab_size:
            raise ValueError(f"k={k} out of range for model {self.name}: must be in 1..{self.vocab_size} "
                             f"(its vocabulary size)")

    @torch.inference_mode()
    def topk(self, input_ids: np.ndarray, attention_mask: np.ndarray, k: int, tau: float = 1.0,
             batch_id: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-k of log_softmax(logits / tau) per position.

        returns ids int32 [B, T, k] (descending log-prob), logprobs fp32 [B, T, k],
        tail fp32 [B, T] = 1 - sum_{i in top-k} p_i.
        """
        self._check_k(k)
        logits = self.logits(input_ids, attention_mask, batch_id)
        ids, lps, tail = sparse_topk(logits, k, tau, self.vocab_size, self.chunk_tokens)
        return (ids.to(torch.int32).cpu().numpy(), lps.cpu().numpy(), tail.cpu().numpy())

    @torch.inference_mode()
    def gather(self, input_ids: np.ndarray, attention_mask: np.ndarray, ids: np.ndarray, tau: float = 1.0,
               batch_id: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """log_softmax(logits / tau) at given ids [B, T, k], and the mass off them.

        returns logprobs fp32 [B, T, k], tail fp32 [B, T] = 1 - sum_{i in ids} p_i.
        """
        ids = np.asarray(ids)
        if ids.ndim != 3 or ids.shape[:2] != np.asarray(input_ids).shape:
            raise ValueError(f"{self.name}: support ids shape {tuple(ids.shape)} must be [B, T, k] with "
                             f"[B, T] = {tuple(np.asarray(input_ids).shape)}")
        self._check_k(ids.shape[-1])
        logits = self.logits(input_ids, attention_mask, batch_id)
        # np.array copies: ids arrive as a read-only view from the object store, which torch warns about
        support = torch.from_numpy(np.array(ids, dtype=np.int64)).to(self.device)
        lps, tail = sparse_gather(logits, support, tau, self.vocab_size, self.chunk_tokens)
        return lps.cpu().numpy(), tail.cpu().numpy()

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenise texts with this model's tokenizer, right padded: (input_ids int32, attention_mask) [B, T]."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode expects a list of strings")
        enc = self.tokenizer(list(texts), padding=True, return_tensors="np", padding_side="right")
        return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)

    def describe(self) -> dict[str, Any]:
        return {"model": self.name, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "vocab_size": self.vocab_size, "model_vocab_size": self.model_vocab_size,
                "fingerprint": self.fingerprint}
