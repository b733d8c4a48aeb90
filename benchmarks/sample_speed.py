"""Sampling throughput of the EMA network alone (latents out, no VAE decode): images/s at 1, 2 and 4
steps of the u-head and 50 Euler steps of the v-head, in fp32 and, on CUDA, under bf16 autocast.

    python benchmarks/sample_speed.py                    # DuMo-XL/2, ImageNet-256 latents, chunk 256
    python benchmarks/sample_speed.py --preset DuMo-S/2 --input-size 16 --classes 10 --chunk 64
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

from bench_model import add_model_arguments, bench_device, build_bench_model  # benchmarks/ is on sys.path
from report import report

from dumo_ray.flow.sampler import sample_plan, sample_in_chunks

SETTINGS = [("u", 1), ("u", 2), ("u", 4), ("euler", 50)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(p)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--images", type=int, default=None, help="images per setting (default: 2 chunks)")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    device = bench_device()
    model = build_bench_model(args, device).eval()
    images = args.images or 2 * args.chunk
    labels, seeds = sample_plan(range(images), range(args.classes), seed=0, purpose="bench")
    precisions = ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]
    rows = []
    for precision in precisions:
        amp = (torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext())
        for method, steps in SETTINGS:
            with amp:
                sample_in_chunks(model, labels[: args.chunk], seeds[: args.chunk], chunk=args.chunk, steps=steps,
                                 method=method)  # warm-up: kernels chosen, memory pooled
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                sample_in_chunks(model, labels, seeds, chunk=args.chunk, steps=steps, method=method)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            rows.append({"precision": precision, "sampler": f"{method} x{steps}", "images_per_s": images / seconds,
                         "ms_per_chunk": 1000 * seconds / (images / args.chunk)})
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    report(f"sampling {args.preset}, {images} images per setting in chunks of {args.chunk}, {name}", rows,
           ["precision", "sampler", "images_per_s", "ms_per_chunk"], args.json, {**vars(args), "device": name})


if __name__ == "__main__":
    main()
