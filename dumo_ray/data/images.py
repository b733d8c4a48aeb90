"""Image folders (`root/<class>/<image>`): listing, robust decoding, ADM-style center crop.

Bad files never stop a run: `load_image` returns (array, None) or (None, reason) and the reason ends up
in the manifest's list of skipped files.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".JPEG"}
# Images above this many pixels are skipped rather than decoded (a decompression bomb or a scan).
DEFAULT_MAX_PIXELS = 64_000_000


@dataclass(frozen=True)
class ImageRecord:
    key: str  # path relative to the root, with '/' separators: unique and stable
    label: int


def list_image_tree(root: str | Path) -> tuple[list[ImageRecord], list[str]]:
    """Every file under root/<class>/ (any depth), sorted by key; class index = sorted folder names.

    All files are listed, not only those with an image suffix: a file that does not decode is reported
    as skipped, with its reason, instead of silently vanishing."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"input folder {root} has no class sub-folders (expected root/<class>/<image>)")
    records = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in filenames:
                if filename.startswith("."):
                    continue
                path = Path(dirpath) / filename
                records.append(ImageRecord(path.relative_to(root).as_posix(), label))
    records.sort(key=lambda r: r.key)
    return records, classes


def center_crop_adm(image: Image.Image, resolution: int) -> Image.Image:
    """ADM's center crop: halve with a box filter while the short side is >= 2R, resize the short side
    to R with bicubic, then crop the center R x R."""
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    left = (image.width - resolution) // 2
    top = (image.height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def load_image(path: str | Path, resolution: int, mode: str = "RGB",
               max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray | None, str | None]:
    """-> (uint8 array (R, R, channels), None) or (None, reason). Converts grayscale/RGBA/CMYK/palette
    images to `mode` (RGBA is composited on white so transparent areas do not turn black)."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return None, "empty file"
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    return None, f"too large ({width}x{height} pixels > {max_pixels:,})"
                if min(width, height) < 1:
                    return None, "zero-sized image"
                image.draft("RGB", (resolution * 2, resolution * 2))  # JPEG: decode at reduced size
                image.load()
                if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
                    rgba = image.convert("RGBA")
                    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    image = Image.alpha_composite(background, rgba)
                image = image.convert(mode)
                cropped = center_crop_adm(image, resolution)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return None, f"too large: {err}"
    except Exception as err:  # PIL raises many types for corrupt data; any of them means "skip"
        return None, f"cannot decode: {type(err).__name__}: {err}"
    array = np.asarray(cropped, dtype=np.uint8)
    return (array[..., None] if array.ndim == 2 else array), None


def skip_summary(skipped: list[dict[str, str]], reasons: int = 3) -> str:
    """A manifest's skipped files in one line, the most common reasons first:
    `N files skipped: <count> x <reason> (e.g. <key>), ...`."""
    by_reason: dict[str, list[str]] = {}
    for record in skipped:
        # A decoder's message quotes the file's path: grouped without it.
        by_reason.setdefault(re.sub(r"\s*'[^']*'", "", record["reason"]), []).append(record["key"])
    common = sorted(by_reason.items(), key=lambda item: (-len(item[1]), item[0]))
    text = ", ".join(f"{len(keys)} x {reason} (e.g. {keys[0]})" for reason, keys in common[:reasons])
    more = f", and {len(common) - reasons} other reasons" if len(common) > reasons else ""
    return f"{len(skipped)} file{'s' if len(skipped) != 1 else ''} skipped: {text}{more}"
