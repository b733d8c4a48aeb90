"""The one training loop, counted in images, for both launchers.

`training_loop(cfg, backend, codec, batches_from)` builds the model, its EMA, the optimizer and the
objective, resumes from the backend's newest checkpoint, and runs: one objective step per global batch,
EMA, status lines, in-training evaluation, MLflow, sample grids and checkpoints at image intervals, and at
the end the sample grids and the consolidated EMA export. What differs between one plain-PyTorch process
and DeepSpeed ZeRO inside Ray Train workers is behind `backend` (train.backend).

Resume by rerunning the same command: the newest checkpoint is loaded, and the data order, time/noise
draws and image counter continue from it (all randomness derives from (seed, rank, step, purpose), so
nothing else needs saving).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from dumo_ray.config import Config
from dumo_ray.console import say
from dumo_ray.data.codec import LatentCodec
from dumo_ray.eval.in_training import TrainingEvaluator, format_scores
from dumo_ray.image_grid import save_grid
from dumo_ray.flow import build_objective
from dumo_ray.flow.sampler import default_method_and_head, sample, sample_plan
from dumo_ray.models import build_model_from_config, count_parameters
from dumo_ray.seeding import generator
from dumo_ray.train.backend import Backend, read_ema, read_state, write_common_files
from dumo_ray.train.devices import autocast
from dumo_ray.train.ema import EMA
from dumo_ray.train.step import NonFiniteGuard
from dumo_ray.train.storage import is_remote, sample_grid_folder, write_export
from dumo_ray.vae import LatentDecoder

# One step's data: this worker's micro-batches of the global batch, each with its loss weight (data.batch_plan).
StepBatches = list[tuple[dict[str, torch.Tensor], float]]

# The fault drill of the restart tests: the last rank raises once when the run passes this image count.
FAIL_ONCE_ENV = "DUMO_RAY_FAIL_ONCE_AT_IMAGES"
FAILURE_MARKER = ".injected-failure-done"


def round_to_batch(images: int, batch: int) -> int:
    """Intervals are multiples of the global batch (rounded up)."""
    return max(batch, -(-images // batch) * batch)


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)


class StatusLine:
    """Prints and records one line per logging interval: images, img/s, step time, losses, grad norm."""

    def __init__(self, images: int, metrics_path: Path | None = None, verbose: bool = True):
        self.verbose = verbose
        self.last_images, self.last_time = images, time.perf_counter()
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.metrics_path = metrics_path

    def add(self, terms: dict[str, torch.Tensor], grad_norm: float) -> None:
        for key, value in {**terms, "grad_norm": grad_norm}.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.steps += 1

    def emit(self, images: int) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = now - self.last_time
        row = {key: value / max(self.steps, 1) for key, value in self.sums.items()}
        row.update(images=images, images_per_s=(images - self.last_images) / elapsed,
                   step_time_s=elapsed / max(self.steps, 1))
        terms = " ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("images", "images_per_s", "step_time_s"))
        if self.verbose:
            say(f"images {images:,} | {row['images_per_s']:.1f} img/s | {row['step_time_s'] * 1000:.0f} ms/step | {terms}")
        self.record(row)
        self.last_images, self.last_time, self.sums, self.steps = images, now, {}, 0
        return row

    def record(self, row: dict[str, Any]) -> None:
        if self.metrics_path is not None:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")


def sample_for_grid(model: nn.Module, cfg: Config, steps: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n class-balanced samples from fixed per-index seeds (the same images at every checkpoint)."""
    labels, seeds = sample_plan(range(n), range(cfg.model.num_classes), cfg.train.seed, "grid")
    method, head = default_method_and_head(cfg.objective.name)
    images = sample(model, labels, seeds, steps=steps, method=method, mid=cfg.train.sample_mid_time, head=head)
    return images, labels


GRID_IMAGES = 100  # at most a 10 x 10 grid


def write_sample_grids(model: nn.Module, cfg: Config, directory: Path, tag: str,
                       decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[int, Path]:
    """One PNG grid per configured step count; returns {steps: path}. `decode` maps model space to
    images in [-1, 1] (undo the latent normalisation, run the VAE decoder)."""
    paths = {}
    nrow = min(cfg.model.num_classes, 10)
    for steps in cfg.train.sample_steps:
        images, _ = sample_for_grid(model, cfg, steps, min(cfg.train.num_sample_images, GRID_IMAGES))
        if decode is not None:
            images = decode(images)
        paths[steps] = save_grid(images, directory / f"{tag}_{steps}step.png", nrow=nrow,
                                 upscale=4 if cfg.model.input_size <= 16 else 1)
    return paths


def evaluation_due(cfg: Config, images: int) -> bool:
    """At every eval.every_images (a multiple of the log interval) and at the end of training."""
    every = cfg.eval.every_images
    due = bool(every) and images % round_to_batch(every, cfg.optim.batch_size) == 0
    return due or images >= cfg.train.total_images


def fault_drill(run_dir: str, images: int, rank: int, world: int) -> None:
    """Test hook, not a config field: with DUMO_RAY_FAIL_ONCE_AT_IMAGES=N in the workers' environment, the
    last rank raises once, the first time the run passes image N (a marker in the run folder remembers)."""
    target = int(os.environ.get(FAIL_ONCE_ENV, "0") or 0)
    if not target or images < target or rank != world - 1:
        return
    marker = Path(run_dir) / FAILURE_MARKER
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(images))
        raise RuntimeError(f"injected failure at image {images} ({FAIL_ONCE_ENV})")


@dataclass
class Progress:
    step: int = 0
    images: int = 0


def training_loop(cfg: Config, backend: Backend, codec: LatentCodec,
                  batches_from: Callable[[int], Iterator[StepBatches]]) -> dict[str, Any]:
    """Trains `cfg` on `backend` until train.total_images. `batches_from(step)` yields this worker's
    micro-batches for every optimizer step from `step` on. Returns the summary (rank 0; {} elsewhere)."""
    t, device, main = cfg.train, backend.device, backend.rank == 0
    log = say if main else (lambda message: None)
    model = build_model_from_config(cfg).to(device)
    num_parameters = count_parameters(model)  # before ZeRO-3 partitions the parameters away
    ema = EMA(model, cfg.optim.ema_decay)  # a full fp32 copy on this worker's device
    optimizer = build_optimizer(cfg, model)
    objective = build_objective(cfg.objective, cfg.model.num_classes, cfg.jvp)
    progress, mlflow_run_id = Progress(), None
    with backend.latest_checkpoint() as checkpoint:
        module = backend.prepare(model, optimizer, checkpoint)
        if checkpoint is not None:
            ema.load_state_dict(read_ema(checkpoint))
            state = read_state(checkpoint)
            progress, mlflow_run_id = Progress(step=state["step"], images=state["images"]), state.get("mlflow_run_id")
            log(f"resuming from {checkpoint} (image {progress.images:,}, step {progress.step:,})")
    log(backend.describe())
    log(f"{cfg.model.preset}: {num_parameters:,} parameters | objective {cfg.objective.name} ({cfg.jvp.estimator}) "
        f"| {device.type} {backend.precision} | {t.total_images:,} images")

    tracker = None
    if main and cfg.tracking.enabled:
        from dumo_ray.tracking import MlflowRun

        tracker = MlflowRun(cfg, mlflow_run_id)
    decoder = LatentDecoder(codec, device)  # the VAE loads on first use (grids: rank 0; eval: all ranks)
    evaluate = TrainingEvaluator(cfg, decode=decoder, device=device, rank=backend.rank, world=backend.world)
    local_files = main and not is_remote(cfg.run_dir)
    if local_files:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    status = StatusLine(progress.images, Path(cfg.run_dir) / "metrics.jsonl" if local_files else None, verbose=main)
    guard = NonFiniteGuard(cfg.distributed.max_nonfinite_steps)
    batch = cfg.optim.batch_size
    log_every, checkpoint_every = round_to_batch(t.log_every_images, batch), round_to_batch(t.checkpoint_every_images, batch)
    latest_eval: dict[str, float] = {}  # repeated in every report, so a scheduler always sees the metric
    batches = batches_from(progress.step)
    started = time.perf_counter()

    def write_common(directory: Path) -> None:
        state = {"step": progress.step, "images": progress.images, "world_size": backend.world,
                 "nodes": backend.nodes, "mlflow_run_id": tracker.run_id if tracker else None}
        write_common_files(directory, ema_state=ema.state_dict(), state=state, cfg=cfg, codec=codec)

    with contextlib.ExitStack() as stack:
        grid_dir, publish_grid = stack.enter_context(sample_grid_folder(cfg.run_dir)) if main else (None, None)

        def sample_grids(tag: str) -> dict[int, Path]:
            paths = write_sample_grids(ema.module, cfg, grid_dir, tag, decode=decoder)
            for path in paths.values():
                publish_grid(path)
                if tracker is not None:
                    tracker.log_artifact(path, "samples")
            return paths

        try:
            module.train()
            while progress.images < t.total_images:
                # One optimizer step: this worker's micro-batches, gradients accumulated over all but the
                # last. Status terms are the last micro-batch's.
                micro_batches = next(batches)
                for i, (micro, weight) in enumerate(micro_batches):
                    data = {k: v.to(device, non_blocking=True) for k, v in micro.items()}
                    draws = generator(t.seed, backend.rank, progress.step, "objective", *((i,) if i else ()), device=device)
                    with autocast(backend.precision, device):
                        loss, terms = objective(module, data, draws, images=progress.images)
                    loss = loss * weight if weight != 1.0 else loss
                    if i < len(micro_batches) - 1:
                        backend.accumulate(loss)
                grad_norm, applied = backend.step(loss)
                progress.step += 1
                progress.images += batch
                guard.record(applied, progress.images)
                if applied:
                    with backend.full_parameters() as full:
                        ema.update(full, progress.step)
                    status.add(terms, grad_norm)
                fault_drill(cfg.run_dir, progress.images, backend.rank, backend.world)
                finished = progress.images >= t.total_images

                if progress.images % log_every == 0 or finished:
                    row = status.emit(progress.images)
                    metrics = {k: v for k, v in row.items() if k != "images"}
                    if evaluate.enabled and evaluation_due(cfg, progress.images):
                        scores = evaluate(ema.module)  # every rank samples its share; rank 0 scores
                        if main:
                            latest_eval.update({**scores, "eval_images": progress.images})
                            metrics.update(scores)
                            status.record({"images": progress.images, **scores})
                            log(f"eval at image {progress.images:,}: {format_scores(scores)}")
                    if tracker is not None:
                        tracker.log_metrics(metrics, progress.images)
                    every = t.sample_every_images
                    if main and every and progress.images % round_to_batch(every, batch) == 0:
                        sample_grids(f"images_{progress.images:012d}")
                    backend.report({**row, **latest_eval, "step": progress.step})

                if progress.images % checkpoint_every == 0 or finished:
                    difference = backend.replica_difference()
                    backend.save_checkpoint(progress.images, write_common, {
                        "images": progress.images, "step": progress.step, "rank_param_max_diff": difference, **latest_eval})
                    log(f"checkpoint at image {progress.images:,} (ranks' parameters differ by at most {difference:.3g})")

            summary: dict[str, Any] = {}
            if main:
                grids = sample_grids("final")
                export = write_export(cfg.run_dir, ema.state_dict(), cfg, codec)
                if tracker is not None and not is_remote(export):
                    tracker.log_artifacts(export, "ema_export")
                if tracker is not None:
                    tracker.log_model(ema.module)  # an MLflow model the Model Registry can register
                summary = {"images": progress.images, "steps": progress.step,
                           "train_seconds": round(time.perf_counter() - started, 1), "export": export,
                           "grids": {k: str(v) for k, v in grids.items()},
                           **{k: v for k, v in latest_eval.items() if k != "eval_images"}}
                if local_files:
                    (Path(cfg.run_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
                log(f"done at image {progress.images:,}; EMA export: {export}")
        except BaseException:
            if tracker is not None:
                tracker.end("FAILED")
                tracker = None
            raise
        finally:
            if tracker is not None:
                tracker.end()
    return summary
