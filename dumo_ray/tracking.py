"""MLflow helpers: one run per training run, owned by rank 0, resumed (same run id) after a restart."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from dumo_ray.config import Config


class MlflowRun:
    """Starts or resumes an MLflow run; logs params once, metrics by image count, images and artifacts."""

    def __init__(self, cfg: Config, run_id: str | None = None):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(cfg.tracking.uri)
        experiment = mlflow.set_experiment(cfg.tracking.experiment)
        if run_id is not None:
            self.run = mlflow.start_run(run_id=run_id)
        else:
            tags = {"mlflow.parentRunId": cfg.tracking.parent_run_id} if cfg.tracking.parent_run_id else None
            self.run = mlflow.start_run(run_name=cfg.train.name, experiment_id=experiment.experiment_id, tags=tags)
            params = {k: (v if v is not None else "null") for k, v in cfg.flat().items()}
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        self.run_id = self.run.info.run_id

    def log_metrics(self, metrics: dict[str, float], images: int) -> None:
        self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=int(images))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self.mlflow.log_artifacts(str(directory), artifact_path=artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


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
