"""Feature networks for Frechet distances. Each one maps uint8 images (N, C, H, W), the pixels that would
be saved to disk, to a dict of per-image arrays: "features" (always; the Frechet distance is taken on
them), "logits" (Inception Score) and "predicted" (class accuracy). Pick one by name with
`build_feature_network`.

- inception: the FID network, torch-fidelity's port of the TensorFlow Inception used by the FID and ADM
  evaluation code (the network torchmetrics' FID and IS run): 2048 pool features + logits, inputs resized
  with the TF1-compatible bilinear filter. Weights come from a local file only: nothing is downloaded.
  The file must be the official one (its SHA-256 is pinned and checked before it is loaded: torch-fidelity
  unpickles it with weights_only=False, and any other file would give FIDs no paper can be compared with).
- digits: FD-digits for the demo. A small MLP classifier trained on scikit-learn's real digits; its
  hidden layer is the feature space, its predictions give class accuracy. It carries its own reference
  (the real digits).
- fashion: FD-fashion, the same idea for Fashion-MNIST at 32x32: a small CNN trained (once, then cached)
  on the training split, which is also its reference.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from dumo_ray.config import INCEPTION_WEIGHTS_ENV
from dumo_ray.digests import check_file_digest, forced_weights_only
from dumo_ray.eval.metrics import feature_statistics

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
# The release file's SHA-256 (95,628,359 bytes; the same bytes as pytorch-fid's pt_inception-2015-12-05-6726825d.pth:
# the name carries the digest's first 8 hex digits, torch.hub's convention).
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
# Another digest for another file (weights of your own): you vouch for that file, and its FIDs are not comparable.
INCEPTION_SHA256_ENV = "DUMO_INCEPTION_SHA256"


class FeatureNetwork(Protocol):
    name: str

    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]: ...

    def reference_statistics(self) -> tuple[np.ndarray, np.ndarray] | None: ...


def inception_weights_path(given: str | os.PathLike | None = None) -> Path:
    """The Inception weights file from the flag/config, else $DUMO_INCEPTION_WEIGHTS; a clear error otherwise."""
    path = str(given) if given else os.environ.get(INCEPTION_WEIGHTS_ENV, "")
    fetch = (f"download {INCEPTION_FILE} once from {INCEPTION_URL} on a machine with internet access, copy it "
             f"here, and pass --inception-weights PATH (eval.inception_weights in a config) or set {INCEPTION_WEIGHTS_ENV}")
    if not path:
        raise FileNotFoundError(f"FID and Inception Score need the Inception-v3 weights file {INCEPTION_FILE} "
                                f"(nothing is downloaded at run time): {fetch}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"Inception weights file {path} does not exist; it should be {INCEPTION_FILE}: {fetch}")
    return Path(path)


def check_inception_weights(path: str | os.PathLike) -> None:
    """DigestMismatchError unless `path` holds the official weights (or the file $DUMO_INCEPTION_SHA256 names)."""
    own = os.environ.get(INCEPTION_SHA256_ENV, "")
    check_file_digest(path, own or INCEPTION_SHA256, what="Inception weights file",
                      pinned=f"${INCEPTION_SHA256_ENV}" if own else f"the official {INCEPTION_FILE}")


def three_channels(images: torch.Tensor) -> torch.Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class InceptionFeatures:
    name = "inception"

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = inception_weights_path(weights)
        check_inception_weights(path)
        self.device = torch.device(device)
        with forced_weights_only():  # torch-fidelity loads the file with weights_only=False
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=str(path)).to(self.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        pool, logits = self.net(three_channels(images).to(self.device))
        return {"features": pool.double().cpu().numpy(), "logits": logits.double().cpu().numpy()}

    def reference_statistics(self) -> None:
        return None  # ImageNet's statistics come from a reference batch (.npz)


DIGITS_PIXEL_MAX = 16.0


def digits_pixels(images: torch.Tensor) -> np.ndarray:
    """uint8 (N, 1, 8, 8) -> (N, 64) on the 0..16 scale of scikit-learn's digits."""
    if tuple(images.shape[1:]) != (1, 8, 8):
        raise ValueError(f"digits features take 8x8 one-channel images, got {tuple(images.shape[1:])}")
    return images.reshape(len(images), -1).double().numpy() * (DIGITS_PIXEL_MAX / 255.0)


class DigitsFeatures:
    """Hidden layer (64 ReLU units) of an MLP trained on the real digits (held-out accuracy ~0.97)."""

    name = "digits"

    def __init__(self):
        from sklearn.neural_network import MLPClassifier

        from dumo_ray.data.digits import load_digits_arrays

        images, labels = load_digits_arrays()
        # The real digits pass through the same uint8 quantisation as the samples (PNG files, digits-tree).
        real = torch.from_numpy(np.round(images * (255.0 / DIGITS_PIXEL_MAX)).astype(np.uint8)).reshape(-1, 1, 8, 8)
        pixels = digits_pixels(real)
        self.classifier = MLPClassifier(hidden_layer_sizes=(64,), max_iter=2000, random_state=0).fit(pixels, labels)
        self.real_statistics = feature_statistics(self.hidden(pixels))

    def hidden(self, pixels: np.ndarray) -> np.ndarray:
        return np.maximum(pixels @ self.classifier.coefs_[0] + self.classifier.intercepts_[0], 0.0)

    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        pixels = digits_pixels(images)
        return {"features": self.hidden(pixels), "predicted": self.classifier.predict(pixels)}

    def reference_statistics(self) -> tuple[np.ndarray, np.ndarray]:
        return self.real_statistics


class FashionFeatures:
    """FD-fashion: the hidden layer (128 units) of a small CNN trained on Fashion-MNIST's training split
    (eval/fashion_classifier.py); its reference is the training split's statistics."""

    name = "fashion"

    def __init__(self):
        from dumo_ray.eval.fashion_classifier import load_or_train

        self.net, self.train_statistics = load_or_train()

    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        from dumo_ray.eval.fashion_classifier import features_and_predictions

        if tuple(images.shape[1:]) != (1, 32, 32):
            raise ValueError(f"fashion features take 32x32 one-channel images, got {tuple(images.shape[1:])}")
        features, predicted = features_and_predictions(self.net, images)
        return {"features": features, "predicted": predicted}

    def reference_statistics(self) -> tuple[np.ndarray, np.ndarray]:
        return self.train_statistics


@functools.lru_cache(maxsize=1)
def fashion_features() -> FashionFeatures:
    return FashionFeatures()


@functools.lru_cache(maxsize=1)
def digits_features() -> DigitsFeatures:
    return DigitsFeatures()  # trained once per process (about a second)


def build_feature_network(name: str, *, inception_weights: str | None = None,
                          device: str | torch.device = "cpu") -> FeatureNetwork:
    if name == "inception":
        return InceptionFeatures(inception_weights, device)
    if name == "digits":
        return digits_features()
    if name == "fashion":
        return fashion_features()
    raise ValueError(f"unknown feature network {name!r}; use 'inception', 'digits' or 'fashion'")
