"""`dumo-ray verify-latents DIR`: checks a precomputed latent folder against its manifest."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from dumo_ray.data.images import skip_summary
from dumo_ray.data.latents import COLUMNS, CorruptShardError, load_manifest, read_shard
from dumo_ray.digests import file_sha256


def verify_latents(root: str | Path, *, preview: str | Path | None = None, preview_rows: int = 16,
                   vae: str | None = None) -> dict[str, Any]:
    """Schema, row counts, checksums, NaN/Inf and duplicate keys for every shard. Returns
    {"problems": [...], "rows": N, "shards": K, "preview": path or None}; with `preview`, decodes the first rows
    to a PNG grid (when there are rows). An empty folder is a problem, explained by its skipped files."""
    root = Path(root)
    manifest = load_manifest(root)
    problems: list[str] = []
    seen: set[tuple[str, bool]] = set()
    rows = 0
    first: np.ndarray | None = None
    for shard in manifest["shards"]:
        path = root / shard["file"]
        if not path.is_file():
            problems.append(f"{shard['file']}: missing")
            continue
        if file_sha256(path) != shard["sha256"]:
            problems.append(f"{shard['file']}: checksum differs from the manifest (file changed or corrupt)")
            continue
        names = pq.read_schema(path).names
        if sorted(names) != sorted(COLUMNS):
            problems.append(f"{shard['file']}: columns {names}, expected {list(COLUMNS)}")
            continue
        try:
            data = read_shard(path)
        except CorruptShardError as error:  # page checksums or NaN / Inf moments
            problems.append(f"{shard['file']}: {error}")
            continue
        n = len(data["key"])
        rows += n
        if n != shard["rows"]:
            problems.append(f"{shard['file']}: {n} rows, manifest says {shard['rows']}")
        if list(data["moments"].shape[1:]) != manifest["moments_shape"]:
            problems.append(f"{shard['file']}: moments shape {list(data['moments'].shape[1:])}, manifest says {manifest['moments_shape']}")
        labels = data["label"]
        if n and (labels.min() < 0 or labels.max() >= manifest["num_classes"]):
            problems.append(f"{shard['file']}: labels outside [0, {manifest['num_classes']})")
        for key, flip in zip(data["key"], data["flip"]):
            if (key, bool(flip)) in seen:
                problems.append(f"{shard['file']}: duplicate row {key} flip={bool(flip)}")
            seen.add((key, bool(flip)))
        if first is None and n:
            first = data["moments"][:preview_rows]
    if rows != manifest["rows"]:
        problems.append(f"{rows} rows in the shards, manifest says {manifest['rows']}")
    if rows == 0 and not manifest["rows"]:
        problems.append(no_rows_problem(manifest))
    written = write_preview(first, manifest, preview, vae) if preview is not None and first is not None else None
    return {"problems": problems, "rows": rows, "shards": len(manifest["shards"]), "preview": written}


def no_rows_problem(manifest: dict[str, Any]) -> str:
    """An empty latent folder, explained by the files the precompute skipped (and why)."""
    skipped = manifest.get("skipped", [])
    if not skipped:
        return "the folder holds no latents (0 rows)"
    return f"the folder holds no latents (0 rows): every file was skipped ({skip_summary(skipped)})"


def write_preview(moments: np.ndarray, manifest: dict[str, Any], path: str | Path, vae: str | None) -> Path:
    """Decodes posterior means (through the manifest's VAE, or `vae`) to a PNG grid."""
    import torch

    from dumo_ray.image_grid import save_grid

    means = torch.from_numpy(moments[:, 0].astype(np.float32))
    vae_id = vae or manifest["vae"]["id"]
    if vae_id != "none":
        from dumo_ray.vae import decode, load_vae

        means = decode(load_vae(vae_id), means)
    return save_grid(means, path, nrow=8, upscale=4 if manifest["resolution"] <= 16 else 1)
