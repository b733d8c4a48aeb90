"""Ray Data job: an image tree -> SD-VAE latents -> deterministic Parquet shards + manifest.json.

    dumo-ray precompute --input DIR --output DIR --vae stabilityai/sd-vae-ft-ema --resolution 256 --flip

Resumable: shard k always holds the same images (sorted keys, fixed shard size); a shard is committed by
renaming its finished file, so a rerun after an interruption redoes only the shards that are missing and
never leaves a duplicate or partial shard visible. The settings of the first run are kept in
`precompute.json`; a rerun with different settings into the same folder is refused.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from dumo_ray.data.images import DEFAULT_MAX_PIXELS, list_image_tree, skip_summary
from dumo_ray.data.codec import CODEC_FILE, LatentCodec
from dumo_ray.data.latents import MANIFEST, SCHEMA_VERSION, channel_stats, shard_name
from dumo_ray.data.precompute_stages import SIDECAR_SUFFIX, DecodeImages, EncodeLatents, write_shard

SETTINGS = "precompute.json"


def _latent_geometry(vae: str | None, resolution: int, mode: str) -> dict[str, Any]:
    """Latent shape and the VAE's identity, read on the driver from the VAE's config."""
    if vae is None:
        channels = 1 if mode == "L" else 3
        return {"id": "none", "config_hash": None, "scaling_factor": None,
                "latent_shape": [channels, resolution, resolution]}
    from dumo_ray.vae import downsample_factor, load_vae_config, vae_config_hash

    config = load_vae_config(vae)  # config.json only: the weights load once per encoder actor
    factor = downsample_factor(config)
    if resolution % factor:
        raise ValueError(f"--resolution {resolution} is not a multiple of the VAE's downsampling factor {factor}")
    return {"id": vae, "config_hash": vae_config_hash(config), "scaling_factor": config.get("scaling_factor", 0.18215),
            "latent_shape": [config.get("latent_channels", 4), resolution // factor, resolution // factor]}


def _check_settings(output: Path, settings: dict[str, Any]) -> None:
    path = output / SETTINGS
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous != settings:
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            if "schema_version" in changed:  # shards of two formats must not mix in one dataset
                raise ValueError(f"{output} holds a precompute in shard schema {previous.get('schema_version', 1)}, "
                                 f"this dumo-ray writes schema {SCHEMA_VERSION}; training reads it as it is, but "
                                 "to resume it use the dumo-ray that started it, or choose a new --output folder")
            raise ValueError(f"{output} already holds a precompute with different settings ({', '.join(changed)}); "
                             "rerun with the same settings to resume, or choose a new --output folder")
    else:
        path.write_text(json.dumps(settings, indent=2))


def precompute_latents(
    input_dir: str,
    output_dir: str,
    *,
    vae: str | None = None,
    resolution: int = 256,
    flip: bool = False,
    limit: int | None = None,
    shard_size: int = 1000,
    batch_size: int = 32,
    num_encoders: int | None = None,
    mode: str = "RGB",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """Runs (or resumes) the precompute; returns the summary and writes `manifest.json`. When no file decodes,
    the manifest (with every skipped file and why) is still written, then ValueError names the reasons."""
    import ray

    if resolution < 1 or shard_size < 1 or batch_size < 1:
        raise ValueError("--resolution, --shard-size and --batch-size must be >= 1")
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    started = time.perf_counter()
    source = Path(input_dir).resolve()
    output = Path(output_dir)
    records, classes = list_image_tree(source)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise ValueError(f"no files found under {source}/<class>/")
    output.mkdir(parents=True, exist_ok=True)
    geometry = _latent_geometry(vae, resolution, mode)
    settings = {"schema_version": SCHEMA_VERSION, "source_root": str(source), "vae": geometry["id"],
                "vae_config_hash": geometry["config_hash"], "resolution": resolution, "flip": flip, "limit": limit,
                "shard_size": shard_size, "mode": mode, "max_pixels": max_pixels, "files": len(records)}
    _check_settings(output, settings)

    num_shards = math.ceil(len(records) / shard_size)
    names = {i: shard_name(i, num_shards) for i in range(num_shards)}
    done = {i for i, name in names.items()
            if (output / name).is_file() and (output / name).with_suffix(SIDECAR_SUFFIX).is_file()}
    todo = [dict(key=r.key, label=r.label, shard=i // shard_size) for i, r in enumerate(records)
            if i // shard_size not in done]
    print(f"[dumo-ray] precompute: {len(records):,} files in {len(classes)} classes -> {num_shards} shards "
          f"({len(done)} already done, {num_shards - len(done)} to do)", flush=True)

    if todo:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        encoders = num_encoders or max(1, gpus)
        if gpus:
            # GPU actors encode; CPU tasks decode alongside and scale on their own.
            decode_cpus, encoder_resources, threads = 1.0, {"num_gpus": 1}, None
        else:
            # CPU only: decoding is fused into the encoder actors (same 1-CPU request), and each actor runs
            # torch on its share of the cores. Reserving the whole share instead starves the shuffle and
            # write tasks (measured: 92 s vs 77 s for 192 images on 2 cores).
            share = max(1, int(resources.get("CPU", 1)) // encoders)
            decode_cpus, encoder_resources, threads = 1.0, {"num_cpus": 1}, share
        ds = ray.data.from_items(todo, override_num_blocks=max(1, min(len(todo) // batch_size, 200)))
        ds = ds.map_batches(DecodeImages(str(source), resolution, mode, max_pixels), batch_size=batch_size,
                            num_cpus=decode_cpus)
        ds = ds.map_batches(EncodeLatents,
                            fn_constructor_kwargs=dict(vae=vae, flip=flip, latent_shape=tuple(geometry["latent_shape"]),
                                                       threads=threads),
                            batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=encoders), **encoder_resources)
        # One group per shard; a few partitions per CPU (Ray's default of 200 is costly on small runs).
        partitions = max(1, min(len({row["shard"] for row in todo}), int(resources.get("CPU", 1)) * 2))
        ds = ds.groupby("shard", num_partitions=partitions).map_groups(
            write_shard, fn_kwargs=dict(output=str(output.resolve()), names=names), batch_format="numpy")
        written = ds.take_all()

    manifest = write_manifest(output, settings, geometry, classes, names)
    elapsed = time.perf_counter() - started
    encoded = len(todo) - sum(int(row["skipped"]) for row in written) if todo else 0
    summary = {"files": len(records), "processed_now": len(todo), "encoded_now": encoded,
               "skipped": len(manifest["skipped"]), "rows": manifest["rows"], "shards": num_shards,
               "seconds": round(elapsed, 1), "images_per_s": round(len(todo) / elapsed, 1) if todo else 0.0}
    print(f"[dumo-ray] precompute done: read {len(todo):,} files, encoded {encoded:,}, skipped {summary['skipped']:,} "
          f"(all shards), rows {manifest['rows']:,} in {num_shards} shards, {summary['images_per_s']:.1f} images/s "
          f"-> {output / MANIFEST}", flush=True)
    if not manifest["rows"]:  # nothing to train on: a failure, not a dataset of 0 rows
        raise ValueError(f"no image under {source} could be decoded ({skip_summary(manifest['skipped'])}); "
                         f"every skipped file and its reason is listed in {output / MANIFEST}")
    return summary


def precompute_pixels_in_process(input_dir: str | Path, output_dir: str | Path, *, resolution: int, mode: str = "L",
                                 shard_size: int = 1000) -> dict[str, Any]:
    """A pixel-space latent folder (--vae none) written by this pipeline's own stages and manifest writer in
    this process, without Ray: shard k holds the same rows as the Ray Data pipeline puts there (sorted keys,
    fixed shard size), and the shard bytes are the same (tests/test_precompute.py). For the tests and for a
    machine without Ray (the GPU benchmark's Fashion-MNIST run). Returns the manifest."""
    import numpy as np

    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    records, classes = list_image_tree(input_dir)
    geometry = _latent_geometry(None, resolution, mode)
    num_shards = math.ceil(len(records) / shard_size)
    names = {i: shard_name(i, num_shards) for i in range(num_shards)}
    decode = DecodeImages(str(input_dir), resolution, mode)
    encode = EncodeLatents(None, False, tuple(geometry["latent_shape"]))
    for shard in range(num_shards):
        rows = records[shard * shard_size:(shard + 1) * shard_size]
        batch = {"key": np.asarray([r.key for r in rows], dtype=object), "label": np.asarray([r.label for r in rows]),
                 "shard": np.full(len(rows), shard, dtype=np.int64)}
        write_shard(encode(decode(batch)), str(output), names)
    settings = {"source_root": str(Path(input_dir).resolve()), "resolution": resolution, "mode": mode, "flip": False,
                "shard_size": shard_size}
    return write_manifest(output, settings, geometry, classes, names)


def write_manifest(output: Path, settings: dict[str, Any], geometry: dict[str, Any], classes: list[str],
                   names: dict[int, str]) -> dict[str, Any]:
    """Aggregates the shard sidecars into manifest.json (written to a temporary name, then renamed)."""
    import numpy as np

    shards, skipped = [], []
    sum_mean = sum_sq = None
    count = 0
    for index in sorted(names):
        sidecar = json.loads((output / names[index]).with_suffix(SIDECAR_SUFFIX).read_text())
        shards.append({"file": sidecar["file"], "rows": sidecar["rows"], "images": sidecar["images"], "sha256": sidecar["sha256"]})
        skipped.extend(sidecar["skipped"])
        if sidecar["count"]:
            sm, sq = np.asarray(sidecar["sum_mean"]), np.asarray(sidecar["sum_sq"])
            sum_mean = sm if sum_mean is None else sum_mean + sm
            sum_sq = sq if sum_sq is None else sum_sq + sq
            count += sidecar["count"]
    mean, std = channel_stats(sum_mean, sum_sq, count) if count else ([], [])
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "source_root": settings["source_root"],
        "classes": classes,
        "num_classes": len(classes),
        "vae": {"id": geometry["id"], "config_hash": geometry["config_hash"], "scaling_factor": geometry["scaling_factor"]},
        "resolution": settings["resolution"],
        "mode": settings["mode"],
        "flip": settings["flip"],
        "latent_shape": geometry["latent_shape"],
        "moments_shape": [2, *geometry["latent_shape"]],
        "rows": sum(s["rows"] for s in shards),
        "images": sum(s["images"] for s in shards),
        "latent_stats": {"mean": mean, "std": std},
        "shards": shards,
        "skipped": sorted(skipped, key=lambda s: s["key"]),
    }
    tmp = output / f".tmp-{MANIFEST}"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, output / MANIFEST)
    if count:  # the codec a model trained on this folder uses by default (data.normalize=manifest)
        LatentCodec.from_manifest(manifest).save(output / CODEC_FILE)
    return manifest
