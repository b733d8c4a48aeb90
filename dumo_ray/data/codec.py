"""`LatentCodec`: how the model's space relates to the stored latents and to images.

Training reads raw VAE moments from the Parquet shards and normalises each channel just in time
(z - mean) / std; sampling undoes that and runs the VAE decoder (or nothing, for a pixel-space folder
written with `--vae none`). The codec travels with every checkpoint and export as `latents.json`, so
whatever samples from a model decodes it the way it was trained.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

PIXELS = "none"  # the VAE id of a pixel-space folder
CODEC_FILE = "latents.json"  # beside a latent folder's manifest, in every checkpoint and in every export


@dataclass(frozen=True)
class LatentCodec:
    vae: str  # hub id or local path of the AutoencoderKL, or "none" (pixels in [-1, 1])
    channel_mean: tuple[float, ...]
    channel_std: tuple[float, ...]
    latent_shape: tuple[int, ...]  # (C, h, w) of one latent
    classes: tuple[str, ...] = ()  # class names in label order

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], normalize: str = "manifest", latent_scale: float = 0.18215) -> "LatentCodec":
        """`normalize` (data.normalize): manifest = the folder's per-channel statistics, scale = z * latent_scale
        (the SD convention), none = as stored."""
        channels = manifest["latent_shape"][0]
        if normalize == "manifest":
            mean = manifest["latent_stats"]["mean"]
            std = [max(s, 1e-6) for s in manifest["latent_stats"]["std"]]  # a constant channel must not divide by 0
        elif normalize == "scale":
            mean, std = [0.0] * channels, [1.0 / latent_scale] * channels
        else:
            mean, std = [0.0] * channels, [1.0] * channels
        return cls(vae=manifest["vae"]["id"], channel_mean=tuple(map(float, mean)), channel_std=tuple(map(float, std)),
                   latent_shape=tuple(manifest["latent_shape"]), classes=tuple(manifest.get("classes") or ()))

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1)
        return (torch.tensor(self.channel_mean, dtype=torch.float32, device=like.device).view(shape),
                torch.tensor(self.channel_std, dtype=torch.float32, device=like.device).view(shape))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (N, C, h, w) -> model space."""
        mean, std = self._stats(z)
        return (z.float() - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> raw latents (or pixels in [-1, 1] for a pixel-space codec)."""
        mean, std = self._stats(x)
        return x.float() * std + mean

    @property
    def is_pixels(self) -> bool:
        return self.vae == PIXELS

    def with_vae(self, vae: str | None) -> "LatentCodec":
        """The same codec decoding through another copy of the VAE (e.g. a local path on an offline node)."""
        return self if not vae else LatentCodec(vae, self.channel_mean, self.channel_std, self.latent_shape, self.classes)

    def to_dict(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LatentCodec":
        try:
            return cls(vae=str(data["vae"]), channel_mean=tuple(map(float, data["channel_mean"])),
                       channel_std=tuple(map(float, data["channel_std"])),
                       latent_shape=tuple(int(v) for v in data.get("latent_shape") or ()),
                       classes=tuple(str(c) for c in data.get("classes") or ()))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"not a latent codec ({error!r}): needs vae, channel_mean and channel_std") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LatentCodec":
        return cls.from_dict(json.loads(Path(path).read_text()))
