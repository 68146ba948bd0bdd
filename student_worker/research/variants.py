"""Method variants of a comparison: `method@key=value[,key=value...]` (student_worker.research.experiment --methods).

A variant is a loss method plus config overrides that only its runs get, e.g. `delta_kd@alpha=0.5`,
`kd@lam=0.5`, `delta_kd@delta_form=student_shift`, `kd@tau=2`, `delta_kd@tail=student_base`, `parallelogram@weights.kd=0.3,weights.delta_kd=0.7`, on-policy
`delta_kd@on_policy=0.5`, `kd@on_policy=1,lag=1,objective=sampled_token`. A plain name
(`kd`) is the method with the experiment's shared config. In a `--methods` list the commas separate both
the entries and one variant's keys: a piece with `=` and no `@` continues the variant before it, so
`kd,delta_kd@alpha=0.5,tau=2,sft` is three entries: kd, delta_kd@alpha=0.5,tau=2 and sft (values cannot
hold commas).

Keys: a short alias from KEY_ALIASES (`alpha` is loss.alpha), `weights.<name>` (loss.weights.<name>), or a
full dotted config key. A variant may change `loss.*` and `training.*` only: the teacher pool, the models,
the data and the evaluation are shared by every run of an experiment (one pool, paired examples), and
`loss.method` / `seed` are set by the experiment itself. Values are read as YAML scalars, as with `--set`;
the config itself validates them when the experiment builds each run's config.

Pure Python (no Ray, torch or transformers). Other branches add aliases to KEY_ALIASES."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["KEY_ALIASES", "PREFIX_ALIASES", "VARIANT_SECTIONS", "Variant", "VariantError", "split_entries",
           "parse_variant", "parse_methods", "resolve_key"]

# Short names for the keys users sweep; the value is the dotted config key.
KEY_ALIASES: dict[str, str] = {
    "alpha": "loss.alpha",
    "delta_form": "loss.delta_form",  # paper | student_shift: `delta_kd@alpha=0.5,delta_form=student_shift`
    "tau": "loss.tau",
    "lam": "loss.lam",
    "k": "loss.k",
    "tail": "loss.tail",
    "objective": "loss.objective",
    "jsd_beta": "loss.jsd_beta",
    "lr": "training.lr",
    "steps": "training.max_steps",
    # on-policy batches (common/config/training.py OnPolicyConfig): `delta_kd@on_policy=0.5,lag=1`
    "on_policy": "training.on_policy.fraction",
    "lag": "training.on_policy.lag",
    "temperature": "training.on_policy.temperature",
    "top_p": "training.on_policy.top_p",
    "max_new_tokens": "training.on_policy.max_new_tokens",
}
# `<prefix>.<rest>` stands for `<target>.<rest>`.
PREFIX_ALIASES: dict[str, str] = {"weights": "loss.weights"}
# The config sections a variant may change.
VARIANT_SECTIONS = ("loss", "training")
_SET_BY_EXPERIMENT = ("loss.method", "seed")
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$")
_METHOD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class VariantError(ValueError):
    """A --methods entry is malformed; the message names the entry and the culprit."""


@dataclass(frozen=True)
class Variant:
    """One entry of a comparison. `label` names it everywhere (tables, experiment.json); `overrides` are the
    dotted `key=value` strings its runs get on top of the shared config, `loss.method=<method>` first."""

    label: str
    method: str
    overrides: tuple[str, ...]

    @property
    def settings(self) -> tuple[str, ...]:
        """The variant's own overrides (without loss.method)."""
        return self.overrides[1:]

    @property
    def slug(self) -> str:
        """A file-name-safe form of the label (run directories): `delta_kd@alpha=0.5,tau=2` ->
        `delta_kd+alpha=0.5+tau=2`; a plain method is its own name."""
        return re.sub(r"[^A-Za-z0-9._=+-]", "_", self.label.replace("@", "+").replace(",", "+"))


def resolve_key(key: str) -> str:
    """The dotted config key an alias, a prefix alias or a full key stands for. Raises VariantError for an
    unknown bare key (with the nearest alias), a malformed key or a key outside VARIANT_SECTIONS."""
    if not _KEY_RE.match(key):
        raise VariantError(f"malformed key {key!r}")
    if key in ("seed", "method"):
        raise VariantError(f"key {key!r} is set by the experiment (the method before '@', --seeds)")
    head, _, rest = key.partition(".")
    if not rest:
        if key not in KEY_ALIASES:
            close = difflib.get_close_matches(key, list(KEY_ALIASES), n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise VariantError(f"unknown key {key!r}{hint}: use an alias ({', '.join(KEY_ALIASES)}), "
                               f"weights.<name>, or a dotted config key such as loss.alpha")
        dotted = KEY_ALIASES[key]
    elif head in PREFIX_ALIASES:
        dotted = f"{PREFIX_ALIASES[head]}.{rest}"
    else:
        dotted = key
    if dotted in _SET_BY_EXPERIMENT:
        raise VariantError(f"key {key!r}: {dotted} is set by the experiment (the method before '@', --seeds)")
    if dotted.partition(".")[0] not in VARIANT_SECTIONS:
        raise VariantError(f"key {key!r} ({dotted}): a variant may change {', '.join(s + '.*' for s in VARIANT_SECTIONS)}"
                           " only (teachers, models, data and evaluation are shared by every run)")
    return dotted


def parse_variant(text: str, methods: Iterable[str] | None = None) -> Variant:
    """`method` or `method@key=value[,key=value...]` -> Variant. `methods`: the valid method names (None: any
    identifier). The label is the entry with spaces removed around names, `=`, `@` and commas."""
    entry = text.strip()
    method, at, spec = (part.strip() for part in entry.partition("@"))
    if not _METHOD_RE.match(method):
        raise VariantError(f"--methods entry {entry!r}: bad method name {method!r}")
    known = list(methods) if methods is not None else None
    if known is not None and method not in known:
        close = difflib.get_close_matches(method, known, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise VariantError(f"--methods entry {entry!r}: unknown method {method!r}{hint}; known: {', '.join(known)}")
    if not at:
        return Variant(label=method, method=method, overrides=(f"loss.method={method}",))
    if not spec:
        raise VariantError(f"--methods entry {entry!r}: nothing after '@' (expected key=value[,key=value])")
    parts: list[str] = []
    overrides = [f"loss.method={method}"]
    seen: dict[str, str] = {}
    for item in spec.split(","):
        key, eq, value = (p.strip() for p in item.partition("="))
        if not eq or not key or not value:
            raise VariantError(f"--methods entry {entry!r}: {item.strip()!r} is not key=value")
        try:
            dotted = resolve_key(key)
        except VariantError as exc:
            raise VariantError(f"--methods entry {entry!r}: {exc}") from None
        if dotted in seen:
            raise VariantError(f"--methods entry {entry!r}: {dotted} is set twice ({seen[dotted]!r} and {key!r})")
        seen[dotted] = key
        parts.append(f"{key}={value}")
        overrides.append(f"{dotted}={value}")
    return Variant(label=f"{method}@{','.join(parts)}", method=method, overrides=tuple(overrides))


def split_entries(text: str) -> list[str]:
    """Split a --methods list on commas; a piece with '=' and no '@' belongs to the variant before it."""
    entries: list[str] = []
    for piece in text.split(","):
        if "=" in piece and "@" not in piece:
            if not entries or "@" not in entries[-1]:
                raise VariantError(f"--methods {text!r}: {piece.strip()!r} follows no method@ entry "
                                   "(a variant is method@key=value[,key=value])")
            entries[-1] += "," + piece
        elif piece.strip():
            entries.append(piece)
        else:
            raise VariantError(f"--methods {text!r}: an empty entry")
    return entries


def parse_methods(text: str, methods: Iterable[str] | None = None) -> list[Variant]:
    """Every entry of a --methods list, in order. Raises VariantError on an empty list, a bad entry, or two
    entries with the same label or run-directory name."""
    if not text.strip():
        raise VariantError("--methods is empty")
    known = list(methods) if methods is not None else None
    out = [parse_variant(e, known) for e in split_entries(text)]
    for attr in ("label", "slug"):
        names = [getattr(v, attr) for v in out]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise VariantError(f"--methods lists {', '.join(repr(n) for n in twice)} more than once")
    return out
