"""Experiment tracking besides metrics.jsonl: TensorBoard and Weights & Biases (`logging.report_to`).

- "tensorboard": event files under `<output dir>/tensorboard/` through `torch.utils.tensorboard` (needs the
  `tensorboard` package, the `tracking` extra: `pip install -e .[tracking]`; the test command installs it
  with the `dev` extra). Open with `tensorboard --logdir runs/<run_name>/tensorboard`.
- "wandb": `wandb.init(project=logging.wandb_project, mode=logging.wandb_mode, dir=<output dir>)`, only when
  the `wandb` package is installed (not a dependency); the run id is kept in `<output dir>/wandb_run_id`
  so a resumed run continues the same W&B run. Tests use mode "offline".

Every metrics.jsonl row is logged at its step as `train/<key>` (numbers only); validation scores of
best-checkpoint selection as `validation/<key>`, the final ROUGE as `eval/<model>/<key>`. When steps are
replayed (a resumed run, or a worker group restored from a checkpoint) TensorBoard drops the events at and
after the replayed step (`purge_step`); W&B, whose steps only go forward, gets each step once.

Driver hooks (student_worker/driver.py): `check_trackers(cfg)` in preflight, `MetricsTracker(cfg, out,
start_step)` once the run starts, `log_row` for each metrics row, `rewind` on a worker restore,
`log_scalars` for validation and final scores, `close` at the end.
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any

from common.config import RunConfig, config_hash

__all__ = ["TrackingError", "check_trackers", "MetricsTracker", "TB_DIR"]

TB_DIR = "tensorboard"
_INSTALL = {"tensorboard": "pip install -e .[tracking]   (or: pip install tensorboard)",
            "wandb": "pip install wandb"}


class TrackingError(ValueError):
    """A tracker named in logging.report_to cannot run (its package is missing); the message says how to fix it."""


def check_trackers(cfg: RunConfig) -> None:
    """Raise TrackingError naming `logging.report_to` and the install command for a missing package."""
    for name in cfg.logging.report_to:
        module = "torch.utils.tensorboard" if name == "tensorboard" else "wandb"
        try:
            __import__(module)
        except ImportError as exc:
            raise TrackingError(f"logging.report_to includes {name!r} but {module} cannot be imported ({exc}); "
                                f"install it: {_INSTALL[name]}") from None


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class MetricsTracker:
    """The run's trackers; every method is a no-op for trackers not in `logging.report_to`."""

    def __init__(self, cfg: RunConfig, out_dir: Path, start_step: int = 0):
        check_trackers(cfg)
        self.cfg, self.out_dir = cfg, Path(out_dir)
        self.tb: Any = None
        self.wandb: Any = None
        self._wandb_last = start_step - 1
        if "tensorboard" in cfg.logging.report_to:
            self._open_tensorboard(start_step)
        if "wandb" in cfg.logging.report_to:
            self._open_wandb()

    def _open_tensorboard(self, purge_step: int) -> None:
        # deferred: optional dependency (logging.report_to: tensorboard), ~0.4 s at import (measured)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events at or after it that a previous (interrupted) pass wrote.
        self.tb = SummaryWriter(log_dir=str(self.out_dir / TB_DIR), purge_step=purge_step or None)

    def _open_wandb(self) -> None:
        import wandb  # deferred: optional dependency (logging.report_to: wandb)

        id_file = self.out_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        lg = self.cfg.logging
        self.wandb = wandb.init(project=lg.wandb_project, name=self.cfg.run_name, id=run_id, resume="allow",
                                mode=lg.wandb_mode, dir=str(self.out_dir),
                                config={**self.cfg.model_dump(mode="json"), "config_hash": config_hash(self.cfg)})

    def log_row(self, row: dict[str, Any]) -> None:
        """One metrics.jsonl row at its step, as train/<key>."""
        self.log_scalars("train", row, int(row["step"]))

    def log_scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        numbers = _numbers(values)
        if self.tb is not None:
            for key, value in numbers.items():
                self.tb.add_scalar(f"{prefix}/{key}", value, global_step=step)
        if self.wandb is not None and step >= self._wandb_last:
            self.wandb.log({f"{prefix}/{k}": v for k, v in numbers.items()}, step=step)
            self._wandb_last = step

    def rewind(self, step: int) -> None:
        """Steps from `step` on will be logged again (a worker restore): TensorBoard forgets them."""
        if self.tb is not None:
            self.tb.close()
            self._open_tensorboard(step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
