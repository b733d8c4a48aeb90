"""Where a run's files go: a local (or NFS) folder, or an object store (s3://, gs://) through pyarrow's
filesystems, written locally first and copied up."""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from dumo_ray.config import Config
from dumo_ray.data.codec import LatentCodec
from dumo_ray.export import export_ema


def is_remote(path: str) -> bool:
    return "://" in path


def copy_to_storage(local: Path, uri: str) -> None:
    """Copy a local file or folder to `uri` (s3://, gs://, file://, ...) with pyarrow's filesystems; the
    destination's parent folders are created first (a no-op on object stores, needed on the others)."""
    import pyarrow.fs

    filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
    filesystem.create_dir(path if local.is_dir() else path.rsplit("/", 1)[0], recursive=True)
    pyarrow.fs.copy_files(str(local), path, destination_filesystem=filesystem)


def write_export(run_dir: str, ema_state, cfg: Config, codec: LatentCodec | None) -> str:
    """The consolidated EMA export in `<run_dir>/export`; for s3:// or gs:// storage it is written locally
    and copied up."""
    if not is_remote(run_dir):
        return str(export_ema(Path(run_dir) / "export", ema_state, cfg, codec))
    with tempfile.TemporaryDirectory(prefix="dumo-export-") as staging:
        copy_to_storage(export_ema(Path(staging) / "export", ema_state, cfg, codec), f"{run_dir}/export")
    return f"{run_dir}/export"


@contextlib.contextmanager
def sample_grid_folder(run_dir: str):
    """Where rank 0 writes its sample grids: `<run_dir>/samples`, kept with the run (with or without
    MLflow). For s3:// or gs:// storage a local staging folder, copied up after each grid and removed at
    the end; yields (local folder, function that publishes one written file)."""
    if not is_remote(run_dir):
        folder = Path(run_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        yield folder, lambda path: None
        return
    with tempfile.TemporaryDirectory(prefix="dumo-grids-") as staging:
        yield Path(staging), lambda path: copy_to_storage(Path(path), f"{run_dir}/samples/{Path(path).name}")
