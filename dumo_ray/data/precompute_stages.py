"""The stages of the latent precompute (composed into a Ray Data job in `pipelines/precompute_latents.py`).

decode (CPU tasks) -> encode (an actor pool, one VAE per actor; one GPU each when GPUs exist) ->
write (one call per shard: sort, write to a temporary name, rename; plus a JSON sidecar with the
shard's row count, checksum, latent sums and skipped files).

A file that does not decode travels through the pipeline as a row with an `error` and ends up in the
shard's list of skipped files; it never stops the run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dumo_ray.data.images import DEFAULT_MAX_PIXELS, load_image
from dumo_ray.data.latents import moment_sums, moments_table, write_shard_table
from dumo_ray.digests import file_sha256

SIDECAR_SUFFIX = ".json"


class DecodeImages:
    """CPU stage: read + decode + ADM center crop. Output adds `pixels` (R, R, channels) uint8 and
    `error` ('' when the image is good)."""

    def __init__(self, root: str, resolution: int, mode: str = "RGB", max_pixels: int = DEFAULT_MAX_PIXELS):
        self.root, self.resolution, self.mode, self.max_pixels = Path(root), resolution, mode, max_pixels
        self.channels = 1 if mode == "L" else 3

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        pixels = np.zeros((n, self.resolution, self.resolution, self.channels), dtype=np.uint8)
        errors = []
        for i, key in enumerate(batch["key"]):
            array, error = load_image(self.root / str(key), self.resolution, self.mode, self.max_pixels)
            if array is not None:
                pixels[i] = array
            errors.append(error or "")
        return {**batch, "pixels": pixels, "error": np.asarray(errors, dtype=object)}


class EncodeLatents:
    """Actor stage: pixels -> posterior moments (2, C, h, w) float16; with `flip`, a second row per image
    holding the encoding of the mirrored image. `vae=None` keeps pixels (moments = (x, 0)).
    Bad rows pass through once, with zero moments and their error."""

    def __init__(self, vae: str | None, flip: bool, latent_shape: tuple[int, int, int], threads: int | None = None):
        self.flip = flip
        self.latent_shape = tuple(latent_shape)
        self.vae = None
        if threads:  # CPU actors: use every core reserved for the actor (Ray's default is 1 thread)
            torch.set_num_threads(threads)
        if vae is not None:
            from dumo_ray.vae import load_vae

            use_cuda = torch.cuda.is_available()
            self.vae = load_vae(vae, "cuda" if use_cuda else "cpu", torch.bfloat16 if use_cuda else torch.float32)

    def moments(self, images: torch.Tensor) -> np.ndarray:
        """images (N, channels, R, R) in [-1, 1] -> (N, 2, C, h, w) float16."""
        if self.vae is None:
            return torch.stack([images, torch.zeros_like(images)], dim=1).numpy().astype(np.float16)
        from dumo_ray.vae import encode_moments_in_chunks

        mean, std = encode_moments_in_chunks(self.vae, images)
        return torch.stack([mean, std], dim=1).cpu().numpy().astype(np.float16)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        good = np.asarray([e == "" for e in batch["error"]], dtype=bool)
        images = torch.from_numpy(np.ascontiguousarray(batch["pixels"][good])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        variants = [(False, images)] + ([(True, torch.flip(images, dims=[3]))] if self.flip else [])
        out: dict[str, list] = {"key": [], "label": [], "shard": [], "flip": [], "error": [], "moments": []}
        zero = np.zeros((2, *self.latent_shape), dtype=np.float16)
        for flipped, x in variants:
            encoded = self.moments(x) if len(x) else np.zeros((0, 2, *self.latent_shape), np.float16)
            for j, i in enumerate(np.flatnonzero(good)):
                self._append(out, batch, i, flipped, "", encoded[j])
        for i in np.flatnonzero(~good):
            self._append(out, batch, i, False, batch["error"][i], zero)
        return {
            "key": np.asarray(out["key"], dtype=object),
            "label": np.asarray(out["label"], dtype=np.int64),
            "shard": np.asarray(out["shard"], dtype=np.int64),
            "flip": np.asarray(out["flip"], dtype=bool),
            "error": np.asarray(out["error"], dtype=object),
            "moments": np.stack(out["moments"]) if out["moments"] else np.zeros((0, 2, *self.latent_shape), np.float16),
        }

    @staticmethod
    def _append(out, batch, i, flipped, error, moments):
        out["key"].append(batch["key"][i])
        out["label"].append(batch["label"][i])
        out["shard"].append(batch["shard"][i])
        out["flip"].append(flipped)
        out["error"].append(error)
        out["moments"].append(moments)


def write_shard(batch: dict[str, np.ndarray], output: str, names: dict[int, str]) -> dict[str, np.ndarray]:
    """All rows of one shard -> `<name>.parquet` + `<name>.json`, each written to a temporary name and
    renamed; the parquet rename comes last and is the commit. Rows are sorted by (key, flip) so the
    bytes are the same whatever order the pipeline delivered them in."""
    shard = int(batch["shard"][0])
    name = names[shard]
    output_dir = Path(output)
    good = np.asarray([e == "" for e in batch["error"]], dtype=bool)
    skipped = sorted({(str(k), str(e)) for k, e, ok in zip(batch["key"], batch["error"], good) if not ok})
    keys = [str(k) for k in batch["key"][good]]
    order = sorted(range(len(keys)), key=lambda i: (keys[i], bool(batch["flip"][good][i])))
    moments = batch["moments"][good][order]
    table = moments_table([keys[i] for i in order], batch["label"][good][order], batch["flip"][good][order], moments)

    final = output_dir / name
    tmp = output_dir / f".tmp-{name}-{os.getpid()}"
    write_shard_table(table, tmp)
    sum_mean, sum_sq, count = moment_sums(moments)
    sidecar: dict[str, Any] = {
        "file": name, "rows": len(keys), "images": len(set(keys)), "sha256": file_sha256(tmp),
        "sum_mean": list(map(float, sum_mean)), "sum_sq": list(map(float, sum_sq)), "count": int(count),
        "skipped": [{"key": k, "reason": e} for k, e in skipped],
    }
    side_final = final.with_suffix(SIDECAR_SUFFIX)
    side_tmp = output_dir / f".tmp-{side_final.name}-{os.getpid()}"
    side_tmp.write_text(json.dumps(sidecar))
    os.replace(side_tmp, side_final)
    os.replace(tmp, final)  # the commit: a shard is done once its parquet file has its final name
    return {"shard": np.asarray([shard]), "rows": np.asarray([len(keys)]), "skipped": np.asarray([len(skipped)])}
