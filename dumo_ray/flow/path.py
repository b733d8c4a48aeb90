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


def logit_normal(n: int, mean: float, std: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))


class TimeSampler:
    """Draws (t, r) with r <= t per sample.

    `logit_normal` / `uniform`: two independent draws from the base distribution; t is the larger, r the
    smaller. `separate`: t ~ logit-normal(mean, std) and r ~ logit-normal(r_mean, r_std), r clipped to
    <= t; with r_mean well below mean, large intervals (the 1-step jump) are far more common than under
    the sorted pair. Then a random `equal_fraction` of the samples gets r = t (the pure velocity case)
    and a disjoint `zero_fraction` gets r = 0 (the full jump used by 1-step sampling).
    """

    def __init__(self, kind: str = "logit_normal", mean: float = -0.4, std: float = 1.0,
                 equal_fraction: float = 0.0, zero_fraction: float = 0.0, r_mean: float = -0.4, r_std: float = 1.0):
        if kind not in ("logit_normal", "uniform", "separate"):
            raise ValueError(f"unknown time sampler {kind!r}")
        if equal_fraction + zero_fraction > 1.0:
            raise ValueError("equal_fraction + zero_fraction must be <= 1")
        self.kind, self.mean, self.std, self.r_mean, self.r_std = kind, mean, std, r_mean, r_std
        self.equal_fraction, self.zero_fraction = equal_fraction, zero_fraction

    def base(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """The distribution of t alone (what flow matching draws)."""
        if self.kind == "uniform":
            return torch.rand(n, generator=generator, device=device)
        return logit_normal(n, self.mean, self.std, generator, device)

    def __call__(self, n: int, generator: torch.Generator, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        device = torch.device(device)
        if self.kind == "separate":
            t = self.base(n, generator, device)
            r = torch.minimum(logit_normal(n, self.r_mean, self.r_std, generator, device), t)
        else:
            a, b = self.base(n, generator, device), self.base(n, generator, device)
            t, r = torch.maximum(a, b), torch.minimum(a, b)
        # Exact counts (not Bernoulli draws) so small batches honour the fractions too.
        order = torch.randperm(n, generator=generator, device=device)
        n_equal = round(self.equal_fraction * n)
        n_zero = round(self.zero_fraction * n)
        r[order[:n_equal]] = t[order[:n_equal]]
        r[order[n_equal:n_equal + n_zero]] = 0.0
        return t, r
