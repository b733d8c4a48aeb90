"""`train_loop_per_worker`: what every Ray Train worker runs, a thin adapter in the shape of Ray's own
examples. The config and the latent codec arrive from the launcher (train.launch); the worker's DeepSpeed
backend and its dataset shard go into the one training loop (train.loop)."""
from __future__ import annotations

from typing import Any

from dumo_ray.config import config_from_dict
from dumo_ray.data.codec import LatentCodec
from dumo_ray.data.loader import LatentBatches
from dumo_ray.train.deepspeed_backend import DeepSpeedBackend
from dumo_ray.train.loop import training_loop


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train

    cfg = config_from_dict(loop_config["config"])
    codec = LatentCodec.from_dict(loop_config["codec"])
    backend = DeepSpeedBackend(cfg, use_gpu=bool(loop_config["use_gpu"]))

    def batches_from(step: int):
        # A cached (small) dataset is held whole by every worker, which takes its slice of each global
        # batch; a large one streams from this worker's shard (data.loader).
        return iter(LatentBatches(
            ray.train.get_dataset_shard("train"), plan=backend.plan, rows=loop_config["rows"], seed=cfg.train.seed,
            shuffle_buffer=cfg.data.shuffle_buffer, codec=codec, device=backend.device, start_step=step,
            in_memory=loop_config["cached"]))

    training_loop(cfg, backend, codec, batches_from)
