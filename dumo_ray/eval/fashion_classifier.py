"""FD-fashion: a small CNN trained on Fashion-MNIST's training split, the judge of the fashion runs.

Its 128-unit hidden layer is the feature space of the Frechet distance, its predictions give class
accuracy, and the statistics of the 60,000 training images are the reference. It is trained here, from
the official files, by a fixed recipe (seed 0, one thread, a fixed data order), and cached beside its
provenance (the MD5 of the training images, the recipe version): nothing is shipped as an opaque binary.
The first use trains it (about two minutes on 2 cores); later uses load the cache.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from dumo_ray.data.fashion import OFFICIAL_MD5
from dumo_ray.eval.metrics import feature_statistics

RECIPE = {"version": 1, "epochs": 3, "batch": 128, "lr": 1e-3, "seed": 0, "size": 32}
CACHE_ENV = "DUMO_RAY_CACHE"


class FashionNet(nn.Module):
    """Two conv blocks (32x32 -> 8x8) and a 128-unit hidden layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.hidden = nn.Sequential(nn.Linear(64 * 8 * 8, 128), nn.ReLU())
        self.out = nn.Linear(128, 10)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (N, 1, 32, 32) -> (hidden features, logits)."""
        h = self.hidden(self.conv(pixels.float() / 127.5 - 1.0))
        return h, self.out(h)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dumo_ray")


def train_classifier(images: np.ndarray, labels: np.ndarray) -> FashionNet:
    """The fixed recipe; one thread, so the weights do not depend on the machine's core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(RECIPE["seed"])
        net = FashionNet()
        optimizer = torch.optim.Adam(net.parameters(), lr=RECIPE["lr"])
        x, y = torch.from_numpy(images)[:, None], torch.from_numpy(labels)
        order = torch.Generator().manual_seed(RECIPE["seed"])
        for epoch in range(RECIPE["epochs"]):
            started = time.perf_counter()
            for batch in torch.randperm(len(y), generator=order).split(RECIPE["batch"]):
                loss = nn.functional.cross_entropy(net(x[batch])[1], y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            print(f"[dumo-ray] FD-fashion classifier: epoch {epoch + 1}/{RECIPE['epochs']} "
                  f"({time.perf_counter() - started:.0f} s, last loss {loss.item():.3f})", flush=True)
    finally:
        torch.set_num_threads(threads)
    return net.eval()


@torch.no_grad()
def features_and_predictions(net: FashionNet, pixels: torch.Tensor, batch: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    hidden, predicted = [], []
    for chunk in pixels.split(batch):
        h, logits = net(chunk)
        hidden.append(h.double().numpy())
        predicted.append(logits.argmax(dim=1).numpy())
    return np.concatenate(hidden), np.concatenate(predicted)


def cache_file(source: str | Path | None = None) -> tuple[Path, str]:
    """(where the classifier trained on this source's training images is cached, their MD5)."""
    from dumo_ray.data.fashion import SPLIT_FILES, resolve_source
    from dumo_ray.digests import file_md5

    train_md5 = file_md5(resolve_source(source) / SPLIT_FILES["train"][0])
    return cache_dir() / f"fd-fashion-v{RECIPE['version']}-{train_md5[:12]}.safetensors", train_md5


def load_or_train(source: str | Path | None = None,
                  checksums: dict[str, str] | None = OFFICIAL_MD5) -> tuple[FashionNet, tuple[np.ndarray, np.ndarray]]:
    """(the classifier, the training split's feature statistics), from the cache or trained now. The cache
    is keyed by the recipe and the training images' MD5 (`checksums` None: files other than the official
    ones, e.g. a test's)."""
    from safetensors.numpy import load_file, save_file

    from dumo_ray.data.fashion import load_fashion, pad_to

    path, train_md5 = cache_file(source)
    if path.is_file():
        tensors = load_file(path)
        net = FashionNet()
        net.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items() if not k.startswith("reference.")})
        return net.eval(), (tensors["reference.mu"], tensors["reference.sigma"])
    images, labels = load_fashion(source, "train", checksums)
    images = pad_to(images, RECIPE["size"])
    net = train_classifier(images, labels)
    mu, sigma = feature_statistics(features_and_predictions(net, torch.from_numpy(images)[:, None])[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    save_file({**{k: v.numpy() for k, v in net.state_dict().items()}, "reference.mu": mu, "reference.sigma": sigma}, str(tmp),
              metadata={"recipe": json.dumps(RECIPE), "train_images_md5": train_md5})
    os.replace(tmp, path)  # atomic: two processes training at once both end with one whole file
    return net, (mu, sigma)
