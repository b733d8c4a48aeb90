"""The `[dumo-ray] ...` progress lines of the trainers."""
from __future__ import annotations

import sys


def say(message: str) -> None:
    """Writes `[dumo-ray] message` to stdout, once. Not through `print`: inside Ray Train (V2) workers
    `print` is patched to send each line to Train's logger and, since Ray wraps sys.stdout there, to the
    stream as well, so every printed line reached the driver twice (ray 2.60)."""
    sys.stdout.write(f"[dumo-ray] {message}\n")
    sys.stdout.flush()
