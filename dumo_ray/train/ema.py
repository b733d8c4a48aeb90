"""Exponential moving average of the weights, kept in fp32 beside the trained model.

The decay warms up as min(decay, (1 + step) / (10 + step)): a plain 0.999 EMA still holds 0.999^2000 =
13% of the zero-initialised heads after 2,000 steps, which shrinks every sample towards zero.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


def ema_decay_at(step: int, decay: float) -> float:
    return min(decay, (1 + step) / (10 + step))


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """`step`: optimizer steps taken so far (sets the warm-up)."""
        ema_params = list(self.module.parameters())
        params = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - ema_decay_at(step, self.decay))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
