"""`dumo-ray evaluate`: FID / FD, Inception Score and class accuracy of a sample set against a reference.

Samples: an ADM sample batch (`.npz`) or an image folder. Reference: an ADM reference batch (`mu`,
`sigma`), an image set (`.npz` / folder), a precomputed latent folder (decoded through its VAE, originals
only), or nothing for a network that carries its own (digits, fashion).
"""
from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from dumo_ray.eval.features import FeatureNetwork, build_feature_network
from dumo_ray.eval.image_sets import count_images, iter_image_batches, load_reference, save_reference
from dumo_ray.eval.metrics import feature_statistics
from dumo_ray.eval.pixels import to_uint8
from dumo_ray.eval.scores import score_outputs


def is_latent_folder(path: str | Path) -> bool:
    from dumo_ray.data.latents import MANIFEST

    return (Path(path) / MANIFEST).is_file()


def iter_latent_images(root: str | Path, batch_size: int = 100, limit: int | None = None,
                       vae: str | None = None) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """The original (unflipped) images of a latent folder: posterior means decoded by the manifest's VAE
    (or `vae`), as uint8 (B, C, H, W), with their labels."""
    from dumo_ray.data.codec import LatentCodec
    from dumo_ray.data.latents import load_manifest, read_shard
    from dumo_ray.vae import LatentDecoder

    root = Path(root)
    manifest = load_manifest(root)
    # The stored moments are raw (unnormalised) latents: decode them as stored.
    decode = LatentDecoder(LatentCodec.from_manifest(manifest, normalize="none").with_vae(vae))
    left = limit if limit is not None else manifest["rows"]
    for shard in manifest["shards"]:
        data = read_shard(root / shard["file"])
        keep = ~data["flip"].astype(bool)
        means, labels = data["moments"][keep][:, 0], data["label"][keep]
        for start in range(0, min(len(means), left), batch_size):
            stop = min(start + batch_size, len(means), start + left)
            images = decode(torch.from_numpy(means[start:stop].astype(np.float32)))
            yield to_uint8(images), labels[start:stop]
        left -= min(len(means), left)
        if left <= 0:
            return


def extract(network: FeatureNetwork, batches: Iterable[tuple[torch.Tensor, np.ndarray | None]], total: int,
            what: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Runs the network over all batches with a progress line about every 10%."""
    outputs: dict[str, list[np.ndarray]] = defaultdict(list)
    labels: list[np.ndarray] | None = []
    done, next_report, started = 0, max(total // 10, 1), time.perf_counter()
    for images, batch_labels in batches:
        for key, value in network(images).items():
            outputs[key].append(value)
        labels = None if labels is None or batch_labels is None else labels + [np.asarray(batch_labels)]
        done += len(images)
        if done >= next_report or done == total:
            rate = done / max(time.perf_counter() - started, 1e-9)
            print(f"[dumo-ray] {what}: {done:,}/{total:,} images ({rate:.1f} img/s)", flush=True)
            next_report += max(total // 10, 1)
    if not outputs:
        raise ValueError(f"{what}: no images")
    return {k: np.concatenate(v) for k, v in outputs.items()}, (np.concatenate(labels) if labels else None)


def image_batches(path: str | Path, batch_size: int, limit: int | None, vae: str | None = None):
    """(batches, count) for an image set or a latent folder."""
    if is_latent_folder(path):
        from dumo_ray.data.latents import load_manifest

        originals = load_manifest(path)["images"]
        total = originals if limit is None else min(limit, originals)
        return iter_latent_images(path, batch_size, limit, vae), total
    total = count_images(path)
    return iter_image_batches(path, batch_size, limit), total if limit is None else min(limit, total)


def reference_statistics(network: FeatureNetwork, reference: str | Path | None, *, batch_size: int = 100,
                         limit: int | None = None, vae: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    if reference is None:
        stats = network.reference_statistics()
        if stats is None:
            raise ValueError(f"{network.name} features need a reference: --reference REF.npz (an ADM reference batch "
                             "with mu/sigma, e.g. VIRTUAL_imagenet256_labeled.npz), an image folder or a latent folder")
        return stats
    if not is_latent_folder(reference):
        stats = load_reference(reference)
        if stats is not None:
            return stats
    batches, total = image_batches(reference, batch_size, limit, vae)
    outputs, _ = extract(network, batches, total, f"reference {reference}")
    return feature_statistics(outputs["features"])


def evaluate_files(samples: str | Path, reference: str | Path | None = None, *, features: str = "inception",
                   inception_weights: str | None = None, batch_size: int = 100, device: str = "cpu",
                   limit: int | None = None, save_reference_to: str | Path | None = None,
                   vae: str | None = None) -> dict:
    network = build_feature_network(features, inception_weights=inception_weights, device=device)
    ref_mu, ref_sigma = reference_statistics(network, reference, batch_size=batch_size, limit=limit, vae=vae)
    if save_reference_to is not None:
        save_reference(save_reference_to, ref_mu, ref_sigma)
        print(f"[dumo-ray] wrote reference statistics to {save_reference_to}", flush=True)
    batches, total = image_batches(samples, batch_size, limit, vae)
    outputs, labels = extract(network, batches, total, f"samples {samples}")
    scores = score_outputs(outputs, (ref_mu, ref_sigma), labels)
    return {"samples": str(samples), "reference": str(reference) if reference else network.name,
            "features": network.name, "num_samples": int(len(outputs["features"])), **scores}
