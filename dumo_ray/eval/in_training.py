"""In-training evaluation: the EMA model samples a fixed evaluation set (index i: label i mod classes,
seed derived from (train.seed, "eval", i)) at each of `eval.steps`, and the samples are scored against
the reference. Each worker draws every world-size-th index and the features are gathered on rank 0; as
sampling runs on fixed-shape chunks, the numbers do not depend on the number of workers."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from dumo_ray.config import Config, resolved_eval_features
from dumo_ray.eval.features import build_feature_network, check_inception_weights, inception_weights_path
from dumo_ray.eval.image_sets import load_reference
from dumo_ray.eval.pixels import to_uint8
from dumo_ray.eval.scores import score_outputs
from dumo_ray.flow.sampler import default_method_and_head, sample_in_chunks, sample_plan


def check_eval_inputs(cfg: Config) -> None:
    """Fail before any training starts when the evaluation's files are missing (or not the official weights)."""
    if resolved_eval_features(cfg) != "inception":
        return
    check_inception_weights(inception_weights_path(cfg.eval.inception_weights or None))
    if load_reference(cfg.eval.reference) is None:
        raise ValueError(f"eval.reference {cfg.eval.reference} holds images but no statistics; write them once with "
                         f"`dumo-ray evaluate --samples ... --reference {cfg.eval.reference} --save-reference REF.npz` "
                         "and point eval.reference at REF.npz")


def eval_indices(cfg: Config, rank: int, world: int) -> tuple[np.ndarray, torch.Tensor, list[int]]:
    indices = np.arange(rank, cfg.eval.num_images, world)
    labels, seeds = sample_plan(indices, range(cfg.model.num_classes), cfg.train.seed, "eval")
    return indices, labels, seeds


class TrainingEvaluator:
    """`evaluator(ema_model)` -> {"fd_1step": ..., "accuracy_1step": ..., ...} on rank 0, {} on the others.
    Every rank must call it at the same point (it gathers)."""

    def __init__(self, cfg: Config, *, decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 device: str | torch.device = "cpu", rank: int = 0, world: int = 1):
        self.cfg, self.decode, self.rank, self.world = cfg, decode, rank, world
        self.kind = resolved_eval_features(cfg)
        self.enabled = self.kind != "none"
        if not self.enabled:
            return
        self.network = build_feature_network(self.kind, inception_weights=cfg.eval.inception_weights or None, device=device)
        own = self.network.reference_statistics()  # the digits and fashion judges carry their own
        self.reference = own if own is not None else load_reference(cfg.eval.reference)
        self.indices, self.labels, self.seeds = eval_indices(cfg, rank, world)
        self.method, self.head = default_method_and_head(cfg.objective.name)

    def _outputs(self, model: nn.Module, steps: int, method: str | None = None) -> dict[str, np.ndarray]:
        images = sample_in_chunks(model, self.labels, self.seeds, chunk=self.cfg.eval.chunk, steps=steps,
                                  method=method or self.method, mid=self.cfg.train.sample_mid_time, head=self.head)
        if self.decode is not None:
            images = self.decode(images)
        return self.network(to_uint8(images))

    def _gather(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """All ranks' outputs in index order on rank 0 (None elsewhere)."""
        if self.world == 1:
            return outputs
        import torch.distributed as dist

        everything: list = [None] * self.world
        dist.all_gather_object(everything, (self.indices, outputs))
        if self.rank != 0:
            return None
        order = np.argsort(np.concatenate([idx for idx, _ in everything]))
        return {key: np.concatenate([out[key] for _, out in everything])[order] for key in outputs}

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, float]:
        if not self.enabled:
            return {}
        was_training = model.training
        model.eval()
        scores: dict[str, float] = {}
        labels = np.arange(self.cfg.eval.num_images) % self.cfg.model.num_classes
        # The default sampler at each of eval.steps, then the v-head's Euler integration at eval.euler_steps
        # (DuMo's multi-step view of the same network).
        runs = [(steps, None, f"{steps}step") for steps in self.cfg.eval.steps]
        runs += [(steps, "euler", f"euler{steps}") for steps in self.cfg.eval.euler_steps]
        for steps, method, suffix in runs:
            gathered = self._gather(self._outputs(model, steps, method))
            if gathered is not None:
                for key, value in score_outputs(gathered, self.reference, labels).items():
                    if not key.endswith("_std"):
                        scores[f"{key}_{suffix}"] = value
        model.train(was_training)
        return scores


def format_scores(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in scores.items())
