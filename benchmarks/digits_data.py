"""The digits as a latent folder, the data of every digits benchmark: written once with the quickstart's
own two commands (`dumo-ray digits-tree` + `dumo-ray precompute --vae none --resolution 8 --grayscale`,
Ray Data in a child process) and reused while its manifest is there."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "data" / "digits-latents"  # the quickstart's folder


def digits_latent_folder(folder: str | Path = DEFAULT) -> Path:
    folder = Path(folder)
    if (folder / "manifest.json").is_file():
        return folder
    tree = folder.with_name(folder.name + "-png")
    cli = "import sys; from dumo_ray.cli import main; sys.exit(main(sys.argv[1:]))"
    for command in (["digits-tree", "--output", str(tree)],
                    ["precompute", "--input", str(tree), "--output", str(folder), "--vae", "none", "--resolution", "8",
                     "--grayscale"]):
        print(f"# dumo-ray {' '.join(command)}", flush=True)
        subprocess.run([sys.executable, "-c", cli, *command], check=True)
    return folder
