"""DeepSpeed pieces: the engine config, the optimizer step, and access to the full parameters.

Master weights stay fp32 inside DeepSpeed (no DeepSpeed bf16 section): the main pass runs under torch
bf16 autocast on GPU, and the JVP keeps fp32 weights and inputs (method.md section 7). The optimizer is a
client `torch.optim.AdamW` (DeepSpeed's own Adam variants JIT-compile for ~40 s on CPU).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import torch
import torch.distributed as dist

from dumo_ray.config import Config
from dumo_ray.data.batch_plan import BatchPlan


def import_deepspeed(use_gpu: bool):
    """DS_ACCELERATOR must be set before the first import; the shm comm op (a 28 s JIT build on CPU)
    is switched off because gloo does the collectives."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def deepspeed_config(cfg: Config, plan: BatchPlan, load_universal: bool = False) -> dict[str, Any]:
    """`load_universal`: the checkpoint to load was converted to DeepSpeed's universal format (saved at
    another world size). DeepSpeed is given the plan's nominal micro-batch; the real (possibly uneven)
    shares are weighted in the loss (data.batch_plan)."""
    config: dict[str, Any] = {
        "train_batch_size": plan.nominal_micro_batch * plan.accumulation * plan.world_size,
        "train_micro_batch_size_per_gpu": plan.nominal_micro_batch,
        "gradient_accumulation_steps": plan.accumulation,
        "zero_optimization": {"stage": cfg.distributed.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.optim.grad_clip > 0:
        config["gradient_clipping"] = cfg.optim.grad_clip
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    return config


@contextlib.contextmanager
def full_parameters(engine, zero_stage: int):
    """All parameters materialised on this rank (ZeRO-3 partitions them; stages 1/2 keep full copies)."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            yield engine.module
    else:
        yield engine.module


def parameter_fingerprint(module: torch.nn.Module) -> torch.Tensor:
    """(sum, sum of squares) of every parameter in float64: equal on every rank iff the replicas agree."""
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for p in module.parameters():
            q = p.detach().double().cpu()
            total += torch.stack([q.sum(), q.pow(2).sum()])
    return total


def max_rank_difference(fingerprint: torch.Tensor) -> float:
    """Largest difference between any rank's fingerprint and rank 0's (0.0 when all agree)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return 0.0
    gathered = [torch.zeros_like(fingerprint) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, fingerprint)
    return float(max((g - gathered[0]).abs().max() for g in gathered))


class DeepSpeedStepper:
    """engine.backward + engine.step. A NaN/Inf loss on any rank skips the step on every rank (the ranks
    agree through an all-reduce); a non-finite gradient norm makes DeepSpeed's fp32 ZeRO optimizer skip
    the update itself, which we read back from the norm."""

    def __init__(self, engine):
        self.engine = engine

    def accumulate(self, loss: torch.Tensor) -> None:
        """A micro-batch before the last of a step: DeepSpeed adds its gradient and does not step yet."""
        self.engine.backward(loss)
        self.engine.step()

    def step(self, loss: torch.Tensor) -> tuple[float, bool]:
        if self.engine.gradient_accumulation_steps() == 1:
            # With accumulation the earlier micro-batches' gradients are already in; a bad loss is then
            # left to DeepSpeed's own overflow check on the gradient norm.
            finite = torch.isfinite(loss.detach()).float().reshape(1).cpu()
            if dist.is_initialized():
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if finite.item() == 0:
                return math.nan, False
        self.engine.backward(loss)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if norm is None:  # this ZeRO setting computes no norm; DeepSpeed's own overflow check still ran
            return math.nan, True
        norm = float(norm)
        return norm, math.isfinite(norm)
