"""Reading, overriding, validating, writing and comparing run configs; the keys the schema retired."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .base import ConfigError, did_you_mean
from .run import RunConfig

__all__ = ["RETIRED_KEYS", "RENAMED_KEYS", "without_retired_keys", "parse_override", "apply_overrides", "config_from_dict",
           "with_legacy_delta_form", "load_config", "dump_config", "config_hash", "config_diff"]


# Top-level keys the schema had and no longer has, with what took their place: a config that sets one is refused
# with this hint; a config this program saved itself (a run's config.yaml, a checkpoint's state.json) drops it
# when read back (`without_retired_keys`), since every dump of the old schema carried it.
RETIRED_KEYS = {
    "testing": "fault injection is no longer configured: a test or benchmark builds a common.faults.FaultPlan "
               "and hands it to the driver (run_training(cfg, faults=...)), the teacher pool or the cache build",
}


# Keys the schema renamed (old dotted key -> new one, any depth): a config that sets an old key is refused with
# a hint naming the new key; a config this program saved itself is read back under the new names. An old key
# whose new key lies inside it (`teachers.cache`, a string, is now the section holding `teachers.cache.uri`)
# is moved only when it holds a value rather than a section.
RENAMED_KEYS = {
    "loss.chunk_tokens": "loss.loss_chunk_rows",
    "teachers.chunk_tokens": "teachers.score_chunk_rows",
    "teachers.cache": "teachers.cache.uri",
    "teachers.cache_encoding": "teachers.cache.encoding",
    "teachers.cache_shard_size": "teachers.cache.shard_size",
    "teachers.cache_on_error": "teachers.cache.on_error",
    "teachers.cache_memory_mb": "teachers.cache.memory_mb",
    "teachers.vllm_gpu_memory_utilization": "teachers.vllm.gpu_memory_utilization",
    "teachers.vllm_max_num_batched_tokens": "teachers.vllm.max_num_batched_tokens",
    "teachers.vllm_max_model_len": "teachers.vllm.max_model_len",
    "teachers.vllm_max_logprobs": "teachers.vllm.max_logprobs",
}


def without_retired_keys(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config dict in the current schema's names: the RETIRED_KEYS sections dropped and the
    RENAMED_KEYS moved to their new names, in the table's order (a copy; the input is not changed)."""
    out = copy.deepcopy({k: v for k, v in saved.items() if k not in RETIRED_KEYS})
    for old, new in RENAMED_KEYS.items():
        *parents, leaf = old.split(".")
        section: Any = out
        for p in parents:
            section = section.get(p) if isinstance(section, dict) else None
        if not isinstance(section, dict) or leaf not in section:
            continue
        if new.startswith(old + ".") and isinstance(section[leaf], dict):
            continue  # already the section the old value moved into
        value = section.pop(leaf)
        *new_parents, new_leaf = new.split(".")
        node = out
        for p in new_parents:
            node = node.setdefault(p, {})
        node[new_leaf] = value
    return out


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at `loc` (for the nearest-valid-key hint)."""
    model: Any = RunConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        for c in list(candidates):
            candidates.extend(getattr(c, "__args__", ()))
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden" and len(loc) == 1 and loc[0] in RETIRED_KEYS:
            lines.append(f"  unknown key {key!r} (removed: {RETIRED_KEYS[str(loc[0])]})")
        elif e["type"] == "extra_forbidden" and key in RENAMED_KEYS:
            lines.append(f"  unknown key {key!r} (renamed: did you mean {RENAMED_KEYS[key]!r}?)")
        elif key in RENAMED_KEYS and RENAMED_KEYS[key].startswith(key + ".") and not isinstance(e.get("input"), dict):
            lines.append(f"  {key}: is a section now (renamed: did you mean {RENAMED_KEYS[key]!r}?)")
        elif e["type"] == "extra_forbidden":
            owner = _model_at(loc)
            hint = did_you_mean(str(loc[-1]), list(owner.model_fields)) if owner else ""
            lines.append(f"  unknown key {key!r}{hint}")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {key}: {e['msg']}{got_s}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `a.b.c=value`; the value is read as a YAML scalar/flow value (so 3, 0.5, true, [1,2] work)."""
    if "=" not in text:
        raise ConfigError(f"malformed override {text!r}: expected KEY=VALUE, e.g. loss.alpha=0.5")
    key, _, raw = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p or not p.replace("_", "").replace("-", "").isalnum() for p in parts):
        raise ConfigError(f"malformed override {text!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"malformed override {text!r}: value is not valid YAML ({exc})") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--set` overrides to a raw config dict (before validation). Returns a new dict."""
    out = json.loads(json.dumps(data))
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = {}
                node[p] = child
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {p!r} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None, source: str = "<dict>") -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    raw = apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def with_legacy_delta_form(data: dict[str, Any], source: str = "<dict>") -> dict[str, Any]:
    """A saved config (a run's config.yaml, a checkpoint's state) read as the loss it ran. One saved before
    loss.delta_form existed ran the student_shift form: the key is set to student_shift where the form
    changes that loss (alpha != 1, or extra pairs read by the method), else to the default (the same
    computation). A config that has the key is returned as it is. Raises ConfigError if it does not
    validate either way."""
    loss = data.get("loss") or {}
    if "delta_form" in loss:
        return data
    old = {**data, "loss": {**loss, "delta_form": "student_shift"}}
    cfg = config_from_dict(old, source=source)
    if cfg.loss.delta_form_matters or (cfg.models.extra_pairs and cfg.loss.reads_pair_shift):
        return old
    return {**data, "loss": {**loss, "delta_form": "paper"}}


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read and validate a YAML run config. Errors name the file, the key and the nearest valid key."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    return config_from_dict(data, overrides, source=str(p))


def dump_config(cfg: RunConfig, path: str | Path | None = None) -> str:
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text


def config_hash(cfg: RunConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (for `--resume` from another config)."""
    keys = sorted(set(a) | set(b))
    out: list[str] = []
    for k in keys:
        name = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(config_diff(va, vb, name + "."))
        elif va != vb:
            out.append(f"{name}: {va!r} != {vb!r}")
    return out
