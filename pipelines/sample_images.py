"""Mass sampling on Ray Data: `num` images from an EMA export (or a training checkpoint directory), spread over
a pool of sampler actors (one GPU each when the cluster has GPUs), decoded through the VAE named in the
latent manifest, written as PNG files (`<index>_c<label>.png`, by the actors) and/or one ADM sample batch
`samples.npz` (`arr_0` uint8 NHWC, `arr_1` labels; assembled on the driver through a memory map).

Image i is drawn from (seed, i) alone and the network always runs on `chunk`-sized batches, so every
image is bit-identical whatever the number of actors or `batch_size`.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

SETTINGS_FILE = "samples.json"
NPZ_FILE = "samples.npz"
PNG_DIR = "images"


class SamplerActor:
    """Holds the model (and VAE) once; each call draws the images of a batch of indices."""

    def __init__(self, checkpoint: str, classes: list[int], steps: int, method: str | None, seed: int, mid: float,
                 chunk: int, png_dir: str | None, keep_images: bool, vae: str | None, use_gpu: bool, threads: int,
                 precision: str = "fp32"):
        import torch

        from dumo_ray.sampling import load_ema_model, make_decoder

        torch.set_num_threads(max(1, threads))
        device = "cuda" if use_gpu else "cpu"
        self.model, self.cfg, codec = load_ema_model(checkpoint, device)
        self.decode = make_decoder(codec, vae, device)
        self.classes, self.steps, self.method, self.seed, self.mid, self.chunk = classes, steps, method, seed, mid, chunk
        self.png_dir, self.keep_images, self.precision = png_dir, keep_images, precision

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        from dumo_ray.eval.pixels import to_uint8
        from dumo_ray.sampling import draw

        indices = batch["data"].astype(np.int64)
        images, labels = draw(self.model, self.cfg, self.decode, indices, self.classes, steps=self.steps,
                              method=self.method, seed=self.seed, mid=self.mid, chunk=self.chunk,
                              precision=self.precision)
        pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()
        if self.png_dir is not None:
            for index, label, image in zip(indices, labels.tolist(), pixels):
                path = Path(self.png_dir) / f"{index:06d}_c{label:04d}.png"
                tmp = path.with_name(f".tmp-{path.name}")
                Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(tmp, format="PNG")
                os.replace(tmp, path)
        out = {"index": indices, "label": labels.numpy()}
        if self.keep_images:
            out["image"] = pixels
        return out


def check_output(output: Path, settings: dict) -> None:
    """Refuse to mix samples of different settings in one folder (that would silently corrupt a set)."""
    previous = output / SETTINGS_FILE
    if previous.is_file():
        old = json.loads(previous.read_text())
        # Folders written before `precision` existed were fp32.
        old_settings = {"precision": "fp32", **old.get("settings", {})}
        if old_settings != settings:
            changed = sorted(k for k in settings if old_settings.get(k) != settings[k])
            raise ValueError(f"{output} holds samples drawn with other settings ({', '.join(changed)} differ); "
                             "choose another --output-dir or delete that folder")


def sample_images(checkpoint: str | Path, output: str | Path, *, num: int, steps: int,
                  labels: Sequence[int] | None = None, method: str | None = None, seed: int = 0, mid: float = 0.5,
                  chunk: int = 64, batch_size: int = 256, workers: int | None = None,
                  formats: Sequence[str] = ("png", "npz"), vae: str | None = None, precision: str = "fp32") -> dict:
    import ray

    from dumo_ray.eval.image_sets import SampleBatchWriter
    from dumo_ray.sampling import check_labels, check_precision, load_model_info

    bad = sorted(set(formats) - {"png", "npz"})
    if bad or not formats:
        raise ValueError(f"--format takes png and/or npz, got {','.join(formats) or 'nothing'}")
    if num < 1 or steps < 1 or chunk < 1 or batch_size < 1:
        raise ValueError("num, steps, chunk and batch size must be >= 1")
    checkpoint, output = str(Path(checkpoint).resolve()), Path(output).resolve()
    cfg, _ = load_model_info(checkpoint)
    classes = check_labels(labels, cfg.model.num_classes)
    settings = {"checkpoint": checkpoint, "num": num, "steps": steps, "classes": classes, "method": method,
                "seed": seed, "mid": mid, "chunk": chunk, "vae": vae, "precision": check_precision(precision)}
    check_output(output, settings)
    output.mkdir(parents=True, exist_ok=True)
    (output / SETTINGS_FILE).write_text(json.dumps({"settings": settings, "complete": False}, indent=2))
    png_dir = output / PNG_DIR if "png" in formats else None
    if png_dir is not None:
        png_dir.mkdir(parents=True, exist_ok=True)

    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0
    workers = workers or max(gpus, 1)
    cpus = ray.cluster_resources().get("CPU", 1)
    threads = 1 if use_gpu else max(1, int(cpus // workers))
    print(f"[dumo-ray] sampling {num:,} images ({steps} steps, {precision}) from {checkpoint} on {workers} "
          f"{'GPU' if use_gpu else 'CPU'} actor(s) -> {output}", flush=True)
    if not use_gpu and workers > cpus:
        raise ValueError(f"--workers {workers} needs {workers} CPUs; the cluster has {cpus:g}")
    # In-memory index blocks: no read tasks, which could wait forever for CPUs the actors hold.
    blocks = np.array_split(np.arange(num, dtype=np.int64), max(1, min(-(-num // batch_size), workers * 8)))
    ds = ray.data.from_numpy(blocks).map_batches(
        SamplerActor, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=workers),
        # One reserved CPU per CPU actor (its torch threads may use more): a bigger reservation could take
        # every CPU and starve the tasks that feed the actors.
        num_gpus=1 if use_gpu else 0, num_cpus=None if use_gpu else 1,
        fn_constructor_kwargs=dict(checkpoint=checkpoint, classes=classes, steps=steps, method=method, seed=seed, mid=mid,
                                   chunk=chunk, png_dir=str(png_dir) if png_dir else None, keep_images="npz" in formats,
                                   vae=vae, use_gpu=use_gpu, threads=threads, precision=precision))

    writer, done, started, next_report = None, 0, time.perf_counter(), max(num // 10, 1)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            if "npz" in formats:
                if writer is None:
                    writer = SampleBatchWriter(output / NPZ_FILE, num, batch["image"].shape[1:])
                writer.write(batch["index"], batch["image"], batch["label"])
            done += len(batch["index"])
            if done >= next_report or done == num:
                rate = done / max(time.perf_counter() - started, 1e-9)
                print(f"[dumo-ray] sampled {done:,}/{num:,} images ({rate:.1f} img/s)", flush=True)
                next_report += max(num // 10, 1)
        npz = str(writer.close()) if writer is not None else None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    seconds = time.perf_counter() - started
    summary = {"settings": settings, "complete": True, "images": done, "seconds": round(seconds, 1), "workers": workers,
               "npz": npz, "png_dir": str(png_dir) if png_dir else None}
    (output / SETTINGS_FILE).write_text(json.dumps(summary, indent=2))
    return summary
