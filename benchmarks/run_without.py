"""Runs a Python script as on a machine that lacks some packages: importing them fails, as it would there.
The GPU check's dry run uses it to rehearse, on the CPU, a run meant for the lent GPU machine's image.

    python benchmarks/run_without.py ray,deepspeed,diffusers,mlflow benchmarks/quality_digits.py [ARGS ...]
"""
from __future__ import annotations

import runpy
import sys


class Unavailable:
    """A meta-path finder that refuses the named top-level packages (and their submodules)."""

    def __init__(self, names: set[str]):
        self.names = names

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r} (left out: not on the target machine)", name=fullname)
        return None


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    names, script, args = set(sys.argv[1].split(",")), sys.argv[2], sys.argv[3:]
    present = sorted(n for n in names if n in sys.modules)
    if present:
        sys.exit(f"run_without.py: {present} already imported; cannot leave them out")
    sys.meta_path.insert(0, Unavailable(names))
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
