"""One optimizer step with gradient clipping and a guard against non-finite losses or gradients."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from dumo_ray.console import say


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a NaN/Inf loss or gradient."""


class NonFiniteGuard:
    """Counts skipped steps; raises after `limit` in a row so a diverged run stops with a clear error
    (its last good checkpoint stays on disk)."""

    def __init__(self, limit: int = 20):
        self.limit = limit
        self.in_a_row = 0
        self.total = 0

    def record(self, applied: bool, images: int) -> None:
        if applied:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        say(f"non-finite loss or gradient at image {images}: step skipped "
            f"({self.in_a_row} in a row, {self.total} in all)")
        if self.in_a_row >= self.limit:
            raise NonFiniteError(f"{self.in_a_row} consecutive steps had a NaN/Inf loss or gradient "
                                 f"(last at image {images}); stopping. The last good checkpoint is kept.")


class LocalStepper:
    """Plain PyTorch: backward, clip, step. `step(loss)` returns (grad_norm, applied)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float):
        self.model = model
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]

    def step(self, loss: torch.Tensor) -> tuple[float, bool]:
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            return math.nan, False
        loss.backward()
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return grad_norm, False
        self.optimizer.step()
        return grad_norm, True
