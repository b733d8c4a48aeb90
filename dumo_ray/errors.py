"""Errors that say a retry would fail the same way (bad config, corrupt data, a diverged run). The CLI
finds them inside Ray's wrappers and prints their message in one line (`deterministic_cause`); Ray Train
spends no restart on one raised in a worker (`FailFastPolicy`, set by train.launch.fit). This module
imports nothing heavy: Ray Train's controller actor loads it to run the policy."""
from __future__ import annotations


class DeterministicError(Exception):
    """Raised again by every retry: spend no restart on it."""


class DataError(DeterministicError, ValueError):
    """The latent data cannot train this run (too few rows for a batch, say)."""


def deterministic_cause(error: BaseException | None) -> DeterministicError | None:
    """The DeterministicError inside whatever Ray wrapped it in (a worker group's errors, a task error, a
    controller error, exception chains), or None."""
    seen, stack = set(), [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DeterministicError):
            return e
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None), getattr(e, "controller_failure", None),
                  *(getattr(e, "worker_failures", None) or {}).values()]
    return None


class FailFastPolicy:
    """Ray Train's own failure policy (restart the workers up to `distributed.max_failures` times), except
    that a failure caused by a DeterministicError in any worker (a data or config error, the non-finite
    stop) is raised at once: every restart would fail the same way. The run then ends as any failed run
    does: Ray Train stops all the workers (none is left waiting in a collective) and `fit` raises the
    error. Ray Train's controller calls `make_decision` on each failure."""

    def __init__(self, failure_config):
        from ray.train.v2._internal.execution.failure_handling import create_failure_policy

        self.failure_config = failure_config
        self.default = create_failure_policy(failure_config)

    def make_decision(self, training_failed_error):
        from ray.train.v2._internal.execution.failure_handling import FailureDecision

        cause = deterministic_cause(training_failed_error)
        if cause is None:
            return self.default.make_decision(training_failed_error)
        print(f"[dumo-ray] not restarting the workers: {type(cause).__name__} fails every attempt the same way",
              flush=True)
        return FailureDecision.RAISE
