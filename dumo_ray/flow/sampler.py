"""Sampling (method.md section 6): flow-map jumps with the u-head, or Euler steps with the v-head.

Plain functions over a model `(x_t, t, r, y) -> (v, u)`. Noise comes from per-sample seeds, so a given
(seed, label) gives the same sample whatever the batch it is drawn in. With guidance baked into
training, every step is one network evaluation; `guidance > 1` adds classic CFG (two evaluations).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from dumo_ray.seeding import derive_seed

V_HEAD, U_HEAD = 0, 1


def noise_from_seeds(seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """One standard-normal draw of `shape` per seed, made on the CPU so it is identical on every device."""
    draws = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(draws).to(device)


def predict(model: nn.Module, head: int, x: torch.Tensor, t: float | torch.Tensor, r: float | torch.Tensor,
            y: torch.Tensor, guidance: float = 1.0, null_class: int | None = None) -> torch.Tensor:
    n = x.shape[0]
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(n)
    r = torch.as_tensor(r, dtype=torch.float32, device=x.device).expand(n)
    if guidance == 1.0:
        return model(x, t, r, y)[head].float()
    y_null = torch.full_like(y, null_class)
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([r, r]), torch.cat([y, y_null]))[head].float()
    cond, uncond = out.chunk(2)
    return uncond + guidance * (cond - uncond)


@torch.no_grad()
def one_step(model: nn.Module, x1: torch.Tensor, y: torch.Tensor, **kw) -> torch.Tensor:
    """x0 = x1 - u(x1, r=0, t=1)."""
    return x1 - predict(model, U_HEAD, x1, 1.0, 0.0, y, **kw)


@torch.no_grad()
def two_step(model: nn.Module, x1: torch.Tensor, y: torch.Tensor, mid: float = 0.5, renoise: bool = False,
             renoise_seeds: Sequence[int] | None = None, **kw) -> torch.Tensor:
    """x_m = x1 - (1 - m) u(x1, m, 1); x0 = x_m - m u(x_m, 0, m).

    `renoise=True`: jump straight to x0, re-noise it to time m with fresh noise, and jump again."""
    if renoise:
        x0_hat = one_step(model, x1, y, **kw)
        seeds = renoise_seeds if renoise_seeds is not None else range(x1.shape[0])
        e = noise_from_seeds(seeds, x1.shape[1:], x1.device)
        x_m = (1 - mid) * x0_hat + mid * e
    else:
        x_m = x1 - (1 - mid) * predict(model, U_HEAD, x1, 1.0, mid, y, **kw)
    return x_m - mid * predict(model, U_HEAD, x_m, mid, 0.0, y, **kw)


@torch.no_grad()
def chained_jumps(model: nn.Module, x1: torch.Tensor, y: torch.Tensor, steps: int, **kw) -> torch.Tensor:
    """N flow-map jumps on the uniform grid 1 = t_0 > t_1 > ... > t_N = 0."""
    x = x1
    grid = torch.linspace(1.0, 0.0, steps + 1).tolist()
    for t, r in zip(grid[:-1], grid[1:]):
        x = x - (t - r) * predict(model, U_HEAD, x, t, r, y, **kw)
    return x


@torch.no_grad()
def euler(model: nn.Module, x1: torch.Tensor, y: torch.Tensor, steps: int, head: int = V_HEAD, **kw) -> torch.Tensor:
    """N Euler steps of the velocity (r = t): the multi-step view. `head=U_HEAD` for a MeanFlow model,
    whose u-head at r = t is its velocity."""
    x = x1
    grid = torch.linspace(1.0, 0.0, steps + 1).tolist()
    for t, r in zip(grid[:-1], grid[1:]):
        x = x - (t - r) * predict(model, head, x, t, t, y, **kw)
    return x


def sample_plan(indices: Sequence[int], classes: Sequence[int], seed: int,
                purpose: str) -> tuple[torch.Tensor, list[int]]:
    """Image i: label classes[i mod len(classes)], noise seed derived from (seed, purpose, i) alone, so an
    image is the same whatever set or batch it is drawn in (grids, evaluation and mass sampling each
    have their own purpose)."""
    labels = torch.tensor([classes[int(i) % len(classes)] for i in indices], dtype=torch.long)
    return labels, [derive_seed(seed, purpose, int(i)) for i in indices]


def default_method_and_head(objective: str) -> tuple[str, int]:
    """How a model trained with `objective` samples by default: flow matching integrates its velocity
    head (Euler); DuMo and MeanFlow jump with the u-head (MeanFlow's u-head is also its velocity)."""
    method = "euler" if objective == "flow_matching" else "u"
    head = U_HEAD if objective == "meanflow" else V_HEAD
    return method, head


@torch.no_grad()
def sample(model: nn.Module, labels: torch.Tensor, seeds: Sequence[int], *, steps: int = 1, method: str = "u",
           mid: float = 0.5, renoise: bool = False, guidance: float = 1.0, head: int = V_HEAD) -> torch.Tensor:
    """Samples in model space (latents or pixels), one per (label, seed).

    method "u": 1 step = one jump, 2 steps = the two-jump sampler at `mid`, N steps = chained jumps;
    method "euler": N Euler steps of the velocity head."""
    if len(seeds) != len(labels):
        raise ValueError(f"got {len(seeds)} seeds for {len(labels)} labels")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    shape = (model.in_channels, model.input_size, model.input_size)
    device = next(model.parameters()).device
    x1 = noise_from_seeds(seeds, shape, device)
    y = torch.as_tensor(labels, device=device, dtype=torch.long)
    kw = dict(guidance=guidance, null_class=model.num_classes)
    if method == "euler":
        return euler(model, x1, y, steps, head=head, **kw)
    if method != "u":
        raise ValueError(f"unknown sampling method {method!r}; use 'u' or 'euler'")
    if steps == 1:
        return one_step(model, x1, y, **kw)
    if steps == 2:
        renoise_seeds = [derive_seed(s, "renoise") for s in seeds]  # fresh noise, still per sample
        return two_step(model, x1, y, mid=mid, renoise=renoise, renoise_seeds=renoise_seeds, **kw)
    return chained_jumps(model, x1, y, steps, **kw)


@torch.no_grad()
def sample_in_chunks(model: nn.Module, labels: torch.Tensor, seeds: Sequence[int], *, chunk: int, **kw) -> torch.Tensor:
    """`sample` with the network always run on exactly `chunk` samples (the last chunk padded, the padding
    dropped). Matrix kernels choose their summation order by batch shape, so a sample drawn in different
    batches differs in the last bits; one fixed shape makes each sample bit-identical however the work is
    split over batches and workers."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    seeds = [int(s) for s in seeds]
    if len(seeds) != len(labels):
        raise ValueError(f"got {len(seeds)} seeds for {len(labels)} labels")
    pieces = []
    for start in range(0, len(seeds), chunk):
        part_labels, part_seeds = labels[start:start + chunk], seeds[start:start + chunk]
        real = len(part_seeds)
        if real < chunk:
            part_labels = torch.cat([part_labels, torch.zeros(chunk - real, dtype=torch.long)])
            part_seeds = part_seeds + [0] * (chunk - real)
        pieces.append(sample(model, part_labels, part_seeds, **kw)[:real])
    return torch.cat(pieces)
