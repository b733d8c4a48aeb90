"""Sampling from a saved checkpoint: load the EMA weights, draw, write a PNG grid or an `.npz`."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dumo_ray.config import Config, config_from_dict
from dumo_ray.eval.grids import save_grid
from dumo_ray.export import is_export, load_export
from dumo_ray.flow.sampler import default_method_and_head, sample
from dumo_ray.seeding import derive_seed
from dumo_ray.train.checkpoint import load_state
from dumo_ray.train.loop import build_model_from_config
from dumo_ray.vae import LatentDecoder


def load_ema_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config, dict | None]:
    """An EMA export folder (model.safetensors + config.yaml, from `dumo-ray train` on Ray) or a
    single-process checkpoint (state.pt). Returns (model, config, latent info or None for pixels)."""
    if is_export(checkpoint):
        weights, cfg, latent_info = load_export(checkpoint)
    else:
        state = load_state(checkpoint, map_location="cpu")
        cfg, weights, latent_info = config_from_dict(state["config"]), state["ema"], None
    model = build_model_from_config(cfg)
    model.load_state_dict(weights)
    return model.to(device).eval(), cfg, latent_info


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] (N, C, H, W) -> uint8 (N, H, W, C)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def sample_to_file(checkpoint: str | Path, out: str | Path, *, steps: int, num: int, labels: Sequence[int] | None = None,
                   method: str | None = None, seed: int = 0, mid: float = 0.5, device: str = "cpu") -> Path:
    model, cfg, latent_info = load_ema_model(checkpoint, device)
    decode = LatentDecoder.from_info(latent_info, device) if latent_info is not None else None
    classes = list(labels) if labels else list(range(cfg.model.num_classes))
    bad = [c for c in classes if not 0 <= c < cfg.model.num_classes]
    if bad:
        raise ValueError(f"labels must be in [0, {cfg.model.num_classes - 1}], got {bad}")
    chosen = torch.tensor([classes[i % len(classes)] for i in range(num)])
    seeds = [derive_seed(seed, "sample", i) for i in range(num)]
    default_method, head = default_method_and_head(cfg.objective.name)
    method = method or default_method
    images = sample(model, chosen, seeds, steps=steps, method=method, mid=mid, head=head)
    if decode is not None:
        images = decode(images)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        np.savez(out, images=to_uint8_images(images), labels=chosen.numpy())
        return out
    return save_grid(images, out, nrow=min(len(classes), 10), upscale=4 if cfg.model.input_size <= 16 else 1)
