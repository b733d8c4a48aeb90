"""Training batches from the latent Parquet shards through Ray Data.

Driver side: `latent_dataset` reads the shards (file order fixed by the manifest). Worker side:
`LatentBatches` iterates this worker's `get_dataset_shard(...)` one epoch at a time with a seeded local
shuffle (seed = f(seed, rank, epoch)), samples z from the stored posterior (seed = f(seed, rank, step)),
normalises it, and skips the batches of the current epoch that a resumed run already consumed. A small
(cached) dataset is read from the shard once and reshuffled in memory each epoch with the same seeding.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from dumo_ray.config import DataConfig
from dumo_ray.data.latents import load_manifest, sample_normalized
from dumo_ray.seeding import derive_seed, generator


CACHE_LIMIT_BYTES = 2 * 2**30


def _drop_flipped(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keep = ~batch["flip"].astype(bool)
    return {k: v[keep] for k, v in batch.items()}


def latent_dataset(cfg: DataConfig):
    """-> (ray Dataset of label/flip/moments rows, manifest, number of rows, cached?)."""
    import ray

    manifest = load_manifest(cfg.path)
    # Rows in file order, so a seed gives the same batches in every run (Ray reads files in completion
    # order otherwise). The setting is captured when the read is planned, so it is set before it.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    files = [str(Path(cfg.path) / s["file"]) for s in manifest["shards"]]
    ds = ray.data.read_parquet(files, columns=["label", "flip", "moments"])
    rows = manifest["rows"]
    if not cfg.use_flips and manifest["flip"]:
        ds = ds.map_batches(_drop_flipped, batch_format="numpy")
        rows = manifest["images"]
    size = rows * int(np.prod(manifest["moments_shape"])) * 2  # float16 moments
    cached = cfg.cache == "always" or (cfg.cache == "auto" and size < CACHE_LIMIT_BYTES)
    if cached:
        ds = ds.materialize()
    return ds, manifest, rows, cached


def normalization(cfg: DataConfig, manifest: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(channel_mean, channel_std) so that z_normalised = (z - mean) / std."""
    channels = manifest["latent_shape"][0]
    if cfg.normalize == "manifest":
        mean, std = manifest["latent_stats"]["mean"], manifest["latent_stats"]["std"]
        return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32).clamp_min(1e-6)
    if cfg.normalize == "scale":
        return torch.zeros(channels), torch.full((channels,), 1.0 / cfg.latent_scale)
    return torch.zeros(channels), torch.ones(channels)


class LatentBatches:
    """Endless {"x0", "y"} micro-batches for one worker, reproducible and resumable by step."""

    def __init__(self, shard, *, micro_batch: int, rows: int, world_size: int, rank: int, seed: int,
                 shuffle_buffer: int, channel_mean: torch.Tensor, channel_std: torch.Tensor,
                 device: torch.device, start_step: int = 0, in_memory: bool = False):
        self.shard, self.micro_batch, self.rank, self.seed = shard, micro_batch, rank, seed
        self.shuffle_buffer = shuffle_buffer
        self.steps_per_epoch = (rows // world_size) // micro_batch
        if self.steps_per_epoch < 1:
            raise ValueError(f"{rows} rows over {world_size} workers cannot fill one micro-batch of {micro_batch}")
        self.mean, self.std = channel_mean.to(device), channel_std.to(device)
        self.device = device
        self.step = start_step
        self.in_memory = in_memory

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.in_memory:
            yield from self._iter_in_memory()
            return
        while True:
            epoch, skip = divmod(self.step, self.steps_per_epoch)
            batches = self.shard.iter_torch_batches(
                batch_size=self.micro_batch, drop_last=True, device=self.device,
                local_shuffle_buffer_size=self.shuffle_buffer or None,
                local_shuffle_seed=derive_seed(self.seed, self.rank, "shuffle", epoch) % 2**32 if self.shuffle_buffer else None)
            for index, batch in enumerate(batches):
                if index < skip:
                    continue  # consumed before the checkpoint this run resumed from
                if index >= self.steps_per_epoch:
                    break
                yield self._make_batch(batch["moments"], batch["label"])
            else:
                # The shard ran out early (uneven split): the epoch ends here on every worker alike.
                self.step = (epoch + 1) * self.steps_per_epoch

    def _make_batch(self, moments: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        g = generator(self.seed, self.rank, self.step, "posterior", device=self.device)
        x0 = sample_normalized(moments.to(self.device), self.mean, self.std, g)
        self.step += 1
        return {"x0": x0, "y": labels.to(self.device).long()}

    def _iter_in_memory(self) -> Iterator[dict[str, torch.Tensor]]:
        """Small (cached) datasets: read this worker's shard once, then reshuffle it in memory every epoch
        with the same seeded scheme. Saves Ray Data's per-epoch start-up, which dominates when an epoch is
        a dozen steps (the digits)."""
        parts = list(self.shard.iter_torch_batches(batch_size=4096))
        moments = torch.cat([p["moments"] for p in parts])
        labels = torch.cat([p["label"] for p in parts])
        while True:
            epoch, skip = divmod(self.step, self.steps_per_epoch)
            order = torch.randperm(len(labels), generator=generator(self.seed, self.rank, "shuffle", epoch))
            for index in range(skip, self.steps_per_epoch):
                idx = order[index * self.micro_batch:(index + 1) * self.micro_batch]
                yield self._make_batch(moments[idx], labels[idx])
