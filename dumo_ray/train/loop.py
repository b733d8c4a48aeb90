"""The training loop, counted in images. The single-process trainer lives here; the pieces it is made of
(model/optimizer construction, the step, status lines, sample grids, checkpoints) are shared with the
distributed trainer.

Resume by rerunning the same command: the newest checkpoint in the run directory (`train.storage_path`/`train.name`) is loaded and the data
order, time/noise draws and image counter continue from it (all randomness derives from
(seed, rank, step, purpose), so nothing else needs saving).
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from dumo_ray.config import Config, save_config
from dumo_ray.console import say
from dumo_ray.eval.in_training import TrainingEvaluator, check_eval_inputs, format_scores
from dumo_ray.data.batches import epoch_batches
from dumo_ray.data.digits import load_digits_tensors
from dumo_ray.image_grid import save_grid
from dumo_ray.flow import build_objective
from dumo_ray.flow.sampler import default_method_and_head, sample, sample_plan
from dumo_ray.models import build_model, count_parameters
from dumo_ray.seeding import derive_seed, generator
from dumo_ray.train.checkpoint import latest_checkpoint, load_state, save_checkpoint
from dumo_ray.train.ema import EMA
from dumo_ray.train.step import LocalStepper, NonFiniteGuard


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return name


def autocast(precision: str, device: torch.device):
    """bf16 autocast for the main pass; the JVP and its target switch it off (fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def round_to_batch(images: int, batch: int) -> int:
    """Intervals are multiples of the global batch (rounded up)."""
    return max(batch, -(-images // batch) * batch)


def build_model_from_config(cfg: Config) -> nn.Module:
    m = cfg.model
    # Same seed on every rank: the replicas start identical.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.train.seed, "init"))
        return build_model(m.preset, input_size=m.input_size, in_channels=m.in_channels, num_classes=m.num_classes,
                           head_depth=m.head_depth, time_scale=m.time_scale)


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
        if self.metrics_path is not None:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        self.last_images, self.last_time, self.sums, self.steps = images, now, {}, 0
        return row


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


@dataclass
class Progress:
    step: int = 0
    images: int = 0


def run_steps(
    *,
    cfg: Config,
    model: nn.Module,
    objective: Callable,
    stepper: Any,
    update_ema: Callable[[int], None],
    batches: Iterator[dict[str, torch.Tensor]],
    progress: Progress,
    device: torch.device,
    precision: str,
    rank: int = 0,
    on_log: Callable[[dict[str, float]], None] | None = None,
    on_checkpoint: Callable[[Progress], None] | None = None,
    on_step: Callable[[Progress], None] | None = None,
    status: StatusLine | None = None,
) -> Progress:
    """The loop shared by both trainers: until train.total_images, one objective step per batch, EMA,
    status lines and checkpoints at image intervals. `model` is what the objective calls (a plain module
    or a DeepSpeed engine); `update_ema(step)` folds the current weights into the EMA."""
    t = cfg.train
    batch = cfg.optim.batch_size
    log_every = round_to_batch(t.log_every_images, batch)
    ckpt_every = round_to_batch(t.checkpoint_every_images, batch)
    status = status or StatusLine(progress.images)
    guard = NonFiniteGuard(cfg.distributed.max_nonfinite_steps)
    model.train()
    while progress.images < t.total_images:
        item = next(batches)
        # A step is one batch (the local trainer) or a list of (micro-batch, loss weight) whose gradients
        # accumulate (the Ray trainer; see train.batch_plan). Status terms are the last micro-batch's.
        micro_batches = item if isinstance(item, list) else [(item, 1.0)]
        for i, (micro, weight) in enumerate(micro_batches):
            data = {k: v.to(device, non_blocking=True) for k, v in micro.items()}
            gen = generator(t.seed, rank, progress.step, "objective", *((i,) if i else ()), device=device)
            with autocast(precision, device):
                loss, terms = objective(model, data, gen, images=progress.images)
            loss = loss * weight if weight != 1.0 else loss
            if i < len(micro_batches) - 1:
                stepper.accumulate(loss)
        grad_norm, applied = stepper.step(loss)
        progress.step += 1
        progress.images += batch
        guard.record(applied, progress.images)
        if applied:
            update_ema(progress.step)
            status.add(terms, grad_norm)
        if on_step is not None:
            on_step(progress)
        if progress.images % log_every == 0 or progress.images >= t.total_images:
            row = status.emit(progress.images)
            if on_log is not None:
                on_log(row)
        if on_checkpoint is not None and (progress.images % ckpt_every == 0 or progress.images >= t.total_images):
            on_checkpoint(progress)
    return progress


def train_single_process(cfg: Config) -> dict[str, Any]:
    """Trains on the bundled digits in this process; writes checkpoints, sample grids, metrics.jsonl and
    (for digits) a summary with class accuracy and FD at each sample step count."""
    check_eval_inputs(cfg)
    out = Path(cfg.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)

    model = build_model_from_config(cfg).to(device)
    ema = EMA(model, cfg.optim.ema_decay)
    optimizer = build_optimizer(cfg, model)
    objective = build_objective(cfg.objective, cfg.model.num_classes)
    progress = Progress()

    resume = latest_checkpoint(out)
    if resume is not None:
        state = load_state(resume, map_location=device)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        progress = Progress(step=int(state["step"]), images=int(state["images"]))
        say(f"resuming from {resume} (image {progress.images:,}, step {progress.step:,})")

    say(f"{cfg.model.preset}: {count_parameters(model):,} parameters | objective {cfg.objective.name} "
        f"| {device} {precision} | batch {cfg.optim.batch_size} | {cfg.train.total_images:,} images")

    x, y = load_digits_tensors()
    batches = epoch_batches(x, y, cfg.optim.batch_size, cfg.train.seed, start_image=progress.images)

    def checkpoint(p: Progress) -> None:
        state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                 "step": p.step, "images": p.images, "config": cfg.to_dict()}
        save_checkpoint(out, p.images, state, keep=cfg.train.keep_checkpoints)

    evaluate = TrainingEvaluator(cfg, device=device)
    evaluations: dict[int, dict[str, float]] = {}

    def on_log(row: dict[str, float]) -> None:
        images = int(row["images"])
        every = cfg.train.sample_every_images
        if every and images % round_to_batch(every, cfg.optim.batch_size) == 0:
            write_sample_grids(ema.module, cfg, out / "samples", f"images_{images:012d}")
        if evaluate.enabled and evaluation_due(cfg, images):
            evaluations[images] = evaluate(ema.module)
            say(f"eval at image {images:,}: {format_scores(evaluations[images])}")
            with (out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps({"images": images, **evaluations[images]}) + "\n")

    started = time.perf_counter()
    run_steps(cfg=cfg, model=model, objective=objective, stepper=LocalStepper(model, optimizer, cfg.optim.grad_clip),
              update_ema=lambda step: ema.update(model, step), batches=batches, progress=progress, device=device, precision=precision,
              on_log=on_log, on_checkpoint=checkpoint, status=StatusLine(progress.images, out / "metrics.jsonl"))
    elapsed = time.perf_counter() - started

    grids = write_sample_grids(ema.module, cfg, out / "samples", "final")
    summary: dict[str, Any] = {"images": progress.images, "steps": progress.step, "train_seconds": round(elapsed, 1),
                               "checkpoint": str(latest_checkpoint(out)), "grids": {k: str(v) for k, v in grids.items()}}
    if evaluate.enabled:
        summary.update(evaluations.get(progress.images) or evaluate(ema.module))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    say("done: " + json.dumps(summary))
    return summary
