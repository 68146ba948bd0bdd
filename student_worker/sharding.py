"""FSDP2 for the student (`training.strategy: fsdp2`): shard the model over the student ranks, gather it back.

`shard_student` applies torch's `fully_shard` to every decoder layer and then to the module the step runs (the
root: `HiddenStatesLM(lm)` on the fused path, else the causal LM), over a 1-D device mesh of the student ranks
(torch's default group, student_worker/distributed.py `make_default_group`). Each rank then holds 1/W of every
parameter, of its gradient and of its AdamW state; a layer's weights are all-gathered just before its
forward (and again in backward) and gradients are reduce-scattered (averaged over ranks, as DDP does).

Mixed precision (`mixed_precision`): on GPU parameters are all-gathered and computed in bf16 while the
sharded master weights, and the gradient reduction, stay fp32; on CPU nothing is cast (fp32 throughout, so
fsdp2 and ddp agree to float rounding).

The LM head and the fused loss: the root unit (embeddings, final norm, LM head) is not resharded after the
forward (FSDP2 keeps the root's parameters gathered until backward), so after `model(...)` the head's
weight is the full, unsharded parameter: the fused loss reads it ([V, H], never [B, T, V]), adds its
gradient there, and FSDP's post-backward reduce-scatters that gradient to the shards like any other.
`train_step.model_output` refuses a head weight that is still a sharded DTensor (TrainStepError).

Generation and whole-model outputs need every parameter at once: `full_state_dict` (a collective: every rank
calls it) gathers them, and `gathered_copy` builds a plain, unsharded copy of the student from them (on-policy
sampling, evaluation) that is dropped after use.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

__all__ = ["ShardingError", "student_mesh", "mixed_precision", "decoder_layers", "shard_student",
           "full_state_dict", "gathered_copy", "is_sharded"]


class ShardingError(RuntimeError):
    """The student cannot be sharded as asked (e.g. no decoder layer list found); the message names the model."""


def student_mesh(device: torch.device, world_size: int) -> DeviceMesh:
    """The 1-D mesh of the student ranks over torch's default group (formed by `make_default_group`)."""
    return init_device_mesh(device.type, (world_size,))


def mixed_precision(device: torch.device) -> MixedPrecisionPolicy:
    """GPU: bf16 gathered parameters and compute, fp32 gradient reduction (the master shards stay in the model's
    own dtype, fp32 by default). CPU: no casting at all."""
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def decoder_layers(lm: torch.nn.Module, name: str) -> list[torch.nn.Module]:
    """The decoder layers of a Hugging Face causal LM (`lm.base_model.layers`: Llama, Qwen2, Mistral, ...)."""
    layers = getattr(getattr(lm, "base_model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ShardingError(f"model {name}: no decoder layer list at base_model.layers; training.strategy=fsdp2 "
                            "shards one unit per decoder layer (use training.strategy=ddp for this model)")
    return list(layers)


def shard_student(root: torch.nn.Module, lm: torch.nn.Module, mesh: DeviceMesh, device: torch.device,
                  name: str) -> torch.nn.Module:
    """fully_shard every decoder layer of `lm`, then `root` (the module the step runs; it holds `lm`), in
    place. Works for a frozen copy too (no parameter needs a gradient). Returns `root`."""
    policy = mixed_precision(device)
    for layer in decoder_layers(lm, name):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(root, mesh=mesh, mp_policy=policy)
    return root


def is_sharded(module: torch.nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def full_state_dict(lm: torch.nn.Module, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `lm` whole. A collective: EVERY rank must call it.

    rank0_only: only rank 0 gets the tensors, on CPU (the others an empty dict), e.g. to write final_model/;
    else every rank gets them, on the model's device."""
    return get_model_state_dict(lm, options=StateDictOptions(full_state_dict=True, cpu_offload=rank0_only))


def gathered_copy(lm: Any, device: torch.device) -> Any:
    """A plain (unsharded) copy of the sharded causal LM `lm`, with its weights and generation config, for
    generation (which runs a varying number of forwards per rank, so it cannot all-gather layer by layer).
    A collective: every rank must call it. Costs one full copy of the student (on `device`) while it lives:
    the copy is built on the meta device and takes the gathered tensors themselves."""
    # deferred: transformers costs ~1.6 s at import (measured in common/data/model_loading.py)
    from transformers import AutoModelForCausalLM

    state = full_state_dict(lm)
    with torch.device("meta"):
        copy = AutoModelForCausalLM.from_config(lm.config, dtype=next(iter(state.values())).dtype)
    missing, unexpected = copy.load_state_dict(state, strict=False, assign=True)
    if unexpected or [k for k in missing if k not in _tied_keys(copy)]:
        raise ShardingError(f"gathered copy of the student: missing {missing}, unexpected {unexpected}")
    del state
    copy.tie_weights()
    own_buffers = dict(lm.named_buffers())  # non-persistent buffers (rotary inv_freq): not in the state dict
    for name, buf in list(copy.named_buffers()):
        if buf.is_meta:
            module_name, _, attr = name.rpartition(".")
            copy.get_submodule(module_name).register_buffer(attr, own_buffers[name].to(device), persistent=False)
    still_meta = [n for n, t in [*copy.named_parameters(), *copy.named_buffers()] if t.is_meta]
    if still_meta:
        raise ShardingError(f"gathered copy of the student: {still_meta} not filled")
    copy.generation_config = lm.generation_config
    copy.train(lm.training)
    return copy.to(device)


def _tied_keys(model: Any) -> set[str]:
    """State-dict keys that are tied to another parameter (e.g. lm_head.weight to the embeddings)."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied if isinstance(tied, (list, set, tuple)) else tied.keys())
