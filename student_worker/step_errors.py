"""The errors a student worker's step call raises on purpose (student_worker/worker.py explains the protocol;
the driver's recovery, student_worker/recovery.py, decides what each means for the run)."""

from __future__ import annotations

__all__ = ["StepRejected", "PeerInputError", "StepOrderError"]


class StepRejected(RuntimeError):
    """Raised by EVERY rank at a step's input agreement when some rank had no valid teacher record: no rank
    touched the model, and none is left in a collective. `cause`: this rank's own error (None on a rank
    whose input was fine; see PeerInputError)."""

    def __init__(self, message: str, cause: BaseException | None = None):
        super().__init__(message)
        self.cause = cause


class PeerInputError(StepRejected):
    """Another rank failed to receive or validate its teacher record for this step; nobody stepped."""


class StepOrderError(RuntimeError):
    """A queued call for a step (or a checkpoint) that is not this worker's next one: an earlier step
    failed. Raised before any collective, on every rank alike; nothing was touched."""
