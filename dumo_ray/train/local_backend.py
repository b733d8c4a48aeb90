"""The single-process backend: plain PyTorch on this machine's device, no Ray and no DeepSpeed (for
debugging, and for the small runs of the benchmarks). Checkpoints live in
`<run_dir>/checkpoints/images_<N>/` (train.checkpoint: written atomically, the newest `keep` kept)."""
from __future__ import annotations

import contextlib
import math
import socket
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from dumo_ray.config import Config
from dumo_ray.data.batch_plan import BatchPlan
from dumo_ray.train.checkpoint import latest_checkpoint, save_checkpoint
from dumo_ray.train.devices import resolve_device, resolve_precision

ENGINE_DIR = "engine"  # model.safetensors + optimizer.pt


class LocalBackend:
    rank, world, local_rank = 0, 1, 0

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.plan = BatchPlan(cfg.optim.batch_size, 1, 0, cfg.optim.micro_batch_size)
        self.run_dir = Path(cfg.run_dir)
        self.nodes = [socket.gethostname()]

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Path | None) -> nn.Module:
        from safetensors.torch import load_file

        self.model, self.optimizer = model, optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        if checkpoint is not None:
            model.load_state_dict(load_file(checkpoint / ENGINE_DIR / "model.safetensors", device=str(self.device)))
            optimizer.load_state_dict(torch.load(checkpoint / ENGINE_DIR / "optimizer.pt", map_location=self.device,
                                                 weights_only=True))
        return model

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss weights of data.batch_plan assume DeepSpeed's division by the accumulation steps."""
        return loss / self.plan.accumulation if self.plan.accumulation > 1 else loss

    def accumulate(self, loss: torch.Tensor) -> None:
        self.scaled(loss).backward()

    def step(self, loss: torch.Tensor) -> tuple[float, bool]:
        """Backward, clip, step; a NaN/Inf loss or gradient norm skips the update (and its gradients)."""
        if not torch.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            return math.nan, False
        self.scaled(loss).backward()
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        applied = math.isfinite(grad_norm)
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, applied

    @contextlib.contextmanager
    def full_parameters(self) -> Iterator[nn.Module]:
        yield self.model

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        yield latest_checkpoint(self.run_dir)

    def save_checkpoint(self, images: int, write_common, metrics: dict[str, float]) -> None:
        from safetensors.torch import save_file

        def write(directory: Path) -> None:
            engine = directory / ENGINE_DIR
            engine.mkdir()
            save_file({k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}, engine / "model.safetensors")
            torch.save(self.optimizer.state_dict(), engine / "optimizer.pt")
            write_common(directory)

        save_checkpoint(self.run_dir, images, write, keep=self.cfg.train.keep_checkpoints)

    def replica_difference(self) -> float:
        return 0.0

    def report(self, metrics: dict[str, float]) -> None:
        pass  # one process: the loop's status lines and metrics.jsonl are the record

    def describe(self) -> str:
        return f"one process | {self.plan.describe()} | plain PyTorch"
