"""From feature-network outputs to numbers: Frechet distance to a reference, Inception Score (torchmetrics),
class accuracy."""
from __future__ import annotations

import numpy as np
import torch

from dumo_ray.eval.metrics import feature_statistics, frechet_distance


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """torchmetrics' Inception Score over precomputed logits (it shuffles them: seeded here). The score is
    exp(mean KL(p(y|x) || p(y))) >= 1 exactly; in floating point a set whose predictions are all alike
    can come out a rounding error below 1 (0.9999999999999999 seen), so the mean is clamped to 1."""
    import warnings

    from torchmetrics.image.inception import InceptionScore

    with warnings.catch_warnings():  # "will save all extracted features": these are logits, 4 kB per image
        warnings.simplefilter("ignore", UserWarning)
        metric = InceptionScore(feature=torch.nn.Identity(), splits=min(splits, len(logits)))
    metric.update(torch.as_tensor(logits, dtype=torch.float64))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mean, std = metric.compute()
    return max(1.0, float(mean)), float(std)


def score_outputs(outputs: dict[str, np.ndarray], reference: tuple[np.ndarray, np.ndarray],
                  labels: np.ndarray | None = None) -> dict[str, float]:
    """fd always; inception_score(+_std) when there are logits; accuracy when there are predictions and labels."""
    scores = {"fd": frechet_distance(*feature_statistics(outputs["features"]), *reference)}
    if "logits" in outputs:
        scores["inception_score"], scores["inception_score_std"] = inception_score(outputs["logits"])
    if "predicted" in outputs and labels is not None:
        scores["accuracy"] = float((np.asarray(outputs["predicted"]) == np.asarray(labels)).mean())
    return scores
