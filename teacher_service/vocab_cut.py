"""A view of a checkpoint with its padded vocabulary rows cut, so an engine that cannot cut logits itself
(vLLM) normalises over exactly the tokenizer's vocabulary, as the HF engine does.

Qwen2-7B has 152,064 output rows for a 151,646-token tokenizer. The HF engine drops the 418 padded rows'
logits before its log-softmax; vLLM cuts logits only to `config.vocab_size` and refuses a checkpoint whose
embedding rows differ from it. So `cut_vocab_checkpoint` writes a directory where `config.json` says
`vocab_size = len(tokenizer)` and every tensor with `config.vocab_size` rows in dim 0 (input embeddings,
LM head, an LM-head bias) keeps its first `vocab_size` rows; every other file is a symlink to the source.
The log-softmax over the cut rows is then the HF engine's cut normaliser exactly (tested on CPU by loading
the cut view with transformers). No Ray, no vLLM here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["cut_vocab_checkpoint", "padded_rows"]


def padded_rows(model_dir: str | Path, vocab_size: int) -> int:
    """How many output rows `config.json` declares beyond `vocab_size` (0: nothing to cut)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    rows = int(cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size", 0))
    if rows < vocab_size:
        raise ValueError(f"{model_dir}: config vocab_size {rows} is smaller than the tokenizer's {vocab_size}")
    return rows - vocab_size


def cut_vocab_checkpoint(model_dir: str | Path, vocab_size: int, out_root: str | Path) -> Path:
    """A cut view of the local checkpoint `model_dir` under `out_root` (reused when already complete).

    Returns `model_dir` itself when nothing is padded. Only safetensors checkpoints are handled (one file
    or an index with shards); shards without vocabulary-sized tensors are symlinked, the others rewritten.
    """
    src = Path(model_dir).resolve()
    pad = padded_rows(src, vocab_size)
    if pad == 0:
        return src
    cfg = json.loads((src / "config.json").read_text())
    rows = vocab_size + pad
    key = hashlib.sha256(f"{src}|{vocab_size}|{(src / 'config.json').stat().st_mtime_ns}".encode()).hexdigest()[:16]
    out = Path(out_root) / f"{src.name}-vocab{vocab_size}-{key}"
    if (out / ".complete").is_file():
        return out
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"{src}: no *.safetensors files; the vocabulary cut handles safetensors checkpoints only")
    rewritten = 0
    for name in shards:
        with safe_open(str(src / name), framework="pt") as f:
            keys = list(f.keys())
            vocab_keys = [k for k in keys if f.get_slice(k).get_shape()[:1] == [rows]]
            if not vocab_keys:
                os.symlink(src / name, tmp / name)
                continue
            tensors = {k: (f.get_tensor(k)[:vocab_size].contiguous() if k in vocab_keys else f.get_tensor(k))
                       for k in keys}
            metadata = f.metadata()
        save_file(tensors, str(tmp / name), metadata=metadata)
        rewritten += 1
        del tensors
    if not rewritten:
        raise ValueError(f"{src}: config declares {rows} vocabulary rows but no tensor has {rows} rows")
    for item in src.iterdir():  # tokenizer files, generation config, the shard index (names unchanged)
        if item.name not in shards and item.name != "config.json" and not (tmp / item.name).exists():
            os.symlink(item, tmp / item.name)
    if "text_config" in cfg and "vocab_size" not in cfg:
        cfg["text_config"]["vocab_size"] = vocab_size
    else:
        cfg["vocab_size"] = vocab_size
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    (tmp / ".complete").write_text("")
    if out.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        return out
    tmp.rename(out)
    return out
