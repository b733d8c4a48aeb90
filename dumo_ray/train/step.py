"""The guard against non-finite losses or gradients (the backends skip such a step; this stops a diverged run)."""
from __future__ import annotations

from dumo_ray.console import say
from dumo_ray.errors import DeterministicError


class NonFiniteError(DeterministicError, RuntimeError):
    """Too many consecutive steps had a NaN/Inf loss or gradient."""


class NonFiniteGuard:
    """Counts skipped steps; raises after `limit` in a row so a diverged run stops with a clear error
    (its last good checkpoint stays on disk)."""

    def __init__(self, limit: int = 20):
        self.limit = limit
        self.in_a_row = 0
        self.total = 0

    def record(self, applied: bool, images: int) -> None:
        if applied:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        say(f"non-finite loss or gradient at image {images}: step skipped "
            f"({self.in_a_row} in a row, {self.total} in all)")
        if self.in_a_row >= self.limit:
            raise NonFiniteError(f"{self.in_a_row} consecutive steps had a NaN/Inf loss or gradient "
                                 f"(last at image {images}); stopping. The last good checkpoint is kept.")
