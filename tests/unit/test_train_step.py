"""train_step: a pure function of (model, batch, targets, config). Tiny random Llamas, no Ray."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from common.config import DataConfig, LossConfig
from common.losses import targets_from_record
from common.sparse import sparse_gather, sparse_topk
from common.topk import TopKRecord, rows_from_mask
from student_worker.data import collate, tokenize_examples
from student_worker.train_step import TrainStepError, needs_student_base, train_step
from tests.tiny import make_model_set

EXAMPLES = [
    {"prompt": "sort the numbers : 3 1 2 .", "response": "answer : 1 2 3 ."},
    {"prompt": "reverse the words : red green blue .", "response": "blue green red"},
    {"prompt": "the quick brown fox", "response": "jumps over the lazy dog ."},
    {"prompt": "one two three", "response": "four five six seven eight"},
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = make_model_set(tmp_path_factory.mktemp("tiny"))
    load = {r: AutoModelForCausalLM.from_pretrained(str(paths[r]), dtype=torch.float32).eval()
            for r in ("base_teacher", "sft_teacher", "student")}
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
            vocab: int | None = None) -> TopKRecord:
    ms, tok = models
    v = vocab or len(tok)
    x = _torch(b)
    sft_logits = ms["sft_teacher"](input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    ids, lp_sft, tail_sft = sparse_topk(sft_logits, k, vocab_size=v)
    base_logits = ms[base_role_model](input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    lp_base, tail_base = sparse_gather(base_logits, ids, vocab_size=v)
    rows = rows_from_mask(b["loss_mask"])  # the record carries the counted positions only

    def at(x: torch.Tensor) -> np.ndarray:
        return x.reshape(-1, *x.shape[2:]).numpy()[rows]

    return TopKRecord(0, at(ids.int()), {"sft": at(lp_sft), "base": at(lp_base)},
                      {"sft": at(tail_sft), "base": at(tail_base)}, rows, b["loss_mask"].shape, 1.0, v).validate()


@pytest.mark.parametrize("method", ["sft", "kd", "delta_kd", "parallelogram"])
def test_methods_give_finite_loss_and_gradients(models, method):
    ms, tok = models
    student = copy.deepcopy(ms["student"]).train()
    b = _batch(tok)
    targets = None if method == "sft" else targets_from_record(_record(models, b))
    n = int(b["loss_mask"].sum())
    loss, metrics = train_step(student, ms["student"], _torch(b), targets, LossConfig(method=method, k=8),
                               None, global_tokens=n, world_size=1)
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() > 0
    assert metrics["tokens"] == n
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_loss_is_divided_by_global_tokens_times_world_size(models):
    ms, tok = models
    b = _batch(tok)
    targets = targets_from_record(_record(models, b))
    cfg = LossConfig(method="kd", k=8)
    loss1, m1 = train_step(ms["student"], None, _torch(b), targets, cfg, None, global_tokens=10, world_size=1)
    loss2, m2 = train_step(ms["student"], None, _torch(b), targets, cfg, None, global_tokens=40, world_size=2)
    assert m1["loss_sum"] == pytest.approx(m2["loss_sum"])
    assert loss1.item() == pytest.approx(m1["loss_sum"] / 10, rel=1e-6)
    assert loss2.item() == pytest.approx(m1["loss_sum"] * 2 / 40, rel=1e-6)
    with pytest.raises(TrainStepError, match="global_tokens"):
        train_step(ms["student"], None, _torch(b), targets, cfg, None, global_tokens=0, world_size=1)


def test_two_rank_split_averages_to_the_full_batch_gradient(models):
    """What DDP does: mean over ranks of per-rank grads (world 2, global N) == one process on the batch."""
    ms, tok = models
    cfg = LossConfig(method="delta_kd", k=8)

    def grads(rows, n, world):
        student = copy.deepcopy(ms["student"]).train()
        b = _batch(tok, rows)
        loss, _ = train_step(student, ms["student"], _torch(b), targets_from_record(_record(models, b)), cfg,
                             None, global_tokens=n, world_size=world)
        loss.backward()
        return [p.grad.clone() for p in student.parameters()]

    n = int(_batch(tok)["loss_mask"].sum())
    full = grads(EXAMPLES, n, 1)
    half_a, half_b = grads(EXAMPLES[:2], n, 2), grads(EXAMPLES[2:], n, 2)
    for g, a, c in zip(full, half_a, half_b):
        # fp32, sums over ~40 tokens in a different order (and different right padding): ~1e-6 relative.
        torch.testing.assert_close((a + c) / 2, g, rtol=1e-4, atol=1e-6)


def test_frozen_base_copy_supplies_student_base(models):
    ms, tok = models
    b = _batch(tok)
    record = _record(models, b)
    cfg = LossConfig(method="delta_kd", k=8)
    assert needs_student_base(cfg) and not needs_student_base(LossConfig(method="kd"))
    assert needs_student_base(LossConfig(method="parallelogram", weights={"delta_match": 1.0, "kd": 0.0}))
    assert not needs_student_base(LossConfig(method="parallelogram", weights={"delta_kd": 0.0, "kd": 1.0}))
    n = int(b["loss_mask"].sum())
    with torch.no_grad():
        x = _torch(b)
        logits = ms["student"](input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
        at_rows = logits.reshape(-1, logits.shape[-1])[torch.from_numpy(record.rows).long()]
        lp, tail = sparse_gather(at_rows, torch.from_numpy(record.ids), vocab_size=len(tok))
    explicit = targets_from_record(record.with_role("student_base", lp.numpy(), tail.numpy()))
    via_copy, _ = train_step(ms["student"], ms["student"], x, targets_from_record(record), cfg, None, n, 1)
    via_record, _ = train_step(ms["student"], None, x, explicit, cfg, None, n, 1)
    assert via_copy.item() == pytest.approx(via_record.item(), rel=1e-6)
    with pytest.raises(TrainStepError, match="student_base"):
        train_step(ms["student"], None, x, targets_from_record(record), cfg, None, n, 1)


def test_zero_shift_and_student_equal_to_its_base_gives_zero_delta_kd(models):
    """delta = lp_T1 - lp_T0 = 0 (both roles from one model) and S = S0: the target is S itself, L = 0."""
    ms, tok = models
    b = _batch(tok)
    record = _record(models, b, base_role_model="sft_teacher")
    loss, metrics = train_step(ms["student"], ms["student"], _torch(b), targets_from_record(record),
                               LossConfig(method="delta_kd", k=8), None, int(b["loss_mask"].sum()), 1)
    assert abs(loss.item()) < 1e-5
    kd, _ = train_step(ms["student"], None, _torch(b), targets_from_record(record), LossConfig(method="kd", k=8),
                       None, int(b["loss_mask"].sum()), 1)
    assert kd.item() > 1e-2  # the teacher is a different random model: plain KD is far from 0
