"""Errors that say a retry would fail the same way (bad config, corrupt data, a diverged run). The CLI
finds them inside Ray's wrappers and prints their message in one line (train.launch.deterministic_cause).
Ray Train still restarts a run after one of them (up to `distributed.max_failures`): stopping at the first
is open work (issue 18, item 3)."""
from __future__ import annotations


class DeterministicError(Exception):
    """Raised again by every retry: spend no restart on it."""


class DataError(DeterministicError, ValueError):
    """The latent data cannot train this run (too few rows for a batch, say)."""
