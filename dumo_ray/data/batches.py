"""Seeded, resumable batches from in-memory tensors (the single-process path)."""
from __future__ import annotations

from typing import Iterator

import torch

from dumo_ray.seeding import generator


def epoch_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, start_image: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches; epoch e is the permutation seeded by (seed, "data", e). Starting at image k
    resumes exactly where a run that had consumed k images stopped. Each epoch yields
    n // batch_size full batches; the remainder of its permutation is skipped."""
    n = x.shape[0]
    if batch_size > n:
        raise ValueError(f"batch size {batch_size} is larger than the dataset ({n} samples)")
    batches_per_epoch = n // batch_size
    batch_index = start_image // batch_size
    while True:
        epoch, within = divmod(batch_index, batches_per_epoch)
        order = torch.randperm(n, generator=generator(seed, "data", epoch))
        idx = order[within * batch_size:(within + 1) * batch_size]
        yield {"x0": x[idx], "y": y[idx]}
        batch_index += 1
