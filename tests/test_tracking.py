"""Tracking never stops training: a real MLflow server going away and coming back, a resumed run whose
MLflow run is gone, a store that is never there."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dumo_ray import tracking
from dumo_ray.config import load_config
from dumo_ray.tracking import PREVIOUS_RUN_TAG, MlflowRun

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on a sqlite store, answering when this returns."""
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store}",
                               "--default-artifact-root", str(store.parent / "artifacts"), "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            MlflowClient(f"http://127.0.0.1:{port}").search_experiments()
            return server
        except Exception:
            time.sleep(0.5)
    stop(server)
    raise RuntimeError("mlflow server did not start")


def stop(server: subprocess.Popen) -> None:
    """The server dies at once, the way a crashed or preempted one goes: SIGKILL to its whole process group
    (`mlflow server` runs uvicorn in a child process; a graceful stop took ~5 s on 2 cores)."""
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # already gone
    server.wait(30)


def config(uri: str, *extra: str):
    return load_config(ROOT / "configs/digits_local.yaml", [f"tracking.uri={uri}", "train.name=tracked", *extra])


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


@pytest.mark.slow
def test_server_going_away_mid_run_loses_no_metric(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tracking, "RETRY_SECONDS", 0.0)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path / "mlflow.db", port)
    try:
        run = MlflowRun(config(uri))
        run.log_metrics({"loss": 1.0}, 128)
        stop(server)
        started = time.monotonic()
        run.log_metrics({"loss": 0.9}, 256)  # the server is gone: no exception, the value waits
        run.log_metrics({"loss": 0.8}, 384)
        assert time.monotonic() - started < 60  # no minutes of HTTP retries per call
        assert len(run.queue) == 2
        out = capsys.readouterr().out
        assert out.count("warning: MLflow at") == 1 and "training goes on" in out  # warned once
        server = start_server(tmp_path / "mlflow.db", port)
        run.log_metrics({"loss": 0.7}, 512)  # back: everything queued goes first, in order
        run.end()
        assert history(uri, run.run_id, "loss") == [(128, 1.0), (256, 0.9), (384, 0.8), (512, 0.7)]
        assert MlflowClient(uri).get_run(run.run_id).info.status == "FINISHED"
        assert "answers again" in capsys.readouterr().out
    finally:
        stop(server)


def test_resume_in_another_store_starts_a_new_run_pointing_at_the_old_one(tmp_path):
    first = f"sqlite:///{tmp_path / 'a.db'}"
    old = MlflowRun(config(first))
    old.log_metrics({"loss": 1.0}, 128)
    old.end()
    # The checkpoint names a run the new store does not have (another tracking.uri on resume).
    other = f"sqlite:///{tmp_path / 'b.db'}"
    run = MlflowRun(config(other), run_id=old.run_id)
    run.log_metrics({"loss": 0.5}, 256)
    run.end()
    assert run.run_id != old.run_id
    assert MlflowClient(other).get_run(run.run_id).data.tags[PREVIOUS_RUN_TAG] == old.run_id
    assert history(other, run.run_id, "loss") == [(256, 0.5)]


def test_a_restarted_run_logs_no_step_twice(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = MlflowRun(config(uri))
    for images in (128, 256, 384):  # the last checkpoint was at 256; 384 was logged before the crash
        run.log_metrics({"loss": images / 1000}, images)
    resumed = MlflowRun(config(uri), run_id=run.run_id)  # the restart replays 384 from the checkpoint at 256
    for images in (384, 512):
        resumed.log_metrics({"loss": images / 1000 + 1}, images)
    resumed.end()
    assert history(uri, run.run_id, "loss") == [(128, 0.128), (256, 0.256), (384, 0.384), (512, 1.512)]


@pytest.mark.slow
def test_training_finishes_when_the_store_is_never_there(digits_latents, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    from dumo_ray.train.launch import train_local

    cfg = config(dead, f"data.path={digits_latents}", "model.preset=DuMo-Micro/2", "optim.batch_size=32",
                 "train.total_images=256", "train.log_every_images=64", "train.checkpoint_every_images=256",
                 "train.num_sample_images=4", f"train.storage_path={tmp_path / 'runs'}", "eval.features=none",
                 "train.device=cpu")
    summary = train_local(cfg)
    assert summary["images"] == 256 and Path(summary["export"], "model.safetensors").is_file()
    out = capsys.readouterr().out
    assert out.count("warning: MLflow at") == 1


def test_a_password_in_the_tracking_uri_is_never_stored_or_printed(tmp_path, capsys):
    from dumo_ray.tracking import redact

    assert redact("postgresql://dumo:s3cret@db:5432/mlflow") == "postgresql://dumo:***@db:5432/mlflow"
    assert redact("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    run = MlflowRun(config(f"http://dumo:s3cret@127.0.0.1:{free_port()}"))  # nothing listens: it warns
    assert run.run_id is None and "s3cret" not in capsys.readouterr().out
