"""The single-process backend's checkpoint directories, written atomically.

Layout: <run_dir>/checkpoints/images_<000000012800>/ holding the files of train.backend (EMA, state,
config, codec) and the engine state. A checkpoint is written to a temporary directory and renamed into
place, so a crash never leaves a partial checkpoint that looks complete.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable

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
