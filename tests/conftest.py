import pytest
import torch

from dumo_ray.models import build_model


def randomize(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Non-zero weights everywhere (the zero-initialised heads would make every derivative 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


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
def digits_latents(local_ray, tmp_path_factory):
    """The digits written as PNG files and precomputed in pixel space (--vae none) on the module's Ray."""
    from dumo_ray.data.digits import write_digits_tree
    from dumo_ray.pipelines.precompute_latents import precompute_latents

    root = tmp_path_factory.mktemp("digits")
    write_digits_tree(root / "tree", limit=400)
    precompute_latents(str(root / "tree"), str(root / "latents"), vae=None, resolution=8, mode="L", shard_size=200)
    return root / "latents"


@pytest.fixture(scope="session")
def digits_latent_folder(tmp_path_factory):
    """400 digits precomputed in pixel space (--vae none) once per session, through the CLI in a child
    process (its own Ray, gone when it exits), for the tests of the single-process launcher."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("digits-folder")
    commands = [["digits-tree", "--output", str(root / "tree"), "--limit", "400"],
                ["precompute", "--input", str(root / "tree"), "--output", str(root / "latents"), "--vae", "none",
                 "--resolution", "8", "--grayscale", "--shard-size", "200"]]
    for command in commands:
        subprocess.run([sys.executable, "-c", "import sys; from dumo_ray.cli import main; sys.exit(main(sys.argv[1:]))",
                        *command], check=True, capture_output=True)
    return root / "latents"
