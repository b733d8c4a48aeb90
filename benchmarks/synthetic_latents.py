"""A synthetic latent folder in the exact format `dumo-ray precompute` writes, for timing runs that need
no dataset (the GPU check's Ray Train section: DuMo-XL/2 on ImageNet-256-shaped latents).

    python benchmarks/synthetic_latents.py OUT [--rows 4096] [--shape 4 32 32] [--classes 1000] [--shard-size 2048]

Written by the precompute's own shard writer and manifest writer (checksummed Parquet shards, sidecars,
manifest.json with per-channel statistics, codec.json), so training reads it like any precompute.
Moments: mean ~ N(0, 1), std 0.05, float16 (16 KiB a row at 2 x 4 x 32 x 32); labels uniform. The VAE
id is 'none' (pixel-space semantics): nothing is ever decoded through a VAE, the sample grids show noise.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def write_synthetic_latents(output: str | Path, rows: int = 4096, shape: tuple[int, int, int] = (4, 32, 32),
                            classes: int = 1000, shard_size: int = 2048, seed: int = 0) -> dict:
    """Writes the folder; returns its manifest."""
    from dumo_ray.data.latents import shard_name
    from dumo_ray.data.precompute_stages import write_shard
    from dumo_ray.pipelines.precompute_latents import write_manifest

    if rows < 1 or classes < 1 or shard_size < 1:
        raise ValueError(f"rows ({rows}), classes ({classes}) and shard size ({shard_size}) must be >= 1")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    count = -(-rows // shard_size)
    names = {i: shard_name(i, count) for i in range(count)}
    for index in range(count):
        n = min(shard_size, rows - index * shard_size)
        mean = rng.standard_normal((n, 1, *shape), dtype=np.float32)
        moments = np.concatenate([mean, np.full_like(mean, 0.05)], axis=1).astype(np.float16)  # (n, 2, C, h, w)
        write_shard({"key": np.asarray([f"synthetic/{index:05d}-{i:06d}" for i in range(n)], dtype=object),
                     "label": rng.integers(0, classes, n), "flip": np.zeros(n, dtype=bool), "moments": moments,
                     "error": np.asarray([""] * n, dtype=object), "shard": np.full(n, index)}, str(output), names)
    geometry = {"id": "none", "config_hash": None, "scaling_factor": None, "latent_shape": list(shape)}
    settings = {"source_root": "synthetic", "resolution": shape[-1], "mode": "synthetic", "flip": False}
    return write_manifest(output, settings, geometry, [f"class{i:04d}" for i in range(classes)], names)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("output")
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--shape", type=int, nargs=3, default=[4, 32, 32], metavar=("C", "H", "W"))
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--shard-size", type=int, default=2048)
    args = p.parse_args()
    manifest = write_synthetic_latents(args.output, args.rows, tuple(args.shape), args.classes, args.shard_size)
    print(f"synthetic latents: {manifest['rows']:,} rows of {manifest['moments_shape']} in "
          f"{len(manifest['shards'])} shard(s), {manifest['num_classes']} classes -> {args.output}")


if __name__ == "__main__":
    main()
