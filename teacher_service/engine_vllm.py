"""Optional vLLM engine for a teacher's top-k (prompt log-probs). vLLM is imported only here, lazily.

API: the engine API of the project (docs/ARCHITECTURE.md): `topk(input_ids, attention_mask, rows, k, tau,
include, batch_id) -> (ids [N, K] int32, logprobs [N, K] fp32, tail [N] fp32)` as torch tensors on
`engine.device`; `gather(...)` when the installed vLLM scores given ids per position (feature-detected).

What vLLM returns (checked against vLLM's source, `vllm/logprobs.py` and `vllm/sampling_params.py`):
`RequestOutput.prompt_logprobs[i]` is the distribution of prompt token i given tokens < i (entry 0 is
None), holding the actual token i with its rank and the top-`prompt_logprobs` ids (rank 1, 2, ...).
Our position t (what the model predicts after token t) is vLLM's position t + 1, and a counted position
always has a next token inside the prompt, so the generated token's log-probs are never needed.
With `SamplingParams(flat_logprobs=True)` (feature-detected) the container is a `FlatLogprobs`: per
position, flat lists where entry 0 is the actual token and entries 1..k the top-k in rank order (the
actual token repeats when it is in the top-k); the converter reads those lists into arrays in one go.
Older versions give a list of dicts, converted by a slower fallback.

Normaliser: vLLM normalises over `config.vocab_size` rows (152,064 for Qwen2-7B), the HF engine over
the tokenizer's 151,646 (padded rows cut). The engine therefore loads a cut view of the checkpoint
(`teacher_service.vocab_cut`), so both engines normalise over the same rows exactly.
tau: prompt log-probs are at temperature 1 and the top-k alone cannot give the normaliser at another
tau, so the config refuses `teachers.engine: vllm` with `loss.tau != 1` (common/config/run.py).
`include`: vLLM's actual token is the next input token (the label); that is the only id it can force
into the support (K = k + 1); another include raises.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import ModelSpec
from common.data.tokenizer_check import load_tokenizer, tokenizer_fingerprint

from .vocab_cut import cut_vocab_checkpoint

__all__ = ["VLLMEngine", "prompt_logprobs_block", "rows_topk", "rows_gather", "sampling_params_fields",
           "as_numpy_rows", "vllm_parallel_options"]


def vllm_parallel_options(tensor_parallel_size: int) -> dict[str, Any]:
    """vLLM's `LLM(...)` parallel arguments for a teacher replica that holds `tensor_parallel_size` GPUs.

    One GPU: {"tensor_parallel_size": 1} (vLLM's in-process executor). More: tensor parallelism over the
    replica's GPUs with vLLM's multiprocessing executor, {"tensor_parallel_size": n,
    "distributed_executor_backend": "mp"}. Why "mp" and not vLLM's Ray executor:
    - the pool gives a multi-GPU replica its own placement group whose one bundle holds all n GPUs, and the
      actor takes that bundle (teacher_service/placement.py): Ray sets CUDA_VISIBLE_DEVICES in the actor to
      exactly those GPUs, all on one node, and the "mp" executor starts its n workers as child processes on
      them. This is the "actor holds the GPUs" layout of Ray Serve's and SkyRL's vLLM deployments.
    - The other layout (actor with 0 GPUs inside a placement group of n {GPU: 1} bundles, vLLM's Ray
      executor starting one Ray actor per bundle) depends on vLLM finding the placement group from its
      engine-core process, which V1 starts as a separate (spawned) process: vLLM PR #14705 passes it along
      (vllm/config/parallel.py `placement_group`), yet vLLM issue #30016 reports workers that cannot find it
      on Ray Serve with TP > 1 and recommends "mp"; and a 0-GPU actor's CUDA_VISIBLE_DEVICES="" is inherited
      by that engine process (agentscope-ai/TuFT PR #112: "KeyError: 'bundles'").
    - The backend must be named: vllm/config/parallel.py picks "ray" by itself whenever Ray is initialised
      and the caller runs in a placement group (`ray.util.get_current_placement_group()`), which a
      multi-GPU replica does; its Ray executor would then wait for n more GPUs that the replica already holds.
    Single node only: a teacher replica never spans nodes (its placement group is STRICT_PACK).
    """
    n = int(tensor_parallel_size)
    if n < 1:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size}: a vLLM teacher needs at least one GPU")
    if n == 1:
        return {"tensor_parallel_size": 1}
    return {"tensor_parallel_size": n, "distributed_executor_backend": "mp"}


def sampling_params_fields(sampling_params_cls: Any) -> set[str]:
    """Field names of vLLM's SamplingParams (a msgspec Struct in current vLLM; a dataclass in older ones)."""
    names = getattr(sampling_params_cls, "__struct_fields__", None)
    if names is not None:
        return set(names)
    if dataclasses.is_dataclass(sampling_params_cls):
        return {f.name for f in dataclasses.fields(sampling_params_cls)}
    return set(inspect.signature(sampling_params_cls).parameters)


def as_numpy_rows(x: Any) -> np.ndarray:
    """int64 numpy of the same shape from a numpy array or torch tensor (any device)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.int64).numpy()
    return np.asarray(x, dtype=np.int64)


def prompt_logprobs_block(plp: Any, actual: np.ndarray, width: int, start: int = 0
                          ) -> tuple[np.ndarray, np.ndarray]:
    """One request's prompt log-probs -> (ids int64 [P - start, 1 + width], logprobs fp32 [P - start, 1 + width]).

    plp: `RequestOutput.prompt_logprobs` (FlatLogprobs or a list whose entry 0 is None), P + 1 entries for
    a prompt of P + 1 tokens. actual: [P] the prompt tokens 1..P (the token each position scored).
    start: the first of our positions to convert (the counted positions of a batch, responses, sit at
    the end of each sequence: converting only from the first one halves the work there).
    Column 0 is the actual token, columns 1..width the ids of rank 1..width. Raises ValueError naming
    the position when an entry is missing or short.
    """
    return _block_from(plp, actual, width, start)


def _block_from(plp: Any, actual: np.ndarray, width: int, start: int) -> tuple[np.ndarray, np.ndarray]:
    n_pos = len(actual)
    if hasattr(plp, "start_indices") and hasattr(plp, "token_ids"):  # FlatLogprobs: flat lists
        starts = np.asarray(plp.start_indices[1:], dtype=np.int64)
        ends = np.asarray(plp.end_indices[1:], dtype=np.int64)
        if len(starts) != n_pos:
            raise ValueError(f"{len(starts)} prompt positions with log-probs, expected {n_pos}")
        short = np.nonzero(ends - starts != width + 1)[0]
        if short.size:
            p = int(short[0])
            raise ValueError(f"position {p}: {int(ends[p] - starts[p])} entries, expected {width + 1} (the actual "
                             f"token + top-{width}); raise max_logprobs to >= {width}")
        m = n_pos - start
        first = int(starts[start]) if m > 0 else 0
        total = m * (width + 1)
        if m > 0 and int(ends[-1]) - first != total:  # non-contiguous positions: should not happen
            raise ValueError("FlatLogprobs positions are not contiguous")
        ids = _flat_column(plp.token_ids, first, total, np.int64)
        lps = _flat_column(plp.logprobs, first, total, np.float32)
        return ids.reshape(m, width + 1), lps.reshape(m, width + 1)
    return _dict_block(plp, actual, width, start)


def _flat_column(column: Any, first: int, total: int, dtype: Any) -> np.ndarray:
    """column[first:first + total] as numpy. vLLM's FlatLogprobs keeps its columns as Python lists in some
    releases and as numpy arrays in others: a numpy slice is a view (no per-entry work); a list slice is
    converted by np.asarray, which reads Python numbers at C speed (np.fromiter took ~2x longer here)."""
    return np.asarray(column[first:first + total], dtype=dtype)


def _dict_block(plp: Sequence[Mapping[int, Any] | None], actual: np.ndarray, width: int, start: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
    """Fallback for the list-of-dicts form: each dict holds the top-width ids (rank 1..width) and the
    actual token (an extra entry when it is outside the top-width)."""
    n_pos = len(actual)
    if len(plp) != n_pos + 1:
        raise ValueError(f"{len(plp) - 1} prompt positions with log-probs, expected {n_pos}")
    ids = np.empty((n_pos - start, width + 1), dtype=np.int64)
    lps = np.empty((n_pos - start, width + 1), dtype=np.float32)
    for p in range(start, n_pos):
        entry = plp[p + 1]
        if entry is None:
            raise ValueError(f"position {p}: no log-probs")
        top = sorted((int(v.rank), int(tok), float(v.logprob)) for tok, v in entry.items()
                     if v.rank is not None and v.rank <= width)
        if len(top) < width:
            raise ValueError(f"position {p}: {len(top)} entries with rank <= {width}; raise max_logprobs to >= {width}")
        a = int(actual[p])
        if a not in entry:
            raise ValueError(f"position {p}: the actual token {a} is missing")
        ids[p - start, 0], lps[p - start, 0] = a, float(entry[a].logprob)
        ids[p - start, 1:] = [t for _, t, _ in top[:width]]
        lps[p - start, 1:] = [lp for _, _, lp in top[:width]]
    return ids, lps


def _locate_rows(rows: np.ndarray, lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat rows b*T+t -> (b, t), checking that every row has a next token inside its sequence."""
    b, t = np.divmod(rows, seq_len)
    if rows.size and (rows.min() < 0 or b.max() >= len(lengths)):
        raise ValueError(f"rows out of range [0, {len(lengths) * seq_len})")
    bad = np.nonzero(t >= lengths[b] - 1)[0]
    if bad.size:
        n = int(bad[0])
        raise ValueError(f"row {int(rows[n])} (b={int(b[n])}, t={int(t[n])}) has no next token in its sequence "
                         f"of {int(lengths[b[n]])} tokens: not a counted position")
    return b, t


def rows_topk(blocks: list[tuple[np.ndarray, np.ndarray]], rows: np.ndarray, lengths: np.ndarray, seq_len: int,
              k: int, include: bool, vocab_size: int, starts: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-request blocks (prompt_logprobs_block, width >= k, + 1 with include; request i's block begins
    at position starts[i], default 0) -> the rows' support.

    returns ids int32 [N, K], logprobs fp32 [N, K], tail fp32 [N] = 1 - sum_K p, K = k (+ 1 with include:
    the top-k, then the actual next token if it is not among them, else the (k+1)-th best id).
    """
    b, t = _locate_rows(rows, lengths, seq_len)
    offsets = np.concatenate([[0], np.cumsum([len(blk[0]) for blk in blocks])])
    all_ids = np.concatenate([blk[0] for blk in blocks]) if blocks else np.empty((0, k + 2), np.int64)
    all_lps = np.concatenate([blk[1] for blk in blocks]) if blocks else np.empty((0, k + 2), np.float32)
    sel = offsets[b] + t - (0 if starts is None else np.asarray(starts, dtype=np.int64)[b])
    ids_sel, lps_sel = all_ids[sel], all_lps[sel]
    ids, lps = ids_sel[:, 1:k + 1], lps_sel[:, 1:k + 1]
    if include:
        if ids_sel.shape[1] < k + 2:
            raise ValueError(f"include needs the top-{k + 1} per position, got top-{ids_sel.shape[1] - 1}")
        actual_in = (ids == ids_sel[:, :1]).any(1)
        extra_id = np.where(actual_in, ids_sel[:, k + 1], ids_sel[:, 0])
        extra_lp = np.where(actual_in, lps_sel[:, k + 1], lps_sel[:, 0])
        ids = np.concatenate([ids, extra_id[:, None]], 1)
        lps = np.concatenate([lps, extra_lp[:, None]], 1)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token id {int(ids.max())} outside the tokenizer's vocabulary [0, {vocab_size}): the engine "
                         "must serve the cut checkpoint (teacher_service.vocab_cut)")
    if not np.isfinite(lps).all() or (lps > 1e-4).any():
        n = int(np.nonzero(~np.isfinite(lps).all(1) | (lps > 1e-4).any(1))[0][0])
        raise ValueError(f"row {int(rows[n])}: bad log-probs {lps[n][:4].tolist()}...")
    tail = np.clip(1.0 - np.exp(lps.astype(np.float64)).sum(-1), 0.0, 1.0).astype(np.float32)
    return ids.astype(np.int32), lps.astype(np.float32), tail


def rows_gather(scored: list[tuple[np.ndarray, np.ndarray]], rows: np.ndarray, lengths: np.ndarray, seq_len: int,
                ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Log-probs at given ids from per-request scored entries (ids [P, E], logprobs [P, E] per request, the
    entries vLLM returned at each position when asked for given ids) -> (logprobs fp32 [N, K], tail [N]).

    Every requested id must be among the position's entries (else ValueError naming row and id: the
    installed vLLM did not score what it was asked). tail = 1 - sum over the distinct requested ids.
    """
    b, t = _locate_rows(rows, lengths, seq_len)
    offsets = np.concatenate([[0], np.cumsum([len(s[0]) for s in scored])])
    ent_ids = np.concatenate([s[0] for s in scored])[offsets[b] + t]   # [N, E]
    ent_lps = np.concatenate([s[1] for s in scored])[offsets[b] + t]
    want = np.asarray(ids, dtype=np.int64)                             # [N, K]
    match = want[:, :, None] == ent_ids[:, None, :]                    # [N, K, E]
    found = match.any(-1)
    if not found.all():
        n, j = (int(x[0]) for x in np.nonzero(~found))
        raise ValueError(f"row {int(rows[n])}: id {int(want[n, j])} was not scored by vLLM")
    lps = ent_lps[np.arange(len(want))[:, None], match.argmax(-1)].astype(np.float32)
    first = np.ones_like(want, dtype=bool)  # distinct ids only in the tail sum
    srt = np.sort(want, 1)
    dup_sorted = np.concatenate([np.zeros((len(want), 1), bool), srt[:, 1:] == srt[:, :-1]], 1)
    if dup_sorted.any():
        order = np.argsort(want, 1, kind="stable")
        first[np.arange(len(want))[:, None], order] = ~dup_sorted
    p = np.where(first, np.exp(lps.astype(np.float64)), 0.0).sum(-1)
    return lps, np.clip(1.0 - p, 0.0, 1.0).astype(np.float32)


class VLLMEngine:
    """A teacher served by vLLM (one GPU, or tensor parallel over the replica's GPUs: `vllm_parallel_options`).
    See the module docstring for what it returns and why."""

    def __init__(self, spec: ModelSpec, max_logprobs: int = 65, gpu_memory_utilization: float = 0.75,
                 max_model_len: int | None = None, dtype: str = "auto", max_num_batched_tokens: int | None = 2048,
                 cut_dir: str | None = None, tensor_parallel_size: int = 1):
        from vllm import LLM, SamplingParams  # optional extra: pip install deltakd[vllm]

        self.spec = spec
        self.name = spec.path if spec.revision is None else f"{spec.path}@{spec.revision}"
        self.tokenizer = load_tokenizer(spec)
        self.vocab_size = len(self.tokenizer)
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.max_logprobs = int(max_logprobs)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        fields = sampling_params_fields(SamplingParams)
        self.flat = "flat_logprobs" in fields
        # Per-position ids: newer vLLM scores given ids at each prompt row (`prompt_logprob_token_ids`,
        # rows from `prompt_logprob_start`). Without both fields the base teacher's gather stays on HF.
        self.can_gather = {"prompt_logprob_token_ids", "prompt_logprob_start"} <= fields
        model_dir = self._local_dir(spec)
        root = cut_dir or str(Path.home() / ".cache" / "deltakd" / "vllm-cut")
        self.model_dir = str(cut_vocab_checkpoint(model_dir, self.vocab_size, root))
        self.llm = LLM(model=self.model_dir, tokenizer=spec.path, tokenizer_revision=spec.revision,
                       trust_remote_code=spec.trust_remote_code, dtype=dtype, max_logprobs=self.max_logprobs,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       max_num_batched_tokens=max_num_batched_tokens,
                       **vllm_parallel_options(tensor_parallel_size))
        self.tensor_parallel_size = int(tensor_parallel_size)

    @staticmethod
    def _local_dir(spec: ModelSpec) -> str:
        if Path(spec.path).is_dir():
            return spec.path
        from huggingface_hub import snapshot_download  # deferred: hub access (optional dependency)

        return snapshot_download(spec.path, revision=spec.revision)

    def _generate(self, input_ids: np.ndarray, lengths: np.ndarray, **params: Any) -> list[Any]:
        # deferred: vllm is an optional dependency (pip install deltakd[vllm])
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.flat:
            params["flat_logprobs"] = True
        sp = SamplingParams(max_tokens=1, detokenize=False, temperature=1.0, **params)
        prompts = [TokensPrompt(prompt_token_ids=input_ids[i, : lengths[i]].tolist()) for i in range(len(lengths))]
        return list(self.llm.generate(prompts, sp, use_tqdm=False))

    def topk(self, input_ids: Any, attention_mask: Any, rows: Any, k: int, tau: float = 1.0,
             include: Any = None, batch_id: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k (+ the label with include) at the counted rows; tensors on `self.device`."""
        if tau != 1.0:
            raise ValueError(f"vLLM model {self.name}: tau={tau}; the vLLM engine supports tau=1 only "
                             "(prompt log-probs are at temperature 1); use teachers.engine=hf")
        width = k + 1 if include is not None else k
        if not 0 < width <= min(self.vocab_size, self.max_logprobs):
            raise ValueError(f"k={k}{' + 1 (include)' if include is not None else ''} out of range for vLLM model "
                             f"{self.name}: max_logprobs {self.max_logprobs}, vocabulary {self.vocab_size}")
        ids_np, lengths, rows_np, seq_len = self._inputs(input_ids, attention_mask, rows)
        if include is not None:
            inc = as_numpy_rows(include).reshape(-1)
            nxt = ids_np.reshape(-1)[np.minimum(rows_np + 1, ids_np.size - 1)]
            if inc.shape != rows_np.shape or (inc != nxt).any():
                raise ValueError(f"vLLM model {self.name}, batch {batch_id}: include must be the next input token "
                                 "of each row (the label): vLLM scores only the actual prompt token beyond its top-k")
        outs = self._generate(ids_np, lengths, prompt_logprobs=width)
        first = np.full(len(lengths), seq_len, dtype=np.int64)  # each request's first counted position
        np.minimum.at(first, rows_np // seq_len, rows_np % seq_len)
        starts = np.minimum(first, np.maximum(lengths - 1, 0))
        try:
            blocks = [prompt_logprobs_block(o.prompt_logprobs, ids_np[i, 1:lengths[i]], width, int(starts[i]))
                      for i, o in enumerate(outs)]
            res = rows_topk(blocks, rows_np, lengths, seq_len, k, include is not None, self.vocab_size, starts)
        except ValueError as err:
            raise ValueError(f"vLLM model {self.name}, batch {batch_id}: {err}") from err
        return tuple(torch.from_numpy(a).to(self.device) for a in res)  # type: ignore[return-value]

    def gather(self, input_ids: Any, attention_mask: Any, rows: Any, ids: Any, tau: float = 1.0,
               batch_id: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs at given ids per counted row, when this vLLM scores per-position ids (`can_gather`)."""
        if not self.can_gather:
            raise NotImplementedError(f"vLLM engine ({self.name}): this vLLM cannot score given ids per position "
                                      "(no SamplingParams.prompt_logprob_token_ids); gather roles use the hf engine")
        if tau != 1.0:
            raise ValueError(f"vLLM model {self.name}: tau={tau}; the vLLM engine supports tau=1 only")
        ids_np, lengths, rows_np, seq_len = self._inputs(input_ids, attention_mask, rows)
        want = as_numpy_rows(ids).reshape(len(rows_np), -1)
        b, t = _locate_rows(rows_np, lengths, seq_len)
        outs = []
        for i in range(len(lengths)):  # one request per sequence: its rows [first..last], -1 pads unused rows
            mine = np.nonzero(b == i)[0]
            if not mine.size:
                outs.append(None)
                continue
            start = int(t[mine].min())
            grid = np.full((int(lengths[i]) - 1 - start, want.shape[1]), -1, dtype=np.int64)
            grid[t[mine] - start] = want[mine]
            outs.append((start, grid))
        results = self._generate_scoring(ids_np, lengths, outs)
        scored = []
        for i, res in enumerate(results):
            n_pos = int(lengths[i]) - 1
            e_ids = np.full((n_pos, want.shape[1] + 1), -1, dtype=np.int64)
            e_lps = np.zeros((n_pos, want.shape[1] + 1), dtype=np.float32)
            if res is not None:
                start = outs[i][0]  # type: ignore[index]
                plp = res.prompt_logprobs  # FlatLogprobs or a list: both give a dict per position
                for p in range(start, n_pos):
                    entry = plp[p + 1]
                    if entry:
                        e_ids[p, : len(entry)] = list(entry.keys())
                        e_lps[p, : len(entry)] = [v.logprob for v in entry.values()]
            scored.append((e_ids, e_lps))
        try:
            lps, tail = rows_gather(scored, rows_np, lengths, seq_len, want)
        except ValueError as err:
            raise ValueError(f"vLLM model {self.name}, batch {batch_id}: {err}") from err
        return torch.from_numpy(lps).to(self.device), torch.from_numpy(tail).to(self.device)

    def _generate_scoring(self, input_ids: np.ndarray, lengths: np.ndarray, asks: list[Any]) -> list[Any]:
        # deferred: vllm is an optional dependency (pip install deltakd[vllm])
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        out: list[Any] = [None] * len(asks)
        todo = [i for i, a in enumerate(asks) if a is not None]
        prompts = [TokensPrompt(prompt_token_ids=input_ids[i, : lengths[i]].tolist()) for i in todo]
        params = [SamplingParams(max_tokens=1, detokenize=False, prompt_logprob_start=asks[i][0],
                                 prompt_logprob_token_ids=asks[i][1].tolist()) for i in todo]
        for i, o in zip(todo, self.llm.generate(prompts, params, use_tqdm=False)):
            out[i] = o
        return out

    def _inputs(self, input_ids: Any, attention_mask: Any, rows: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        ids_np = as_numpy_rows(input_ids)  # [B, T] int64 on the host: vLLM takes token lists
        mask = as_numpy_rows(attention_mask).reshape(ids_np.shape)
        if ids_np.ndim != 2:
            raise ValueError(f"{self.name}: input_ids must be [B, T], got shape {ids_np.shape}")
        return ids_np, mask.sum(1).astype(np.int64), as_numpy_rows(rows).reshape(-1), int(ids_np.shape[1])

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tokenizer(list(texts), padding=True, return_tensors="np", padding_side="right")
        return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)

    def describe(self) -> dict[str, Any]:
        return {"model": self.name, "device": f"{self.device} (vllm)", "dtype": "vllm", "vocab_size": self.vocab_size,
                "model_vocab_size": self.vocab_size, "fingerprint": self.fingerprint, "flat_logprobs": self.flat,
                "gather": self.can_gather, "served_from": self.model_dir,
                "tensor_parallel_size": self.tensor_parallel_size}


