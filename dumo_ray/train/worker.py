"""`train_loop_per_worker`: the issue-2 loop inside a Ray Train worker, on a DeepSpeed ZeRO engine.

Every rank: build the same model (same seed), wrap it in DeepSpeed, resume from Ray Train's latest
checkpoint if there is one, stream latent batches from its dataset shard, and run `run_steps`. Rank 0
also owns the MLflow run, the sample grids and the final EMA export. Checkpoints: every rank saves its
DeepSpeed shard into a local temporary folder and reports it; Ray merges them into one checkpoint in
`storage_path/name`. Rank 0 adds the EMA weights (safetensors) and `state.json` (step, images, MLflow
run id). Data position, time/noise draws and posterior samples derive from (seed, rank, step), so a
restart repeats nothing and skips nothing after its checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from dumo_ray.config import config_from_dict
from dumo_ray.console import say
from dumo_ray.data.loader import LatentBatches
from dumo_ray.eval.in_training import TrainingEvaluator, format_scores
from dumo_ray.export import export_ema
from dumo_ray.flow import build_objective
from dumo_ray.models import count_parameters
from dumo_ray.train.deepspeed_engine import (DeepSpeedStepper, deepspeed_config, full_parameters, import_deepspeed,
                                             max_rank_difference, parameter_fingerprint)
from dumo_ray.train.batch_plan import BatchPlan, workers_phrase
from dumo_ray.train.ema import EMA
from dumo_ray.train.loop import (Progress, StatusLine, build_model_from_config, build_optimizer,
                                 evaluation_due, resolve_precision, round_to_batch, run_steps, write_sample_grids)
from dumo_ray.train.reshard import saved_world_size, universal_copy_on_node
from dumo_ray.vae import LatentDecoder

DS_TAG = "deepspeed"
EMA_FILE = "ema.safetensors"
STATE_FILE = "state.json"
FAILURE_MARKER = ".injected-failure-done"
# Fault drill for tests, not a config key: the first time a run reaches this many images, the last worker
# raises once (the marker file in the run directory keeps the restarted run from failing again).
# launch.fit passes the driver's value on to the workers.
FAIL_ONCE_ENV = "DUMO_RAY_FAIL_ONCE_AT_IMAGES"


def copy_to_storage(local: Path, uri: str) -> None:
    """Copy a local file or folder to `uri` (s3://, gs://, file://, ...) with pyarrow's filesystems; the
    destination's parent folders are created first (a no-op on object stores, needed on the others)."""
    import pyarrow.fs

    filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
    filesystem.create_dir(path if local.is_dir() else path.rsplit("/", 1)[0], recursive=True)
    pyarrow.fs.copy_files(str(local), path, destination_filesystem=filesystem)


def write_export(run_dir: str, ema_state, cfg, latent_info) -> str:
    """The consolidated EMA export in `<run_dir>/export`; for s3:// or gs:// storage it is written locally
    and copied up."""
    if "://" not in run_dir:
        return str(export_ema(Path(run_dir) / "export", ema_state, cfg, latent_info))
    with tempfile.TemporaryDirectory(prefix="dumo-export-") as staging:
        copy_to_storage(export_ema(Path(staging) / "export", ema_state, cfg, latent_info), f"{run_dir}/export")
    return f"{run_dir}/export"


@contextlib.contextmanager
def sample_grid_folder(run_dir: str):
    """Where rank 0 writes its sample grids: `<run_dir>/samples`, kept with the run (with or without
    MLflow). For s3:// or gs:// storage a local staging folder, copied up after each grid and removed at
    the end; yields (local folder, function that publishes one written file)."""
    if "://" not in run_dir:
        folder = Path(run_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        yield folder, lambda path: None
        return
    with tempfile.TemporaryDirectory(prefix="dumo-grids-") as staging:
        yield Path(staging), lambda path: copy_to_storage(Path(path), f"{run_dir}/samples/{Path(path).name}")


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


def log(rank: int, message: str) -> None:
    if rank == 0:
        say(message)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    from safetensors.torch import load_file, save_file

    cfg = config_from_dict(loop_config["config"])
    latent_info = loop_config["latent_info"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = bool(loop_config["use_gpu"])
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    torch.set_num_threads(max(1, int(cfg.distributed.cpus_per_worker)))
    precision = resolve_precision(cfg.train.precision, device)
    deepspeed = import_deepspeed(use_gpu)

    plan = BatchPlan(cfg.optim.batch_size, world, rank, cfg.optim.micro_batch_size)
    model = build_model_from_config(cfg).to(device)
    num_parameters = count_parameters(model)  # before ZeRO-3 partitions the parameters away
    ema = EMA(model, cfg.optim.ema_decay)  # a full fp32 copy on this worker's device
    optimizer = build_optimizer(cfg, model)
    objective = build_objective(cfg.objective, cfg.model.num_classes, cfg.jvp)
    progress, mlflow_run_id = Progress(), None

    checkpoint = ray.train.get_checkpoint()
    with contextlib.ExitStack() as stack:
        directory = Path(stack.enter_context(checkpoint.as_directory())) if checkpoint is not None else None
        load_dir, saved_world = directory, world
        if directory is not None:
            saved_world = saved_world_size(directory / DS_TAG)
            if saved_world != world:
                # Saved by another number of workers (a node was lost or added): reshard through
                # DeepSpeed's universal checkpoint, converted once per node.
                load_dir, seconds = stack.enter_context(universal_copy_on_node(
                    directory / DS_TAG, f"{checkpoint.path}|{world}", converts=ctx.get_local_rank() == 0))
                if seconds is not None:
                    say(f"node {ray.get_runtime_context().get_node_id()[:8]}: ZeRO state converted to DeepSpeed's "
                        f"universal format in {seconds:.1f} s for the node's {workers_phrase(ctx.get_local_world_size())}")
                before = BatchPlan(cfg.optim.batch_size, saved_world, 0, cfg.optim.micro_batch_size)
                log(rank, f"worker count changed {saved_world} -> {world}: {before.describe()} becomes "
                          f"{plan.describe()}; ZeRO state resharded from DeepSpeed's universal format")
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               config=deepspeed_config(cfg, plan, load_universal=saved_world != world))
        if directory is not None:
            engine.load_checkpoint(str(load_dir), tag=DS_TAG)
            ema.load_state_dict(load_file(directory / EMA_FILE))
            state = json.loads((directory / STATE_FILE).read_text())
            progress = Progress(step=state["step"], images=state["images"])
            mlflow_run_id = state.get("mlflow_run_id")
            log(rank, f"resumed from checkpoint at image {progress.images:,} (step {progress.step:,})")

    nodes = worker_nodes(world)
    log(rank, f"{workers_phrase(world)} on {len(set(nodes))} node(s): " + ", ".join(
        f"{node[:8]} x {nodes.count(node)}" for node in sorted(set(nodes))))
    log(rank, f"{cfg.model.preset}: {num_parameters:,} parameters | objective {cfg.objective.name} "
              f"({cfg.jvp.estimator}) | {plan.describe()} | ZeRO-{cfg.distributed.zero_stage} "
              f"| {device.type} {precision} | {cfg.train.total_images:,} images")

    tracker = None
    if rank == 0 and cfg.tracking.enabled:
        from dumo_ray.tracking import MlflowRun

        tracker = MlflowRun(cfg, mlflow_run_id)
    decoder = LatentDecoder.from_info(latent_info, device)  # the VAE loads on first use (grids: rank 0; eval: all)
    evaluate = TrainingEvaluator(cfg, decode=decoder, device=device, rank=rank, world=world)
    latest_eval: dict[str, float] = {}  # repeated in every report, so a scheduler always sees the metric
    run_dir = Path(cfg.run_dir)
    grids = contextlib.ExitStack()
    grid_dir, publish_grid = grids.enter_context(sample_grid_folder(cfg.run_dir)) if rank == 0 else (None, None)

    def sample_grids(tag: str) -> None:
        paths = write_sample_grids(ema.module, cfg, grid_dir, tag, decode=decoder)
        for path in paths.values():
            publish_grid(path)
            if tracker is not None:
                tracker.log_artifact(path, "samples")

    def update_ema(step: int) -> None:
        with full_parameters(engine, cfg.distributed.zero_stage) as module:
            ema.update(module, step)

    def on_log(row: dict[str, float]) -> None:
        images = int(row["images"])
        metrics = {k: v for k, v in row.items() if k != "images"}
        if evaluate.enabled and evaluation_due(cfg, images):
            scores = evaluate(ema.module)  # every rank samples its share; rank 0 scores
            if rank == 0:
                latest_eval.update({**scores, "eval_images": images})
                metrics.update(scores)
                log(rank, f"eval at image {images:,}: {format_scores(scores)}")
        if tracker is not None:
            tracker.log_metrics(metrics, images)
        every = cfg.train.sample_every_images
        if rank == 0 and every and images % round_to_batch(every, cfg.optim.batch_size) == 0:
            sample_grids(f"images_{images:012d}")
        ray.train.report({**row, **latest_eval, "step": progress.step})

    def on_checkpoint(p: Progress) -> None:
        with full_parameters(engine, cfg.distributed.zero_stage) as module:
            difference = max_rank_difference(parameter_fingerprint(module))
        with tempfile.TemporaryDirectory() as directory:
            engine.save_checkpoint(directory, tag=DS_TAG)
            if rank == 0:
                save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, Path(directory) / EMA_FILE)
                state = {"step": p.step, "images": p.images, "world_size": world, "nodes": nodes,
                         "mlflow_run_id": tracker.run_id if tracker else None}
                (Path(directory) / STATE_FILE).write_text(json.dumps(state))
            metrics = {"images": p.images, "step": p.step, "rank_param_max_diff": difference, **latest_eval}
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        log(rank, f"checkpoint at image {p.images:,} (ranks' parameters differ by at most {difference:.3g})")

    def on_step(p: Progress) -> None:
        target = int(os.environ.get(FAIL_ONCE_ENV, "0"))
        if target and p.images >= target and rank == world - 1:
            marker = run_dir / FAILURE_MARKER
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(str(p.images))
                raise RuntimeError(f"injected failure at image {p.images} ({FAIL_ONCE_ENV})")

    try:
        batches = iter(LatentBatches(
            ray.train.get_dataset_shard("train"), plan=plan, rows=loop_config["rows"],
            seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
            channel_mean=torch.tensor(latent_info["channel_mean"]), channel_std=torch.tensor(latent_info["channel_std"]),
            device=device, start_step=progress.step, in_memory=loop_config["cached"]))
        status = StatusLine(progress.images, verbose=rank == 0)
        run_steps(cfg=cfg, model=engine, objective=objective, stepper=DeepSpeedStepper(engine), update_ema=update_ema,
                  batches=batches, progress=progress, device=device, precision=precision, rank=rank,
                  on_log=on_log, on_checkpoint=on_checkpoint, on_step=on_step, status=status)
        if rank == 0:
            sample_grids("final")
            export = write_export(cfg.run_dir, ema.state_dict(), cfg, latent_info)
            if tracker is not None and "://" not in export:
                tracker.log_artifacts(export, "ema_export")
            log(rank, f"done at image {progress.images:,}; EMA export: {export}")
    except BaseException:
        if tracker is not None:
            tracker.end("FAILED")
            tracker = None
        raise
    finally:
        grids.close()
        if tracker is not None:
            tracker.end()

