"""Names of the teacher service's named Ray actors."""

from __future__ import annotations

__all__ = ["replica_name"]


def replica_name(prefix: str, role: str, i: int) -> str:
    """Name of replica i of a role's named actor: `{prefix}-{role}-{i}`."""
    return f"{prefix}-{role}-{i}"
