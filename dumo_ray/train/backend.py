"""The seam between the one training loop (`train.loop.training_loop`) and what runs it.

A `Backend` owns the engine (plain torch in one process, or DeepSpeed ZeRO inside a Ray Train worker):
it wraps model and optimizer, applies a step, gathers full parameters, and saves and finds checkpoints.
The loop owns everything else, the same for both: data position, EMA, evaluation, MLflow, grids, export.

Every checkpoint is one directory with the same files whatever the backend:
    ema.safetensors   the EMA weights (what sampling uses)
    state.json        step, images, world size, nodes, MLflow run id
    config.yaml       the resolved config of the run
    latents.json      the latent codec (how model space decodes to images)
plus the backend's own engine state (model + optimizer: `engine/`, or DeepSpeed's ZeRO shards:
`deepspeed/`). A checkpoint directory is also something `dumo-ray sample --checkpoint` reads.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, ContextManager, Iterator, Protocol

import torch
import torch.nn as nn

from dumo_ray.config import Config, load_config, save_config
from dumo_ray.data.codec import CODEC_FILE, LatentCodec

EMA_FILE = "ema.safetensors"
STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"


class Backend(Protocol):
    rank: int
    world: int
    local_rank: int
    device: torch.device
    precision: str  # fp32 | bf16 (autocast of the main pass)

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Path | None) -> nn.Module:
        """Wrap model and optimizer in the engine, loading the engine state of `checkpoint` when given.
        Returns the module the objective differentiates (never the engine itself)."""

    def accumulate(self, loss: torch.Tensor) -> None:
        """Backward of a micro-batch before the last of a step (gradient accumulation)."""

    def step(self, loss: torch.Tensor) -> tuple[float, bool]:
        """Backward of the last micro-batch and the optimizer step: (gradient norm, applied?)."""

    def full_parameters(self) -> ContextManager[nn.Module]:
        """The trained module with every parameter present on this rank (for the EMA)."""

    def latest_checkpoint(self) -> ContextManager[Path | None]:
        """A local directory view of the newest checkpoint of this run, or None for a fresh start."""

    def save_checkpoint(self, images: int, write_common: Any, metrics: dict[str, float]) -> None:
        """Save the engine state and, on rank 0, `write_common(directory)`'s files into one checkpoint
        (every rank calls it)."""

    def replica_difference(self) -> float:
        """Largest difference between the ranks' parameters (0.0: the replicas agree)."""

    def report(self, metrics: dict[str, float]) -> None:
        """Metrics for the launcher (Ray Train's results, which a Tune scheduler reads)."""

    def describe(self) -> str:
        """One line: workers, nodes, batch plan, engine."""


def write_common_files(directory: Path, *, ema_state: dict[str, torch.Tensor], state: dict[str, Any],
                       cfg: Config, codec: LatentCodec) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in ema_state.items()}, directory / EMA_FILE)
    (directory / STATE_FILE).write_text(json.dumps(state))
    save_config(cfg, directory / CONFIG_FILE)
    codec.save(directory / CODEC_FILE)


def read_state(directory: Path) -> dict[str, Any]:
    return json.loads((directory / STATE_FILE).read_text())


def read_ema(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(directory / EMA_FILE)


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / EMA_FILE).is_file() and (Path(path) / CONFIG_FILE).is_file()


def load_checkpoint_info(directory: str | Path) -> tuple[Config, LatentCodec | None]:
    directory = Path(directory)
    codec = LatentCodec.load(directory / CODEC_FILE) if (directory / CODEC_FILE).is_file() else None
    return load_config(directory / CONFIG_FILE, saved=True), codec


@contextlib.contextmanager
def no_checkpoint() -> Iterator[None]:
    yield None
