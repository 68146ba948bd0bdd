"""The LoRA teacher pair: one copy of the base weights serves the base and the SFT teacher. No Ray here.

`PairEngine` is a `TeacherEngine` over the base model with a PEFT LoRA adapter injected (`PeftModel`): the
`sft` role runs with the adapter on, the `base` role inside peft's `disable_adapter()` context, which turns the
LoRA layers' extra term off and leaves the base weights as they are, so the base role computes exactly the
base model (common/lora.py decides when a run is such a pair). The row path (backbone + LM head chunks, or the
full forward) is the parent's; both roles use it, the LoRA layers live inside the backbone (and in the head if
the adapter targets it, which the parent's probe then routes through the full forward).

Every call names its role (`role="sft"` or `"base"`); the actor passes it through. The two roles' forward
passes are separate (a LoRA-on and a LoRA-off pass cannot share activations), so the pair saves the second
copy of the weights and the transfer of the support between actors, not compute.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from common.config import ModelSpec
from common.data.tokenizer_check import load_tokenizer, tokenizer_fingerprint
from common.topk import ROLE_BASE, ROLE_SFT

from .engine_hf import ArrayLike, TeacherEngine, load_causal_lm, resolve_device, resolve_dtype

__all__ = ["PairEngine", "PAIR_ROLES"]

PAIR_ROLES = (ROLE_SFT, ROLE_BASE)  # adapter on, adapter off


class PairEngine(TeacherEngine):
    """Base model + LoRA adapter, answering for `sft` (adapter on) and `base` (adapter off).

    topk / gather are the parent's with a `role` keyword (default: sft for topk, base for gather, the chain's
    use). Shapes and returns as `TeacherEngine`.
    """

    roles = PAIR_ROLES

    def __init__(self, base: ModelSpec, adapter: ModelSpec, device: str = "auto", dtype: str = "auto",
                 chunk_tokens: int = 1024, num_gpus: int = 1):
        """num_gpus > 1 (on cuda): the base model spread over that many GPUs, as `TeacherEngine`."""
        # deferred: peft imports transformers' model classes (~2 s, measured with transformers'); only a pair needs it
        from peft import PeftModel

        self.spec = adapter
        self.base_spec = base
        self.name = f"{adapter.path}+{base.path}" if adapter.revision is None else \
            f"{adapter.path}@{adapter.revision}+{base.path}"
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, base.dtype, self.device)
        self.chunk_tokens = int(chunk_tokens)
        self.tokenizer = load_tokenizer(base)  # one vocabulary: check_tokenizers compared the adapter's, if any
        self.vocab_size = len(self.tokenizer)
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        if self.tokenizer.pad_token is None and self.tokenizer.eos_token is not None:
            self.tokenizer.pad_token = self.tokenizer.eos_token  # as TeacherEngine: after the fingerprint
        self.num_gpus = int(num_gpus)
        model = load_causal_lm(base, self.device, self.dtype, self.num_gpus)
        self.peft = PeftModel.from_pretrained(model, adapter.path, revision=adapter.revision, is_trainable=False)
        self.peft.eval()
        self._use_model(self.peft.get_base_model())  # the base model with the LoRA layers injected in place

    @classmethod
    def from_peft(cls, peft_model: Any, vocab_size: int, chunk_tokens: int = 1024, name: str | None = None,
                  fingerprint: str = "") -> PairEngine:
        """A pair over a PeftModel already in memory (tests, benchmarks): no tokenizer, `encode` unavailable."""
        base = peft_model.get_base_model()  # the base model with the LoRA layers injected in place
        engine = cls.from_model(base, vocab_size, chunk_tokens, name or f"in-memory-pair-{type(base).__name__}",
                                fingerprint)
        engine.base_spec = None
        engine.peft = peft_model.eval()
        return engine

    @contextmanager
    def role(self, role: str) -> Iterator[None]:
        """Within this context the model computes `role`: sft (adapter on) or base (adapter off)."""
        if role not in PAIR_ROLES:
            raise ValueError(f"{self.name}: a LoRA pair serves roles {list(PAIR_ROLES)}, not {role!r}")
        with self.peft.disable_adapter() if role == ROLE_BASE else nullcontext():
            yield

    def topk(self, input_ids: ArrayLike, attention_mask: ArrayLike, rows: ArrayLike, k: int, tau: float = 1.0,
             include: ArrayLike | None = None, batch_id: Any = None, role: str = ROLE_SFT,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with self.role(role):
            return super().topk(input_ids, attention_mask, rows, k, tau, include=include, batch_id=batch_id)

    def gather(self, input_ids: ArrayLike, attention_mask: ArrayLike, rows: ArrayLike, ids: ArrayLike,
               tau: float = 1.0, batch_id: Any = None, role: str = ROLE_BASE) -> tuple[torch.Tensor, torch.Tensor]:
        with self.role(role):
            return super().gather(input_ids, attention_mask, rows, ids, tau, batch_id=batch_id)

    def weight_bytes(self) -> int:
        """Bytes of every parameter held (the base once, plus the adapter's A and B matrices)."""
        return sum(p.numel() * p.element_size() for p in self.peft.parameters())

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "roles": list(PAIR_ROLES),
                "adapter": None if self.spec is None else self.spec.path,
                "base": None if self.base_spec is None else self.base_spec.path}
