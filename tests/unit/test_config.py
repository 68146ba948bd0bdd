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


def test_renamed_chunk_keys_name_their_new_keys_and_saved_configs_read_back() -> None:
    """The two chunk sizes have distinct names; the old shared name fails with a hint naming the new key, and a
    config this program saved under the old names reads back under the new ones."""
    from common.config import RENAMED_KEYS, without_retired_keys

    assert RENAMED_KEYS == {"loss.chunk_tokens": "loss.loss_chunk_rows",
                            "teachers.chunk_tokens": "teachers.score_chunk_rows"}
    base = {"models": {r: {"path": "x"} for r in ("base_teacher", "sft_teacher", "student")}}
    for old, new in RENAMED_KEYS.items():
        with pytest.raises(ConfigError, match=rf"unknown key '{old}' \(renamed: did you mean '{new}'\?\)"):
            config_from_dict(base, [f"{old}=64"])
    saved = {**base, "loss": {"chunk_tokens": 64}, "teachers": {"chunk_tokens": 32}, "testing": {}}
    cfg = config_from_dict(without_retired_keys(saved))
    assert (cfg.loss.loss_chunk_rows, cfg.teachers.score_chunk_rows) == (64, 32)
    assert saved["loss"] == {"chunk_tokens": 64}  # the input is not changed


def test_resume_and_run_identity_policy_comes_from_the_schema() -> None:
    """Which keys may differ on --resume and which are not part of an experiment run's identity is declared on
    the fields (common/config/base.py policy tags), not kept as string lists elsewhere; the sets are pinned."""
    from common.config import RESUME_FREE, RUNTIME, RunConfig, keys_with_policy

    assert set(keys_with_policy(RunConfig, RESUME_FREE)) == {
        "training.max_steps", "output.dir", "output.require_shared_dir", "evaluation.", "teachers.namespace",
        "teachers.name_prefix", "teachers.attach", "teachers.source", "teachers.cache", "teachers.cache_encoding",
        "teachers.cache_shard_size", "teachers.cache_on_error", "teachers.cache_memory_mb", "training.log_every",
        "training.collective_timeout_s", "training.gradient_checkpointing", "logging."}
    assert set(keys_with_policy(RunConfig, RUNTIME)) == {
        "teachers.namespace", "teachers.name_prefix", "teachers.attach", "output.dir", "run_name", "logging."}


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
