"""The two launchers of `dumo-ray train`, around the one training loop (train.loop):

- `fit`: builds and runs the Ray Train `TorchTrainer` (Train V2); every worker runs DeepSpeed ZeRO.
- `train_local`: this process, plain PyTorch, no Ray (for debugging and small runs).

Both read the same Parquet latents through `LatentBatches`. Rerunning the same command (same
`train.storage_path` and `train.name`) resumes the run from its latest checkpoint. Ray Train restarts
failed workers (`distributed.max_failures`), but not after a DeterministicError (FailFastPolicy).
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from dumo_ray.config import Config, ConfigError, save_config
from dumo_ray.errors import FailFastPolicy
from dumo_ray.data.codec import LatentCodec
from dumo_ray.data.loader import LatentBatches, latent_dataset, read_latents
from dumo_ray.eval.in_training import check_eval_inputs
from dumo_ray.tracking import SQLITE_PREFIX, sqlite_file


def storage_uri(path: str) -> str:
    """Ray wants an absolute local path or a URI (s3://, gs://, ...)."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def absolute_paths(cfg: Config) -> Config:
    """Ray Train workers run in their own working directory: relative paths (the run's storage, a
    sqlite MLflow store, the latent folder) are resolved here, against the directory of the command."""
    uri, database = cfg.tracking.uri, sqlite_file(cfg.tracking.uri)
    if database is not None and not database.is_absolute():
        uri = SQLITE_PREFIX + str(database.resolve())
    data_path = cfg.data.path if "://" in cfg.data.path or not cfg.data.path else str(Path(cfg.data.path).resolve())
    return replace(cfg, train=replace(cfg.train, storage_path=storage_uri(cfg.train.storage_path)),
                   tracking=replace(cfg.tracking, uri=uri), data=replace(cfg.data, path=data_path))


def check_against_manifest(cfg: Config, manifest: dict[str, Any]) -> None:
    c, h, w = manifest["latent_shape"]
    m = cfg.model
    if (m.in_channels, m.input_size, m.num_classes) != (c, h, manifest["num_classes"]):
        raise ConfigError(f"model (in_channels {m.in_channels}, input_size {m.input_size}, num_classes {m.num_classes}) "
                          f"does not match the latents in {cfg.data.path} ({c} channels, {h}x{w}, "
                          f"{manifest['num_classes']} classes): set model.in_channels={c} model.input_size={h} "
                          f"model.num_classes={manifest['num_classes']}")


def save_run_config(cfg: Config) -> None:
    """The resolved config next to the run (every checkpoint holds it too)."""
    if "://" not in cfg.run_dir:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.run_dir) / "config.yaml")


def train_local(cfg: Config) -> dict[str, Any]:
    """One process, plain PyTorch: the whole latent folder in memory (read with pyarrow, no Ray), the
    same global batch order as a cached dataset on Ray. Returns the run's summary."""
    from dumo_ray.train.local_backend import LocalBackend
    from dumo_ray.train.loop import training_loop

    check_eval_inputs(cfg)
    moments, labels, manifest = read_latents(cfg.data)
    check_against_manifest(cfg, manifest)
    codec = LatentCodec.from_manifest(manifest, cfg.data.normalize, cfg.data.latent_scale)
    save_run_config(cfg)
    backend = LocalBackend(cfg)

    def batches_from(step: int):
        return iter(LatentBatches((moments, labels), plan=backend.plan, rows=len(labels), seed=cfg.train.seed,
                                  shuffle_buffer=0, codec=codec, device=backend.device, start_step=step, in_memory=True))

    return training_loop(cfg, backend, codec, batches_from)


def fail_fast(trainer_cls):
    """`trainer_cls` (a Ray Train V2 trainer) with FailFastPolicy as its failure policy. Ray Train has no
    public setting for it: its trainers hand their controller a policy through `_initialize_and_run_controller`
    (Ray 2.50 to 2.60 at least), which this replaces. Should that change, the run keeps Ray's own policy
    (tests/test_fail_fast.py then fails)."""

    class FailFastTrainer(trainer_cls):
        def _initialize_and_run_controller(self, **controller_init_kwargs):
            if "failure_policy" in controller_init_kwargs:
                controller_init_kwargs["failure_policy"] = FailFastPolicy(self.run_config.failure_config)
            return super()._initialize_and_run_controller(**controller_init_kwargs)

    return FailFastTrainer


def fit(cfg: Config, callbacks: list | None = None):
    """Starts (or connects to) Ray, runs the trainer, returns Ray Train's Result. `callbacks`: Ray Train
    callbacks (a sweep passes the one that forwards evaluations to Tune)."""
    import ray
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dumo_ray.train.loop import FAIL_ONCE_ENV
    from dumo_ray.train.worker import train_loop_per_worker

    cfg = absolute_paths(cfg)
    check_eval_inputs(cfg)
    if not ray.is_initialized():
        ray.init(address=cfg.distributed.address)
    # Our status lines are the progress output; Ray Data's per-epoch bars would bury them.
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds, manifest, rows, cached = latent_dataset(cfg.data)
    check_against_manifest(cfg, manifest)
    d = cfg.distributed
    use_gpu = d.use_gpu if d.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    resources = {"CPU": d.cpus_per_worker, **({"GPU": d.gpus_per_worker} if use_gpu else {}), **d.worker_resources}
    codec = LatentCodec.from_manifest(manifest, cfg.data.normalize, cfg.data.latent_scale)
    save_run_config(cfg)
    trainer = fail_fast(TorchTrainer)(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "rows": rows, "cached": cached, "codec": codec.to_dict(),
                           "use_gpu": use_gpu},
        scaling_config=ScalingConfig(num_workers=(d.min_workers, d.max_workers) if d.elastic else d.max_workers,
                                     use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=d.placement_strategy,
                                     elastic_resize_monitor_interval_s=d.elastic_resize_interval_s),
        run_config=RunConfig(name=cfg.train.name, storage_path=cfg.train.storage_path,
                             # A test's fault drill set in this process reaches the workers, whatever Ray
                             # cluster they run on (job-level env vars were fixed when Ray started).
                             worker_runtime_env={"env_vars": {FAIL_ONCE_ENV: os.environ[FAIL_ONCE_ENV]}}
                             if os.environ.get(FAIL_ONCE_ENV) else None,
                             failure_config=FailureConfig(max_failures=d.max_failures), callbacks=callbacks,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)),
        datasets={"train": ds},
        # Deterministic block order, so each worker's shard (and its seeded shuffle) repeats exactly. A cached
        # dataset is not split: every worker holds it whole and takes its slice of each global batch, so
        # the data order does not depend on the number of workers (data/loader.py).
        dataset_config=DataConfig(datasets_to_split=[] if cached else "all",
                                  execution_options=ExecutionOptions(preserve_order=True)),
    )
    return trainer.fit()
