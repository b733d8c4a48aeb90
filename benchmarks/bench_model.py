"""The model the GPU-path benchmarks time: the same command-line options and set-up in each script
(DuMo-XL/2 on ImageNet-256 latents by default, on CUDA when there is one, TF32 matmuls allowed)."""
from __future__ import annotations

import argparse

import torch

from dumo_ray.models import build_model


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="DuMo-XL/2")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--classes", type=int, default=1000)


def bench_device() -> torch.device:
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda")
    return torch.device("cpu")


def build_bench_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(args.preset, input_size=args.input_size, in_channels=args.channels,
                       num_classes=args.classes).to(device)
