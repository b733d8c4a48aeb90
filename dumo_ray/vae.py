"""The SD-VAE (diffusers `AutoencoderKL`): load by hub id or local directory, encode, decode.

Latents are stored as the raw posterior moments (mean, std); sampling and normalisation happen just in
time during training (EDM2 style), so one precompute serves any normalisation choice.
"""
from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dumo_ray.data.codec import LatentCodec


def _not_found(id_or_path: str, err: Exception) -> FileNotFoundError:
    return FileNotFoundError(
        f"could not load the VAE {id_or_path!r}: {err}. Give a hub id reachable from this machine or a local "
        "directory written by AutoencoderKL.save_pretrained (config.json + weights).")


def load_vae(id_or_path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """`stabilityai/sd-vae-ft-ema` (needs the hub or its cache) or a local `save_pretrained` directory."""
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(id_or_path, torch_dtype=dtype)
    except (OSError, ValueError) as err:
        raise _not_found(id_or_path, err) from err
    return vae.to(device).eval().requires_grad_(False)


def load_vae_config(id_or_path: str) -> dict:
    """The VAE's config.json alone (no weights): what the driver needs to plan a precompute."""
    from diffusers import AutoencoderKL

    try:
        return dict(AutoencoderKL.load_config(id_or_path))
    except (OSError, ValueError) as err:
        raise _not_found(id_or_path, err) from err


def vae_config_hash(config: dict) -> str:
    """A short hash of the VAE's config, stored in the manifest so latents and decoder can be matched."""
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def downsample_factor(config: dict) -> int:
    return 2 ** (len(config.get("block_out_channels", (64,))) - 1)


@torch.no_grad()
def encode_moments(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """images (N, 3, H, W) in [-1, 1] -> posterior (mean, std), each (N, C, H/f, W/f), fp32."""
    posterior = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    return posterior.mean.float(), posterior.std.float()


# Images per encoder call, whatever the size of the batch Ray Data delivers. CPU and GPU kernels choose
# their summation order by batch shape, so an image encoded in a batch of 3 can differ in the last bits
# from the same image in a batch of 5; one fixed shape makes every latent bit-identical however the rows
# are batched (and a redone shard byte-identical). 8 keeps a GPU busy at 256x256 and wastes little on CPUs.
ENCODE_CHUNK = 8


def in_fixed_chunks(fn, x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, ...]:
    """`fn(x)` for a function returning a tuple of per-row tensors, always called on exactly `chunk` rows
    (the last piece padded with zeros, the padding's outputs dropped)."""
    pieces = []
    for start in range(0, len(x), chunk):
        part = x[start:start + chunk]
        real = len(part)
        if real < chunk:
            part = torch.cat([part, part.new_zeros(chunk - real, *part.shape[1:])])
        pieces.append([out[:real] for out in fn(part)])
    return tuple(torch.cat(column) for column in zip(*pieces))


@torch.no_grad()
def encode_moments_in_chunks(vae, images: torch.Tensor, chunk: int = ENCODE_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """`encode_moments` with the encoder always run on `chunk` images (see ENCODE_CHUNK)."""
    mean, std = in_fixed_chunks(lambda part: encode_moments(vae, part), images, chunk)
    return mean, std


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Unnormalised latents (N, C, h, w) -> images (N, 3, H, W) in [-1, 1]."""
    return vae.decode(latents.to(vae.device, vae.dtype)).sample.float().clamp(-1, 1)


class LatentDecoder:
    """Model-space samples -> images in [-1, 1]: undo the latent normalisation (the codec), then the VAE
    decoder (loaded on first use) or nothing for pixel-space folders (`--vae none`)."""

    def __init__(self, codec: "LatentCodec", device: str | torch.device = "cpu"):
        self.codec = codec
        self.device = device
        self.vae = None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        raw = self.codec.denormalize(z.float().cpu())
        if self.codec.is_pixels:
            return raw.clamp(-1, 1)
        if self.vae is None:
            self.vae = load_vae(self.codec.vae, self.device)
        return decode(self.vae, raw).cpu()
