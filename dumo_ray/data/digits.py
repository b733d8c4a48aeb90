"""scikit-learn's bundled 8x8 digits (1,797 images, 10 classes) as a class-conditional pixel dataset.

No download: the data ships inside scikit-learn. Pixels 0..16 map to [-1, 1] for training.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

DIGITS_MAX = 16.0


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 8, 8) float in 0..16, labels (N,) int64)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def to_model_space(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """0..16 pixels (N, 8, 8) -> (N, 1, 8, 8) in [-1, 1]."""
    x = torch.as_tensor(pixels, dtype=torch.float32)
    return (x / (DIGITS_MAX / 2) - 1.0).reshape(-1, 1, 8, 8)


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """Model space (N, 1, 8, 8) -> 0..16 pixels (N, 64), clipped."""
    return ((x.detach().float().cpu() + 1.0) * (DIGITS_MAX / 2)).clamp(0, DIGITS_MAX).reshape(x.shape[0], -1).numpy()


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_digits_arrays()
    return to_model_space(images), torch.from_numpy(labels)


def write_digits_tree(root: str | Path, limit: int | None = None) -> int:
    """Writes the digits as real 8-bit grayscale PNG files in an ImageNet-style tree root/<digit>/<n>.png,
    so the precompute path (listing, decoding, cropping) is exercised on them. Returns the file count."""
    from PIL import Image

    images, labels = load_digits_arrays()
    root = Path(root)
    count = 0
    for index, (image, label) in enumerate(zip(images, labels)):
        if limit is not None and count >= limit:
            break
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.round(image * (255.0 / DIGITS_MAX)).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{index:04d}.png")
        count += 1
    return count
