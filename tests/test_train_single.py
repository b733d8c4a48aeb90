"""The single-process launcher end to end through the CLI: the one training loop on the plain-PyTorch
backend, reading a real Parquet latent folder: checkpoints, grids, MLflow, resume, export, sampling."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dumo_ray.cli import main
from dumo_ray.tracking import run_summary
from dumo_ray.train.checkpoint import checkpoint_dirs

ROOT = Path(__file__).resolve().parents[1]


def run_train(latents, out, total, extra=()):
    args = ["train", "--config", str(ROOT / "configs/digits_local.yaml"), "--set", f"data.path={latents}",
            "--set", "model.preset=DuMo-Micro/2", "--set", "optim.batch_size=32", "--set", f"train.total_images={total}",
            "--set", "train.log_every_images=64", "--set", "train.checkpoint_every_images=128",
            "--set", "train.num_sample_images=20", "--set", "eval.num_images=100", "--set", "eval.every_images=128",
            "--set", f"train.storage_path={out.parent}", "--set", f"train.name={out.name}",
            "--set", f"tracking.uri=sqlite:///{out.parent / 'mlflow.db'}", *extra]
    assert main(args) == 0


@pytest.mark.slow
def test_train_checkpoint_resume_and_sample(digits_latents, tmp_path, capsys):
    digits_latent_folder = digits_latents
    out = tmp_path / "run"
    run_train(digits_latent_folder, out, 256)
    assert [p.name for p in checkpoint_dirs(out)] == ["images_000000000128", "images_000000000256"]
    # One checkpoint layout for both launchers: EMA, state, the resolved config, the latent codec, and
    # the backend's own engine state.
    last = checkpoint_dirs(out)[-1]
    assert {p.name for p in last.iterdir()} == {"ema.safetensors", "state.json", "config.yaml", "latents.json", "engine"}
    state = json.loads((last / "state.json").read_text())
    assert state["images"] == 256 and state["step"] == 8 and state["world_size"] == 1
    assert f"data:\n  path: {digits_latent_folder}" in (last / "config.yaml").read_text()
    for steps in (1, 2):
        grid = Image.open(out / "samples" / f"final_{steps}step.png")
        assert grid.width > 8 * 10
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["accuracy_1step"] <= 1.0 and summary["fd_1step"] > 0
    # In-training evaluation every 128 images (FD-digits + accuracy at 1 and 2 steps); the last is the summary's.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "fd_2step" in r]
    assert [r["images"] for r in evals] == [128, 256]
    assert {k: evals[-1][k] for k in summary if k in evals[-1] and k != "images"} == {
        k: summary[k] for k in ("fd_1step", "accuracy_1step", "fd_2step", "accuracy_2step")}
    assert "images 256" in capsys.readouterr().out
    # The same MLflow run as the Ray launcher logs: params, losses by image count, evaluations, grids, export.
    tracked = run_summary(f"sqlite:///{tmp_path / 'mlflow.db'}", state["mlflow_run_id"])
    assert tracked["status"] == "FINISHED" and tracked["params"]["optim.batch_size"] == "32"
    assert tracked["metrics"]["fd_2step"] == summary["fd_2step"]
    assert {"samples/final_1step.png", "ema_export/model.safetensors"} <= set(tracked["artifacts"])
    # The export holds the final EMA weights.
    exported = load_file(out / "export" / "model.safetensors")
    for key, value in load_file(last / "ema.safetensors").items():
        assert torch.equal(exported[key], value)

    # Rerunning with a larger budget resumes at image 256 and continues to 384, in the same MLflow run.
    run_train(digits_latent_folder, out, 384)
    printed = capsys.readouterr().out
    assert "resuming from" in printed and "images_000000000256" in printed
    resumed = checkpoint_dirs(out)[-1]
    resumed_state = json.loads((resumed / "state.json").read_text())
    assert resumed_state["images"] == 384 and resumed_state["step"] == 12
    assert resumed_state["mlflow_run_id"] == state["mlflow_run_id"]

    # The same 12 steps in one go give the same weights: resume repeats and skips nothing.
    straight = tmp_path / "straight"
    run_train(digits_latent_folder, straight, 384)
    one_go = checkpoint_dirs(straight)[-1]
    # Bit for bit, by design: the resumed steps run the same shapes, seeds, data order and reduction
    # order as the uninterrupted ones (only a change of world size changes the arithmetic).
    for name in ("engine/model.safetensors", "ema.safetensors"):
        expected = load_file(one_go / name)
        for key, value in load_file(resumed / name).items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0)

    assert main(["sample", "--checkpoint", str(resumed), "--steps", "2", "--num", "12", "--labels", "3,7",
                 "--out", str(tmp_path / "s.npz")]) == 0
    saved = np.load(tmp_path / "s.npz")
    assert saved["arr_0"].shape == (12, 8, 8, 1) and saved["arr_0"].dtype == np.uint8
    assert saved["arr_1"].tolist() == [3, 7] * 6
    assert main(["sample", "--checkpoint", str(resumed), "--steps", "1", "--num", "10", "--out", str(tmp_path / "g.png")]) == 0
    assert Image.open(tmp_path / "g.png").width > 0


def test_sample_errors_are_clear(tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_train_config_error_exits_2(capsys):
    assert main(["train", "--config", str(ROOT / "configs/digits_local.yaml"), "--set", "optim.lr=-1"]) == 2
    assert "optim.lr must be > 0" in capsys.readouterr().err


def test_grid_folder_for_remote_storage_copies_up_and_leaves_nothing_behind(tmp_path):
    """s3:// or gs:// run dirs: grids are staged locally, copied with pyarrow.fs (file:// stands in for a
    bucket here), and the staging folder is removed."""
    from dumo_ray.train.storage import sample_grid_folder

    remote = tmp_path / "bucket" / "run"
    with sample_grid_folder(f"file://{remote}") as (folder, publish):
        staging = folder
        (folder / "final_1step.png").write_bytes(b"png bytes")
        publish(folder / "final_1step.png")
    assert (remote / "samples" / "final_1step.png").read_bytes() == b"png bytes"
    assert not staging.exists()
    with sample_grid_folder(str(tmp_path / "local")) as (folder, publish):
        assert folder == tmp_path / "local" / "samples" and folder.is_dir()


def test_export_to_remote_storage_is_copied_whole(tmp_path):
    from dumo_ray.config import load_config
    from dumo_ray.data.codec import LatentCodec
    from dumo_ray.export import load_export
    from dumo_ray.train.storage import write_export

    cfg = load_config(ROOT / "configs/digits_local.yaml")
    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    codec = LatentCodec("none", (0.5,), (2.0,), (1, 8, 8), ("zero",))
    assert write_export(f"file://{tmp_path}/bucket/run", weights, cfg, codec) == f"file://{tmp_path}/bucket/run/export"
    loaded, loaded_cfg, latents = load_export(tmp_path / "bucket" / "run" / "export")
    assert torch.equal(loaded["w"], weights["w"]) and loaded_cfg == cfg and latents == codec
