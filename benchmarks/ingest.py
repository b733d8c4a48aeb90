"""Parquet latents -> training batches through Ray Data, in latents per second per CPU core.

    python benchmarks/ingest.py [--rows 32768] [--cpus 2] [--micro-batch 256] [--batches 100]

Writes synthetic ImageNet-256-shaped shards (posterior moments 2 x 4 x 32 x 32 in float16, 16 KiB a row,
the format `dumo-ray precompute` writes) and reads them the way a training worker does: `latent_dataset`
-> a Ray Data iterator -> `LatentBatches` (seeded local shuffle, posterior sample, normalisation), in
three modes: streaming from Parquet with the shuffle buffer, streaming without it, and the in-memory
cache used for small sets. One more streaming row stops at the torch batches of moments: that is all a
GPU worker's CPU does, since it draws the posterior sample on the GPU. Baseline: plain pyarrow reading
the same files in one process. The timed batches lie within one epoch (an epoch restart is Ray Data
start-up, not throughput). Latents/s per core divides by the CPUs Ray was given. Goal (issue 8): >= 20,000
latents/s per core.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from report import report  # benchmarks/report.py (the script's folder is on sys.path)

import numpy as np


def write_shards(root: Path, rows: int, per_shard: int = 4096, shape=(2, 4, 32, 32)) -> dict:
    from dumo_ray.data.latents import MANIFEST, SCHEMA_VERSION, moments_table, shard_name, write_shard_table

    rng = np.random.default_rng(0)
    count = -(-rows // per_shard)
    shards = []
    for index in range(count):
        n = min(per_shard, rows - index * per_shard)
        moments = rng.normal(size=(n, *shape)).astype(np.float16)
        table = moments_table([f"k{index}-{i}" for i in range(n)], rng.integers(0, 1000, n), np.zeros(n, bool), moments)
        name = shard_name(index, count)
        write_shard_table(table, root / name)
        shards.append({"file": name, "rows": n, "images": n, "sha256": ""})
    manifest = {"schema_version": SCHEMA_VERSION, "rows": rows, "images": rows, "flip": False, "shards": shards, "num_classes": 1000,
                "latent_shape": list(shape[1:]), "moments_shape": list(shape), "vae": {"id": "synthetic"},
                "latent_stats": {"mean": [0.0] * shape[1], "std": [1.0] * shape[1]}}
    (root / MANIFEST).write_text(json.dumps(manifest))
    return manifest


def time_batches(batches, count: int, micro_batch: int) -> float:
    iterator = iter(batches)
    next(iterator)  # start-up (first block read, pipeline spin-up) is not throughput
    started = time.perf_counter()
    for _ in range(count):
        next(iterator)
    return count * micro_batch / (time.perf_counter() - started)


def ray_rate(root: Path, manifest: dict, *, cache: str, shuffle_buffer: int, micro_batch: int, batches: int,
             sample: bool = True) -> float:
    import torch

    from dumo_ray.config import DataConfig
    from dumo_ray.data.loader import LatentBatches, latent_dataset
    from dumo_ray.data.batch_plan import BatchPlan

    cfg = DataConfig(path=str(root), cache=cache, shuffle_buffer=shuffle_buffer)
    ds, _, rows, cached = latent_dataset(cfg)
    if not sample:
        return time_batches(ds.iterator().iter_torch_batches(batch_size=micro_batch, drop_last=True), batches, micro_batch)
    channels = manifest["latent_shape"][0]
    loader = LatentBatches(ds.iterator(), plan=BatchPlan(micro_batch, 1, 0), rows=rows, seed=0,
                           shuffle_buffer=shuffle_buffer, channel_mean=torch.zeros(channels),
                           channel_std=torch.ones(channels), device=torch.device("cpu"), in_memory=cached)
    return time_batches(loader, batches, micro_batch)


def pyarrow_rate(root: Path, manifest: dict) -> float:
    from dumo_ray.data.latents import read_shard

    started = time.perf_counter()
    total = sum(len(read_shard(root / s["file"])["label"]) for s in manifest["shards"])
    return total / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=32768)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=256)
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if (args.batches + 1) * args.micro_batch > args.rows:
        p.error(f"--batches {args.batches} + 1 of {args.micro_batch} do not fit in one epoch of --rows {args.rows}")

    import ray
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="dumo-ingest-") as tmp:
        root = Path(tmp)
        manifest = write_shards(root, args.rows)
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        rows = []
        try:
            for label, cache, buffer, sample in [
                    ("Ray Data, streaming, shuffle buffer 4096", "never", 4096, True),
                    ("Ray Data, streaming, no shuffle buffer", "never", 0, True),
                    ("Ray Data, streaming, torch batches of moments (no posterior sample)", "never", 0, False),
                    ("Ray Data, in-memory cache", "always", 4096, True)]:
                rate = ray_rate(root, manifest, cache=cache, shuffle_buffer=buffer, micro_batch=args.micro_batch,
                                batches=args.batches, sample=sample)
                rows.append({"path": label, "latents_per_s": rate, "per_core": rate / args.cpus})
        finally:
            ray.shutdown()
        rate = pyarrow_rate(root, manifest)
        rows.append({"path": "plain pyarrow read (1 process, no batching)", "latents_per_s": rate, "per_core": rate})

    report(f"{args.rows:,} rows of 2x4x32x32 float16 moments, micro-batch {args.micro_batch}, "
           f"{args.batches} batches timed, Ray with {args.cpus} CPUs", rows, ["path", "latents_per_s", "per_core"],
           args.json, vars(args))


if __name__ == "__main__":
    main()
