"""`dumo-ray submit` / `dumo-ray jobs` against a real Ray head with its job server, started by this module
on its own ports and temp dir (and shut down by it; never `ray stop`). The cluster has token
authentication on (Ray's default), so the submission authenticates for real."""
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest
import ray

from dumo_ray.cli import main
from dumo_ray.jobs import ALWAYS_EXCLUDED, runtime_env

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def local_ray():
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="dumo-head-", dir="/tmp")  # short: Ray's socket paths live under it
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, _temp_dir=temp_dir)
    yield f"http://127.0.0.1:{port}"
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_runtime_env_uploads_the_code_not_the_data():
    env = runtime_env(ROOT)
    assert env["working_dir"] == str(ROOT)
    assert {"/data/", "/runs/", "*.db", "*.safetensors"} <= set(env["excludes"])
    assert "data" not in env["excludes"] and "data/" not in env["excludes"]  # would drop the dumo_ray/data package
    assert all(not p.startswith("!") for p in env["excludes"]) and "*.pt" in ALWAYS_EXCLUDED


@pytest.mark.ray
@pytest.mark.slow
def test_submit_a_training_run_and_read_its_logs(local_ray, digits_latents, tmp_path, capsys):
    address = local_ray
    train = ["train", "--config", "configs/quickstart.yaml", "--set", f"data.path={digits_latents}",
             "--set", "model.preset=DuMo-Micro/2", "--set", "optim.batch_size=32", "--set", "train.total_images=320",
             "--set", "train.log_every_images=160", "--set", "train.checkpoint_every_images=320",
             "--set", "train.num_sample_images=10", "--set", "eval.features=none",
             "--set", f"train.storage_path={tmp_path / 'runs'}", "--set", "train.name=submitted",
             "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    # This local cluster runs the interpreter of this test (a venv that is not on PATH).
    submit = ["submit", "--address", address, "--python", sys.executable]
    assert main([*submit, "--submission-id", "dumo-test-train", "--", *train]) == 0
    printed = capsys.readouterr().out
    assert "job dumo-test-train: SUCCEEDED" in printed and "[dumo-ray] done at image 320" in printed
    assert (tmp_path / "runs" / "submitted" / "export" / "model.safetensors").is_file()

    assert main(["jobs", "logs", "dumo-test-train", "--address", address]) == 0
    assert "[dumo-ray] done at image 320" in capsys.readouterr().out
    assert main(["jobs", "list", "--address", address]) == 0
    listed = capsys.readouterr().out
    assert "dumo-test-train" in listed and "SUCCEEDED" in listed

    # A job that fails (bad config) makes `submit` exit non-zero with the job's own error in the logs.
    assert main([*submit, "--", "train", "--config", "configs/missing.yaml"]) == 1
    printed = capsys.readouterr().out
    assert "config file configs/missing.yaml does not exist" in printed and ": FAILED" in printed


def test_submit_errors_are_clear(capsys):
    assert main(["submit", "--address", "http://127.0.0.1:9", "--", "train", "--config", "x.yaml"]) == 2
    assert "cannot reach the Ray job server at http://127.0.0.1:9" in capsys.readouterr().err
    assert main(["submit", "--address", "http://127.0.0.1:9"]) == 2
    assert "nothing to submit" in capsys.readouterr().err
