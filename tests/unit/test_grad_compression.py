"""bf16 gradient compression for DDP (training.grad_compression), on gloo in this process.

With one rank the all-reduce adds nothing, so what DDP leaves in `.grad` is exactly the hook's rounding:
bf16(g) cast back to fp32 with "bf16", g itself with "none". Two ranks: tests/integration/test_grad_compression.py.
"""

from __future__ import annotations

import pytest
import torch

from student_worker.distributed import (
    DistributedError,
    compression_hook,
    make_process_group,
    open_rendezvous_store,
    wrap_ddp,
)


@pytest.fixture(scope="module")
def group():
    store, address = open_rendezvous_store(1, timeout_s=30, host="127.0.0.1")
    return make_process_group(address, 0, 1, "gloo", timeout_s=30, store=store)


def _grads(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    model(x).pow(2).sum().backward()
    return [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["none", "bf16"])
def test_hook_rounds_gradients_to_bf16_exactly(group, mode: str) -> None:
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))
    ddp_model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))
    ddp_model.load_state_dict(plain.state_dict())
    ddp = wrap_ddp(ddp_model, group, torch.device("cpu"), compression_hook(mode))
    x = torch.randn(5, 7)
    ref = _grads(plain, x)
    got = _grads(ddp, x)
    for r, g in zip(ref, got):
        expect = r.to(torch.bfloat16).to(torch.float32) if mode == "bf16" else r
        torch.testing.assert_close(g, expect, rtol=0, atol=0)
    if mode == "bf16":  # the hook really ran: some gradient lost bits
        assert any(not torch.equal(r, g) for r, g in zip(ref, got))


def test_unknown_mode_is_refused(group) -> None:
    with pytest.raises(DistributedError, match="grad_compression='fp8'"):
        compression_hook("fp8")
