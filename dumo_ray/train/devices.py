"""Device and precision choices: what `auto` means on this machine."""
from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """auto: bf16 on CUDA (the main pass under autocast; the JVP stays fp32), fp32 elsewhere."""
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return name


def autocast(precision: str, device: torch.device):
    """bf16 autocast for the main pass; the JVP and its target switch it off (fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
