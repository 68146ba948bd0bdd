"""The cut checkpoint view (teacher_service.vocab_cut): loading it gives the original model's logits at
the tokenizer's rows, so its log-softmax is the HF engine's cut normaliser exactly, on a sharded
safetensors checkpoint with padded vocabulary rows (like Qwen2-7B's 152,064 vs 151,646)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from teacher_service.vocab_cut import cut_vocab_checkpoint, padded_rows
from tests.tiny import make_llama, make_tokenizer


def test_cut_view_matches_cut_logits_and_is_reused(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_dir = make_tokenizer(tmp_path / "tok")
    src = make_llama(tmp_path / "padded", tok_dir, seed=3, vocab_pad=7)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    model.save_pretrained(str(src), max_shard_size="20KB")  # several shards + an index, as for a 7B model
    assert (src / "model.safetensors.index.json").is_file()
    v = len(AutoTokenizer.from_pretrained(str(src)))
    assert padded_rows(src, v) == 7

    cut = cut_vocab_checkpoint(src, v, tmp_path / "cache")
    assert cut != src.resolve() and json.loads((cut / "config.json").read_text())["vocab_size"] == v
    assert any(p.is_symlink() for p in cut.glob("*.safetensors"))  # shards without vocabulary rows are linked
    cut_model = AutoModelForCausalLM.from_pretrained(str(cut), dtype=torch.float32)
    assert cut_model.get_output_embeddings().weight.shape[0] == v
    ids = torch.randint(0, v, (2, 6))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        mine = cut_model(input_ids=ids).logits
    assert full.shape[-1] == v + 7 and mine.shape[-1] == v
    torch.testing.assert_close(mine, full[..., :v], rtol=0, atol=1e-6)
    # The normaliser: log-softmax over the cut rows, what the HF engine computes; not over the padded ones.
    torch.testing.assert_close(torch.log_softmax(mine, -1), torch.log_softmax(full[..., :v], -1), rtol=0, atol=1e-6)
    assert not torch.allclose(torch.log_softmax(full, -1)[..., :v], torch.log_softmax(mine, -1), atol=1e-6)

    assert cut_vocab_checkpoint(src, v, tmp_path / "cache") == cut  # complete views are reused
    assert cut_vocab_checkpoint(cut, v, tmp_path / "other") == cut.resolve()  # nothing padded: served as is
