"""Image grids as PNG files: sample grids (training, `dumo-ray sample`) and the latent preview of
`dumo-ray verify-latents`. It sits below data/ and eval/ so that both may use it."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 10, upscale: int = 1) -> Path:
    """images: (N, C, H, W) in [-1, 1]. `upscale` enlarges tiny images (8x8 digits) with nearest pixels."""
    grid = make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=nrow, normalize=True, value_range=(-1, 1), pad_value=1.0)
    array = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
