"""The distributed backend: DeepSpeed ZeRO inside a Ray Train worker.

Every rank builds the same model (same seed) and wraps it in a DeepSpeed engine. Checkpoints: every rank
saves its ZeRO shard into a local temporary folder and reports it; Ray merges them into one checkpoint in
`storage_path/name` (rank 0 adds the common files of train.backend). A checkpoint saved by another number
of workers (a node was lost or added) is resharded through DeepSpeed's universal format, converted once
per node. DeepSpeed unpickles its shards with weights_only=False; here every such load runs weights-only
(train.checkpoint.restricted_unpickling), so a tampered checkpoint is refused rather than run.
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from dumo_ray.config import Config
from dumo_ray.console import say
from dumo_ray.data.batch_plan import BatchPlan, workers_phrase
from dumo_ray.train.checkpoint import deepspeed_safe_globals, restricted_unpickling
from dumo_ray.train.deepspeed_engine import (DeepSpeedStepper, deepspeed_config, full_parameters, import_deepspeed,
                                             max_rank_difference, parameter_fingerprint)
from dumo_ray.train.devices import resolve_precision
from dumo_ray.train.reshard import saved_world_size, universal_copy_on_node

DS_TAG = "deepspeed"


def load_engine_checkpoint(engine, load_dir: Path) -> None:
    """DeepSpeed's own load of the ZeRO shards in `load_dir`/deepspeed, weights-only: UnsafeCheckpointError
    naming the file when one holds anything but tensors, plain containers and DeepSpeed's plain-data classes."""
    with restricted_unpickling(load_dir, deepspeed_safe_globals()):
        engine.load_checkpoint(str(load_dir), tag=DS_TAG)


def worker_nodes(world: int) -> list[str]:
    """The Ray node id of every rank, in rank order (recorded in each checkpoint's state.json)."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if world == 1 or not dist.is_initialized():
        return [node]
    nodes: list = [None] * world
    dist.all_gather_object(nodes, node)
    return nodes


class DeepSpeedBackend:
    def __init__(self, cfg: Config, use_gpu: bool):
        import ray.train
        import ray.train.torch

        self.cfg = cfg
        self.context = ray.train.get_context()
        self.rank, self.world = self.context.get_world_rank(), self.context.get_world_size()
        self.local_rank = self.context.get_local_rank()
        self.device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
        torch.set_num_threads(max(1, int(cfg.distributed.cpus_per_worker)))
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.deepspeed = import_deepspeed(use_gpu)
        self.zero_stage = cfg.distributed.zero_stage
        self.plan = BatchPlan(cfg.optim.batch_size, self.world, self.rank, cfg.optim.micro_batch_size)
        self.nodes = worker_nodes(self.world)

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Path | None) -> nn.Module:
        with contextlib.ExitStack() as stack:
            load_dir, saved_world = checkpoint, self.world
            if checkpoint is not None:
                saved_world = saved_world_size(checkpoint / DS_TAG)
                if saved_world != self.world:
                    load_dir = self._universal_copy(stack, checkpoint, saved_world)
            self.engine, _, _, _ = self.deepspeed.initialize(
                model=model, optimizer=optimizer,
                config=deepspeed_config(self.cfg, self.plan, load_universal=saved_world != self.world))
            if checkpoint is not None:
                load_engine_checkpoint(self.engine, Path(load_dir))
        self.stepper = DeepSpeedStepper(self.engine)
        # ZeRO-3's parameters are gathered by hooks around the engine's forward; stages 1 and 2 keep whole
        # parameters, so the objective differentiates the module itself (what torch.compile traces too).
        return self.engine if self.zero_stage == 3 else self.engine.module

    def _universal_copy(self, stack: contextlib.ExitStack, checkpoint: Path, saved_world: int) -> Path:
        import ray

        load_dir, seconds = stack.enter_context(universal_copy_on_node(
            checkpoint / DS_TAG, f"{self.checkpoint_path}|{self.world}", converts=self.local_rank == 0))
        if seconds is not None:
            say(f"node {ray.get_runtime_context().get_node_id()[:8]}: ZeRO state converted to DeepSpeed's universal "
                f"format in {seconds:.1f} s for the node's {workers_phrase(self.context.get_local_world_size())}")
        if self.rank == 0:
            before = BatchPlan(self.cfg.optim.batch_size, saved_world, 0, self.cfg.optim.micro_batch_size)
            say(f"worker count changed {saved_world} -> {self.world}: {before.describe()} becomes "
                f"{self.plan.describe()}; ZeRO state resharded from DeepSpeed's universal format")
        return load_dir

    def accumulate(self, loss: torch.Tensor) -> None:
        self.stepper.accumulate(loss)

    def step(self, loss: torch.Tensor) -> tuple[float, bool]:
        return self.stepper.step(loss)

    @contextlib.contextmanager
    def full_parameters(self) -> Iterator[nn.Module]:
        with full_parameters(self.engine, self.zero_stage) as module:
            yield module

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        # The storage path names the checkpoint alike on every worker of a node (the key of the one
        # universal conversion per node); the local view may be a per-process download.
        self.checkpoint_path = checkpoint.path
        with checkpoint.as_directory() as directory:
            yield Path(directory)

    def save_checkpoint(self, images: int, write_common, metrics: dict[str, float]) -> None:
        import ray.train

        with tempfile.TemporaryDirectory() as directory:
            self.engine.save_checkpoint(directory, tag=DS_TAG)
            if self.rank == 0:
                write_common(Path(directory))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    def replica_difference(self) -> float:
        with self.full_parameters() as module:
            return max_rank_difference(parameter_fingerprint(module))

    def report(self, metrics: dict[str, float]) -> None:
        import ray.train

        ray.train.report(metrics)

    def describe(self) -> str:
        nodes = self.nodes
        placement = ", ".join(f"{node[:8]} x {nodes.count(node)}" for node in sorted(set(nodes)))
        return (f"{workers_phrase(self.world)} on {len(set(nodes))} node(s): {placement} | {self.plan.describe()} "
                f"| DeepSpeed ZeRO-{self.zero_stage}")
