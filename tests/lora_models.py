"""A tiny LoRA teacher pair for tests: a random LoRA adapter of a tiny Llama, and the same adapter merged into
a full copy (the two-actor reference). Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

# Every linear layer of the Llama blocks; the LM head stays the base's (the usual LoRA fine-tune).
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_lora_adapter(out_dir: str | Path, base_dir: str | Path, tokenizer_dir: str | Path, seed: int = 5,
                      rank: int = 4, base_name: str | None = None) -> Path:
    """A LoRA adapter of `base_dir` with random A *and* B (init_lora_weights=False: a non-zero delta, so
    adapter on and off differ), saved with the tokenizer; `base_name` overrides base_model_name_or_path."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                  init_lora_weights=False))
    if base_name is not None:
        peft_model.peft_config["default"].base_model_name_or_path = base_name
    out = Path(out_dir)
    peft_model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out))
    return out


def merge_adapter(out_dir: str | Path, base_dir: str | Path, adapter_dir: str | Path) -> Path:
    """The adapter merged into a full copy of the base (peft's merge_and_unload), saved as a plain model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    out = Path(out_dir)
    merged.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(out))
    return out
