"""The embedded default's tiny models: built once on the CPU, cached, and loaded like hub models.

`build_embedded_models(ecfg)` returns local paths by role (`tokenizer`, `base_teacher`, `sft_teacher`,
`student`). The build of the `format_shift` preset (the first one; unchanged, bit for bit):

1. trains a word-level tokenizer (`tokenizers`) on the corpus plus the formatted train split, so every
   word of the prompt format is in the vocabulary, and saves it as a PreTrainedTokenizerFast;
2. pretrains a Llama base teacher and a smaller Llama student base on the prose corpus only
   (causal LM on packed blocks of sentences);
3. fine-tunes the SFT teacher from the base teacher on the train split with the default prompt
   template (loss on response tokens only, batches from `common.data.batching`).

The `style_shift` preset (docs/EXPERIMENT.md) differs in what the models read: each base's pretraining
documents are its own prose draw mixed with instruction-formatted examples answered tersely (the bases'
style; `teacher_instruct_fraction` / `student_instruct_fraction` of the documents, from the suite's
pretrain split), and SFT teaches the sentence answer style. Its weights are initialised by this module
from a seeded PCG64 stream (uniform, std 0.02; norms 1), not by transformers' `_init_weights`, so the
initial weights do not depend on the transformers version or on the CPU's vector width.

Cache: `<cache_root>/embedded-<hash>`, where the hash covers every EmbeddedConfig field that affects the
build and BUILD_VERSION (format_shift's key is what it was before presets existed). A build goes into a temp dir beside it that is renamed into place only when
complete, with a `COMPLETE` JSON marker written last. A missing marker or an unreadable weights file
makes the directory invalid: it is removed and rebuilt. An fcntl lock serialises concurrent builders.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from common.config import ConfigError, DataConfig, EmbeddedConfig, ModelSpec, RunConfig
from common.lora import ADAPTER_CONFIG
from common.reproducibility import apply_compute_settings, compute_info
from common.tiny_world.format_shift import build_format_into
from common.tiny_world.style import STUDENT_PLUS_STEPS, build_style_into, train_student_plus_into
from common.tiny_world.training import EMBEDDED_ROLES, EmbeddedBuildError, role_paths

__all__ = [
    "BUILD_VERSION",
    "EMBEDDED_ROLES",
    "EMBEDDED_PREFIX",
    "EmbeddedBuildError",
    "build_key",
    "cache_root",
    "build_embedded_models",
    "resolve_model_paths",
    "EXTRA_ROLES",
    "student_plus_key",
    "build_student_plus",
]

# Bump when the build code changes what it produces: old caches are then ignored, never reused.
BUILD_VERSION = "1"  # format_shift
STYLE_BUILD_VERSION = "1"  # style_shift
# EmbeddedConfig keys that never change a build, and the keys only style_shift reads (left out of
# format_shift's key, so its cache directories keep the names they had before presets existed).
_NOT_BUILD_KEYS = {"cache_dir", "build_threads", "num_test_extra"}
_STYLE_ONLY_KEYS = {"preset", "num_pretrain", "teacher_instruct_fraction", "student_instruct_fraction"}
# The LoRA SFT teacher's keys: in the key only with sft_teacher: lora (a full build keeps its directory name).
_LORA_KEYS = {"sft_teacher", "lora_rank", "lora_alpha", "lora_lr"}
EMBEDDED_PREFIX = "embedded:"
# Roles built on demand on top of a complete build, each in its own cache directory (never by the default
# build): `student_plus` is S0+, style_shift only (issue 23's world B; style.py).
EXTRA_ROLES = ("student_plus",)
STUDENT_PLUS_VERSION = "1"
_MARKER = "COMPLETE"


def build_key(ecfg: EmbeddedConfig) -> str:
    """16 hex chars of sha256 over the build-relevant config and the preset's build version."""
    style = ecfg.preset == "style_shift"
    lora = ecfg.sft_teacher == "lora"
    fields = ecfg.model_dump(mode="json", exclude=_NOT_BUILD_KEYS | (set() if style else _STYLE_ONLY_KEYS)
                             | (set() if lora else _LORA_KEYS))
    payload = {"version": BUILD_VERSION, "embedded": fields, "prompt": DataConfig().prompt_template,
               "context": DataConfig().context_template}
    if style:
        payload["style_version"] = STYLE_BUILD_VERSION
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def cache_root(ecfg: EmbeddedConfig) -> Path:
    """ecfg.cache_dir, else $DELTAKD_CACHE, else ~/.cache/deltakd."""
    root = ecfg.cache_dir or os.environ.get("DELTAKD_CACHE") or "~/.cache/deltakd"
    return Path(root).expanduser()


def _is_complete(build_dir: Path, key: str) -> bool:
    """True when the marker names `key` and every model's safetensors and the tokenizer read back."""
    try:
        marker = json.loads((build_dir / _MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if marker.get("key") != key:
        return False
    paths = role_paths(build_dir)
    if not (paths["tokenizer"] / "tokenizer.json").is_file():
        return False
    for role in EMBEDDED_ROLES:
        adapter = (paths[role] / ADAPTER_CONFIG).is_file()  # a LoRA SFT teacher (embedded.sft_teacher: lora)
        weights = paths[role] / ("adapter_model.safetensors" if adapter else "model.safetensors")
        config = paths[role] / (ADAPTER_CONFIG if adapter else "config.json")
        if not config.is_file() or not (paths[role] / "tokenizer.json").is_file():
            return False
        try:  # reading every tensor catches truncated files too; the models are a few MB
            with safe_open(str(weights), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    f.get_tensor(name)
        except Exception:  # any failure to read the weights means the cache cannot be trusted
            return False
    return True


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run the build with n intra-op threads, restoring the caller's setting after. On a 2-core machine
    that other processes share, 2 threads on these tiny matrices spend most of their time spinning: a
    measured step took 14x longer than with 1 thread under load."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _name_adapter_base(adapter_dir: Path, base_dir: Path) -> None:
    """Write the base teacher's final path into the adapter's config (what transformers and peft load the
    base from when they are given the adapter alone, e.g. the SFT teacher's evaluation)."""
    file = adapter_dir / ADAPTER_CONFIG
    conf = json.loads(file.read_text())
    conf["base_model_name_or_path"] = str(base_dir)
    file.write_text(json.dumps(conf, indent=2, sort_keys=True))


def _build_once(root: Path, name: str, complete: Callable[[Path], bool],
                build: Callable[[Path, Path], dict[str, Any]], threads: int | None, what: str) -> Path:
    """`root/name`, built at most once across processes: `complete(dir)` says whether a finished copy reads
    back; `build(tmp, final)` writes the models into `tmp` (with `threads` torch threads) and returns the
    marker's fields (the compute settings are added), then `tmp` is renamed to `final` in one step. Under the
    lock a half-written `final` and the temp dirs of a killed builder are removed first."""
    final = root / name
    if complete(final):
        return final
    with _file_lock(root / f"{name}.lock"):
        if complete(final):  # another process finished it while we waited
            return final
        if final.exists():  # half-written or corrupted: never used, rebuilt from scratch
            shutil.rmtree(final)
        # Holding the lock, no one else builds this name: temp dirs left by a killed builder are garbage.
        for stale in root.glob(f".tmp-{name}-*"):
            shutil.rmtree(stale)
        tmp = root / f".tmp-{name}-{os.getpid()}"
        try:
            with _torch_threads(threads):
                marker = build(tmp, final)
                marker["compute"] = compute_info()
            (tmp / _MARKER).write_text(json.dumps(marker, indent=2))
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if not complete(final):
        raise EmbeddedBuildError(f"{what} in {final} finished but does not read back")
    return final


def build_embedded_models(ecfg: EmbeddedConfig, progress: bool = True) -> dict[str, Path]:
    """Paths by role (tokenizer, base_teacher, sft_teacher, student) of the cached build, building if needed."""
    root = cache_root(ecfg)
    key = build_key(ecfg)

    def build(tmp: Path, final: Path) -> dict[str, Any]:
        build_into = build_style_into if ecfg.preset == "style_shift" else build_format_into
        info = build_into(ecfg, tmp, progress)
        if ecfg.sft_teacher == "lora":  # the adapter names its base where the base will be, not in tmp
            _name_adapter_base(role_paths(tmp)["sft_teacher"], role_paths(final)["base_teacher"])
        return {"key": key, "version": BUILD_VERSION, "embedded": ecfg.model_dump(mode="json"), **info}

    final = _build_once(root, f"embedded-{key}", lambda d: _is_complete(d, key), build, ecfg.build_threads,
                        "embedded build")
    return role_paths(final)


def student_plus_key(ecfg: EmbeddedConfig, steps: int) -> str:
    """16 hex chars of sha256 over the base build's key, S0+'s steps and its build version."""
    payload = {"base": build_key(ecfg), "steps": steps, "version": STUDENT_PLUS_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _model_complete(model_dir: Path, key: str) -> bool:
    """True when the marker in model_dir names `key` and its config, tokenizer and weights read back."""
    try:
        if json.loads((model_dir / _MARKER).read_text()).get("key") != key:
            return False
        if not (model_dir / "config.json").is_file() or not (model_dir / "tokenizer.json").is_file():
            return False
        with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                f.get_tensor(name)
    except Exception:  # unreadable marker or weights: the cache cannot be trusted
        return False
    return True


def build_student_plus(ecfg: EmbeddedConfig, steps: int | None = None, progress: bool = True) -> Path:
    """S0+ of the style_shift build `ecfg` (its student base further trained on the terse answers for
    `steps` steps; common/tiny_world/style.py), built once and cached in
    `<cache_root>/embedded-<base key>-student_plus-<key>` with the base build's lock, temp-dir and marker
    discipline. Deterministic from ecfg.seed. Builds the base models first if they are not cached.
    steps: None is STUDENT_PLUS_STEPS (what `embedded:student_plus` names)."""
    steps = STUDENT_PLUS_STEPS if steps is None else steps
    if ecfg.preset != "style_shift":
        raise ConfigError(f"embedded:student_plus is built on the style_shift preset only (terse answers); "
                          f"embedded.preset is {ecfg.preset!r}")
    base = build_embedded_models(ecfg, progress)
    root = cache_root(ecfg)
    key = student_plus_key(ecfg, steps)

    def build(tmp: Path, final: Path) -> dict[str, Any]:
        info = train_student_plus_into(ecfg, base["student"], tmp, steps, progress)
        return {"key": key, "version": STUDENT_PLUS_VERSION, "base": str(base["student"]), **info}

    return _build_once(root, f"embedded-{build_key(ecfg)}-student_plus-{key}", lambda d: _model_complete(d, key),
                       build, ecfg.build_threads, "S0+ build")


def resolve_model_paths(cfg: RunConfig) -> RunConfig:
    """A copy of cfg with every `embedded:<role>` model path replaced by the built local path."""
    out = cfg.model_copy(deep=True)
    specs: list[tuple[str, ModelSpec]] = [
        ("models.base_teacher", out.models.base_teacher),
        ("models.sft_teacher", out.models.sft_teacher),
        ("models.student", out.models.student),
    ]
    if out.models.student_base is not None:
        specs.append(("models.student_base", out.models.student_base))
    for j, pair in enumerate(out.models.extra_pairs):
        specs += [(f"models.extra_pairs.{j}.base", pair.base), (f"models.extra_pairs.{j}.sft", pair.sft)]
    embedded = [(where, s) for where, s in specs if s.path.startswith(EMBEDDED_PREFIX)]
    for where, spec in embedded:
        role = spec.path[len(EMBEDDED_PREFIX):]
        if role not in EMBEDDED_ROLES + EXTRA_ROLES:
            raise ConfigError(f"{where}.path: unknown embedded role {role!r}; expected one of "
                              f"{list(EMBEDDED_ROLES + EXTRA_ROLES)}")
        if role == "student_plus" and out.embedded.preset != "style_shift":
            raise ConfigError(f"{where}.path: embedded:student_plus exists on the style_shift preset only "
                              f"(embedded.preset is {out.embedded.preset!r})")
    if embedded:
        # This process may build the models: it computes like every other process of the run.
        apply_compute_settings(out.reproducibility, where="embedded build")
        paths: dict[str, Path] = dict(build_embedded_models(out.embedded))
        if any(spec.path == EMBEDDED_PREFIX + "student_plus" for _, spec in embedded):
            paths["student_plus"] = build_student_plus(out.embedded)
        for _, spec in embedded:
            spec.path = str(paths[spec.path[len(EMBEDDED_PREFIX):]])
    return out
