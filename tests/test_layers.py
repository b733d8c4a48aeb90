"""Imports run one way (cli -> pipelines/tune -> train -> eval -> flow/data -> models/config): every
`import` in the library, module-level or inside a function, checked against the layer rules."""
import ast
from pathlib import Path

import pytest

LIBRARY = Path(__file__).resolve().parents[1] / "dumo_ray"

# package or module -> what it must never import (prefixes of module names)
FORBIDDEN = {
    "dumo_ray/config.py": ("dumo_ray.models", "dumo_ray.flow", "dumo_ray.data", "dumo_ray.train", "dumo_ray.eval", "torch", "timm"),
    "dumo_ray/model_presets.py": ("dumo_ray.models", "torch", "timm"),
    "dumo_ray/models": ("dumo_ray.flow", "dumo_ray.data", "dumo_ray.train", "dumo_ray.eval", "ray", "deepspeed"),
    "dumo_ray/flow": ("dumo_ray.data", "dumo_ray.train", "dumo_ray.eval", "ray", "deepspeed"),
    "dumo_ray/data": ("dumo_ray.train", "dumo_ray.eval", "dumo_ray.flow", "deepspeed"),
    "dumo_ray/eval": ("dumo_ray.train", "deepspeed"),
}


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("where", sorted(FORBIDDEN))
def test_no_layer_imports_a_higher_one(where):
    files = [LIBRARY.parent / where] if where.endswith(".py") else sorted((LIBRARY.parent / where).rglob("*.py"))
    assert files and all(f.is_file() for f in files)
    broken = {f"{f.relative_to(LIBRARY.parent)} imports {module}"
              for f in files for module in imported_modules(f)
              for banned in FORBIDDEN[where] if module == banned or module.startswith(banned + ".")}
    assert not broken, sorted(broken)


def test_the_rule_catches_an_upward_import(tmp_path):
    """The scan sees imports inside functions too (the lazy ones are where a layer slips)."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from dumo_ray.train.loop import training_loop\n    import deepspeed\n")
    assert imported_modules(module) == {"dumo_ray.train.loop", "deepspeed"}


def test_the_shard_reader_that_ray_data_runs_imports_no_torch():
    """Ray Data's read tasks import `dumo_ray.data.latents` (read_training_shards): without torch a read worker
    starts in a fraction of the time and memory."""
    import subprocess
    import sys

    probe = "import sys, dumo_ray.data.latents; print(sorted(m for m in ('torch', 'timm', 'deepspeed') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "[]"
