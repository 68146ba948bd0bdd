"""The transformers teacher engine: one causal LM that scores the counted rows of a batch. No Ray here.

`topk` gives the SFT teacher's support (its top-k ids at temperature tau, their log-probs and the tail
mass), optionally with one forced id per row (`include`); `gather` gives any other model's log-probs at
given ids plus its tail mass off those ids. Both work on the counted rows only (`rows`: flat indices
b * T + t of a right-padded [B, T] batch): the backbone runs over the batch, its last hidden states are
selected at the rows, and the LM head is applied chunk by chunk over them (`common.sparse.head_topk`),
so no [B, T, V] logits exist. Results are torch tensors on `engine.device` (no host copy).

What this relies on in a Hugging Face causal LM: `model.get_decoder()` returns the backbone, whose output
has `last_hidden_state`, and `model.get_output_embeddings()` is the `nn.Linear` LM head, with logits =
lm_head(last_hidden_state). Models that post-process their logits (Gemma-2/3 soft-capping, Cohere's
logit_scale, Granite's logits_scaling, ...) or whose structure differs are detected at load (config keys
plus a probe forward compared against the model's own logits) and use the full forward instead, selecting
the rows from its [B, T, V'] logits; `describe()["rows_path"]` says which path and why.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from common.config import ModelSpec
from common.data.tokenizer_check import load_tokenizer, tokenizer_fingerprint
from common.sparse import head_gather, head_topk, sparse_gather, sparse_topk

from .errors import TeacherOutputError

__all__ = ["TeacherEngine", "resolve_device", "resolve_dtype", "load_causal_lm", "device_map_for", "ArrayLike"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Config attributes of logit post-processing the hidden-state path would skip (value None/0/1 = inactive).
_POSTPROCESSING_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier",
                        "output_multiplier_scale")

ArrayLike = np.ndarray | torch.Tensor


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when available, else cpu. A bare "cuda" becomes the current device (cuda:i)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def resolve_dtype(dtype: str, spec_dtype: str, device: torch.device) -> torch.dtype:
    """Explicit engine dtype, else the model spec's, else bf16 on cuda / fp32 on cpu."""
    for choice in (dtype, spec_dtype):
        if choice != "auto":
            if choice not in _DTYPES:
                raise ValueError(f"unknown dtype {choice!r}; expected one of {sorted(_DTYPES)} or 'auto'")
            return _DTYPES[choice]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# Share of each GPU a spread model's weights may fill: the rest is for activations and, on the last GPU, the
# LM head's chunked log-softmax (score_chunk_rows x V x 4 bytes, 0.6 GB at 1024 x 152,064, plus temporaries).
SPREAD_HEADROOM = 0.15


def device_map_for(num_gpus: int, device: torch.device, gpu_bytes: list[int] | None = None,
                   headroom: float = SPREAD_HEADROOM) -> dict[str, Any]:
    """The `from_pretrained` placement arguments of a replica with `num_gpus` GPUs.

    One GPU, or a CPU device: everything on `device` ({"device_map": {"": device}}). More than one GPU: the
    layers spread evenly over cuda:0..num_gpus-1 (the GPUs Ray made visible to the replica) with
    {"device_map": "balanced", "max_memory": {i: (1 - headroom) x gpu_bytes[i]}}: accelerate puts the
    embedding on the first GPU, the layers in order, the final norm and LM head on the last; inputs go to the
    first device and each layer's hook moves activations on. gpu_bytes: each visible GPU's total memory.
    """
    if num_gpus <= 1 or device.type != "cuda":
        return {"device_map": {"": device}}
    if gpu_bytes is None or len(gpu_bytes) < num_gpus:
        raise ValueError(f"a teacher replica with num_gpus={num_gpus} sees {0 if gpu_bytes is None else len(gpu_bytes)} "
                         f"GPUs (CUDA_VISIBLE_DEVICES): Ray should have made {num_gpus} visible to it")
    return {"device_map": "balanced",
            "max_memory": {i: int(gpu_bytes[i] * (1.0 - headroom)) for i in range(num_gpus)}}


def _visible_gpu_bytes() -> list[int]:
    return [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]


def load_causal_lm(spec: ModelSpec, device: torch.device, dtype: torch.dtype, num_gpus: int = 1) -> Any:
    """AutoModelForCausalLM on `device` in `dtype` (with num_gpus > 1 on a cuda device: spread over that many
    GPUs, `device_map_for`), in eval mode.

    With `accelerate` installed, `device_map={"": device}` makes transformers place each weight on the
    device as it is read, so a 7B model is never fully materialised on the host first. Without it (e.g. an
    image that lacks the package) the model is loaded on the host and moved, with a warning saying so; a
    model spread over several GPUs needs it.
    """
    # deferred: transformers costs ~1.6 s at import (measured); both CLIs' start-up imports this module
    from transformers import AutoModelForCausalLM
    from transformers.utils import is_accelerate_available

    kwargs: dict[str, Any] = dict(revision=spec.revision, dtype=dtype, trust_remote_code=spec.trust_remote_code)
    spread = num_gpus > 1 and device.type == "cuda"
    placement = device_map_for(num_gpus, device, _visible_gpu_bytes() if spread else None)
    if spread and not is_accelerate_available():
        raise ValueError(f"{spec.path}: spreading a teacher over {num_gpus} GPUs needs the `accelerate` package "
                         "(transformers' device_map)")
    if is_accelerate_available():
        model = AutoModelForCausalLM.from_pretrained(spec.path, **placement, **kwargs)
        off = sorted({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()} & {"cpu", "disk"})
        if spread and off:
            raise ValueError(f"{spec.path} does not fit {num_gpus} GPUs at {1 - SPREAD_HEADROOM:.0%} of their memory: "
                             f"parts were placed on {off}; give the replica more GPUs (teachers.num_gpus)")
    else:
        warnings.warn(f"loading {spec.path} on the host, then moving it to {device}: the `accelerate` package "
                      "(needed for device_map) is not installed", stacklevel=2)
        model = AutoModelForCausalLM.from_pretrained(spec.path, **kwargs).to(device)
    return model.eval()


def _postprocessing(config: Any) -> str | None:
    """The name of an active logit post-processing config key, or None."""
    for key in _POSTPROCESSING_KEYS:
        value = getattr(config, key, None)
        if value not in (None, 0, 0.0, 1, 1.0, False):
            return f"config.{key}={value}"
    return None


def _as_tensor(x: ArrayLike, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype)
    # torch.tensor copies: Ray hands out read-only numpy views, which torch.from_numpy would warn about.
    return torch.tensor(np.asarray(x), dtype=dtype, device=device)


class TeacherEngine:
    """A Hugging Face causal LM serving sparse distributions at the counted rows of a batch.

    vocab_size = len(tokenizer); logits' rows beyond it (padded embeddings) are cut before the softmax.
    Inputs are right padded: input_ids, attention_mask [B, T] (numpy or torch); rows [N] flat b * T + t.
    """

    def __init__(self, spec: ModelSpec, device: str = "auto", dtype: str = "auto", chunk_tokens: int = 1024,
                 num_gpus: int = 1):
        """num_gpus > 1 (on cuda): spread the model over cuda:0..num_gpus-1 (`device_map_for`); `device` is
        then the first GPU, where inputs go and results are returned."""
        self.spec: ModelSpec | None = spec
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
        self.num_gpus = int(num_gpus)
        self._use_model(load_causal_lm(spec, self.device, self.dtype, self.num_gpus))

    @classmethod
    def from_model(cls, model: Any, vocab_size: int, chunk_tokens: int = 1024, name: str | None = None,
                   fingerprint: str = "") -> TeacherEngine:
        """An engine over a causal LM already in memory (benchmarks, pipelines that built the model): no
        checkpoint and no tokenizer (`encode` is unavailable); device and dtype are the model's."""
        engine = cls.__new__(cls)
        engine.spec = None
        engine.name = name or f"in-memory-{type(model).__name__}"
        first = next(model.parameters())
        engine.device, engine.dtype = first.device, first.dtype
        engine.chunk_tokens = int(chunk_tokens)
        engine.num_gpus = 1
        engine.tokenizer = None
        engine.vocab_size, engine.fingerprint = int(vocab_size), fingerprint
        engine._use_model(model.eval())
        return engine

    def _use_model(self, model: Any) -> None:
        self.model = model
        # Inputs go where the embedding is (the first GPU of a spread model); `devices` names every device used.
        self.device = model.get_input_embeddings().weight.device
        self.devices = sorted({str(p.device) for p in model.parameters()})
        self.model_vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        if self.model_vocab_size < self.vocab_size:
            raise ValueError(f"model {self.name} has {self.model_vocab_size} output rows, fewer than its "
                             f"tokenizer's {self.vocab_size} tokens")
        self.backbone: Any = None
        self.head: torch.nn.Linear | None = None
        self.rows_path = self._choose_rows_path()

    # ------------------------------------------------------------------ the hidden-state path, or not
    @torch.inference_mode()
    def _choose_rows_path(self) -> str:
        """Use backbone + LM head when they reproduce the model's logits; else the full forward (says why)."""
        reason = _postprocessing(self.model.config)
        if reason is not None:
            return f"full_forward ({reason})"
        backbone = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        head = self.model.get_output_embeddings()
        if backbone is None or backbone is self.model or not isinstance(head, torch.nn.Linear):
            return "full_forward (no separate backbone and nn.Linear LM head)"
        probe = torch.arange(2, 2 + 6, device=self.device).remainder(self.vocab_size)[None]
        ones = torch.ones_like(probe)
        try:
            want = self.model(input_ids=probe, attention_mask=ones, use_cache=False).logits[0].float()
            hidden = backbone(input_ids=probe, attention_mask=ones, use_cache=False).last_hidden_state[0]
            got = head(hidden.to(head.weight.device)).float().to(want.device)
        except Exception as err:  # an exotic backbone signature: the full forward still works
            return f"full_forward (backbone probe failed: {type(err).__name__}: {err})"
        finite = want[torch.isfinite(want)]
        scale = float(finite.abs().max()) if finite.numel() else 1.0
        # NaN weights give NaN on both sides: no reason to leave the hidden-state path (each batch's outputs
        # are checked for NaN anyway, naming the batch)
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-2, atol=1e-2 * (scale or 1.0),
                                                         equal_nan=True):
            return "full_forward (lm_head(last_hidden_state) differs from the model's logits)"
        self.backbone, self.head = backbone, head
        return "hidden_states"

    # ------------------------------------------------------------------ inputs
    def _inputs(self, input_ids: ArrayLike, attention_mask: ArrayLike, rows: ArrayLike,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids_t = _as_tensor(input_ids, torch.long, self.device)
        mask_t = _as_tensor(attention_mask, torch.long, self.device)
        rows_t = _as_tensor(rows, torch.long, self.device)
        if ids_t.ndim != 2:
            raise ValueError(f"{self.name}: input_ids must be [B, T], got shape {tuple(ids_t.shape)}")
        if mask_t.shape != ids_t.shape:
            raise ValueError(f"{self.name}: attention_mask shape {tuple(mask_t.shape)} != "
                             f"input_ids shape {tuple(ids_t.shape)}")
        if rows_t.ndim != 1:
            raise ValueError(f"{self.name}: rows must be [N] flat indices b * T + t, got shape {tuple(rows_t.shape)}")
        b, t = ids_t.shape
        if ids_t.numel() or rows_t.numel():  # one host sync for every range check
            lo, hi = (ids_t.min(), ids_t.max()) if ids_t.numel() else (ids_t.new_zeros(()), ids_t.new_zeros(()))
            r_lo, r_hi = (rows_t.min(), rows_t.max()) if rows_t.numel() else (lo.new_zeros(()), lo.new_zeros(()))
            steps = (rows_t[1:] - rows_t[:-1]).min() if rows_t.numel() > 1 else lo.new_ones(())
            lo_, hi_, r_lo_, r_hi_, step = torch.stack([lo, hi, r_lo, r_hi, steps]).tolist()
            if lo_ < 0 or hi_ >= self.vocab_size:
                raise ValueError(f"{self.name}: token ids out of range [0, {self.vocab_size}): min {lo_}, max {hi_}")
            if rows_t.numel() and (r_lo_ < 0 or r_hi_ >= b * t):
                raise ValueError(f"{self.name}: rows out of range [0, B*T={b * t}): min {r_lo_}, max {r_hi_}")
            if step <= 0:
                raise ValueError(f"{self.name}: rows must be strictly increasing")
        return ids_t, mask_t, rows_t

    def _check_k(self, k: int) -> None:
        if not 0 < k <= self.vocab_size:
            raise ValueError(f"k={k} out of range for model {self.name}: must be in 1..{self.vocab_size} "
                             f"(its vocabulary size)")

    # ------------------------------------------------------------------ forward
    def _at_rows(self, ids_t: torch.Tensor, mask_t: torch.Tensor, rows_t: torch.Tensor) -> torch.Tensor:
        """The backbone's last hidden states [N, H] at the rows, or (full-forward path) the logits [N, V']."""
        if self.backbone is not None:  # a spread model's hidden states come out of the last GPU: to the head's
            hidden = self.backbone(input_ids=ids_t, attention_mask=mask_t, use_cache=False).last_hidden_state
            rows_h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows_t.to(hidden.device))
            return rows_h.to(self.head.weight.device)  # type: ignore[union-attr]
        logits = self.model(input_ids=ids_t, attention_mask=mask_t, use_cache=False).logits
        return logits.reshape(-1, logits.shape[-1]).index_select(0, rows_t.to(logits.device))

    @torch.inference_mode()
    def full_logits(self, input_ids: ArrayLike, attention_mask: ArrayLike) -> torch.Tensor:
        """The model's own logits [B, T, V'] (model dtype): the reference the row path must reproduce."""
        ids_t, mask_t, _ = self._inputs(input_ids, attention_mask, np.zeros(0, dtype=np.int64))
        return self.model(input_ids=ids_t, attention_mask=mask_t, use_cache=False).logits

    def _check_output(self, lps: torch.Tensor, tail: torch.Tensor, rows_t: torch.Tensor, t: int,
                      batch_id: Any) -> None:
        """NaN in a row's outputs means NaN/inf logits there (the log-sum-exp spreads it): never pass it on."""
        bad = torch.isnan(tail) | torch.isnan(lps).any(-1)
        if bool(bad.any()):
            first = int(rows_t[bad.nonzero()[0, 0]])
            raise TeacherOutputError(self.name, batch_id, f"{int(bad.sum())} positions with NaN/inf logits "
                                                          f"(first at [b, t] = {[first // t, first % t]})")

    @torch.inference_mode()
    def topk(self, input_ids: ArrayLike, attention_mask: ArrayLike, rows: ArrayLike, k: int, tau: float = 1.0,
             include: ArrayLike | None = None, batch_id: Any = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k of log_softmax(logits / tau) at each counted row.

        include: optional [N] ids forced into the support (K = k + 1, all distinct; if the id is already in
        the top-k, slot k holds the (k+1)-th best id). Returns tensors on `self.device`: ids int32 [N, K]
        (top-k descending, then the forced slot), logprobs fp32 [N, K], tail fp32 [N] = 1 - sum_K p.
        """
        self._check_k(k)
        ids_t, mask_t, rows_t = self._inputs(input_ids, attention_mask, rows)
        forced = None if include is None else _as_tensor(include, torch.long, self.device)
        if forced is not None and tuple(forced.shape) != tuple(rows_t.shape):
            raise ValueError(f"{self.name}: include shape {tuple(forced.shape)} != rows shape {tuple(rows_t.shape)}")
        width = k if forced is None else k + 1
        if width > self.vocab_size:
            raise ValueError(f"k={k} plus a forced id needs {width} distinct ids, more than model {self.name}'s "
                             f"vocabulary of {self.vocab_size}")
        x = self._at_rows(ids_t, mask_t, rows_t) if rows_t.numel() else None
        if x is None:  # no counted row: nothing to run
            ids, lps, tail = (torch.empty(0, width, dtype=torch.long, device=self.device),
                              torch.empty(0, width, device=self.device), torch.empty(0, device=self.device))
        else:
            f = None if forced is None else forced.to(x.device)
            if self.head is not None:
                ids, lps, tail = head_topk(x, self.head.weight, self.head.bias, k, tau, self.vocab_size,
                                           self.chunk_tokens, f)
            else:
                ids, lps, tail = sparse_topk(x, k, tau, self.vocab_size, self.chunk_tokens, f)
            ids, lps, tail = ids.to(self.device), lps.to(self.device), tail.to(self.device)  # no-ops on one device
        self._check_output(lps, tail, rows_t, ids_t.shape[1], batch_id)
        return ids.to(torch.int32), lps, tail

    @torch.inference_mode()
    def gather(self, input_ids: ArrayLike, attention_mask: ArrayLike, rows: ArrayLike, ids: ArrayLike,
               tau: float = 1.0, batch_id: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """log_softmax(logits / tau) at given ids [N, K] of each counted row, and the mass off them.

        Returns tensors on `self.device`: logprobs fp32 [N, K], tail fp32 [N] = 1 - sum_{i in ids} p_i.
        """
        ids_t, mask_t, rows_t = self._inputs(input_ids, attention_mask, rows)
        support = _as_tensor(ids, torch.long, self.device)
        if support.ndim != 2 or support.shape[0] != rows_t.shape[0]:
            raise ValueError(f"{self.name}: support ids shape {tuple(support.shape)} must be [N, K] with "
                             f"N = {rows_t.shape[0]} rows")
        self._check_k(support.shape[1])
        if not rows_t.numel():
            return torch.empty(0, support.shape[1], device=self.device), torch.empty(0, device=self.device)
        x = self._at_rows(ids_t, mask_t, rows_t)
        if self.head is not None:
            lps, tail = head_gather(x, self.head.weight, self.head.bias, support.to(x.device), tau, self.vocab_size,
                                    self.chunk_tokens)
        else:
            lps, tail = sparse_gather(x, support.to(x.device), tau, self.vocab_size, self.chunk_tokens)
        lps, tail = lps.to(self.device), tail.to(self.device)  # no-ops on one device
        self._check_output(lps, tail, rows_t, ids_t.shape[1], batch_id)
        return lps, tail

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenise texts with this model's tokenizer, right padded: (input_ids int32, attention_mask) [B, T]."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode expects a list of strings")
        if self.tokenizer is None:
            raise ValueError(f"{self.name}: an engine built from a model in memory has no tokenizer")
        enc = self.tokenizer(list(texts), padding=True, return_tensors="np", padding_side="right")
        return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)

    def describe(self) -> dict[str, Any]:
        return {"model": self.name, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "vocab_size": self.vocab_size, "model_vocab_size": self.model_vocab_size,
                "fingerprint": self.fingerprint, "rows_path": self.rows_path, "num_gpus": self.num_gpus,
                "devices": self.devices}
