"""Errors of the teacher cache. Each names the cache location and what is wrong with it."""

from __future__ import annotations

__all__ = ["CacheError", "CacheIncompleteError", "CacheMismatchError", "CacheRoleError", "ShardError"]


class CacheError(ValueError):
    """Something about a teacher cache is unusable. The message names the cache and the culprit."""


class CacheIncompleteError(CacheError):
    """The location holds no manifest: no cache, or a build that has not finished."""


class CacheMismatchError(CacheError):
    """The cache was built for other settings than the run's. `differences` lists 'key: cache X, run Y'."""

    def __init__(self, where: str, differences: list[str]):
        self.where = where
        self.differences = list(differences)
        lines = "\n".join(f"  {d}" for d in self.differences)
        super().__init__(f"teacher cache {where} does not match this run ({len(self.differences)} "
                         f"difference(s)):\n{lines}")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.where, self.differences))


class CacheRoleError(CacheError):
    """The cache lacks a role the run's loss needs."""


class ShardError(CacheError):
    """A shard is missing, truncated, corrupted or inconsistent. The message names its path and examples."""
