"""Checkpoint directories, written atomically and loaded without unpickling arbitrary objects.

Layout: <out_dir>/checkpoints/images_<000000012800>/state.pt. A checkpoint is written to a temporary
directory and renamed into place, so a crash never leaves a partial checkpoint that looks complete.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^images_(\d{12})$")
STATE_FILE = "state.pt"


def checkpoint_dirs(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def save_checkpoint(out_dir: str | Path, images: int, state: dict[str, Any], keep: int) -> Path:
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"images_{images:012d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoint_dirs(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint directory or its state.pt; tensors, numbers, strings and containers only."""
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = checkpoint_dirs(out_dir)
    return found[-1] if found else None
