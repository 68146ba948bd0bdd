"""Best-checkpoint selection by validation ROUGE-L (`evaluation.select_best`; MiniLLM's convention).

Every `evaluation.select_every` completed steps, and after the last one, rank 0 scores greedy ROUGE-L on
the validation set (`data.validation`, never the test set: the config refuses it). When the score beats
the best so far (ties keep the earlier step), rank 0's weights are saved to `<output>/best_model/` (HF
format, written to a temp dir and renamed) with `selection.json` ({"step", "rougeL", ...}). The student's
test score in report.json is then the best model's (`final_spec`), and report.json's `selection` lists
every validation score. Selection passes only read the model (greedy decoding uses no random numbers), so
the training itself is the same with selection on or off.

Checkpoints carry the selection: each checkpoint holds a hard-linked copy of best_model/ (no extra bytes
on one file system) and its state the validation history, so a resumed run, or a worker group restored
after a crash, continues with exactly the best model of the step it restarts from.

Driver hooks (student_worker/driver.py): `BestModelSelection.from_config` when the data loads; `due` and
`update` after each step; `save_into` and `state` in a checkpoint; `restore` on resume and on a worker
restore; `final_spec` for the last test evaluation; `summary` in report.json.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from common.config import ModelSpec, RunConfig
from common.data.examples import load_examples

__all__ = ["BEST_DIR", "SELECTION_FILE", "BestModelSelection", "load_validation_examples"]

BEST_DIR = "best_model"
SELECTION_FILE = "selection.json"


def load_validation_examples(cfg: RunConfig) -> list[dict[str, str]]:
    """The validation examples (`data.validation`, split `data.validation_split`, capped by
    `data.max_validation_examples`), loaded like the eval set."""
    d = cfg.data
    as_eval = d.model_copy(update={"eval": d.validation, "eval_split": d.validation_split,
                                   "max_eval_examples": d.max_validation_examples})
    return load_examples(as_eval, "eval", cfg.embedded)


def _link_tree(src: Path, dst: Path) -> None:
    """Copy a directory of files as hard links (a plain copy across file systems)."""
    dst.mkdir(parents=True)
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(exist_ok=True)
            continue
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


class BestModelSelection:
    """The selection state of one run; a no-op when `evaluation.select_best` is off."""

    def __init__(self, cfg: RunConfig, out_dir: Path, examples: list[dict[str, str]]):
        self.cfg, self.out_dir, self.examples = cfg, Path(out_dir), examples
        self.enabled = cfg.evaluation.select_best
        self.every = cfg.evaluation.select_every
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, cfg: RunConfig, out_dir: Path) -> BestModelSelection:
        """Loads the validation set when selection is on (a DataError names a bad file or split)."""
        return cls(cfg, out_dir, load_validation_examples(cfg) if cfg.evaluation.select_best else [])

    @property
    def best_dir(self) -> Path:
        return self.out_dir / BEST_DIR

    def due(self, step: int) -> bool:
        """After `step` completed steps: every `select_every` steps and after the last one."""
        return self.enabled and step > 0 and (step % self.every == 0 or step == self.cfg.training.max_steps)

    def update(self, step: int, group: Any) -> dict[str, Any]:
        """Score the current weights (rank 0's; a WorkerGroup's `call_whole`) on the validation set; keep them
        when they are the best so far."""
        e = self.cfg.evaluation
        result = group.call_whole("evaluate", self.examples, e.max_new_tokens, e.batch_size)
        entry = {"step": step, **{k: float(result[k]) for k in ("rougeL", "rouge1", "rouge2")},
                 "num_examples": int(result["num_examples"])}
        self.history = [h for h in self.history if h["step"] != step] + [entry]
        if self.best is None or entry["rougeL"] > self.best["rougeL"]:
            tmp = self.out_dir / f".{BEST_DIR}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            group.call_whole("save_model", str(tmp))
            (tmp / SELECTION_FILE).write_text(json.dumps(entry, indent=1))
            self._replace_best(tmp)
            self.best = entry
        return entry

    def _replace_best(self, new: Path) -> None:
        old = self.out_dir / f".{BEST_DIR}.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.best_dir.exists():
            os.replace(self.best_dir, old)
        os.replace(new, self.best_dir)
        shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        return {"history": list(self.history), "best": self.best}

    def save_into(self, ckpt_tmp: Path) -> None:
        """Put a hard-linked copy of best_model/ into a checkpoint being written."""
        if self.enabled and self.best is not None:
            _link_tree(self.best_dir, Path(ckpt_tmp) / BEST_DIR)

    def restore(self, ckpt_dir: Path | None, state: dict[str, Any] | None) -> None:
        """Back to the selection of a checkpoint (None: none yet): its history, best and best_model/."""
        if not self.enabled:
            return
        saved = (state or {}).get("selection") or {}
        self.history, self.best = list(saved.get("history", [])), saved.get("best")
        if self.best is None:
            shutil.rmtree(self.best_dir, ignore_errors=True)
            return
        src = Path(ckpt_dir) / BEST_DIR if ckpt_dir is not None else None
        if src is None or not (src / SELECTION_FILE).is_file():
            raise FileNotFoundError(f"checkpoint {ckpt_dir} records a best model (step {self.best['step']}) "
                                    f"but holds no {BEST_DIR}/")
        tmp = self.out_dir / f".{BEST_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        _link_tree(src, tmp)
        self._replace_best(tmp)

    # ------------------------------------------------------------------ results
    def final_spec(self) -> ModelSpec | None:
        """The model the student's test score is for: best_model/ when selection chose one, else None
        (the run's last weights)."""
        if not self.enabled or self.best is None:
            return None
        return ModelSpec(path=str(self.best_dir), dtype="float32")

    def summary(self) -> dict[str, Any]:
        """report.json's `selection`: on/off, cadence, validation size, every score, the chosen step."""
        if not self.enabled:
            return {"enabled": False}
        return {"enabled": True, "every": self.every, "split": f"{self.cfg.data.validation}"
                f"[{self.cfg.data.validation_split}]", "examples": len(self.examples), "history": self.history,
                "best_step": None if self.best is None else self.best["step"],
                "best_validation_rougeL": None if self.best is None else self.best["rougeL"]}
