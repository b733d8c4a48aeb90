"""File integrity: content digests, checked before a file is trusted, and weights-only unpickling.

A digest pins the exact bytes of an input we did not write (the official Fashion-MNIST files, the FID
Inception weights) or that we wrote and re-read (latent shards). Weights-only unpickling stops a pickle
from running code where a library we call loads with `torch.load(weights_only=False)`.
This module imports nothing heavy, so every layer may use it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterator

from dumo_ray.errors import DeterministicError

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch.load reads it on every call, over its argument


class DigestMismatchError(DeterministicError, ValueError):
    """A file's bytes are not the ones pinned for it (truncated, corrupted, or another file)."""


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def file_sha256(path: str | Path) -> str:
    return file_digest(path, "sha256")


def file_md5(path: str | Path) -> str:
    return file_digest(path, "md5")


def check_file_digest(path: str | Path, expected: str, algorithm: str = "sha256", *, what: str = "file",
                      pinned: str = "the official file") -> None:
    """Raises DigestMismatchError (one line: the file, its digest and `pinned`'s, the expected one) unless the
    file's digest is `expected`."""
    actual = file_digest(path, algorithm)
    if actual != expected.lower():
        raise DigestMismatchError(f"{what} {path} has {algorithm.upper()} {actual}, {pinned} has {expected.lower()}: "
                                  f"a truncated, corrupted or different file")


@contextlib.contextmanager
def forced_weights_only() -> Iterator[None]:
    """Every torch.load inside runs with weights_only=True (tensors, plain containers and the classes
    allowed by torch.serialization.safe_globals), even where the caller asks for weights_only=False:
    torch's own TORCH_FORCE_WEIGHTS_ONLY_LOAD switch, set for the block and restored after it."""
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous
