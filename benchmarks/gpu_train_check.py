"""The single-process launcher on the GPU path: the digits run with device/precision 'auto' must pick
CUDA + bf16, train both heads (JVP in fp32 under the bf16 main pass) and reach a sane FD-digits. The digits
latent folder is written first if missing (Ray Data: on the lent GPU machine, install the carried bundle
of ../shared/tools/gpu-bundle.sh first).

    python benchmarks/gpu_train_check.py [--steps 1500] [--out DIR]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from report import report  # benchmarks/report.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--out", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import torch

    from digits_data import digits_latent_folder  # benchmarks/digits_data.py

    from dumo_ray.config import load_config
    from dumo_ray.train.devices import resolve_device, resolve_precision
    from dumo_ray.train.launch import train_local

    total = args.steps * 128
    storage = args.out or tempfile.mkdtemp(prefix="dumo-gpu-")
    cfg = load_config(ROOT / "configs/digits_local.yaml", [
        f"data.path={digits_latent_folder()}", "tracking.enabled=false", f"train.total_images={total}", f"train.log_every_images={total // 5 // 128 * 128}",
        f"train.checkpoint_every_images={total}", f"train.storage_path={storage}", "eval.every_images=0",
        "eval.steps=[1, 2]"])
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    print(f"# auto-selected device {device}, precision {precision}")
    start = time.perf_counter()
    summary = train_local(cfg)
    seconds = time.perf_counter() - start
    row = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU", "precision": precision,
           "steps": args.steps, "seconds": seconds, **{k: v for k, v in summary.items() if k.startswith(("fd_", "accuracy_"))}}
    report("digits, DuMo-Tiny/2, batch 128, single-process launcher", [row], list(row), args.json, vars(args))
    if device.type == "cuda" and precision != "bf16":
        sys.exit("expected bf16 on CUDA")


if __name__ == "__main__":
    main()
