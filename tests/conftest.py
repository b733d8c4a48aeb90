import os

import pytest
import torch

from dumo_ray.models import build_model

# One thread in the test process (Ray's workers already get one each). The models under test are tiny, so a
# second thread buys little, and on a shared machine a team of two OpenMP threads waits on whichever is
# descheduled: the objectives' training tests took 140 s instead of 10 s beside one other busy process.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests are skipped without CUDA; a test that starts Ray must say so (`ray`, for -m "not ray")."""
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if {"local_ray", "cluster", "digits_latents"} & set(item.fixturenames) and not item.get_closest_marker("ray"):
            raise pytest.UsageError(f"{item.nodeid} starts Ray (local_ray, cluster or digits_latents): mark it with @pytest.mark.ray")


def randomize(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Non-zero weights everywhere (the zero-initialised heads would make every derivative 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def undecodable_tree(root):
    """Two classes of files that are no images: text renamed .png, an empty file, a truncated PNG."""
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a/notes.png").write_text("not an image")
    (root / "a/other.png").write_text("not one either")
    (root / "b/empty.png").write_bytes(b"")
    return root


def precompute_in_process(tree, output, resolution: int = 8, mode: str = "L"):
    """A pixel-space latent folder (--vae none) written by the precompute's own stages and manifest writer,
    in this process and one shard: for the tests that need a small folder without starting Ray."""
    from pathlib import Path

    import numpy as np

    from dumo_ray.data.images import list_image_tree
    from dumo_ray.data.latents import shard_name
    from dumo_ray.data.precompute_stages import DecodeImages, EncodeLatents, write_shard
    from dumo_ray.pipelines.precompute_latents import _latent_geometry, write_manifest

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    records, classes = list_image_tree(tree)
    geometry = _latent_geometry(None, resolution, mode)
    batch = {"key": np.asarray([r.key for r in records], dtype=object), "label": np.asarray([r.label for r in records]),
             "shard": np.zeros(len(records), dtype=np.int64)}
    batch = EncodeLatents(None, False, tuple(geometry["latent_shape"]))(DecodeImages(str(tree), resolution, mode)(batch))
    names = {0: shard_name(0, 1)}
    write_shard(batch, str(output), names)
    settings = {"source_root": str(Path(tree).resolve()), "resolution": resolution, "mode": mode, "flip": False}
    return write_manifest(output, settings, geometry, classes, names)


@pytest.fixture
def micro_model():
    torch.manual_seed(0)
    return build_model("DuMo-Micro/2", input_size=8, in_channels=1, num_classes=10)


@pytest.fixture
def random_micro_model(micro_model):
    return randomize(micro_model)


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    """A real AutoencoderKL (random weights, 2 blocks: downsampling 2) saved and loaded the way users do."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                        norm_num_groups=32, sample_size=16)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray (2 CPUs, no dashboard) for all the tests of a module that need one; a module that needs
    another Ray (the job server, a multi-node cluster) defines its own `local_ray`."""
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")  # ~4 s less per Ray Train fit
    ray.init(num_cpus=2, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_latents(tmp_path_factory):
    """The digits written as PNG files and precomputed in pixel space (--vae none), once for the whole run
    (tests only read it): on the Ray already running, else on a Ray of its own, shut down after."""
    import ray

    from dumo_ray.data.digits import write_digits_tree
    from dumo_ray.pipelines.precompute_latents import precompute_latents

    root = tmp_path_factory.mktemp("digits")
    write_digits_tree(root / "tree", limit=400)
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(num_cpus=2, include_dashboard=False)
    try:
        precompute_latents(str(root / "tree"), str(root / "latents"), vae=None, resolution=8, mode="L", shard_size=200)
    finally:
        if own_ray:
            ray.shutdown()
    return root / "latents"
