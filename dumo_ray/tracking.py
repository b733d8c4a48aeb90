"""MLflow helpers: one run per training run, owned by rank 0, resumed (same run id) after a restart.

Tracking never stops training. Every MLflow call is guarded: on the first failure (server down, store
locked, run gone) the run warns once and keeps training; metrics wait in a bounded queue and are sent, in
order, once the store answers again (tried at most every `RETRY_SECONDS`). A resumed run whose MLflow run
no longer exists (another `tracking.uri`, a wiped store) continues in a new run tagged with the old id.
After a restart, metrics of steps the run had already logged are not logged again.

Lineage: a run records the git commit of the code (`mlflow.source.git.commit`, when it runs from a git
checkout or $DUMO_GIT_COMMIT names it), the latent folder as an MLflow dataset input (named after its path,
with the manifest's SHA-256 as its digest: the manifest lists every shard's SHA-256), and at the end the EMA
model as an MLflow model (`ema_model`, pytorch flavor), which the Model Registry can register.
"""
from __future__ import annotations

import copy
import os
import re
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

from dumo_ray.config import Config
from dumo_ray.console import say
from dumo_ray.digests import file_sha256

RETRY_SECONDS = 30.0
MAX_QUEUED = 100_000  # metric values kept while the store is away (a few MB); the oldest go first
PREVIOUS_RUN_TAG = "dumo_ray.previous_run_id"  # on a run that continues one that could not be found
GIT_COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own tag: its UI shows and links it
GIT_COMMIT_ENV = "DUMO_GIT_COMMIT"  # the commit, where the code travels without its .git (a submitted job)
MANIFEST_SHA256_TAG = "dumo_ray.data.manifest_sha256"  # the full digest (MLflow keeps 36 characters of one)
MAX_DATASET_DIGEST = 32  # hex digits of the manifest's SHA-256 in the dataset input (MLflow's limit: 36)
MODEL_NAME = "ema_model"


def git_commit() -> str | None:
    """The commit of the running dumo_ray: $DUMO_GIT_COMMIT, else HEAD of the git checkout this package is
    tracked in; None otherwise (an installed wheel, no git, a copy without .git)."""
    given = os.environ.get(GIT_COMMIT_ENV, "").strip()
    if given:
        return given
    package = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=package, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    # This very file tracked: not a copy of the package inside some other repository (a venv in a checkout).
    if git("ls-files", "--error-unmatch", Path(__file__).name) is None:
        return None
    commit = git("rev-parse", "HEAD")
    return commit if commit and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def manifest_dataset(data_path: str):
    """(MLflow dataset, SHA-256 of manifest.json) for a latent folder: a metadata-only dataset named after the
    folder, whose digest is the manifest's (its shards' digests and counts pin the data). None without a
    manifest (no data.path, a folder this process does not see)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from dumo_ray.data.latents import MANIFEST

    manifest = Path(data_path) / MANIFEST
    if not data_path or not manifest.is_file():
        return None
    sha256 = file_sha256(manifest)
    with warnings.catch_warnings():  # a local path matches MLflow's "" and "file" sources alike, the same class
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        source = resolve_dataset_source(data_path)
    return MetaDataset(source, name=data_path, digest=sha256[:MAX_DATASET_DIGEST]), sha256


def model_requirements() -> list[str]:
    """What the logged model imports besides dumo_ray (which travels with it as code)."""
    import timm
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}"]


def redact(uri: str) -> str:
    """A URI with its password masked (postgresql://user:secret@host/db -> postgresql://user:***@host/db):
    what may be printed or stored as a param."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


SQLITE_PREFIX = "sqlite:///"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///path.db` tracking URI (relative or absolute, as written); None for
    any other store."""
    return Path(uri.removeprefix(SQLITE_PREFIX)) if uri.startswith(SQLITE_PREFIX) else None


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside the database for a SQLite store (MLflow's own
    default is ./mlruns under whatever folder the process runs in, which scatters a run's model and grids
    over the working folders of its launches); the server's choice for any other store."""
    database = sqlite_file(uri)
    return None if database is None else (database.resolve().parent / "mlruns").as_uri()


def experiment_id_for(client, cfg: Config) -> str:
    """The id of `tracking.experiment` in the client's store, creating it (artifacts as artifact_location
    says) the first time: for training runs and sweep parents alike."""
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(cfg.tracking.experiment, artifact_location=artifact_location(cfg.tracking.uri))


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
                self._record_lineage(run.data.tags)
                return
        experiment_id = experiment_id_for(self.client, self.cfg)
        tags = {}
        if (commit := git_commit()) is not None:
            tags[GIT_COMMIT_TAG] = commit
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
        self._record_lineage(tags)

    def _record_lineage(self, tags: dict[str, str]) -> None:
        """The dataset input (and, on a resumed run that has none, the commit). Once per start, best effort:
        the run exists already, so a failure here is warned about and not retried (a retried `_start`
        would open a second run)."""
        try:
            if GIT_COMMIT_TAG not in tags and (commit := git_commit()) is not None:
                self.client.set_tag(self.run_id, GIT_COMMIT_TAG, commit)
            if (found := manifest_dataset(self.cfg.data.path)) is not None:
                from mlflow.entities import DatasetInput, InputTag
                from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

                dataset, sha256 = found
                self.client.set_tag(self.run_id, MANIFEST_SHA256_TAG, sha256)
                self.client.log_inputs(self.run_id, [DatasetInput(dataset._to_mlflow_entity(),
                                                                  [InputTag(MLFLOW_DATASET_CONTEXT, "train")])])
        except Exception as error:  # lineage is worth a warning, never a stop
            say(f"warning: the run's commit and dataset could not be recorded in MLflow at {self.where} "
                f"({type(error).__name__}: {self._first_line(error)})")

    def _first_line(self, error: Exception) -> str:
        line = (str(error).splitlines() or [""])[0][:200]
        return line.replace(self.password, "***") if self.password else line  # the client's errors name the URL

    def _guard(self, call, *args) -> bool:
        """Runs an MLflow call; on failure warns (once per outage) and returns False."""
        try:
            call(*args)
        except Exception as error:  # whatever the store raises, training goes on
            if self.failing_since is None:
                self.failing_since = time.monotonic()
                say(f"warning: MLflow at {self.where} failed ({type(error).__name__}: {self._first_line(error)}); "
                    f"training goes on, metrics are kept and sent when it answers again")
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

    def log_model(self, module) -> None:
        """`module` (the EMA model) as the MLflow model `ema_model`: pytorch flavor, with dumo_ray as its code,
        so that `mlflow.pytorch.load_model` loads it and the Model Registry can register it."""
        if self._ready():
            self._guard(self._log_model, module)

    def _log_model(self, module) -> None:
        import mlflow
        import mlflow.pytorch

        mlflow.set_tracking_uri(self.cfg.tracking.uri)  # mlflow.pytorch logs through the fluent client
        # Created here, in the run's experiment: left to mlflow.pytorch, it lands in the fluent client's
        # active experiment (the default one), and `runs:/<run>/ema_model` finds nothing.
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        model = self.client.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=self.run_id)
        package = Path(__file__).resolve().parent
        mlflow.pytorch.log_model(copy.deepcopy(module).cpu().eval(), name=MODEL_NAME, run_id=self.run_id,
                                 model_id=model.model_id, code_paths=[str(package)],
                                 pip_requirements=model_requirements(), serialization_format="pickle")

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
