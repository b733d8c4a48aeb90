"""Training batches from the latent Parquet shards through Ray Data.

Driver side: `latent_dataset` reads the shards (file order fixed by the manifest). Worker side:
`LatentBatches` yields, per optimizer step, this worker's micro-batches of the global batch (see
`data.batch_plan`), each with its loss weight; it samples z from the stored posterior (seed =
f(seed, rank, step)), normalises it, and skips what a resumed run already consumed.

Two sources:
- a small (cached) dataset, or any dataset read by the single-process trainer (`read_latents`, plain
  pyarrow, no Ray), is held whole by every worker and put in a global order each epoch
  (seed = f(seed, epoch)); step k of an epoch is positions [k*B, (k+1)*B) of that order, and each worker
  takes its slice. The images of every step are the same whatever the number of workers, so an elastic
  run that shrinks or grows continues the data order exactly.
- a streamed dataset: each worker iterates its own `get_dataset_shard(...)` with a seeded local shuffle
  (seed = f(seed, rank, epoch)). Resuming at another worker count keeps the position in the epoch but
  draws the rest of the epoch from the new split (some images of that epoch seen twice, some not at all).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from dumo_ray.config import DataConfig
from dumo_ray.data.codec import LatentCodec
from dumo_ray.errors import DataError
from dumo_ray.data.latents import load_manifest, moments_array, read_training_shards, read_training_table
from dumo_ray.seeding import derive_seed, generator
from dumo_ray.data.batch_plan import BatchPlan


CACHE_LIMIT_BYTES = 2 * 2**30


def latent_dataset(cfg: DataConfig):
    """-> (ray Dataset of label/flip/moments rows, manifest, number of rows, cached?)."""
    import ray

    manifest = load_manifest(cfg.path)
    # Rows in file order, so a seed gives the same batches in every run (Ray reads files in completion
    # order otherwise). The setting is captured when the read is planned, so it is set before it.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    files = shard_files(cfg, manifest)
    drop_flipped = not cfg.use_flips and manifest["flip"]
    # A dataset of shard paths, each read by our own reader: ray.data.read_parquet cannot verify Parquet
    # page checksums (its scanner replaces the scan options that ask for it; ray 2.60), and a shard of the
    # right size with flipped bytes must stop the run, not train it.
    ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files)).map_batches(
        read_training_shards, batch_format="pyarrow", batch_size=1,
        fn_kwargs=dict(shape=tuple(manifest["moments_shape"]), drop_flipped=drop_flipped))
    rows = manifest["images"] if drop_flipped else manifest["rows"]
    size = rows * int(np.prod(manifest["moments_shape"])) * 2  # float16 moments
    cached = cfg.cache == "always" or (cfg.cache == "auto" and size < CACHE_LIMIT_BYTES)
    if cached:
        ds = ds.materialize()
    return ds, manifest, rows, cached


def shard_files(cfg: DataConfig, manifest: dict[str, Any]) -> list[str]:
    """The Parquet shards in the manifest's order (the order every reader keeps)."""
    return [str(Path(cfg.path) / s["file"]) for s in manifest["shards"]]


def read_latents(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The whole folder in this process with pyarrow, no Ray: (moments (N, 2, C, h, w) float16, labels (N,),
    manifest), rows in the manifest's file order: the rows a cached Ray dataset holds, in the same order."""
    manifest = load_manifest(cfg.path)
    shape = tuple(manifest["moments_shape"])
    drop_flipped = not cfg.use_flips and manifest["flip"]
    moments, labels = [], []
    for file in shard_files(cfg, manifest):
        table = read_training_table(file, ["label", "flip", "moments"])
        if drop_flipped:
            table = table.filter(pc.invert(table.column("flip")))
        moments.append(torch.from_numpy(moments_array(table.column("moments"), shape)))
        labels.append(torch.from_numpy(table.column("label").to_numpy().astype(np.int64)))
    return torch.cat(moments), torch.cat(labels), manifest


def sample_normalized(moments: torch.Tensor, channel_mean: torch.Tensor, channel_std: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, 2, C, h, w) moments -> (N, C, h, w) normalised latent sample, fp32."""
    moments = moments.float()
    mean, std = moments[:, 0], moments[:, 1]
    z = torch.randn(mean.shape, generator=generator, device=mean.device)
    # In place on the fresh noise tensor: this runs on every batch on the CPU when training there.
    z.mul_(std).add_(mean)
    return z.sub_(channel_mean.view(1, -1, 1, 1)).div_(channel_std.view(1, -1, 1, 1))


class LatentBatches:
    """Endless lists of ({"x0", "y"} micro-batch, loss weight), one list per optimizer step, for one
    worker; reproducible and resumable by step. `source`: this worker's dataset shard (streamed), the
    whole Ray dataset (in_memory), or the (moments, labels) tensors of `read_latents` (in memory)."""

    def __init__(self, source, *, plan: BatchPlan, rows: int, seed: int, shuffle_buffer: int,
                 codec: LatentCodec, device: torch.device, start_step: int = 0, in_memory: bool = False):
        self.source, self.plan, self.rank, self.seed = source, plan, plan.rank, seed
        self.share = plan.share(plan.rank)
        self.shuffle_buffer = shuffle_buffer
        if in_memory:
            self.steps_per_epoch = rows // plan.global_batch
        else:  # every worker streams an equal part of the rows and stops with the one that has the largest share
            self.steps_per_epoch = (rows // plan.world_size) // plan.share(0)
        if self.steps_per_epoch < 1:
            raise DataError(f"{rows} rows cannot fill one global batch of {plan.global_batch} "
                             f"over {plan.world_size} workers")
        self.mean = torch.tensor(codec.channel_mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(codec.channel_std, dtype=torch.float32, device=device)
        self.device = device
        self.step = start_step
        self.in_memory = in_memory

    def __iter__(self) -> Iterator[list[tuple[dict[str, torch.Tensor], float]]]:
        if self.in_memory:
            yield from self._iter_in_memory()
            return
        while True:
            epoch, skip = divmod(self.step, self.steps_per_epoch)
            batches = self.source.iter_torch_batches(
                batch_size=self.share, drop_last=True, device=self.device,
                local_shuffle_buffer_size=self.shuffle_buffer or None,
                local_shuffle_seed=derive_seed(self.seed, self.rank, "shuffle", epoch) % 2**32 if self.shuffle_buffer else None)
            for index, batch in enumerate(batches):
                if index < skip:
                    continue  # consumed before the checkpoint this run resumed from
                if index >= self.steps_per_epoch:
                    break
                yield self._micro_batches(batch["moments"], batch["label"])
            else:
                # The shard ran out early (uneven split): the epoch ends here on every worker alike.
                self.step = (epoch + 1) * self.steps_per_epoch

    def _micro_batches(self, moments: torch.Tensor, labels: torch.Tensor) -> list[tuple[dict[str, torch.Tensor], float]]:
        """This worker's share of one step, split into its micro-batches, z drawn from the posterior."""
        out, start = [], 0
        for i, size in enumerate(self.plan.micro_batches):
            g = generator(self.seed, self.rank, self.step, "posterior", *((i,) if i else ()), device=self.device)
            x0 = sample_normalized(moments[start:start + size].to(self.device), self.mean, self.std, g)
            out.append(({"x0": x0, "y": labels[start:start + size].to(self.device).long()}, self.plan.weight(size)))
            start += size
        self.step += 1
        return out

    def _iter_in_memory(self) -> Iterator[list[tuple[dict[str, torch.Tensor], float]]]:
        """Small (cached) datasets: read the whole dataset once, then each epoch take this worker's slice
        of every global batch of one seeded global order. Saves Ray Data's per-epoch start-up, which
        dominates when an epoch is a dozen steps (the digits)."""
        if isinstance(self.source, tuple):
            moments, labels = self.source
        else:
            parts = list(self.source.iter_torch_batches(batch_size=4096))
            moments = torch.cat([p["moments"] for p in parts])
            labels = torch.cat([p["label"] for p in parts])
        batch, offset = self.plan.global_batch, self.plan.offset
        while True:
            epoch, skip = divmod(self.step, self.steps_per_epoch)
            order = torch.randperm(len(labels), generator=generator(self.seed, "shuffle", epoch))
            for index in range(skip, self.steps_per_epoch):
                idx = order[index * batch + offset:index * batch + offset + self.share]
                yield self._micro_batches(moments[idx], labels[idx])
