"""The latent dataset format: Parquet shards + `manifest.json`, and how training reads them.

Each row is one (image, flip): `key` (path relative to the source root), `label` (int64), `flip`
(bool, True = encoding of the mirrored image) and `moments` (float16, shape (2, C, h, w): the VAE
posterior mean and std). Schema 2 stores each row's moments as one fixed-size binary value (the raw
C-order float16 bytes; the shape is in the manifest and in the file metadata, `dumo_ray.moments_shape`):
Parquet decodes that as one copy, ~8x faster than schema 1's list of 8,192 float16 values with a
repetition level each (measured 110,000 vs 13,000 rows/s a core for 2x4x32x32). Schema 1 shards (Ray's
tensor extension type) still read; `moments_array` turns either column into an (N, 2, C, h, w) array.

With `--vae none` the "moments" are the pixels in [-1, 1] and a zero std: one format for both paths.
Every shard is written with Parquet page checksums (CRC32 of each page), and every reader here verifies
them and rejects non-finite moments (`read_training_table`): a corrupted shard of the right size stops a
run with an error naming the file instead of training on garbage. The check costs a CRC per page (GB/s)
and one pass of `isfinite`, not a hash of the whole dataset (`verify-latents` does that, by SHA-256).
Shards written before the checksums existed read as before (nothing to verify) but still get the
finiteness check.

Latents are normalised just in time (`data.loader`): z = (mean + std * eps - channel_mean) / channel_std,
with the per-channel statistics of the manifest (or a single scale such as SD's 0.18215).

This module imports no torch: Ray Data's read tasks load it (`read_training_shards`), and each read
worker would otherwise import torch for nothing (measured: a process importing numpy, pyarrow, torch and
pydantic used 2.3 CPU-s and 680 MB peak RSS; numpy and pyarrow alone 0.3 CPU-s and 64 MB).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dumo_ray.errors import DeterministicError

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
SHAPE_KEY = b"dumo_ray.moments_shape"
COLUMNS = ("key", "label", "flip", "moments")


def shard_name(index: int, total: int) -> str:
    return f"shard-{index:05d}-of-{total:05d}.parquet"


def moments_table(keys: list[str], labels: np.ndarray, flips: np.ndarray, moments: np.ndarray) -> pa.Table:
    """moments: (N, 2, C, h, w) -> a table in the shard schema (float16 moments, one binary value a row)."""
    moments = np.ascontiguousarray(moments, dtype=np.float16)
    row_bytes = int(np.prod(moments.shape[1:])) * moments.itemsize
    table = pa.table({
        "key": pa.array(keys, pa.string()),
        "label": pa.array(np.asarray(labels, dtype=np.int64)),
        "flip": pa.array(np.asarray(flips, dtype=bool)),
        "moments": pa.Array.from_buffers(pa.binary(row_bytes), len(moments), [None, pa.py_buffer(moments)]),
    })
    return table.replace_schema_metadata({SHAPE_KEY: json.dumps(list(moments.shape[1:])).encode()})


def moments_array(column: pa.Array | pa.ChunkedArray, shape: tuple[int, ...]) -> np.ndarray:
    """A shard's moments column, schema 2 (fixed-size binary: no copy) or 1 (tensor extension / list),
    -> an (N, *shape) float16 array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column, pa.ExtensionArray):
        column = column.storage
    if pa.types.is_fixed_size_binary(column.type):
        width = column.type.byte_width
        flat = np.frombuffer(column.buffers()[1], dtype=np.float16,
                             count=len(column) * width // np.dtype(np.float16).itemsize, offset=column.offset * width)
    else:
        flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(column), *shape)


def write_shard_table(table: pa.Table, path: str | Path) -> None:
    """Parquet with the moments column neither dictionary-encoded nor compressed: float16 latents do not
    repeat or compress (-6% size), and decoding a dictionary-encoded column made reading ~4x slower
    (measured 2,400 vs 10,500-14,000 rows/s a core for 2x4x32x32 moments)."""
    small = [name for name in table.column_names if name != "moments"]
    compression = {name: "snappy" for name in small} | {"moments": "none"}
    pq.write_table(table, path, use_dictionary=small, compression=compression, write_page_checksum=True)


class CorruptShardError(DeterministicError, ValueError):
    """A latent shard whose bytes or values cannot be right. Never worth a retry: it fails the same way."""


def read_training_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """A shard read with its page checksums verified and its moments checked for NaN / Inf: the one way
    every training, evaluation and verification reader opens a shard."""
    try:
        table = pq.read_table(path, columns=columns, page_checksum_verification=True)
    except OSError as error:  # pyarrow: "could not verify page integrity, CRC checksum verification failed"
        raise CorruptShardError(f"latent shard {path} is corrupt ({error}); check the folder with `dumo-ray "
                                "verify-latents` and precompute it again") from None
    if "moments" in table.column_names:
        shape = json.loads(table.schema.metadata[SHAPE_KEY])
        moments = moments_array(table.column("moments"), shape)
        bad = ~np.isfinite(moments).all(axis=tuple(range(1, moments.ndim)))  # per row; 0 rows is fine
        if bad.any():
            raise CorruptShardError(f"latent shard {path} has {int(bad.sum()):,} rows with NaN or Inf moments "
                                    f"(first: row {int(np.argmax(bad))}); check the folder with `dumo-ray "
                                    "verify-latents` and precompute it again")
    return table


def read_training_shards(paths: pa.Table, shape: tuple[int, ...], drop_flipped: bool) -> pa.Table:
    """Runs inside the read tasks, one shard at a time: reads it with its page checksums verified and its
    moments checked (a corrupt shard raises, naming the file), optionally drops the mirrored rows, and
    turns the moments column into Ray's tensor type so that batches arrive as (N, *shape) tensors."""
    from ray.data.extensions import ArrowTensorArray

    tables = [read_training_table(path, ["label", "flip", "moments"]) for path in paths.column("path").to_pylist()]
    batch = pa.concat_tables(tables)
    if drop_flipped:
        batch = batch.filter(pc.invert(batch.column("flip")))
    index = batch.schema.get_field_index("moments")
    return batch.set_column(index, "moments", ArrowTensorArray.from_numpy(moments_array(batch.column("moments"), shape)))


def read_shard(path: str | Path) -> dict[str, Any]:
    """Plain pyarrow: {"key": list, "label": (N,), "flip": (N,), "moments": (N, 2, C, h, w) float16}."""
    table = read_training_table(path)
    shape = json.loads(table.schema.metadata[SHAPE_KEY])
    return {
        "key": table.column("key").to_pylist(),
        "label": table.column("label").to_numpy(),
        "flip": table.column("flip").to_numpy(zero_copy_only=False),
        "moments": moments_array(table.column("moments"), shape),
    }


def load_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {root} the output folder of `dumo-ray precompute`?")
    manifest = json.loads(path.read_text())
    if manifest.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
        raise ValueError(f"{path} has schema version {manifest.get('schema_version')}, this dumo-ray reads "
                         f"{' and '.join(map(str, READABLE_SCHEMA_VERSIONS))}")
    return manifest


def channel_stats(sum_mean: np.ndarray, sum_sq: np.ndarray, count: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of z ~ N(mean, std^2) over every latent pixel:
    E[z] = E[mean], E[z^2] = E[mean^2 + std^2]."""
    mean = sum_mean / count
    var = np.maximum(sum_sq / count - mean ** 2, 0.0)
    return mean.tolist(), np.sqrt(var).tolist()


def moment_sums(moments: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-channel sums of the mean and of mean^2 + std^2 over rows and pixels, in float64."""
    m = moments.astype(np.float64)
    mean, std = m[:, 0], m[:, 1]
    sum_mean = mean.sum(axis=(0, 2, 3))
    sum_sq = (mean ** 2 + std ** 2).sum(axis=(0, 2, 3))
    return sum_mean, sum_sq, mean.shape[0] * mean.shape[2] * mean.shape[3]
