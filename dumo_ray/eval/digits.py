"""Judging digit samples: class accuracy by a classifier trained on the real digits, and the Frechet
distance to the real digits in 64-d pixel space (0..16 scale).

Accuracy alone proves nothing (class-mean templates score 100%, FD ~451); real digits score FD ~10.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dumo_ray.data.digits import load_digits_arrays
from dumo_ray.eval.metrics import feature_statistics, frechet_distance


@dataclass
class DigitsScore:
    accuracy: float
    fd: float


class DigitsJudge:
    def __init__(self):
        from sklearn.linear_model import LogisticRegression

        images, labels = load_digits_arrays()
        real = images.reshape(len(images), -1)
        self.classifier = LogisticRegression(max_iter=5000).fit(real, labels)
        self.mu, self.sigma = feature_statistics(real)

    def accuracy(self, pixels: np.ndarray, labels: np.ndarray) -> float:
        return float((self.classifier.predict(pixels) == np.asarray(labels)).mean())

    def fd(self, pixels: np.ndarray) -> float:
        return frechet_distance(*feature_statistics(pixels), self.mu, self.sigma)

    def score(self, pixels: np.ndarray, labels: np.ndarray) -> DigitsScore:
        """pixels: (N, 64) on the 0..16 scale."""
        return DigitsScore(self.accuracy(pixels, labels), self.fd(pixels))
