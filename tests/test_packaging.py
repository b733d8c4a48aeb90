"""How dumo-ray installs: `pipelines/` and `tune/` go inside the package (dumo_ray.pipelines, dumo_ray.tune),
never as top-level packages of those names that would clash with other distributions; the named search
spaces travel with it; and a plain checkout on the path (what a `dumo-ray submit` job runs) imports the same
names from its own folders. The wheel is built by pip from a copy of the checkout, as a user's install is."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "README.md", "dumo_ray", "pipelines", "tune"]


def copy_checkout(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, dest / name)
    return dest


def python(code: str, cwd: Path, pythonpath: Path) -> list[str]:
    """Runs `code` in a fresh interpreter of this environment with `pythonpath` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = copy_checkout(tmp_path_factory.mktemp("source"))  # the checkout itself gets no build/ folder
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(out), str(source)], check=True)
    return next(out.glob("dumo_ray-*.whl"))


def test_the_wheel_has_one_top_level_package_holding_pipelines_tune_and_the_spaces(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"dumo_ray"}
    top_level = next(name for name in names if name.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["dumo_ray"]
    # Every module of the checkout is in the wheel where the install puts it (a subpackage missing from
    # pyproject.toml's list fails here), and so are the search spaces `dumo-ray tune` reads.
    expected = {f"dumo_ray/{p.relative_to(ROOT / 'dumo_ray')}" for p in (ROOT / "dumo_ray").rglob("*.py")}
    for folder in ("pipelines", "tune"):
        expected |= {f"dumo_ray/{p.relative_to(ROOT)}" for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".yaml")}
    assert "dumo_ray/tune/spaces/loss_weighting.yaml" in expected and "dumo_ray/pipelines/sample_images.py" in expected
    assert sorted(expected - names) == []


def test_the_installed_wheel_imports_and_reads_its_spaces(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True)
    assert not (site / "pipelines").exists() and not (site / "tune").exists()
    printed = python("import dumo_ray.pipelines.precompute_latents as p, dumo_ray.tune.sweep as s\n"
                     "print(p.__file__, s.__file__, ','.join(s.available_spaces()))\n"
                     "from dumo_ray.jobs import project_root\n"
                     "try:\n    project_root()\nexcept ValueError as err:\n    print('submit:', err)",
                     cwd=tmp_path, pythonpath=site)
    assert all(Path(f).is_relative_to(site) for f in printed[:2]), printed
    assert printed[2] == "loss_weighting,objective,time_sampling"
    # Installed from a wheel, outside a checkout: `dumo-ray submit` has nothing to ship and says so (it used
    # to offer site-packages as the job's working_dir).
    assert printed[3] == "submit:" and "no dumo-ray checkout to ship" in " ".join(printed)


def test_a_checkout_on_the_path_imports_its_own_pipelines_and_tune(tmp_path):
    """A `dumo-ray submit` job: the uploaded checkout is the job's working directory and on its PYTHONPATH,
    not installed. dumo_ray.pipelines and dumo_ray.tune must come from that upload, not from the copy this
    environment has installed."""
    job = copy_checkout(tmp_path / "job")
    printed = python("import dumo_ray.pipelines.sample_images as p, dumo_ray.tune.sweep as s\n"
                     "from dumo_ray.jobs import project_root\n"
                     "print(p.__file__, s.__file__, project_root())", cwd=job, pythonpath=job)
    assert printed == [str(job / "pipelines" / "sample_images.py"), str(job / "tune" / "sweep.py"), str(job)]
