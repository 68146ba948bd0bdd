"""A run's examples from the embedded suite or a file / hub data set.

- `load_examples(data_cfg, which, embedded_cfg)` -> `[{"prompt", "response"}]` (Dolly-style columns by
  default; the prompt is `data_cfg.prompt_template` with the context block filled in).
- `format_prompt(instruction, context, data_cfg)`: the prompt template filled in.
Bad rows raise `DataError` naming the file and line/row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from common.config import DataConfig, EmbeddedConfig
from common.tiny_world.suite import embedded_suite

__all__ = ["DataError", "format_prompt", "load_examples"]

_EMBEDDED_SPLITS = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}


class DataError(ValueError):
    """A data row, file or example is unusable. The message names the file and line/row or example index."""


# ----------------------------------------------------------------------------------------------------
# Loading


def format_prompt(instruction: str, context: str, data_cfg: DataConfig) -> str:
    """`prompt_template` with `{instruction}` and `{context}` (the context block, or "" when empty)."""
    block = data_cfg.context_template.format(context=context) if context.strip() else ""
    return data_cfg.prompt_template.format(instruction=instruction, context=block)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON line ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # a .json file holding JSON lines
            return _read_jsonl(path)
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} style
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i} is a {type(row).__name__}, expected a JSON object")
    return data


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import datasets  # deferred: datasets costs ~2.3 s at import (measured); only .parquet files need it

    ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    return [dict(r) for r in ds]


def _read_source(source: str, split: str) -> tuple[list[dict[str, Any]], str]:
    """Rows of a local file or a hub data set, and a name for error messages."""
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl", ".parquet"):
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        reader = {".json": _read_json, ".jsonl": _read_jsonl, ".parquet": _read_parquet}[suffix]
        return reader(path), str(path)
    if path.exists():
        raise DataError(f"{path}: unsupported data file type {suffix!r}; use .json, .jsonl or .parquet")
    import datasets  # a hub data set name: needs network access (or the local HF cache)

    ds = datasets.load_dataset(source, split=split)
    return [dict(r) for r in ds], f"{source}[{split}]"


def _rows_to_examples(rows: list[dict[str, Any]], name: str, data_cfg: DataConfig) -> list[dict[str, str]]:
    cols = data_cfg.columns
    required = [c for c in (cols.instruction, cols.response) if c]
    examples: list[dict[str, str]] = []
    for i, row in enumerate(rows):
        for col in required:
            if col not in row:
                raise DataError(
                    f"{name}: row {i} has no column {col!r} (data.columns); columns present: {sorted(row)}"
                )
        instruction = row[cols.instruction]
        response = row[cols.response]
        context = row.get(cols.context) if cols.context else None
        for col, value in ((cols.instruction, instruction), (cols.response, response)):
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{name}: row {i} has an empty or non-text {col!r} ({value!r})")
        if context is not None and not isinstance(context, str):
            raise DataError(f"{name}: row {i} has a non-text context column {cols.context!r} ({context!r})")
        examples.append({"prompt": format_prompt(instruction, context or "", data_cfg), "response": response})
    return examples


def load_examples(
    data_cfg: DataConfig, which: Literal["train", "eval"], embedded_cfg: EmbeddedConfig
) -> list[dict[str, str]]:
    """The examples of the train or eval set as `{"prompt", "response"}` strings, capped by
    `max_train_examples` / `max_eval_examples`.

    Sources: "embedded" (the generated suite, split `data_cfg.train_split` / `eval_split`), a local
    .json / .jsonl / .parquet file, or a hub data set name (loaded with `datasets`, split as configured).
    """
    source: str | None
    if which == "train":
        source, split, cap = data_cfg.train, data_cfg.train_split, data_cfg.max_train_examples
    elif which == "eval":
        source, split, cap = data_cfg.eval, data_cfg.eval_split, data_cfg.max_eval_examples
        if source is None:
            raise DataError("data.eval is not set: there is no evaluation set to load")
    else:
        raise DataError(f"unknown data set {which!r}; expected 'train' or 'eval'")
    assert source is not None  # data.train is required by the schema; data.eval was checked above
    if source == "embedded":
        if split not in _EMBEDDED_SPLITS:
            raise DataError(f"embedded data has no split {split!r}; use one of {sorted(_EMBEDDED_SPLITS)}")
        suite = embedded_suite(embedded_cfg)  # the splits of embedded_cfg.preset
        rows: list[dict[str, Any]] = suite[_EMBEDDED_SPLITS[split]]
        name = f"embedded[{split}]"
        # The generator's columns are fixed (Dolly-style), whatever data.columns says for files.
        data_cfg = data_cfg.model_copy(update={"columns": type(data_cfg.columns)()})
    else:
        rows, name = _read_source(source, split)
    examples = _rows_to_examples(rows, name, data_cfg)
    if not examples:
        raise DataError(f"{name}: no examples")
    return examples[:cap] if cap is not None else examples
