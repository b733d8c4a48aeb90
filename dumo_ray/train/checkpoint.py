"""The single-process backend's checkpoint directories, written atomically, and the restricted
unpickling every engine-state load goes through.

Layout: <run_dir>/checkpoints/images_<000000012800>/ holding the files of train.backend (EMA, state,
config, codec) and the engine state. A checkpoint is written to a temporary directory and renamed into
place, so a crash never leaves a partial checkpoint that looks complete.

Loading never unpickles arbitrary objects: a pickle can run any code, and whoever can write to
`storage_path` would run it on every worker of a resume. Our own files are safetensors/JSON/YAML or
loaded with `torch.load(weights_only=True)`; DeepSpeed's ZeRO shards are loaded by DeepSpeed itself with
`weights_only=False`, so `restricted_unpickling` turns on torch's own override (TORCH_FORCE_WEIGHTS_ONLY_LOAD)
around those loads and allow-lists the few plain-data DeepSpeed classes its shards hold.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Callable, Iterator

from dumo_ray.digests import forced_weights_only
from dumo_ray.errors import DeterministicError

_NAME = re.compile(r"^images_(\d{12})$")
COMPLETE_MARKER = "state.json"  # written last-but-not-least by every backend; the rename makes it atomic


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def save_checkpoint(run_dir: str | Path, images: int, write: Callable[[Path], None], keep: int) -> Path:
    """`write(directory)` fills a fresh temporary directory, which then replaces `images_<N>`."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"images_{images:012d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = checkpoint_dirs(run_dir)
    return found[-1] if found else None


class UnsafeCheckpointError(DeterministicError, pickle.UnpicklingError):
    """A checkpoint file holds something other than tensors and plain containers (tampered, or foreign)."""


def deepspeed_safe_globals() -> list:
    """The classes DeepSpeed's ZeRO optimizer shards pickle besides tensors (found by loading stage 1, 2 and 3
    shards): the loss scaler, the ZeRO stage enum and a (numel, start) dataclass. Plain data: the unpickler
    rebuilds them by setting attributes or by enum value, no method of theirs runs."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def refused_file(directory: Path, allowed: list) -> tuple[Path, str] | None:
    """The first *.pt file under `directory` that torch's weights-only unpickler refuses, with its reason."""
    import torch

    for path in sorted(directory.rglob("*.pt")):
        try:  # mmap: the tensors' bytes are not read, only the pickle (a zip file's; a bare pickle has no mmap)
            with torch.serialization.safe_globals(allowed):
                torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as error:  # noqa: BLE001 (whatever the reason, this file is the one not loaded)
            reason = next((line.strip() for line in str(error).splitlines() if "Unsupported" in line), "")
            return path, reason.split(" was not an allowed global")[0] or "not a weights-only pickle"
    return None


@contextlib.contextmanager
def restricted_unpickling(directory: str | Path, allowed: list = ()) -> Iterator[None]:
    """Every torch.load inside runs weights-only (tensors, plain containers and `allowed` classes), even
    where the caller asks for weights_only=False. A refusal raises UnsafeCheckpointError naming the file
    under `directory` (the checkpoint being loaded) and what it tried to load."""
    import torch

    try:
        with forced_weights_only(), torch.serialization.safe_globals(list(allowed)):
            yield
    except pickle.UnpicklingError as error:
        found = refused_file(Path(directory), list(allowed))
        where = f"{found[0]} ({found[1]})" if found else f"a file under {directory}"
        raise UnsafeCheckpointError(f"refusing to unpickle {where}: checkpoint files may hold only tensors and "
                                    f"plain containers; is the checkpoint from this code, and is storage_path "
                                    f"writable only by you?") from error
