"""train_step: a pure function of (model, batch, targets, config). Tiny random Llamas, no Ray.

Both student paths: fused (HiddenStatesLM: backbone only, the loss applies the head per chunk of counted
rows) and logits (the causal LM's own forward). They must give the same loss and the same gradient for
every parameter, the LM head's included."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from common.config import DataConfig, LossConfig
from common.data.batching import collate, tokenize_examples
from common.losses import targets_from_record
from common.roles import needs_student_base
from common.topk import TopKRecord
from student_worker.train_step import (
    HiddenStatesLM,
    TrainStepError,
    add_student_base,
    enable_gradient_checkpointing,
    fused_head_problem,
    loss_forward_module,
    train_step,
)
from tests.tiny import make_llama, make_model_set

EXAMPLES = [
    {"prompt": "sort the numbers : 3 1 2 .", "response": "answer : 1 2 3 ."},
    {"prompt": "reverse the words : red green blue .", "response": "blue green red"},
    {"prompt": "the quick brown fox", "response": "jumps over the lazy dog ."},
    {"prompt": "one two three", "response": "four five six seven eight"},
]
PATHS = ["fused", "logits"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("tiny")
    paths = make_model_set(root)
    # a student with padded vocabulary rows (like Qwen2's 151,936 tokenizer vs 152,064 head rows)
    paths["student_padded"] = make_llama(root / "student_padded", paths["tokenizer"], seed=4, hidden_size=16,
                                         num_heads=2, intermediate_size=32, vocab_pad=7)
    load = {r: AutoModelForCausalLM.from_pretrained(str(paths[r]), dtype=torch.float32).eval()
            for r in ("base_teacher", "sft_teacher", "student", "student_padded")}
    tok = AutoTokenizer.from_pretrained(str(paths["tokenizer"]))
    return load, tok


def _batch(tok, rows=EXAMPLES) -> dict[str, np.ndarray]:
    return collate(tokenize_examples(rows, tok, DataConfig(max_length=64)), tok.pad_token_id)


def _torch(b: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.from_numpy(b["input_ids"]).long(),
            "attention_mask": torch.from_numpy(b["attention_mask"]).long(),
            "labels": torch.from_numpy(b["labels"])}


@torch.no_grad()
def _record(models, b: dict[str, np.ndarray], k: int = 8, base_role_model: str = "base_teacher",
            extra: dict[str, str] | None = None, tau: float = 1.0) -> TopKRecord:
    """The teachers' top-k record at the batch's counted positions (from their full logits, at tau)."""
    ms, tok = models
    v = len(tok)
    x = _torch(b)
    roles = {"sft": "sft_teacher", "base": base_role_model, **(extra or {})}
    dense = {r: torch.log_softmax(ms[m](input_ids=x["input_ids"], attention_mask=x["attention_mask"])
                                  .logits[..., :v] / tau, -1).numpy() for r, m in roles.items()}
    return TopKRecord.from_dense(0, dense, k, b["loss_mask"], tau=tau).validate(list(roles))


def _module(model, path):
    return HiddenStatesLM(model) if path == "fused" else model


def _grads(student, loss):
    loss.backward()
    return {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("method", ["sft", "kd", "delta_kd", "parallelogram"])
def test_methods_give_finite_loss_and_gradients(models, method, path):
    ms, tok = models
    student = copy.deepcopy(ms["student"]).train()
    b = _batch(tok)
    targets = None if method == "sft" else targets_from_record(_record(models, b))
    n = int(b["loss_mask"].sum())
    loss, metrics = train_step(_module(student, path), _module(ms["student"], path), _torch(b), targets,
                               LossConfig(method=method, k=8), None, global_tokens=n, world_size=1)
    grads = _grads(student, loss)
    assert math.isfinite(loss.item()) and loss.item() > 0
    assert metrics["tokens"] == n
    assert len(grads) == len(list(student.parameters()))  # every parameter, the LM head's included
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert float(grads["lm_head.weight"].abs().sum()) > 0


@pytest.mark.parametrize("cfg", [
    LossConfig(method="sft"),
    LossConfig(method="kd", k=8, lam=0.3, tau=2.0),
    LossConfig(method="delta_kd", k=8),
    LossConfig(method="delta_kd", k=8, tail="student_base", lam=0.2),
    LossConfig(method="delta_kd", k=8, tail="drop", objective="reverse_kl"),
], ids=["sft", "kd_tau2", "delta_kd", "delta_kd_student_base_tail", "delta_kd_drop_rkl"])
def test_fused_path_equals_logits_path(models, cfg):
    """Same loss and the same gradient for every parameter through HiddenStatesLM and the causal LM; a
    padded head (V' = |V| + 7) is cut on both."""
    ms, tok = models
    b = _batch(tok)
    n = int(b["loss_mask"].sum())
    rec = None if cfg.method == "sft" else _record(models, b, tau=cfg.tau)
    results = {}
    for path in PATHS:
        student = copy.deepcopy(ms["student_padded"]).train()
        targets = None if rec is None else targets_from_record(rec)
        loss, metrics = train_step(_module(student, path), _module(ms["student"], path), _torch(b), targets,
                                   cfg, None, n, 1)
        results[path] = (loss.item(), metrics, _grads(student, loss))
    (l_f, m_f, g_f), (l_l, m_l, g_l) = results["fused"], results["logits"]
    assert l_f == pytest.approx(l_l, rel=1e-5)
    assert m_f.keys() == m_l.keys()
    # fp32 on both paths; the head product runs on [chunk, H] rows instead of [B*T, H] (another BLAS
    # blocking): ~1e-7 relative per logit, a few 1e-7 on the gradients.
    for name, g in g_l.items():
        torch.testing.assert_close(g_f[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_path_never_forms_full_logits(models):
    """Neither the student's nor the frozen base's LM head module runs over [B, T] on the fused path."""
    ms, tok = models
    student, base = copy.deepcopy(ms["student"]).train(), copy.deepcopy(ms["student"]).eval()
    calls = []
    for m in (student, base):
        m.lm_head.register_forward_hook(lambda mod, inp, out: calls.append(tuple(out.shape)))
    b = _batch(tok)
    loss, _ = train_step(HiddenStatesLM(student), HiddenStatesLM(base), _torch(b),
                         targets_from_record(_record(models, b)), LossConfig(method="delta_kd", k=8), None,
                         int(b["loss_mask"].sum()), 1)
    loss.backward()
    assert calls == []
    assert student.lm_head.weight.grad is not None and base.lm_head.weight.grad is None


def test_loss_is_divided_by_global_tokens_times_world_size(models):
    ms, tok = models
    b = _batch(tok)
    targets = targets_from_record(_record(models, b))
    cfg = LossConfig(method="kd", k=8)
    student = HiddenStatesLM(ms["student"])
    loss1, m1 = train_step(student, None, _torch(b), targets, cfg, None, global_tokens=10, world_size=1)
    loss2, m2 = train_step(student, None, _torch(b), targets, cfg, None, global_tokens=40, world_size=2)
    assert m1["loss_sum"] == pytest.approx(m2["loss_sum"])
    assert loss1.item() == pytest.approx(m1["loss_sum"] / 10, rel=1e-6)
    assert loss2.item() == pytest.approx(m1["loss_sum"] * 2 / 40, rel=1e-6)
    with pytest.raises(TrainStepError, match="global_tokens"):
        train_step(student, None, _torch(b), targets, cfg, None, global_tokens=0, world_size=1)


def test_two_rank_split_averages_to_the_full_batch_gradient(models):
    """What DDP does: mean over ranks of per-rank grads (world 2, global N) == one process on the batch."""
    ms, tok = models
    cfg = LossConfig(method="delta_kd", k=8)

    def grads(rows, n, world):
        student = copy.deepcopy(ms["student"]).train()
        b = _batch(tok, rows)
        loss, _ = train_step(HiddenStatesLM(student), HiddenStatesLM(ms["student"]), _torch(b),
                             targets_from_record(_record(models, b)), cfg, None, global_tokens=n, world_size=world)
        loss.backward()
        return [p.grad.clone() for p in student.parameters()]

    n = int(_batch(tok)["loss_mask"].sum())
    full = grads(EXAMPLES, n, 1)
    half_a, half_b = grads(EXAMPLES[:2], n, 2), grads(EXAMPLES[2:], n, 2)
    for g, a, c in zip(full, half_a, half_b):
        # fp32, sums over ~40 tokens in a different order (and different right padding): ~1e-6 relative.
        torch.testing.assert_close((a + c) / 2, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_frozen_base_copy_supplies_student_base(models, path):
    ms, tok = models
    b = _batch(tok)
    record = _record(models, b)
    cfg = LossConfig(method="delta_kd", k=8)
    assert needs_student_base(cfg) and not needs_student_base(LossConfig(method="kd"))
    assert needs_student_base(LossConfig(method="parallelogram", weights={"delta_match": 1.0, "kd": 0.0}))
    assert not needs_student_base(LossConfig(method="parallelogram", weights={"delta_kd": 0.0, "kd": 1.0}))
    n = int(b["loss_mask"].sum())
    x = _torch(b)
    explicit = targets_from_record(_record(models, b, extra={"student_base": "student"}))
    via_copy, _ = train_step(_module(ms["student"], path), _module(ms["student"], path), x,
                             targets_from_record(record), cfg, None, n, 1)
    via_record, _ = train_step(_module(ms["student"], path), None, x, explicit, cfg, None, n, 1)
    assert via_copy.item() == pytest.approx(via_record.item(), rel=1e-5)
    added = add_student_base(_module(ms["student"], path), x, targets_from_record(record), chunk_tokens=5)
    torch.testing.assert_close(added.logprobs["student_base"], explicit.logprobs["student_base"], rtol=0,
                               atol=2e-5)
    torch.testing.assert_close(added.tail["student_base"], explicit.tail["student_base"], rtol=0, atol=2e-6)
    with pytest.raises(TrainStepError, match="student_base"):
        train_step(ms["student"], None, x, targets_from_record(record), cfg, None, n, 1)


def test_zero_shift_and_student_equal_to_its_base_gives_zero_delta_kd(models):
    """delta = lp_T1 - lp_T0 = 0 (both roles from one model) and S = S0: the target is S itself, L = 0."""
    ms, tok = models
    b = _batch(tok)
    record = _record(models, b, base_role_model="sft_teacher")
    n = int(b["loss_mask"].sum())
    for tail in ("bucket", "student_base"):
        loss, _ = train_step(HiddenStatesLM(ms["student"]), HiddenStatesLM(ms["student"]), _torch(b),
                             targets_from_record(record), LossConfig(method="delta_kd", k=8, tail=tail), None, n, 1)
        assert abs(loss.item()) < 1e-5, tail
    kd, _ = train_step(HiddenStatesLM(ms["student"]), None, _torch(b), targets_from_record(record),
                       LossConfig(method="kd", k=8), None, n, 1)
    assert kd.item() > 1e-2  # the teacher is a different random model: plain KD is far from 0


def test_gradient_checkpointing_gives_the_same_gradients(models):
    ms, tok = models
    b = _batch(tok)
    targets = targets_from_record(_record(models, b))
    n = int(b["loss_mask"].sum())
    out = []
    for checkpointing in (False, True):
        student = copy.deepcopy(ms["student"]).train()
        if checkpointing:
            enable_gradient_checkpointing(student)
        loss, _ = train_step(HiddenStatesLM(student), HiddenStatesLM(ms["student"]), _torch(b), targets,
                             LossConfig(method="delta_kd", k=8), None, n, 1)
        out.append(_grads(student, loss))
    for name, g in out[0].items():
        torch.testing.assert_close(out[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


class _ScaledLlama(torch.nn.Module):
    """A model whose forward scales its logits after the head, with no config key saying so."""

    def __init__(self, lm):
        super().__init__()
        self.inner, self.config, self.base_model = lm, lm.config, lm.model

    def get_output_embeddings(self):
        return self.inner.lm_head

    def forward(self, input_ids, attention_mask=None):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
        out.logits = out.logits * 0.5
        return out


def test_models_the_fused_loss_cannot_reproduce_fall_back_or_fail(models, caplog):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    ms, _ = models
    assert fused_head_problem(ms["student"]) is None
    assert fused_head_problem(ms["student_padded"]) is None
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                           final_logit_softcapping=30.0))
    assert "final_logit_softcapping" in fused_head_problem(gemma)
    assert "differ from lm_head" in fused_head_problem(_ScaledLlama(ms["student"]))
    assert isinstance(loss_forward_module(ms["student"], LossConfig(), "tiny"), HiddenStatesLM)
    assert loss_forward_module(ms["student"], LossConfig(fused="off"), "tiny") is ms["student"]
    with caplog.at_level("WARNING"):
        assert loss_forward_module(gemma, LossConfig(fused="auto"), "my/gemma") is gemma
    assert "my/gemma" in caplog.text and "loss.fused" in caplog.text
    with pytest.raises(TrainStepError, match=r"model my/gemma: config.final_logit_softcapping.*loss.fused"):
        loss_forward_module(gemma, LossConfig(fused="on"), "my/gemma")


def test_tied_embeddings_get_both_gradients_on_the_fused_path(models):
    """Qwen2-0.5B ties its LM head to the input embeddings: the shared weight's gradient is the sum of the
    embedding's and the head's, the same on both paths."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ms, tok = models
    torch.manual_seed(5)
    tied = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok) + 3, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                        tie_word_embeddings=True)).train()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    b = _batch(tok)
    targets = targets_from_record(_record(models, b))
    n = int(b["loss_mask"].sum())
    grads = {}
    for path in PATHS:
        student = copy.deepcopy(tied)
        loss, _ = train_step(_module(student, path), None, _torch(b), targets, LossConfig(method="kd", k=8), None,
                             n, 1)
        grads[path] = _grads(student, loss)
    for name, g in grads["logits"].items():
        torch.testing.assert_close(grads["fused"][name], g, rtol=1e-4, atol=1e-6, msg=name)
