"""teacher_service.cache.identity: model and data fingerprints, and a run config's expectations of a cache."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from common.config import config_from_dict
from common.roles import cache_roles
from teacher_service.cache import (
    BuildHead,
    CacheError,
    CacheMismatchError,
    CacheReader,
    CacheRoleError,
    CacheWriter,
    open_for_run,
)
from teacher_service.cache.identity import (
    examples_fingerprint,
    model_identity,
    run_roles,
    run_valid_for,
    weights_fingerprint,
)
from tests.unit.test_cache_records import make_examples


def model_dir(path, scale=1.0, hidden=8):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": hidden}))
    rng = np.random.default_rng(0)
    # 3 MiB of weights: larger than the 16 sampled blocks of 64 KiB, so sampling is exercised
    save_file({"w": (rng.normal(size=(768, 1024)) * scale).astype(np.float32)}, str(path / "model.safetensors"))
    (path / "tokenizer.json").write_text("{}")
    return path


def test_weights_fingerprint_follows_weights_and_config_not_location(tmp_path):
    base = weights_fingerprint(model_dir(tmp_path / "a"))
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    assert weights_fingerprint(tmp_path / "copy") == base
    (tmp_path / "copy" / "tokenizer.json").write_text('{"x": 1}')  # tokenizer files are not weights
    assert weights_fingerprint(tmp_path / "copy") == base
    assert weights_fingerprint(model_dir(tmp_path / "tuned", scale=1.001)) != base  # every weight moved
    assert weights_fingerprint(model_dir(tmp_path / "cfg", hidden=16)) != base
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match="no weight files"):
        weights_fingerprint(tmp_path / "empty")


def test_model_identity_of_a_hub_id_without_a_local_snapshot():
    from common.config import ModelSpec

    # no such repository in any local Hugging Face cache; nothing is downloaded (local_files_only)
    ident = model_identity(ModelSpec(path="deltakd-tests/no-such-model", revision="abc"))
    assert ident == {"path": "deltakd-tests/no-such-model", "revision": "abc", "fingerprint": None}


def test_examples_fingerprint_covers_ids_lengths_and_prompt_boundary():
    a = [([1, 2, 3, 4], 2), ([5, 6], 1)]
    fp = examples_fingerprint(a)
    assert fp == examples_fingerprint([(np.array(x), p) for x, p in a])
    assert fp != examples_fingerprint(a[::-1])
    assert fp != examples_fingerprint([([1, 2, 3, 4], 3), ([5, 6], 1)])
    assert fp != examples_fingerprint([([1, 2, 3], 2), ([4, 5, 6], 1)])  # same tokens, other split


def run_cfg(tmp_path, **loss):
    paths = {r: str(model_dir(tmp_path / r, scale=1.0 + i)) for i, r in enumerate(["base", "sft", "student"])}
    return config_from_dict({"models": {"base_teacher": {"path": paths["base"]}, "sft_teacher": {"path": paths["sft"]},
                                        "student": {"path": paths["student"]}},
                             "loss": {"k": 6, **loss}})


def test_roles_a_run_reads_from_the_cache(tmp_path):
    cfg = run_cfg(tmp_path)
    assert cache_roles(cfg) == ["sft", "base"]  # delta_kd; lp_S0 from the worker's frozen copy
    assert cache_roles(cfg, student_base_from_cache=True) == ["student_base", "sft", "base"]
    kd = cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"method": "kd"})})
    assert cache_roles(kd) == ["sft"]
    sft = cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"method": "sft"})})
    assert cache_roles(sft) == []
    ids = run_roles(cfg, ["sft", "base", "student_base"])
    assert ids["student_base"]["path"] == cfg.models.student.path  # lp_S0: the student's own start
    assert len({i["fingerprint"] for i in ids.values()}) == 3


def test_a_cache_built_for_one_run_refuses_another(tmp_path):
    cfg = run_cfg(tmp_path)
    exs = make_examples(8, seed=3)
    data_fp = examples_fingerprint([(np.arange(e.length), int(e.t[0]) + 1) for e in exs])
    vf = run_valid_for(cfg, tokenizer_fingerprint="tok", vocab_size=40, examples_sha256=data_fp, num_examples=8,
                       encoding="fp32")
    roles = run_roles(cfg, ["sft", "base"])
    w = CacheWriter.open(str(tmp_path / "cache"), BuildHead(vf, roles, "fp32", 6, 40, 8, 4))
    for spec in w.pending():
        w.write(spec, exs[spec.start: spec.end])
    w.finalize()
    # the same run: accepted, whatever encoding it would take (encoding=None)
    facts = {"tokenizer_fingerprint": "tok", "vocab_size": 40, "examples_sha256": data_fp, "num_examples": 8}
    reader = open_for_run(str(tmp_path / "cache"), cfg, **facts)
    assert reader.roles == ["sft", "base"]
    with pytest.raises(CacheMismatchError, match="encoding: cache 'fp32', run 'q8d10'"):
        open_for_run(str(tmp_path / "cache"), cfg, encoding="q8d10", **facts)
    # lp_S0 from the cache: this cache has no student_base role
    with pytest.raises(CacheRoleError, match=r"lacks role\(s\) \['student_base'\].*lp_S0 from the cache"):
        open_for_run(str(tmp_path / "cache"), cfg, student_base_from_cache=True, **facts)
    # another run: tau, prompt template and the SFT teacher's weights differ
    other = cfg.model_copy(update={
        "loss": cfg.loss.model_copy(update={"tau": 2.0}),
        "data": cfg.data.model_copy(update={"prompt_template": "Q: {instruction}{context}A:"}),
        "models": cfg.models.model_copy(update={"sft_teacher": cfg.models.student}),
    })
    with pytest.raises(CacheMismatchError) as err:
        CacheReader(str(tmp_path / "cache"),
                    run_valid_for=run_valid_for(other, tokenizer_fingerprint="tok", vocab_size=40,
                                                examples_sha256=data_fp, num_examples=8),
                    run_roles=run_roles(other, ["sft", "base"]))
    keys = [d.split(":")[0] for d in err.value.differences]
    assert keys == ["prompt_template", "tau", "roles.sft.path", "roles.sft.fingerprint"], err.value.differences
    assert "tau: cache 1.0, run 2.0" in str(err.value)
