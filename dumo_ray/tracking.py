"""MLflow helpers: one run per training run, owned by rank 0, resumed (same run id) after a restart.

Tracking never stops training. Every MLflow call is guarded: on the first failure (server down, store
locked, run gone) the run warns once and keeps training; metrics wait in a bounded queue and are sent, in
order, once the store answers again (tried at most every `RETRY_SECONDS`). A resumed run whose MLflow run
no longer exists (another `tracking.uri`, a wiped store) continues in a new run tagged with the old id.
After a restart, metrics of steps the run had already logged are not logged again.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from dumo_ray.config import Config
from dumo_ray.console import say

RETRY_SECONDS = 30.0
MAX_QUEUED = 100_000  # metric values kept while the store is away (a few MB); the oldest go first
PREVIOUS_RUN_TAG = "dumo_ray.previous_run_id"  # on a run that continues one that could not be found


def redact(uri: str) -> str:
    """A URI with its password masked (postgresql://user:secret@host/db -> postgresql://user:***@host/db):
    what may be printed or stored as a param."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _is_missing_run(error: Exception) -> bool:
    return getattr(error, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


class MlflowRun:
    """Starts or resumes an MLflow run; logs params once, metrics by image count, images and artifacts.
    Failures are warned about, never raised (see the module doc)."""

    def __init__(self, cfg: Config, run_id: str | None = None):
        # MLflow's HTTP client retries a dead server for minutes per call by default: a step must not wait
        # that long. Few retries and a short timeout here; the queue does the waiting.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        self.cfg, self.Metric = cfg, Metric
        self.client = MlflowClient(cfg.tracking.uri)
        self.where = redact(cfg.tracking.uri)  # for messages
        from urllib.parse import urlsplit

        self.password = urlsplit(cfg.tracking.uri).password
        self.run_id: str | None = None
        self.resume_id = run_id
        self.logged_until = -1  # the largest step the run already has (a resumed run)
        self.queue: list[Any] = []
        self.failing_since: float | None = None
        self.next_try = 0.0
        self._guard(self._start)

    def _start(self) -> None:
        if self.resume_id is not None:
            try:
                run = self.client.get_run(self.resume_id)
            except Exception as error:
                if not _is_missing_run(error):
                    raise
                say(f"warning: MLflow run {self.resume_id} is not in {self.where}; continuing in a new "
                    f"run tagged {PREVIOUS_RUN_TAG}={self.resume_id}")
            else:
                self.client.update_run(run.info.run_id, status="RUNNING")
                self.logged_until = max((m.step for key in run.data.metrics
                                         for m in self.client.get_metric_history(run.info.run_id, key)), default=-1)
                self.run_id = run.info.run_id
                return
        experiment = self.client.get_experiment_by_name(self.cfg.tracking.experiment)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(self.cfg.tracking.experiment))
        tags = {}
        if self.cfg.tracking.parent_run_id:
            tags["mlflow.parentRunId"] = self.cfg.tracking.parent_run_id
        if self.resume_id is not None:
            tags[PREVIOUS_RUN_TAG] = self.resume_id
        run = self.client.create_run(experiment_id, run_name=self.cfg.train.name, tags=tags)
        from mlflow.entities import Param

        params = {k: (v if v is not None else "null") for k, v in self.cfg.flat().items()}
        params["tracking.uri"] = redact(self.cfg.tracking.uri)  # never a password in the params
        items = [Param(k, str(v)[:500]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(run.info.run_id, params=items[i:i + 100])
        self.run_id = run.info.run_id

    def _guard(self, call, *args) -> bool:
        """Runs an MLflow call; on failure warns (once per outage) and returns False."""
        try:
            call(*args)
        except Exception as error:  # whatever the store raises, training goes on
            if self.failing_since is None:
                self.failing_since = time.monotonic()
                first_line = (str(error).splitlines() or [""])[0][:200]
                if self.password:  # the client's own error names the URL it tried
                    first_line = first_line.replace(self.password, "***")
                say(f"warning: MLflow at {self.where} failed ({type(error).__name__}: {first_line}); training goes "
                    f"on, metrics are kept and sent when it answers again")
            self.next_try = time.monotonic() + RETRY_SECONDS
            return False
        if self.failing_since is not None:
            say(f"MLflow at {self.where} answers again after {time.monotonic() - self.failing_since:.0f} s")
            self.failing_since = None
        return True

    def _ready(self) -> bool:
        """Started (now, if the store was away at the start), and not waiting out a failure."""
        if self.failing_since is not None and time.monotonic() < self.next_try:
            return False
        return self.run_id is not None or self._guard(self._start)

    def _send(self) -> None:
        while self.queue:
            chunk = self.queue[:1000]  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=chunk)
            del self.queue[:len(chunk)]

    def log_metrics(self, metrics: dict[str, float], images: int) -> None:
        if images <= self.logged_until:
            return  # logged before the restart: a metric is logged once per step
        now = int(time.time() * 1000)
        self.queue += [self.Metric(k, float(v), now, int(images)) for k, v in metrics.items()]
        if len(self.queue) > MAX_QUEUED:
            del self.queue[:len(self.queue) - MAX_QUEUED]
        if self._ready():
            self._guard(self._send)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        # Artifacts are files of the run folder too: one missed here is not lost.
        if self._ready():
            self._guard(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        if self._ready():
            self._guard(self.client.log_artifacts, self.run_id, str(directory), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self.next_try = 0.0  # a last try, whatever the backoff says
        if self._ready():
            self._guard(self._send)
            if self.queue:
                say(f"warning: {len(self.queue):,} metric values could not be sent to MLflow")
            self._guard(self.client.set_terminated, self.run_id, status)


def run_summary(tracking_uri: str, run_id: str) -> dict[str, Any]:
    """Params, latest metrics and artifact paths of a run (for tests and reports)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    artifacts = []
    stack = [None]
    while stack:
        for item in client.list_artifacts(run_id, stack.pop()):
            (stack.append(item.path) if item.is_dir else artifacts.append(item.path))
    return {"params": run.data.params, "metrics": run.data.metrics, "status": run.info.status, "artifacts": sorted(artifacts)}
