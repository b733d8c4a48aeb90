"""A run's lineage in a real MLflow store (sqlite): the git commit of the code, the latent folder as a
dataset input whose digest is its manifest's, and the EMA model as an MLflow model that loads back and
that the Model Registry registers."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from dumo_ray import tracking
from dumo_ray.config import load_config
from dumo_ray.digests import file_sha256
from dumo_ray.tracking import GIT_COMMIT_TAG, MANIFEST_SHA256_TAG, MODEL_NAME, MlflowRun

ROOT = Path(__file__).resolve().parents[1]


def latent_folder(root: Path) -> Path:
    """A folder with a manifest (all the lineage reads of it)."""
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps({"schema_version": 2, "rows": 3, "shards": [
        {"file": "shard-00000-of-00001.parquet", "rows": 3, "sha256": "ab" * 32}]}))
    return root


def config(uri: str, data: Path):
    return load_config(ROOT / "configs/digits_local.yaml",
                       [f"tracking.uri={uri}", "train.name=lineage", f"data.path={data}"])


def head_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.mark.slow
def test_a_run_records_commit_dataset_and_a_registrable_model(tmp_path, micro_model, monkeypatch):
    import mlflow
    import mlflow.pytorch

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # MLflow's own default would put the artifacts in ./mlruns here
    # MlflowRun.log_model sets the fluent client's tracking URI (mlflow.pytorch logs through it): restored after.
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = latent_folder(tmp_path / "latents")
    run = MlflowRun(config(uri, data))
    run.log_model(micro_model)
    run.end()

    client = MlflowClient(uri)
    logged = client.get_run(run.run_id)
    # The artifacts sit beside the database, whatever folder the run was started from.
    assert logged.info.artifact_uri.startswith((tmp_path / "mlruns").as_uri() + "/")
    assert (tmp_path / "mlruns").is_dir() and not any(elsewhere.iterdir())
    assert logged.data.tags[GIT_COMMIT_TAG] == head_commit()
    manifest_sha256 = file_sha256(data / "manifest.json")
    assert logged.data.tags[MANIFEST_SHA256_TAG] == manifest_sha256
    [dataset_input] = logged.inputs.dataset_inputs
    assert (dataset_input.dataset.name, dataset_input.dataset.digest) == (str(data), manifest_sha256[:32])
    assert [(t.key, t.value) for t in dataset_input.tags] == [("mlflow.data.context", "train")]

    # The logged model loads back (its code travels with it) and computes what the module does.
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pytorch.load_model(f"runs:/{run.run_id}/{MODEL_NAME}")
    x, t, r, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.rand(2), torch.tensor([1, 2])
    with torch.no_grad():
        expected, got = micro_model.eval()(x, t, r, y), loaded(x, t, r, y)
    assert len(got) == 2 and all(torch.equal(a, b) for a, b in zip(expected, got))  # both heads
    version = mlflow.register_model(f"runs:/{run.run_id}/{MODEL_NAME}", "dumo-lineage")
    assert int(version.version) == 1 and version.run_id == run.run_id


def test_commit_from_the_environment_or_none_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.setenv("DUMO_GIT_COMMIT", "0123abcd" * 5)
    assert tracking.git_commit() == "0123abcd" * 5
    monkeypatch.delenv("DUMO_GIT_COMMIT")
    assert tracking.git_commit() == head_commit()  # these tests run from the checkout
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all: skipped quietly
    assert tracking.git_commit() is None
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = MlflowRun(config(uri, tmp_path / "no-such-folder"))
    run.end()
    logged = MlflowClient(uri).get_run(run.run_id)
    assert GIT_COMMIT_TAG not in logged.data.tags and logged.inputs.dataset_inputs == []


def test_a_resumed_run_adds_a_changed_dataset_and_keeps_its_commit(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = latent_folder(tmp_path / "latents")
    first = MlflowRun(config(uri, data))
    first.end()
    MlflowRun(config(uri, data), run_id=first.run_id).end()  # same data: nothing new
    (data / "manifest.json").write_text("{}")  # the folder was rewritten between the attempts
    MlflowRun(config(uri, data), run_id=first.run_id).end()
    logged = MlflowClient(uri).get_run(first.run_id)
    digests = sorted(d.dataset.digest for d in logged.inputs.dataset_inputs)
    assert len(digests) == 2 and file_sha256(data / "manifest.json")[:32] in digests
    assert logged.data.tags[MANIFEST_SHA256_TAG] == file_sha256(data / "manifest.json")
    assert logged.data.tags[GIT_COMMIT_TAG] == head_commit()
