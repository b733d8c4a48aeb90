"""Ray Train (V2) + DeepSpeed on CPU with gloo: 2 workers on a real local Ray, real Parquet latents (the
digits, precomputed in pixel space), real MLflow (sqlite). These tests take a few minutes."""
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dumo_ray.cli import main
from dumo_ray.config import load_config
from dumo_ray.tracking import run_summary
from dumo_ray.train.launch import fit

ROOT = Path(__file__).resolve().parents[1]
# Every test fits a TorchTrainer on the module's one local Ray (tests/conftest.py).
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("local_ray")]


def tiny_config(latents, tmp_path, name, *extra):
    return load_config(ROOT / "configs/quickstart.yaml", [
        f"data.path={latents}", "model.preset=DuMo-Micro/2", "optim.batch_size=32", "optim.lr=3e-3",
        "train.total_images=640", "train.log_every_images=128", "train.checkpoint_every_images=320",
        "train.num_sample_images=20", f"train.storage_path={tmp_path / 'runs'}", f"train.name={name}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "eval.features=none", *extra])


def history(tracking_uri, run_id, key):
    from mlflow.tracking import MlflowClient

    return [m.value for m in sorted(MlflowClient(tracking_uri).get_metric_history(run_id, key), key=lambda m: m.step)]


# The settings of the uninterrupted ZeRO-2 run below, which the restart test also reads as its reference. The
# eager JVP (the CPU's default): the compiled pass equals it (tests/test_jvp.py), and compiling it in both
# workers here cost a minute or more of the suite's time on 2 cores.
ZERO2 = ("jvp.estimator=jvp",)


@pytest.fixture(scope="module")
def zero2_run(digits_latents, tmp_path_factory):
    """One 2-worker ZeRO-2 run to image 640 with in-training evaluation and MLflow, shared by two tests (each
    Ray Train start costs ~45 s on 2 cores)."""
    tmp_path = tmp_path_factory.mktemp("zero2")
    cfg = tiny_config(digits_latents, tmp_path, "zero2", *ZERO2, "eval.features=digits", "eval.every_images=256",
                      "eval.num_images=100", "eval.chunk=16")
    return cfg, fit(cfg)


def test_zero2_two_workers_trains_checkpoints_and_logs(zero2_run, tmp_path):
    cfg, result = zero2_run
    assert result.error is None
    assert result.metrics["images"] == 640 and result.metrics["rank_param_max_diff"] == 0.0  # ranks identical
    # In-training evaluation reaches Ray Train's results (what a Tune scheduler reads).
    assert result.metrics["fd_1step"] > 0 and 0 <= result.metrics["accuracy_2step"] <= 1

    with result.checkpoint.as_directory() as d:
        files = {p.name for p in Path(d).rglob("*") if p.is_file()}
    assert {"ema.safetensors", "state.json", "config.yaml", "latents.json"} <= files  # the one checkpoint layout
    assert any("optim_states" in f for f in files) and any("model_states" in f for f in files)

    import json
    with result.checkpoint.as_directory() as d:
        run_id = json.loads((Path(d) / "state.json").read_text())["mlflow_run_id"]
    summary = run_summary(cfg.tracking.uri, run_id)
    assert summary["status"] == "FINISHED"
    assert summary["params"]["optim.lr"] == "0.003" and summary["params"]["distributed.zero_stage"] == "2"
    mse = history(cfg.tracking.uri, run_id, "mse_v")
    assert len(mse) == 5 and mse[-1] < 0.85 * mse[0]  # the loss falls
    assert "samples/final_1step.png" in summary["artifacts"] and "ema_export/model.safetensors" in summary["artifacts"]
    # The grids also stay with the run (rank 0 only writes them; nothing is left in the temp folder).
    assert {p.name for p in (Path(cfg.run_dir) / "samples").iterdir()} == {"final_1step.png", "final_2step.png"}
    # FD-digits and class accuracy at 1 and 2 steps over training: at images 256, 512 and the end (640).
    for key in ("fd_1step", "fd_2step", "accuracy_1step", "accuracy_2step"):
        assert len(history(cfg.tracking.uri, run_id, key)) == 3
    assert history(cfg.tracking.uri, run_id, "fd_2step")[-1] == result.metrics["fd_2step"]

    # The consolidated EMA export loads without DeepSpeed and samples through the CLI.
    export = Path(cfg.run_dir) / "export"
    weights = load_file(export / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert main(["sample", "--checkpoint", str(export), "--steps", "2", "--num", "8", "--out", str(tmp_path / "s.npz")]) == 0
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (8, 8, 8, 1)

    # The two workers' shared-out evaluation equals one process evaluating the same EMA weights.
    from dumo_ray.eval.in_training import TrainingEvaluator
    from dumo_ray.sampling import load_ema_model, make_decoder

    model, exported_cfg, info = load_ema_model(export)
    alone = TrainingEvaluator(exported_cfg, decode=make_decoder(info, None, "cpu"))(model)
    # Equal up to float32 summation order (the workers and this process may use other thread counts):
    # FD ~450 here, so 1e-6 relative is far below any real difference, and accuracies are counts.
    assert alone == pytest.approx({k: result.metrics[k] for k in alone}, rel=1e-6)


def test_zero3_trains_the_dumo_objective_and_checkpoints(digits_latents, tmp_path, capfd):
    cfg = tiny_config(digits_latents, tmp_path, "zero3", "distributed.zero_stage=3", "train.total_images=320",
                      "tracking.enabled=false", "jvp.estimator=auto")
    result = fit(cfg)
    assert result.error is None and result.checkpoint is not None
    assert result.metrics["images"] == 320 and result.metrics["rank_param_max_diff"] == 0.0
    # The estimator was settled when the config loaded (jvp.estimator auto), and the run says which it used.
    assert cfg.jvp.estimator == "finite_difference"
    assert "objective dumo (finite_difference)" in capfd.readouterr().out
    assert "estimator: finite_difference" in (Path(cfg.run_dir) / "config.yaml").read_text()


def test_a_rerun_and_a_worker_failure_both_resume_exactly(zero2_run, digits_latents, tmp_path, monkeypatch, capfd):
    """A run stopped at image 320 is run again with a budget of 640: it resumes from its checkpoint; a worker
    then dies at image 416, and Ray Train restarts the workers from the checkpoint at 320. The weights at 640
    equal those of the uninterrupted run (zero2_run: the same settings plus evaluation and MLflow, which draw
    no training randomness). The fault drill is a test hook (an environment variable the launcher forwards
    to the workers), not a config field."""
    from dumo_ray.train.loop import FAIL_ONCE_ENV

    reference, _ = zero2_run
    first = tiny_config(digits_latents, tmp_path, "resumed", *ZERO2, "tracking.enabled=false", "train.total_images=320")
    assert fit(first).metrics["images"] == 320
    capfd.readouterr()

    more = tiny_config(digits_latents, tmp_path, "resumed", *ZERO2, "tracking.enabled=false", "distributed.max_failures=1")
    monkeypatch.setenv(FAIL_ONCE_ENV, "416")
    result = fit(more)
    monkeypatch.delenv(FAIL_ONCE_ENV)
    assert result.error is None and result.metrics["images"] == 640
    assert (Path(more.run_dir) / ".injected-failure-done").read_text() == "416"
    # Resumed twice from the checkpoint at 320: by the rerun, then by Ray Train's restart after the failure.
    resumes = [line for line in capfd.readouterr().out.splitlines() if "resuming from" in line]
    assert len(resumes) == 2 and all("(image 320, step 10)" in line for line in resumes), resumes

    a = load_file(Path(more.run_dir) / "export" / "model.safetensors")
    b = load_file(Path(reference.run_dir) / "export" / "model.safetensors")
    # Bit for bit, by design: the resumed steps run the same shapes, seeds, data order and reduction
    # order as the uninterrupted ones (only a change of world size changes the arithmetic).
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_three_workers_uneven_shares_and_gradient_accumulation(digits_latents, tmp_path, capfd):
    """Global batch 32 over 3 workers (11/11/10), each share in 2 accumulated micro-batches of <= 6."""
    cfg = tiny_config(digits_latents, tmp_path, "uneven", "distributed.num_workers=3", "optim.micro_batch_size=6",
                      "train.total_images=320", "tracking.enabled=false")
    result = fit(cfg)
    assert result.error is None
    assert result.metrics["images"] == 320 and result.metrics["step"] == 10
    assert result.metrics["rank_param_max_diff"] == 0.0  # DeepSpeed kept the three replicas identical
    assert "global batch 32 = 3 workers x 11/10 (2 accumulated micro-batches of <= 6)" in capfd.readouterr().out

    # The same run continued by 2 workers on the node: the ZeRO state saved by 3 is converted to the
    # universal format once for the node (local rank 0), the other worker waits for it and loads it too.
    more = tiny_config(digits_latents, tmp_path, "uneven", "optim.micro_batch_size=6", "train.total_images=480",
                       "tracking.enabled=false")
    result = fit(more)
    assert result.error is None and result.metrics["images"] == 480 and result.metrics["step"] == 15
    assert result.metrics["rank_param_max_diff"] == 0.0
    captured = capfd.readouterr()
    out, lines = captured.out, (captured.out + captured.err).splitlines()
    # Each line reaches the driver once (Ray Train's patched print sent it to stdout and, through its
    # logger, to stderr).
    assert sum("worker count changed 3 -> 2: global batch 32 = 3 workers x 11/10" in line for line in lines) == 1
    assert sum("[dumo-ray] images 480 |" in line for line in lines) == 1
    conversions = [line for line in out.splitlines() if "converted to DeepSpeed's universal format" in line]
    assert len(conversions) == 1 and "for the node's 2 workers" in conversions[0] and "repeated" not in conversions[0]
    assert not list(Path(tempfile.gettempdir()).glob("dumo-universal-*"))  # the converter cleaned up


def test_model_must_match_the_latents(digits_latents, tmp_path):
    from dumo_ray.config import ConfigError

    cfg = tiny_config(digits_latents, tmp_path, "mismatch", "model.in_channels=4")
    with pytest.raises(ConfigError, match="does not match the latents"):
        fit(cfg)
