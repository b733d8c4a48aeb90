"""dumo_ray: Duality Models (DuMo) - a dual-head DiT trained for one- and few-step generation on Ray."""
from pathlib import Path as _Path

__version__ = "0.1.0"

# `pipelines/` and `tune/` are installed inside this package (dumo_ray.pipelines, dumo_ray.tune; see
# pyproject.toml). In a plain checkout on the path, as in a Ray job whose working_dir is the checkout
# (`dumo-ray submit`), they sit beside this folder instead: look for subpackages there too.
_checkout = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "pipelines").is_dir() and (_checkout / "pipelines" / "__init__.py").is_file():
    __path__.append(str(_checkout))
