"""The linear interpolant between data (t = 0) and noise (t = 1), and the (t, r) samplers.

Conventions (method.md section 1): x_t = (1 - t) * x0 + t * e, conditional velocity v_t = e - x0,
the flow map jumps x_r = x_t - (t - r) * u(x_t, r, t) with r <= t.
"""
from __future__ import annotations

import torch


def broadcast_time(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, 1) so a per-sample time multiplies an image batch."""
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def interpolate(x0: torch.Tensor, e: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = broadcast_time(t, x0)
    return (1 - t) * x0 + t * e


def conditional_velocity(x0: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    return e - x0


class TimeSampler:
    """Draws (t, r) with r <= t per sample.

    Two independent draws from the base distribution (logit-normal(mean, std) or uniform); t is the
    larger, r the smaller. Then a random `equal_fraction` of the samples gets r = t (the pure velocity
    case) and a disjoint `zero_fraction` gets r = 0 (the full jump used by 1-step sampling).
    """

    def __init__(self, kind: str = "logit_normal", mean: float = -0.4, std: float = 1.0,
                 equal_fraction: float = 0.0, zero_fraction: float = 0.0):
        if kind not in ("logit_normal", "uniform"):
            raise ValueError(f"unknown time sampler {kind!r}")
        if equal_fraction + zero_fraction > 1.0:
            raise ValueError("equal_fraction + zero_fraction must be <= 1")
        self.kind, self.mean, self.std = kind, mean, std
        self.equal_fraction, self.zero_fraction = equal_fraction, zero_fraction

    def base(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        if self.kind == "uniform":
            return torch.rand(n, generator=generator, device=device)
        return torch.sigmoid(self.mean + self.std * torch.randn(n, generator=generator, device=device))

    def __call__(self, n: int, generator: torch.Generator, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        device = torch.device(device)
        a, b = self.base(n, generator, device), self.base(n, generator, device)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        # Exact counts (not Bernoulli draws) so small batches honour the fractions too.
        order = torch.randperm(n, generator=generator, device=device)
        n_equal = round(self.equal_fraction * n)
        n_zero = round(self.zero_fraction * n)
        r[order[:n_equal]] = t[order[:n_equal]]
        r[order[n_equal:n_equal + n_zero]] = 0.0
        return t, r
