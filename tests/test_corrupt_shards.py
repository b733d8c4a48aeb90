"""A corrupted latent shard of the right size never trains: Parquet page checksums and a finiteness check
on every read stop the run with an error naming the shard."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dumo_ray.cli import main
from dumo_ray.data.latents import CorruptShardError, load_manifest, moments_table, read_training_table

ROOT = Path(__file__).resolve().parents[1]


def corrupt_copy(latents: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the latent folder whose first shard has bytes flipped inside its moments pages (same size:
    the manifest's row counts and the file size still agree)."""
    folder = tmp_path / "latents"
    shutil.copytree(latents, folder)
    shard = load_manifest(folder)["shards"][0]["file"]
    path = folder / shard
    meta = pq.ParquetFile(path).metadata
    column = pq.ParquetFile(path).schema_arrow.get_field_index("moments")
    chunk = meta.row_group(0).column(column)
    middle = chunk.data_page_offset + chunk.total_compressed_size // 2  # inside the float16 values
    data = bytearray(path.read_bytes())
    size = len(data)
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))
    assert path.stat().st_size == size
    return folder, shard


def test_flipped_bytes_fail_the_read_naming_the_shard(digits_latents, tmp_path):
    folder, shard = corrupt_copy(digits_latents, tmp_path)
    with pytest.raises(CorruptShardError, match=rf"latent shard .*{shard} is corrupt .*CRC checksum"):
        read_training_table(folder / shard)


def test_non_finite_moments_fail_even_without_page_checksums(tmp_path):
    """Shards of older versions have no page checksums: NaN / Inf are still refused."""
    moments = np.zeros((4, 2, 1, 2, 2), np.float16)
    moments[2, 0, 0, 1, 1] = np.inf
    pq.write_table(moments_table(["a", "b", "c", "d"], np.zeros(4), np.zeros(4, bool), moments), tmp_path / "old.parquet")
    with pytest.raises(CorruptShardError, match=r"old.parquet has 1 rows with NaN or Inf moments \(first: row 2\)"):
        read_training_table(tmp_path / "old.parquet")


@pytest.mark.slow
def test_local_training_stops_on_a_corrupt_shard(digits_latents, tmp_path, capsys):
    folder, shard = corrupt_copy(digits_latents, tmp_path)
    code = main(["train", "--config", str(ROOT / "configs/digits_local.yaml"), "--set", f"data.path={folder}",
                 "--set", f"train.storage_path={tmp_path / 'runs'}", "--set", "tracking.enabled=false"])
    err = capsys.readouterr().err.splitlines()
    assert code == 1 and err[0].startswith(f"dumo-ray train: error: latent shard {folder / shard} is corrupt")
    assert not (tmp_path / "runs" / "digits-local" / "checkpoints").exists()  # not one step trained
