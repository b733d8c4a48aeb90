import os

import pytest
import torch

from dumo_ray.models import build_model
from dumo_ray.pipelines.precompute_latents import precompute_pixels_in_process

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
        if {"local_ray", "cluster"} & set(item.fixturenames) and not item.get_closest_marker("ray"):
            raise pytest.UsageError(f"{item.nodeid} starts Ray (local_ray or cluster): mark it with @pytest.mark.ray")


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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local_ray(temp_dir: str) -> str:
    """A local Ray of 2 CPUs with its dashboard (Ray Train frees a finished trial's reservation through the
    state API it serves; the job server is part of it) on a free port, under `temp_dir` (short: Ray's socket
    paths live under it). Returns the dashboard's address."""
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")  # ~4 s less per Ray Train fit
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, _temp_dir=temp_dir)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def _ray_session():
    """Shuts down, at the end of the run, the Ray that `local_ray` started (if it is still up), and removes
    the temp dirs of every one it started."""
    import shutil

    session = {"temp_dirs": []}
    yield session
    import ray

    ray.shutdown()
    for folder in session["temp_dirs"]:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def local_ray(_ray_session):
    """One local Ray for the whole run, started by the first module that needs it and kept for the next
    ones (each start costs ~10 s on 2 cores); a module that needs another Ray (the multi-node cluster of
    test_elastic.py) shuts it down, and the next user starts a new one. Yields the dashboard's address."""
    import tempfile

    import ray

    if not ray.is_initialized() or "address" not in _ray_session:
        if ray.is_initialized():
            ray.shutdown()  # a Ray some test started on its own
        _ray_session["temp_dirs"].append(tempfile.mkdtemp(prefix="dumo-ray-", dir="/tmp"))
        _ray_session["address"] = start_local_ray(_ray_session["temp_dirs"][-1])
    yield _ray_session["address"]


@pytest.fixture(scope="session")
def digits_latents(tmp_path_factory):
    """400 digits written as PNG files and precomputed in pixel space (--vae none) into 2 shards, once for
    the whole run (tests only read it). Written in this process by the precompute's own stages: starting a
    Ray and a Ray Data job for it cost ~30 s on 2 cores; the pipeline itself is tested in test_precompute.py."""
    from dumo_ray.data.digits import write_digits_tree

    root = tmp_path_factory.mktemp("digits")
    write_digits_tree(root / "tree", limit=400)
    precompute_pixels_in_process(root / "tree", root / "latents", resolution=8, shard_size=200)
    return root / "latents"
