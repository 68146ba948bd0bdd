"""A reduced embedded build (seconds): loadable models, cache reuse, corruption rebuilt, new config new dir.

No Ray: this trains tiny models in-process, so it sits with the integration tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.config import ConfigError, EmbeddedConfig, EmbeddedModelShape, config_from_dict
from common.data.batching import encode_prompt
from common.data.examples import format_prompt
from common.tiny_world.build import build_embedded_models, build_key, resolve_model_paths

TINY_SHAPE = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}
REDUCED = dict(num_train=40, num_val=5, num_test=5, corpus_sentences=200, pretrain_steps=8, sft_steps=8,
               batch_size=4, max_length=64, teacher=EmbeddedModelShape(**{**TINY_SHAPE, "hidden_size": 32}),
               student=EmbeddedModelShape(**TINY_SHAPE))


def _reduced(cache: Path, **changes: object) -> EmbeddedConfig:
    return EmbeddedConfig(cache_dir=str(cache), **{**REDUCED, **changes})


def _stamp(paths: dict[str, Path]) -> dict[str, int]:
    build_dir = paths["student"].parent
    return {str(p): p.stat().st_mtime_ns for p in build_dir.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[EmbeddedConfig, dict[str, Path]]:
    ecfg = _reduced(tmp_path_factory.mktemp("cache"))
    return ecfg, build_embedded_models(ecfg, progress=False)


def test_reduced_build_loads_like_hub_models(built: tuple[EmbeddedConfig, dict[str, Path]]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ecfg, paths = built
    assert set(paths) == {"tokenizer", "base_teacher", "sft_teacher", "student"}
    tok = AutoTokenizer.from_pretrained(str(paths["tokenizer"]))
    assert tok.unk_token_id not in tok("### Instruction:\nwhat colour is the apple ?")["input_ids"]
    prompt = torch.tensor([encode_prompt("### Instruction:\nsort these numbers in order .\n", tok)])
    sizes = {}
    for role in ("base_teacher", "sft_teacher", "student"):
        assert AutoTokenizer.from_pretrained(str(paths[role])).get_vocab() == tok.get_vocab()
        model = AutoModelForCausalLM.from_pretrained(str(paths[role]), dtype=torch.float32)
        assert model.config.model_type == "llama" and model.config.vocab_size == len(tok)
        logits = model(input_ids=prompt).logits
        assert logits.shape == (1, prompt.shape[1], len(tok)) and torch.isfinite(logits).all()
        sizes[role] = sum(p.numel() for p in model.parameters())
    assert sizes["student"] < sizes["base_teacher"] == sizes["sft_teacher"]
    # SFT moved the teacher away from its base.
    base = AutoModelForCausalLM.from_pretrained(str(paths["base_teacher"]))
    sft = AutoModelForCausalLM.from_pretrained(str(paths["sft_teacher"]))
    assert not torch.equal(base.lm_head.weight, sft.lm_head.weight)
    marker = json.loads((paths["student"].parent / "COMPLETE").read_text())
    assert marker["key"] == build_key(ecfg) and paths["student"].parent.name == f"embedded-{marker['key']}"


def test_second_call_uses_the_cache(built: tuple[EmbeddedConfig, dict[str, Path]]) -> None:
    ecfg, paths = built
    before = _stamp(paths)
    assert build_embedded_models(ecfg, progress=False) == paths
    assert _stamp(paths) == before  # nothing rewritten


def test_truncated_weights_make_the_cache_invalid(built: tuple[EmbeddedConfig, dict[str, Path]], tmp_path: Path) -> None:
    import shutil

    from common.tiny_world.build import _is_complete

    ecfg, paths = built
    copy = tmp_path / paths["student"].parent.name
    shutil.copytree(paths["student"].parent, copy)
    assert _is_complete(copy, build_key(ecfg))
    assert not _is_complete(copy, "another-key")
    weights = copy / "student" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size - 100])
    assert not _is_complete(copy, build_key(ecfg))


@pytest.mark.parametrize("damage", ["marker", "weights"])
def test_corrupted_cache_is_rebuilt(tmp_path: Path, damage: str) -> None:
    ecfg = _reduced(tmp_path)
    paths = build_embedded_models(ecfg, progress=False)
    weights = paths["sft_teacher"] / "model.safetensors"
    marker = paths["student"].parent / "COMPLETE"
    (marker if damage == "marker" else weights).unlink()
    stale = tmp_path / f".tmp-embedded-{build_key(ecfg)}-999999"  # left by a builder that was killed
    (stale / "tokenizer").mkdir(parents=True)
    student_weights_time = (paths["student"] / "model.safetensors").stat().st_mtime_ns
    again = build_embedded_models(ecfg, progress=False)
    assert again == paths and weights.is_file() and marker.is_file()
    assert (paths["student"] / "model.safetensors").stat().st_mtime_ns != student_weights_time  # rebuilt
    from safetensors.torch import load_file

    assert load_file(str(weights))  # reads back in full
    assert not list(tmp_path.glob(".tmp-*"))


def test_changed_config_gets_a_new_directory(tmp_path: Path) -> None:
    a = _reduced(tmp_path)
    b = _reduced(tmp_path, sft_steps=9)
    assert build_key(a) != build_key(b)
    assert build_key(a) == build_key(_reduced(tmp_path / "elsewhere"))  # cache_dir is not part of the key
    assert build_embedded_models(b, progress=False)["student"].parent.name == f"embedded-{build_key(b)}"


def test_resolve_model_paths(built: tuple[EmbeddedConfig, dict[str, Path]]) -> None:
    ecfg, paths = built
    raw = {"models": {"base_teacher": {"path": "embedded:base_teacher"}, "sft_teacher": {"path": "embedded:sft_teacher"},
                      "student": {"path": "/some/local/student"}},
           "embedded": ecfg.model_dump(mode="json")}
    cfg = config_from_dict(raw)
    out = resolve_model_paths(cfg)
    assert out.models.base_teacher.path == str(paths["base_teacher"])
    assert out.models.sft_teacher.path == str(paths["sft_teacher"])
    assert out.models.student.path == "/some/local/student"
    assert cfg.models.base_teacher.path == "embedded:base_teacher"  # the input is not modified
    raw["models"]["student"] = {"path": "embedded:teacher"}
    with pytest.raises(ConfigError, match=r"models.student.path: unknown embedded role 'teacher'"):
        resolve_model_paths(config_from_dict(raw))


# ----------------------------------------------------------------------------------------------------
# Presets


def test_format_shift_cache_key_is_what_it_was_before_presets() -> None:
    """The default format_shift build keeps its cache directory (and so its models) across this change."""
    assert build_key(EmbeddedConfig()) == "1f70a96b61389ccc"
    assert build_key(EmbeddedConfig(num_test_extra=400, teacher_instruct_fraction=0.5)) == "1f70a96b61389ccc"
    assert build_key(EmbeddedConfig(preset="style_shift")) != build_key(EmbeddedConfig())


def test_portable_init_does_not_depend_on_torch_rng_or_transformers_init() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from common.tiny_world.style import INIT_STD, portable_init

    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    models = []
    for torch_seed in (0, 1):
        torch.manual_seed(torch_seed)
        m = LlamaForCausalLM(cfg)
        portable_init(m, seed=7)
        models.append(m.state_dict())
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])
    w = models[0]["model.layers.0.mlp.up_proj.weight"]
    assert abs(float(w.std()) - INIT_STD) < 0.003 and float(w.abs().max()) <= INIT_STD * 3**0.5
    assert torch.equal(models[0]["model.norm.weight"], torch.ones(16))


def test_style_shift_reduced_build(tmp_path: Path) -> None:
    """The style_shift build: loadable models, each base pretrained on its own mix of prose and terse
    instruction documents (the marker says how many), the SFT teacher on sentence answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.config import DataConfig
    from common.tiny_world.style import pretraining_documents
    from common.tiny_world.suite import generate_style_suite

    ecfg = _reduced(tmp_path, preset="style_shift", num_pretrain=60, teacher_instruct_fraction=0.2,
                    student_instruct_fraction=0.1)
    paths = build_embedded_models(ecfg, progress=False)
    marker = json.loads((paths["student"].parent / "COMPLETE").read_text())
    assert marker["preset"] == "style_shift" and marker["compute"]["torch_threads"] == 1
    # 200 prose sentences each, plus f / (1 - f) * 200 instruction documents: 50 and 22.
    assert marker["base_teacher_pretrain_documents"] == 250 and marker["student_pretrain_documents"] == 222
    suite = generate_style_suite(ecfg.seed, ecfg.num_train, ecfg.num_val, ecfg.num_test, ecfg.num_pretrain)
    data_cfg = DataConfig(max_length=ecfg.max_length, overlong="truncate")
    docs = {r: pretraining_documents(ecfg, suite, r, data_cfg) for r in ("base_teacher", "student")}
    instruct = {r: [d for d in docs[r] if d.startswith("### Instruction")] for r in docs}
    assert len(instruct["base_teacher"]) == 50 and len(instruct["student"]) == 22
    assert set(docs["base_teacher"]) - set(instruct["base_teacher"]) != set(docs["student"]) - set(instruct["student"])
    # Every instruction document is a pretrain-split question with its terse answer (that split is disjoint
    # from test and validation: tests/unit/test_embedded_data.py).

    terse_docs = {format_prompt(e["instruction"], e["context"], data_cfg) + " " + e["terse"] for e in suite["pretrain"]}
    assert set(instruct["base_teacher"]) <= terse_docs and set(instruct["student"]) <= terse_docs
    tok = AutoTokenizer.from_pretrained(str(paths["tokenizer"]))
    assert tok.unk_token_id not in tok(suite["test"][0]["response"])["input_ids"]
    for role in ("base_teacher", "sft_teacher", "student"):
        model = AutoModelForCausalLM.from_pretrained(str(paths[role]), dtype=torch.float32)
        assert model.config.vocab_size == len(tok)


def test_student_plus_is_cached_deterministic_and_style_shift_only(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """S0+ (issue 23, world B): the student base fine-tuned on the terse answers, in its own cache dir
    keyed by the base build and the steps; the same bits when rebuilt elsewhere from the same seed; the
    `embedded:student_plus` role resolves to it, and refuses format_shift (no terse answers there)."""
    from safetensors.torch import load_file

    from common.tiny_world.build import build_student_plus, student_plus_key

    ecfg = _reduced(tmp_path / "a", preset="style_shift", num_pretrain=100)
    plus = build_student_plus(ecfg, steps=6, progress=False)
    base = build_embedded_models(ecfg, progress=False)["student"]
    assert plus.name == f"embedded-{build_key(ecfg)}-student_plus-{student_plus_key(ecfg, 6)}"
    assert student_plus_key(ecfg, 6) != student_plus_key(ecfg, 7)
    marker = json.loads((plus / "COMPLETE").read_text())
    assert marker["steps"] == 6 and marker["base"] == str(base)
    w_plus, w_base = load_file(str(plus / "model.safetensors")), load_file(str(base / "model.safetensors"))
    assert w_plus.keys() == w_base.keys() and any(not torch.equal(w_plus[k], w_base[k]) for k in w_plus)
    assert (plus / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()
    stamp = {p: p.stat().st_mtime_ns for p in plus.rglob("*") if p.is_file()}
    assert build_student_plus(ecfg, steps=6, progress=False) == plus
    assert stamp == {p: p.stat().st_mtime_ns for p in plus.rglob("*") if p.is_file()}  # not rebuilt
    again = build_student_plus(_reduced(tmp_path / "b", preset="style_shift", num_pretrain=100), steps=6,
                               progress=False)
    w_again = load_file(str(again / "model.safetensors"))
    assert all(torch.equal(w_plus[k], w_again[k]) for k in w_plus)

    raw = {"models": {"base_teacher": {"path": "embedded:base_teacher"}, "sft_teacher": {"path": "embedded:sft_teacher"},
                      "student": {"path": "embedded:student"}, "student_base": {"path": "embedded:student_plus"}},
           "embedded": ecfg.model_dump(mode="json")}
    import common.tiny_world.build as build_mod

    monkeypatch.setattr(build_mod, "STUDENT_PLUS_STEPS", 6)  # the role's steps; 6 keeps the test seconds long
    out = resolve_model_paths(config_from_dict(raw))
    assert out.models.student_base is not None and out.models.student_base.path == str(plus)
    assert out.models.student.path == str(base)
    raw["embedded"] = _reduced(tmp_path / "a").model_dump(mode="json")
    with pytest.raises(ConfigError, match="student_plus exists on the style_shift preset only"):
        resolve_model_paths(config_from_dict(raw))


# ----------------------------------------------------------------------------------------------------
# The SFT teacher as a LoRA adapter (embedded.sft_teacher: lora)


def test_lora_keys_enter_the_build_key_only_for_a_lora_build(tmp_path: Path) -> None:
    """embedded.sft_teacher: lora gets its own directory; a full build ignores the lora keys (its directory, and
    every existing cache, stay as they were). The LoRA build itself runs in test_deploy_configs.py
    (`test_tiny_lora_trains_with_one_pair_actor`)."""
    full = _reduced(tmp_path)
    assert build_key(full) == build_key(_reduced(tmp_path, lora_rank=4, lora_lr=1.0))
    lora = _reduced(tmp_path, sft_teacher="lora")
    assert build_key(lora) != build_key(full) and build_key(lora) != build_key(_reduced(tmp_path, sft_teacher="lora",
                                                                                         lora_rank=4))
