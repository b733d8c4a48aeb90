"""Mass sampling on Ray Data (real local Ray): bit-identical images whatever the number of actors or the
batch size, PNG files and an ADM sample batch that agree, decoding through a real AutoencoderKL."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import randomize
from dumo_ray.config import load_config
from dumo_ray.data.codec import LatentCodec
from dumo_ray.export import export_ema
from dumo_ray.sampling import sample_to_file
from dumo_ray.models import build_model_from_config
from dumo_ray.pipelines.sample_images import sample_images

ROOT = Path(__file__).resolve().parents[1]


def make_export(path, latent_info, *overrides):
    cfg = load_config(ROOT / "configs/quickstart.yaml", ["model.preset=DuMo-Micro/2", *overrides])
    model = randomize(build_model_from_config(cfg), std=0.05)
    return export_ema(path, model.state_dict(), cfg, LatentCodec.from_dict(latent_info))


@pytest.fixture(scope="module")
def pixel_export(tmp_path_factory):
    info = {"vae": "none", "channel_mean": [0.0], "channel_std": [1.0], "latent_shape": [1, 8, 8]}
    return make_export(tmp_path_factory.mktemp("export") / "export", info)


@pytest.mark.ray
@pytest.mark.slow
def test_samples_are_identical_whatever_the_workers_and_batch_size(local_ray, pixel_export, tmp_path):
    common = dict(num=30, steps=2, seed=5, chunk=8)
    one = sample_images(pixel_export, tmp_path / "one", workers=1, batch_size=7, **common)
    two = sample_images(pixel_export, tmp_path / "two", workers=2, batch_size=16, **common)
    assert one["images"] == two["images"] == 30
    with np.load(tmp_path / "one" / "samples.npz") as a, np.load(tmp_path / "two" / "samples.npz") as b:
        images, labels = a["arr_0"], a["arr_1"]
        assert np.array_equal(images, b["arr_0"]) and np.array_equal(labels, b["arr_1"])
    assert images.shape == (30, 8, 8, 1) and images.dtype == np.uint8 and images.std() > 0
    assert labels.tolist() == [i % 10 for i in range(30)]  # class-balanced
    # The PNG files hold the same pixels, named by index and label.
    pngs = sorted((tmp_path / "two" / "images").glob("*.png"))
    assert len(pngs) == 30 and pngs[7].name == "000007_c0007.png"
    assert np.array_equal(np.asarray(Image.open(pngs[7]))[..., None], images[7])
    # One process, the same chunk: the same images again.
    sample_to_file(pixel_export, tmp_path / "local.npz", num=30, steps=2, seed=5, chunk=8)
    with np.load(tmp_path / "local.npz") as c:
        assert np.array_equal(c["arr_0"], images)


@pytest.mark.ray
@pytest.mark.slow
def test_given_labels_and_a_folder_of_other_settings(local_ray, pixel_export, tmp_path):
    sample_images(pixel_export, tmp_path / "s", num=6, steps=1, labels=[3, 7], formats=["npz"], chunk=4)
    with np.load(tmp_path / "s" / "samples.npz") as data:
        assert data["arr_1"].tolist() == [3, 7, 3, 7, 3, 7]
    assert not (tmp_path / "s" / "images").exists()
    with pytest.raises(ValueError, match="other settings .*steps"):
        sample_images(pixel_export, tmp_path / "s", num=6, steps=2, labels=[3, 7], formats=["npz"], chunk=4)
    with pytest.raises(ValueError, match=r"other settings \(precision differ"):
        sample_images(pixel_export, tmp_path / "s", num=6, steps=1, labels=[3, 7], formats=["npz"], chunk=4,
                      precision="bf16")
    # A folder written before `precision` was recorded counts as fp32 (it resumes, it is not refused).
    settings_file = tmp_path / "s" / "samples.json"
    old = json.loads(settings_file.read_text())
    del old["settings"]["precision"]
    settings_file.write_text(json.dumps(old))
    assert sample_images(pixel_export, tmp_path / "s", num=6, steps=1, labels=[3, 7], formats=["npz"],
                         chunk=4)["images"] == 6
    with pytest.raises(ValueError, match=r"labels must be in \[0, 9\]"):
        sample_images(pixel_export, tmp_path / "t", num=6, steps=1, labels=[12])


def test_latent_samples_decode_through_the_manifests_vae(tiny_vae, tmp_path):
    info = {"vae": tiny_vae, "channel_mean": [0.1] * 4, "channel_std": [0.9] * 4, "latent_shape": [4, 4, 4]}
    export = make_export(tmp_path / "export", info, "model.input_size=4", "model.in_channels=4", "eval.features=none")
    sample_to_file(export, tmp_path / "s.npz", num=5, steps=1, chunk=4)
    with np.load(tmp_path / "s.npz") as data:
        assert data["arr_0"].shape == (5, 8, 8, 3)  # the VAE's 2x upsampling, RGB


def test_bf16_sampling_is_close_to_fp32_and_reproducible(pixel_export, tmp_path):
    """`--precision bf16` (autocast on the network): the same images up to bf16 rounding, and the same
    bytes when drawn again."""
    for name, precision in (("fp32", "fp32"), ("bf16", "bf16"), ("bf16_again", "bf16")):
        sample_to_file(pixel_export, tmp_path / f"{name}.npz", num=20, steps=2, seed=3, chunk=8, precision=precision)
    with np.load(tmp_path / "fp32.npz") as a, np.load(tmp_path / "bf16.npz") as b, np.load(tmp_path / "bf16_again.npz") as c:
        fp32, bf16 = a["arr_0"].astype(int), b["arr_0"].astype(int)
        assert np.array_equal(b["arr_0"], c["arr_0"])
        assert not np.array_equal(fp32, bf16)  # bf16 really ran
        assert np.abs(fp32 - bf16).mean() < 0.5 and np.abs(fp32 - bf16).max() <= 4  # of 255 (measured 0.04, 1)
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        sample_to_file(pixel_export, tmp_path / "x.npz", num=2, steps=1, precision="fp16")


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """A run of the single-process launcher (no Ray): 2 steps of a tiny model on 40 digits, checkpointed by the
    project's own code. Returns the run folder (storage_path/name)."""
    from dumo_ray.pipelines.precompute_latents import precompute_pixels_in_process
    from dumo_ray.data.digits import write_digits_tree
    from dumo_ray.train.launch import train_local

    root = tmp_path_factory.mktemp("local-run")
    write_digits_tree(root / "tree", limit=40)
    precompute_pixels_in_process(root / "tree", root / "latents", resolution=8)
    cfg = load_config(ROOT / "configs/digits_local.yaml", [
        f"data.path={root / 'latents'}", "model.preset=DuMo-Micro/2", "optim.batch_size=8", "train.total_images=16",
        "train.log_every_images=8", "train.checkpoint_every_images=16", "train.num_sample_images=4",
        "eval.features=none", "eval.every_images=0", "tracking.enabled=false", f"train.storage_path={root}",
        "train.name=run"])
    train_local(cfg)
    return root / "run"


def sample_with_cli(checkpoint, out) -> np.ndarray:
    from dumo_ray.cli import main

    assert main(["sample", "--checkpoint", str(checkpoint), "--steps", "2", "--num", "6", "--chunk", "4",
                 "--out", str(out)]) == 0
    with np.load(out) as data:
        return data["arr_0"]


def test_sample_reads_a_training_checkpoint_folder_with_its_ema_weights(local_run, tmp_path):
    """`--checkpoint` takes a training checkpoint directory (ema.safetensors, state.json, config.yaml,
    latents.json + the engine's state) as well as an export, and samples its EMA weights: the last
    checkpoint holds the same EMA weights as the run's final export, so they draw the same images."""
    from dumo_ray.train.checkpoint import checkpoint_dirs

    (checkpoint,) = checkpoint_dirs(local_run)
    assert {"ema.safetensors", "state.json", "config.yaml", "latents.json"} <= {p.name for p in checkpoint.iterdir()}
    from_checkpoint = sample_with_cli(checkpoint, tmp_path / "checkpoint.npz")
    assert from_checkpoint.shape == (6, 8, 8, 1) and from_checkpoint.std() > 0
    assert np.array_equal(from_checkpoint, sample_with_cli(local_run / "export", tmp_path / "export.npz"))


def test_sample_from_a_run_folder_takes_its_newest_checkpoint_of_either_launcher(local_run, tmp_path, capsys):
    """The folder `dumo-ray train` prints at the end (storage_path/name) is accepted too: its newest complete
    checkpoint, whether the local launcher's checkpoints/images_<N>/ or the Ray launcher's checkpoint_<time>/."""
    import shutil

    import torch

    from dumo_ray.data.codec import LatentCodec
    from dumo_ray.train.backend import load_checkpoint_info, read_ema, read_state, write_common_files
    from dumo_ray.train.checkpoint import checkpoint_dirs

    run = tmp_path / "run"
    shutil.copytree(local_run, run)
    (local,) = checkpoint_dirs(run)
    local_images = sample_with_cli(local, tmp_path / "local.npz")
    assert np.array_equal(sample_with_cli(run, tmp_path / "run.npz"), local_images)
    assert f"sampling from {local}" in capsys.readouterr().out

    # A later checkpoint in the Ray launcher's layout (its common files are written by the same function; Ray
    # Train names the folder by time), holding other EMA weights: the run folder now samples those.
    cfg, codec = load_checkpoint_info(local)
    ema = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
           for k, v in read_ema(local).items()}
    ray_layout = run / "checkpoint_2026-01-01_00-00-00.000000"
    ray_layout.mkdir()
    write_common_files(ray_layout, ema_state=ema, state={**read_state(local), "images": 32, "step": 4}, cfg=cfg,
                       codec=codec)
    newest = sample_with_cli(run, tmp_path / "newest.npz")
    assert f"sampling from {ray_layout}" in capsys.readouterr().out
    assert not np.array_equal(newest, local_images)
    assert np.array_equal(newest, sample_with_cli(ray_layout, tmp_path / "ray.npz"))

    # A folder that holds none of these is refused with one line saying what is expected.
    from dumo_ray.cli import main

    assert main(["sample", "--checkpoint", str(tmp_path), "--num", "2", "--out", str(tmp_path / "x.png")]) == 2
    assert "expected an EMA export (model.safetensors + config.yaml), a training checkpoint directory" in capsys.readouterr().err
