"""Image sets on disk, in the layouts of the ADM evaluation suite (guided-diffusion's `evaluations/`):

- a sample batch: `.npz` with `arr_0` = uint8 images (N, H, W, C) and optionally `arr_1` = labels (N,);
- a reference batch: `.npz` with `mu`, `sigma` (statistics of the 2048-d Inception pool features), and
  possibly `arr_0` images;
- or a folder of PNG/JPEG files (sorted by name; `<index>_c<label>.png` names carry the label).

`.npz` arrays are read in slices straight from the zip member, so a 50,000-image batch (10 GB at 256 px)
is never held in memory at once.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LABEL_IN_NAME = re.compile(r"_c(\d+)$")


def _npz_member(archive: zipfile.ZipFile, name: str):
    """(open member, shape, dtype) for the array `name` of an open `.npz`, positioned at the data."""
    member = archive.open(f"{name}.npy")
    version = np.lib.format.read_magic(member)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(member)
    if fortran:
        raise ValueError(f"{name} is stored in Fortran order; expected a C-ordered array")
    return member, shape, dtype


def npz_keys(path: str | Path) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        return [n[:-4] for n in archive.namelist() if n.endswith(".npy")]


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no PNG/JPEG images in {folder}")
    return files


def _read_image(path: Path) -> np.ndarray:
    """uint8 (H, W, C): grayscale files stay one channel, everything else becomes RGB."""
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("L" if image.mode in ("L", "1") else "RGB"))
    return array[..., None] if array.ndim == 2 else array


def count_images(path: str | Path) -> int:
    path = Path(path)
    if path.is_dir():
        return len(_image_files(path))
    with zipfile.ZipFile(path) as archive:
        member, shape, _ = _npz_member(archive, "arr_0")
        member.close()
        return int(shape[0])


def iter_image_batches(path: str | Path, batch_size: int = 100,
                       limit: int | None = None) -> Iterator[tuple[torch.Tensor, np.ndarray | None]]:
    """(uint8 images (B, C, H, W), labels (B,) or None) from an `.npz` (arr_0, arr_1) or an image folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image set {path} does not exist")
    if path.is_dir():
        files = _image_files(path)[:limit]
        for start in range(0, len(files), batch_size):
            names = files[start:start + batch_size]
            images = np.stack([_read_image(f) for f in names])
            matches = [LABEL_IN_NAME.search(f.stem) for f in names]
            labels = np.array([int(m.group(1)) for m in matches]) if all(matches) else None
            yield torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels
        return
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        if "arr_0.npy" not in names:
            raise ValueError(f"{path} holds no images (arr_0); keys: {[n[:-4] for n in names]}")
        labels_all = None
        if "arr_1.npy" in names:
            with archive.open("arr_1.npy") as member:
                labels_all = np.load(member)
        member, shape, dtype = _npz_member(archive, "arr_0")
        if dtype != np.uint8 or len(shape) != 4:
            raise ValueError(f"{path}: arr_0 must be uint8 images (N, H, W, C), got {dtype} {shape}")
        total = shape[0] if limit is None else min(limit, shape[0])
        per_image = int(np.prod(shape[1:]))
        with member:
            for start in range(0, total, batch_size):
                count = min(batch_size, total - start)
                raw = member.read(count * per_image)
                images = np.frombuffer(raw, dtype=np.uint8).reshape(count, *shape[1:])
                labels = labels_all[start:start + count] if labels_all is not None else None
                yield torch.from_numpy(images.copy()).permute(0, 3, 1, 2).contiguous(), labels


def save_reference(path: str | Path, mu: np.ndarray, sigma: np.ndarray) -> Path:
    """An ADM-style reference: `mu`, `sigma` (written to a temporary name, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with open(tmp, "wb") as f:
        np.savez(f, mu=np.asarray(mu, dtype=np.float64), sigma=np.asarray(sigma, dtype=np.float64))
    os.replace(tmp, path)
    return path


def load_reference(path: str | Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(mu, sigma) of a reference `.npz`, or None when it holds only images (compute them then)."""
    path = Path(path)
    if path.is_dir():
        return None
    if not path.is_file():
        raise FileNotFoundError(f"reference {path} does not exist")
    keys = npz_keys(path)
    if "mu" in keys and "sigma" in keys:
        with np.load(path) as data:
            mu, sigma = data["mu"], data["sigma"]
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise ValueError(f"{path}: mu {mu.shape} / sigma {sigma.shape} are not a mean vector and its covariance")
        return mu.astype(np.float64), sigma.astype(np.float64)
    if "arr_0" in keys:
        return None
    raise ValueError(f"{path} is neither a reference batch (mu, sigma) nor a sample batch (arr_0); keys: {keys}")


class SampleBatchWriter:
    """Builds an ADM sample batch (`arr_0` images, `arr_1` labels) of known size from rows arriving in any
    order: rows go into a memory-mapped `.npy` next to the target, and `close()` zips it into the `.npz`
    (stored, no compression; a temporary name, then renamed)."""

    def __init__(self, path: str | Path, num: int, image_shape: tuple[int, int, int]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix=".tmp-npz-", dir=self.path.parent))
        self.images = np.lib.format.open_memmap(self.work / "arr_0.npy", mode="w+", dtype=np.uint8, shape=(num, *image_shape))
        self.labels = np.full(num, -1, dtype=np.int64)
        self.written = np.zeros(num, dtype=bool)

    def write(self, indices: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
        self.images[indices] = images
        self.labels[indices] = labels
        self.written[indices] = True

    def close(self) -> Path:
        missing = np.flatnonzero(~self.written)
        if len(missing):
            raise RuntimeError(f"{len(missing)} samples were never written (first: index {missing[0]})")
        self.images.flush()
        np.save(self.work / "arr_1.npy", self.labels)
        tmp = self.work / self.path.name
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name in ("arr_0.npy", "arr_1.npy"):
                archive.write(self.work / name, arcname=name)
        del self.images
        os.replace(tmp, self.path)
        shutil.rmtree(self.work, ignore_errors=True)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
