"""FSDP2 pieces of the student (student_worker/sharding.py), on 2 gloo ranks in spawned processes (no Ray; here,
not in tests/unit, because two spawned interpreters importing transformers take tens of seconds).

One 2-rank run checks, against the same tiny random Llama unsharded in this process:
- the fused step's loss and every gradient (the LM head's included: gathered for the loss, its gradient
  reduce-scattered back to the shards) equal a single process's on the whole batch, to fp32 rounding;
- `gathered_copy` (what on-policy sampling and evaluation use) is the unsharded model: identical logits and
  the same greedy generation on every rank, and the sharded model is untouched;
- `full_state_dict(rank0_only=True)` gives rank 0 every weight, the other rank nothing;
- a root unit set to reshard after its forward leaves the LM head sharded: `model_output` refuses it.
The end-to-end runs (fsdp2 vs ddp, faults, resume) are in tests/integration/test_faults.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from student_worker.sharding import ShardingError, decoder_layers

WORLD = 2
# fp32 sums in another order (two half-batches reduce-scattered vs one batch): a few ulps
RTOL, ATOL = 1e-5, 1e-6


def _tiny_llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie,
                                        max_position_embeddings=32))


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 40, (2 * WORLD, 6), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.roll(-1, 1)}


def _rank(rank: int, addresses, tmp: str) -> None:
    from student_worker.distributed import local_rendezvous, make_default_group

    torch.set_num_threads(1)
    store, address = local_rendezvous(rank, WORLD, addresses, timeout_s=120)
    make_default_group(address, rank, WORLD, "gloo", timeout_s=120, group_name="test-sharding", store=store)
    result = {}
    for tie in (False, True):
        result[str(tie)] = _rank_run(rank, tie)
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(result))
    # leave without tearing the group down: a gloo group's destructors right after its last collective can
    # block (tests/integration/test_grad_compression.py), holding this rank until the fixture's timeout
    os._exit(0)


def _rank_run(rank: int, tie: bool) -> dict:
    from common.config import LossConfig
    from student_worker import sharding
    from student_worker.train_step import TrainStepError, loss_forward_module, model_output, train_step

    device = torch.device("cpu")
    lm = _tiny_llama(tie)
    cfg = LossConfig(method="sft")
    root = sharding.shard_student(loss_forward_module(lm, cfg, "tiny"), lm, sharding.student_mesh(device, WORLD),
                                  device, "tiny")
    full = _batch()
    mine = {k: v[2 * rank:2 * rank + 2] for k, v in full.items()}
    tokens = int(full["labels"].numel())
    loss, metrics = train_step(root, None, mine, None, cfg, None, tokens, WORLD)
    loss.backward()
    grads = {n: p.grad.full_tensor().tolist() for n, p in lm.named_parameters()}
    copy = sharding.gathered_copy(lm, device)
    with torch.no_grad():
        logits = copy(input_ids=full["input_ids"]).logits.tolist()
        generated = copy.generate(input_ids=full["input_ids"][:1], max_new_tokens=4, do_sample=False,
                                  pad_token_id=0).tolist()
    still_sharded = all(hasattr(p, "to_local") for p in lm.parameters())
    state = sharding.full_state_dict(lm, rank0_only=True)
    root.set_reshard_after_forward(True)  # the root unit would reshard after its forward: the head is a shard
    try:
        with torch.no_grad():
            model_output(root, mine)
        refused = ""
    except TrainStepError as exc:
        refused = str(exc)
    return {"loss_sum": metrics["loss_sum"], "grads": grads, "logits": logits, "generated": generated,
            "still_sharded": still_sharded, "state_keys": sorted(state), "refused": refused}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """One run of 2 spawned ranks (both variants, untied and tied embeddings): each rank's results."""
    from student_worker.distributed import run_local_ranks

    tmp = tmp_path_factory.mktemp("sharding")
    run_local_ranks(_rank, (str(tmp),), WORLD, timeout_s=300)  # a failing rank raises here with its traceback
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_sharded_step_gathered_copy_and_full_state_dict(two_ranks: list[dict], tie: bool) -> None:
    from common.config import LossConfig
    from student_worker.train_step import loss_forward_module, train_step

    got = [r[str(tie)] for r in two_ranks]

    lm = _tiny_llama(tie)  # the reference: one process, the whole batch
    cfg = LossConfig(method="sft")
    full = _batch()
    loss, metrics = train_step(loss_forward_module(lm, cfg, "tiny"), None, full, None, cfg, None,
                               int(full["labels"].numel()), 1)
    loss.backward()
    torch.testing.assert_close(sum(g["loss_sum"] for g in got), metrics["loss_sum"], rtol=RTOL, atol=ATOL)
    for name, p in lm.named_parameters():
        for g in got:
            torch.testing.assert_close(torch.tensor(g["grads"][name]), p.grad, rtol=RTOL, atol=ATOL, msg=name)
    with torch.no_grad():
        logits = lm(input_ids=full["input_ids"]).logits
        generated = lm.generate(input_ids=full["input_ids"][:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    for g in got:
        assert torch.equal(torch.tensor(g["logits"]), logits)  # the same weights, the same kernels: exact
        assert g["generated"] == generated.tolist() and g["still_sharded"]
    assert got[0]["state_keys"] == sorted(lm.state_dict()) and got[1]["state_keys"] == []
    for g in got:  # a head that is still a shard is refused, not used with a gradient that skips the reduction
        assert "the LM head is still sharded after the forward" in g["refused"]


def test_a_model_without_decoder_layers_is_refused_naming_it() -> None:
    with pytest.raises(ShardingError, match="model toy: no decoder layer list.*training.strategy=ddp"):
        decoder_layers(torch.nn.Linear(2, 2), "toy")
