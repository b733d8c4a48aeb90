"""Latent precompute throughput: the Ray Data pipeline vs a plain single-process loop, same images,
same VAE, same CPUs.

    python benchmarks/precompute.py [--images 96] [--resolution 128] [--vae sd|tiny] [--cpus 2]
    python benchmarks/precompute.py --tree data/fashion --vae none --grayscale --resolution 32 --shard-size 5000

The VAE has SD-VAE's architecture (diffusers AutoencoderKL, 83M parameters) with random weights (no
download is possible here; the compute is the same); `--vae none` keeps pixels, as the digits and
Fashion-MNIST runs do. `--tree` reads a real image tree (all of it) instead of random JPEGs. Prints a table
and writes JSON (--json).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from report import report  # benchmarks/report.py (the script's folder is on sys.path)

import numpy as np
import torch
from PIL import Image

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=256)
TINY_VAE = dict(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, sample_size=32)


def make_images(root: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size * 5 // 4, 3), dtype=np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def plain_loop(root: Path, out: Path, vae_path: str | None, resolution: int, batch: int, mode: str = "RGB") -> float:
    """The baseline a user would write: one process, decode + crop, encode, write one Parquet file."""
    from dumo_ray.data.images import list_image_tree, load_image
    from dumo_ray.data.latents import moments_table
    from dumo_ray.vae import encode_moments, load_vae
    import pyarrow.parquet as pq

    start = time.perf_counter()
    vae = load_vae(vae_path) if vae_path else None
    records, _ = list_image_tree(root)
    keys, labels, moments = [], [], []
    for i in range(0, len(records), batch):
        chunk = records[i:i + batch]
        pixels = np.stack([load_image(root / r.key, resolution, mode)[0] for r in chunk])
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
        mean, std = encode_moments(vae, x) if vae is not None else (x, torch.zeros_like(x))
        moments.append(torch.stack([mean, std], 1).numpy())
        keys += [r.key for r in chunk]
        labels += [r.label for r in chunk]
    pq.write_table(moments_table(keys, np.asarray(labels), np.zeros(len(keys), bool), np.concatenate(moments)), out / "all.parquet")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--vae", choices=["sd", "tiny", "none"], default="sd")
    p.add_argument("--tree", default=None, help="an existing image tree to read instead of --images random JPEGs")
    p.add_argument("--grayscale", action="store_true", help="one channel (with --vae none)")
    p.add_argument("--shard-size", type=int, default=None)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--encoders", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import ray
    from diffusers import AutoencoderKL

    from dumo_ray.pipelines.precompute_latents import precompute_latents

    from dumo_ray.data.images import list_image_tree
    from dumo_ray.data.latents import load_manifest

    mode = "L" if args.grayscale else "RGB"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = Path(args.tree) if args.tree else tmp / "images"
        if not args.tree:
            make_images(images, args.images, args.resolution * 2)
        count = len(list_image_tree(images)[0])
        vae = None
        if args.vae != "none":
            torch.manual_seed(0)
            AutoencoderKL(**(SD_VAE if args.vae == "sd" else TINY_VAE)).save_pretrained(tmp / "vae")
            vae = str(tmp / "vae")
        (tmp / "plain").mkdir()
        plain_s = plain_loop(images, tmp / "plain", vae, args.resolution, args.batch, mode)
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            start = time.perf_counter()
            precompute_latents(str(images), str(tmp / "ray"), vae=vae, resolution=args.resolution, mode=mode,
                               batch_size=args.batch, shard_size=args.shard_size or max(1, count // 4),
                               num_encoders=args.encoders)
            ray_s = time.perf_counter() - start
        finally:
            ray.shutdown()
        manifest = load_manifest(tmp / "ray")
    rows = [{"method": "plain single-process loop", "rows": count, "shards": 1, "seconds": plain_s,
             "images_per_s": count / plain_s},
            {"method": f"Ray Data pipeline ({args.cpus} CPUs)", "rows": manifest["rows"], "shards": len(manifest["shards"]),
             "seconds": ray_s, "images_per_s": count / ray_s}]
    source = args.tree or "random JPEGs"
    report(f"{count:,} images ({source}) -> {args.resolution}px crops -> {args.vae} VAE latents, torch threads "
           f"{torch.get_num_threads()}", rows, ["method", "rows", "shards", "seconds", "images_per_s"], args.json, vars(args))


if __name__ == "__main__":
    main()
