"""Precompute over a tree where nothing decodes: on a Ray of its own, which the CLI starts and shuts down
(the run's shared Ray, tests/conftest.py, could still hold the previous tests' actors; it is shut down
first, and its next user starts it again)."""
from __future__ import annotations

from dumo_ray.data.latents import load_manifest

import pytest


@pytest.mark.slow
@pytest.mark.ray
def test_precompute_without_a_decodable_image_fails_naming_the_reasons(tmp_path, capsys):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    """A tree where nothing decodes is an error (exit 2, the skip reasons in one line), not a dataset of 0 rows;
    the manifest with every skipped file and its reason is still written."""
    from conftest import undecodable_tree
    from dumo_ray.cli import main

    tree, out = undecodable_tree(tmp_path / "tree"), tmp_path / "latents"
    assert main(["precompute", "--input", str(tree), "--output", str(out), "--vae", "none", "--resolution", "8",
                 "--grayscale"]) == 2
    # Ray's own start-up warnings come first when the CLI starts it.
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dumo-ray precompute")]
    assert len(errors) == 1
    err = errors[0]
    assert err.startswith(f"dumo-ray precompute: error: no image under {tree.resolve()} could be decoded (3 files "
                          "skipped: 2 x cannot decode: UnidentifiedImageError: cannot identify image file (e.g. a/notes.png), "
                          "1 x empty file (e.g. b/empty.png)); every skipped file and its reason is listed in ")
    manifest = load_manifest(out)
    assert manifest["rows"] == 0 and [s["key"] for s in manifest["skipped"]] == ["a/notes.png", "a/other.png", "b/empty.png"]
