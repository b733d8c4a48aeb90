"""scikit-learn's bundled 8x8 digits (1,797 images, 10 classes) as a class-conditional pixel dataset.

No download: the data ships inside scikit-learn. Pixels 0..16 map to [-1, 1] for training.
"""
from __future__ import annotations

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
