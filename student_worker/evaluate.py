"""Greedy generation on held-out prompts and ROUGE-L / ROUGE-1 / ROUGE-2 against the references.

Prompts are tokenised the way training saw them (`data.encode_prompt`: optional BOS + prompt tokens),
left-padded into batches so every row's last prompt token sits at the same position, and decoded
greedily for `max_new_tokens` (stopping at EOS). Only the new tokens are decoded. ROUGE is the F-measure of `rouge_score.rouge_scorer`,
averaged over examples.
"""

from __future__ import annotations

from typing import Any

import torch

from common.config import ModelSpec
from common.data.batching import encode_prompt
from common.data.model_loading import load_causal_lm, resolve_dtype
from common.reproducibility import apply_compute_settings

__all__ = ["EvaluationError", "ROUGE_KEYS", "greedy_generate", "rouge", "rouge_per_example", "evaluate_model",
           "evaluate_spec"]

ROUGE_KEYS = ("rougeL", "rouge1", "rouge2")


class EvaluationError(RuntimeError):
    """Evaluation cannot run (no examples, a tokenizer without pad/eos). The message names what."""


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch_size: int = 16
) -> list[str]:
    """Greedy continuations of `prompts` (new tokens only, special tokens skipped), in order.

    Each batch: input_ids [b, P] left-padded with pad_id, attention_mask [b, P] (0 on padding).
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise EvaluationError("the tokenizer has neither a pad nor an eos token; cannot left-pad prompts")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for s in range(0, len(prompts), batch_size):
            encoded = [encode_prompt(p, tokenizer) for p in prompts[s : s + batch_size]]
            width = max(len(e) for e in encoded)
            ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(encoded), width), dtype=torch.long)
            for i, e in enumerate(encoded):
                ids[i, width - len(e):] = torch.tensor(e, dtype=torch.long)
                mask[i, width - len(e):] = 1
            gen = model.generate(  # type: ignore[operator]
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
            )
            new = gen[:, width:].cpu()
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return [t.strip() for t in out]


def rouge_per_example(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """ROUGE-L / ROUGE-1 / ROUGE-2 F-measure of each example, in order (rouge_score, stemming off)."""
    # deferred: rouge_score costs ~0.6 s at import (measured); the driver's start-up imports this module
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise EvaluationError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise EvaluationError("no evaluation examples")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=False)
    out: dict[str, list[float]] = {key: [] for key in ROUGE_KEYS}
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)
        for key in ROUGE_KEYS:
            out[key].append(scores[key].fmeasure)
    return out


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-L / ROUGE-1 / ROUGE-2 F-measure over examples (rouge_score, stemming off)."""
    per = rouge_per_example(predictions, references)
    return {key: sum(per[key]) / len(references) for key in ROUGE_KEYS}


def evaluate_model(
    model: torch.nn.Module, tokenizer: Any, examples: list[dict[str, str]], max_new_tokens: int,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Generate for each example's `prompt` and score against its `response`.

    Returns {"rougeL", "rouge1", "rouge2": float (means), "num_examples": int, "per_example": {key: [score
    of each example, in order]} (the method comparison pairs runs by example), "samples": first 3
    (prompt, ref, pred)}.
    """
    if not examples:
        raise EvaluationError("no evaluation examples (data.eval is empty or disabled)")
    prompts = [e["prompt"] for e in examples]
    refs = [e["response"] for e in examples]
    preds = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    per = rouge_per_example(preds, refs)
    result: dict[str, Any] = {key: sum(per[key]) / len(refs) for key in ROUGE_KEYS}
    result["num_examples"] = len(examples)
    result["per_example"] = per
    result["samples"] = [{"prompt": p, "reference": r, "prediction": g}
                         for p, r, g in list(zip(prompts, refs, preds))[:3]]
    return result


def evaluate_spec(spec: ModelSpec, examples: list[dict[str, str]], max_new_tokens: int,
                  batch_size: int, compute: Any = None) -> dict[str, Any]:
    """Load a model by its spec (hub id or path, revision, trust_remote_code, dtype) straight onto this
    process's device (`device_map`: no full host copy) and `evaluate_model` it. dtype "auto": bf16 on a GPU,
    fp32 on the CPU. The driver runs it as a Ray task for the SFT teacher's ceiling; the method comparison
    for its reference models. `compute`: the run's reproducibility settings, applied first (None: their
    defaults)."""
    # deferred: transformers costs ~1.4 s at import (measured); the driver's start-up imports this module
    from transformers import AutoTokenizer

    apply_compute_settings(compute, where="evaluation task")

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    model = load_causal_lm(spec, device, resolve_dtype(spec.dtype, torch.bfloat16 if cuda else torch.float32))
    tok = AutoTokenizer.from_pretrained(spec.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    return evaluate_model(model, tok, examples, max_new_tokens, batch_size)
