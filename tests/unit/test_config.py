"""RunConfig: unknown keys with the nearest valid key, wrong types, bad overrides, YAML errors, round trip."""

from __future__ import annotations

import pytest
import yaml

from common.config import (
    ConfigError,
    RunConfig,
    config_diff,
    config_from_dict,
    config_hash,
    dump_config,
    load_config,
    parse_override,
)

MINIMAL = {
    "models": {
        "base_teacher": {"path": "embedded:base_teacher"},
        "sft_teacher": {"path": "embedded:sft_teacher"},
        "student": {"path": "embedded:student"},
    }
}


def write(tmp_path, data, name="run.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def test_minimal_config_and_defaults():
    cfg = config_from_dict(MINIMAL)
    assert isinstance(cfg, RunConfig)
    assert cfg.loss.method == "delta_kd" and cfg.loss.tail == "bucket"


def test_unknown_key_names_nearest_valid_key(tmp_path):
    data = {**MINIMAL, "loss": {"methd": "kd"}}
    with pytest.raises(ConfigError, match=r"unknown key 'loss\.methd' \(did you mean 'method'\?\)") as info:
        load_config(write(tmp_path, data))
    assert "run.yaml" in str(info.value)
    with pytest.raises(ConfigError, match=r"unknown key 'trainig' \(did you mean 'training'\?\)"):
        config_from_dict({**MINIMAL, "trainig": {}})
    with pytest.raises(ConfigError, match="unknown parallelogram component 'delta_k'.*did you mean"):
        config_from_dict({**MINIMAL, "loss": {"weights": {"delta_k": 1.0}}})


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"loss\.tau.*'warm'"):
        config_from_dict({**MINIMAL, "loss": {"tau": "warm"}})
    with pytest.raises(ConfigError, match=r"loss\.lam"):
        config_from_dict({**MINIMAL, "loss": {"lam": 1.5}})
    with pytest.raises(ConfigError, match=r"loss\.method"):
        config_from_dict({**MINIMAL, "loss": {"method": "kdd"}})
    with pytest.raises(ConfigError, match="batch_size=6 must be a multiple of training.num_workers=4"):
        config_from_dict({**MINIMAL, "training": {"batch_size": 6, "num_workers": 4}})


def test_overrides_are_typed_by_the_schema():
    cfg = config_from_dict(MINIMAL, ["loss.alpha=0.5", "loss.method=kd", "training.max_steps=3",
                                     "loss.weights={kd: 1.0}"])
    assert cfg.loss.alpha == 0.5 and cfg.loss.method == "kd" and cfg.training.max_steps == 3
    assert cfg.loss.weights == {"kd": 1.0}
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])


@pytest.mark.parametrize("text, match", [
    ("loss.alpha", "malformed override 'loss.alpha': expected KEY=VALUE"),
    ("=3", "malformed override '=3': bad key"),
    ("loss..alpha=3", "bad key 'loss..alpha'"),
    ("loss.alpha=[1,", "malformed override 'loss.alpha=\\[1,': value is not valid YAML"),
])
def test_bad_override_is_quoted(text, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(MINIMAL, [text])


def test_override_into_scalar_and_bad_value():
    with pytest.raises(ConfigError, match="'run_name' is not a section"):
        config_from_dict({**MINIMAL, "run_name": "a"}, ["run_name.x=1"])
    with pytest.raises(ConfigError, match=r"loss\.k.*'many'"):
        config_from_dict(MINIMAL, ["loss.k=many"])


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = write(tmp_path, "models:\n  student: {path: x}\nloss:\n  alpha: [1, 2\n  tau: 1\n")
    with pytest.raises(ConfigError, match=rf"{p}:\d+: not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n", "list.yaml"))


def test_dump_and_reload_round_trip(tmp_path):
    cfg = config_from_dict(MINIMAL, ["loss.method=parallelogram", "loss.tau=2.0", "run_name=x"])
    path = tmp_path / "resolved.yaml"
    text = dump_config(cfg, path)
    again = load_config(path)
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert yaml.safe_load(text) == cfg.model_dump(mode="json")
    other = config_from_dict(MINIMAL, ["loss.tau=3.0"])
    assert config_hash(other) != config_hash(cfg)
    assert "loss.tau: 2.0 != 3.0" in config_diff(cfg.model_dump(), other.model_dump())


def test_renamed_keys_name_their_new_keys_and_saved_configs_read_back() -> None:
    """Renamed keys (the two chunk sizes; the teachers' cache and vLLM keys, now the sections teachers.cache and
    teachers.vllm) fail with a hint naming the new key, from --set or a YAML file; a config this program saved
    under the old names reads back under the new ones."""
    from common.config import RENAMED_KEYS, without_retired_keys

    assert RENAMED_KEYS == {
        "loss.chunk_tokens": "loss.loss_chunk_rows", "teachers.chunk_tokens": "teachers.score_chunk_rows",
        "teachers.cache": "teachers.cache.uri", "teachers.cache_encoding": "teachers.cache.encoding",
        "teachers.cache_shard_size": "teachers.cache.shard_size", "teachers.cache_on_error": "teachers.cache.on_error",
        "teachers.cache_memory_mb": "teachers.cache.memory_mb",
        "teachers.vllm_gpu_memory_utilization": "teachers.vllm.gpu_memory_utilization",
        "teachers.vllm_max_num_batched_tokens": "teachers.vllm.max_num_batched_tokens",
        "teachers.vllm_max_model_len": "teachers.vllm.max_model_len",
        "teachers.vllm_max_logprobs": "teachers.vllm.max_logprobs"}
    base = {"models": {r: {"path": "x"} for r in ("base_teacher", "sft_teacher", "student")}}
    for old, new in RENAMED_KEYS.items():
        if new.startswith(old + "."):  # the old scalar key is now the section that holds the new key
            match = rf"{old}: is a section now \(renamed: did you mean '{new}'\?\)"
        else:
            match = rf"unknown key '{old}' \(renamed: did you mean '{new}'\?\)"
        with pytest.raises(ConfigError, match=match):
            config_from_dict(base, [f"{old}=64"])
    saved = {**base, "loss": {"chunk_tokens": 64}, "teachers": {"chunk_tokens": 32}, "testing": {}}
    cfg = config_from_dict(without_retired_keys(saved))
    assert (cfg.loss.loss_chunk_rows, cfg.teachers.score_chunk_rows) == (64, 32)
    assert saved["loss"] == {"chunk_tokens": 64}  # the input is not changed


OLD_TEACHERS = {"source": "auto", "cache": "/runs/c", "cache_encoding": "fp32", "cache_shard_size": 8,
                "cache_on_error": "live", "cache_memory_mb": 64, "vllm_gpu_memory_utilization": 0.5,
                "vllm_max_num_batched_tokens": 512, "vllm_max_model_len": 256, "vllm_max_logprobs": 65}
NEW_TEACHERS = {"source": "auto", "cache": {"uri": "/runs/c", "encoding": "fp32", "shard_size": 8, "on_error": "live",
                                            "memory_mb": 64},
                "vllm": {"gpu_memory_utilization": 0.5, "max_num_batched_tokens": 512, "max_model_len": 256,
                         "max_logprobs": 65}}


def test_old_teachers_keys_in_a_user_config_are_refused_naming_each_new_key(tmp_path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, {**MINIMAL, "teachers": OLD_TEACHERS}))
    msg = str(info.value)
    assert "run.yaml" in msg and "teachers.cache: is a section now (renamed: did you mean 'teachers.cache.uri'?)" in msg
    for old in ("cache_encoding", "cache_shard_size", "cache_on_error", "cache_memory_mb", "vllm_max_logprobs",
                "vllm_gpu_memory_utilization", "vllm_max_num_batched_tokens", "vllm_max_model_len"):
        section, key = old.split("_", 1)
        assert f"unknown key 'teachers.{old}' (renamed: did you mean 'teachers.{section}.{key}'?)" in msg
    cfg = config_from_dict({**MINIMAL, "teachers": NEW_TEACHERS})
    assert cfg.teachers.cache.uri == "/runs/c" and cfg.teachers.vllm.max_logprobs == 65


@pytest.mark.parametrize("override, match", [
    ("teachers.cache.encoding=q8d11", r"teachers\.cache\.encoding: .*unknown cache encoding 'q8d11' "
                                      r"\(did you mean 'q8d10'\?\)"),
    ("teachers.cache.shard_size=0", r"teachers\.cache\.shard_size: .*greater than 0"),
    ("teachers.cache.on_error=retry", r"teachers\.cache\.on_error: .*'stop' or 'live'"),
    ("teachers.cache.encodng=fp32", r"unknown key 'teachers\.cache\.encodng' \(did you mean 'encoding'\?\)"),
    ("teachers.vllm.gpu_memory_utilization=1.5", r"teachers\.vllm\.gpu_memory_utilization: .*less than or equal to 1"),
    ("teachers.vllm.max_logprob=8", r"unknown key 'teachers\.vllm\.max_logprob' \(did you mean 'max_logprobs'\?\)"),
])
def test_teachers_cache_and_vllm_sections_validate_by_name(override, match) -> None:
    with pytest.raises(ConfigError, match=match):
        config_from_dict(MINIMAL, [override])


def test_a_saved_old_format_config_resumes_and_is_the_same_experiment_run(tmp_path) -> None:
    """A checkpoint's (or a finished run's) config saved with the flat teachers keys reads back as the nested
    sections: the resume check finds no difference, and the experiment's run key is the one a config written
    now gets; a key that changes the computation still differs."""
    import json

    from common.config import without_retired_keys
    from student_worker import checkpoint as ckpt
    from student_worker.research.experiment import run_key, saved_run_config

    now = config_from_dict({**MINIMAL, "teachers": NEW_TEACHERS})
    old = now.model_dump(mode="json")
    teachers = {k: v for k, v in old["teachers"].items() if k not in ("cache", "vllm")}
    old["teachers"] = {**teachers, **OLD_TEACHERS}
    assert config_from_dict(without_retired_keys(old)) == now
    assert run_key(saved_run_config(without_retired_keys(old), "config.yaml")) == run_key(now)
    (tmp_path / ckpt.STATE_FILE).write_text(json.dumps({"step": 3, "config": old}))
    ckpt.check_resume_config(tmp_path, now.model_dump(mode="json"))
    # the cache section may change on resume (the cache is checked against the run when it is opened) ...
    moved = config_from_dict({**MINIMAL, "teachers": {**NEW_TEACHERS, "cache": {"uri": "/elsewhere"}}})
    ckpt.check_resume_config(tmp_path, moved.model_dump(mode="json"))
    # ... the vLLM options may not
    other = config_from_dict({**MINIMAL, "teachers": NEW_TEACHERS}, ["teachers.vllm.max_logprobs=80"])
    with pytest.raises(ckpt.CheckpointError, match=r"teachers\.vllm\.max_logprobs: 65 != 80"):
        ckpt.check_resume_config(tmp_path, other.model_dump(mode="json"))
    # a saved config already in the new form is left as it is
    assert without_retired_keys(now.model_dump(mode="json")) == now.model_dump(mode="json")


def test_resume_and_run_identity_policy_comes_from_the_schema() -> None:
    """Which keys may differ on --resume and which are not part of an experiment run's identity is declared on
    the fields (common/config/base.py policy tags), not kept as string lists elsewhere; the sets are pinned."""
    from common.config import RESUME_FREE, RUNTIME, RunConfig, keys_with_policy

    assert set(keys_with_policy(RunConfig, RESUME_FREE)) == {
        "training.max_steps", "output.dir", "output.require_shared_dir", "evaluation.", "teachers.namespace",
        "teachers.name_prefix", "teachers.attach", "teachers.placement_wait_s", "teachers.source", "teachers.cache.",
        "training.log_every",
        "training.collective_timeout_s", "training.gradient_checkpointing", "logging."}
    assert set(keys_with_policy(RunConfig, RUNTIME)) == {
        "teachers.namespace", "teachers.name_prefix", "teachers.attach", "teachers.placement_wait_s", "output.dir",
        "run_name", "logging."}


def test_training_strategy_ddp_by_default_fsdp2_on_request_and_its_refusals():
    assert config_from_dict(MINIMAL).training.strategy == "ddp"
    assert config_from_dict(MINIMAL, ["training.strategy=fsdp2"]).training.strategy == "fsdp2"
    with pytest.raises(ConfigError, match=r"training\.strategy"):
        config_from_dict(MINIMAL, ["training.strategy=fsdp"])
    with pytest.raises(ConfigError, match=r"grad_compression='bf16' is a DDP communication hook.*fsdp2"):
        config_from_dict(MINIMAL, ["training.strategy=fsdp2", "training.grad_compression=bf16"])
    with pytest.raises(ConfigError, match=r"fsdp2 makes the student ranks' group torch's default process group"):
        config_from_dict(MINIMAL, ["training.strategy=fsdp2", "transport.kind=rdt", "transport.rdt_backend=gloo"])
    config_from_dict(MINIMAL, ["training.strategy=fsdp2", "transport.kind=rdt", "transport.rdt_backend=nccl"])
