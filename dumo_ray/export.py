"""Consolidated EMA exports: `model.safetensors` + `config.yaml` (+ `latents.json`, the latent codec),
loadable without DeepSpeed or Ray. `dumo-ray sample` accepts such a folder."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from dumo_ray.config import Config, load_config, save_config
from dumo_ray.data.codec import CODEC_FILE, LatentCodec

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"


def export_ema(directory: str | Path, ema_state: dict[str, torch.Tensor], cfg: Config,
               codec: LatentCodec | None = None) -> Path:
    """Writes the folder atomically (temporary name, then rename)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in ema_state.items()}, tmp / WEIGHTS)
    save_config(cfg, tmp / CONFIG)
    if codec is not None:
        codec.save(tmp / CODEC_FILE)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def is_export(path: str | Path) -> bool:
    return (Path(path) / WEIGHTS).is_file()


def load_export_info(path: str | Path) -> tuple[Config, LatentCodec | None]:
    """The config and latent codec of an export, without the weights."""
    path = Path(path)
    codec = LatentCodec.load(path / CODEC_FILE) if (path / CODEC_FILE).is_file() else None
    return load_config(path / CONFIG, saved=True), codec


def load_export(path: str | Path) -> tuple[dict[str, torch.Tensor], Config, LatentCodec | None]:
    from safetensors.torch import load_file

    cfg, latents = load_export_info(path)
    return load_file(Path(path) / WEIGHTS), cfg, latents
