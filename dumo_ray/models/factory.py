"""The model a config describes, initialised from the run's seed (every rank builds the same replica)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from dumo_ray.models.dit import build_model
from dumo_ray.seeding import derive_seed

if TYPE_CHECKING:
    from dumo_ray.config import Config


def build_model_from_config(cfg: "Config") -> nn.Module:
    m = cfg.model
    # Same seed on every rank: the replicas start identical. The caller's global RNG is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.train.seed, "init"))
        return build_model(m.preset, input_size=m.input_size, in_channels=m.in_channels, num_classes=m.num_classes,
                           head_depth=m.head_depth, time_scale=m.time_scale)
