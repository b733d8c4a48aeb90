"""benchmarks/gpu_check.sh --dry-run on the CPU (no Ray, no GPU): it checks its inputs (configs, the
synthetic-latent writer, the bundle folder and its install.sh, what travels <= 64 MiB), prints what the
GPU run would measure, and fails on a problem. The bundle here is a small fake one: the checks read only
its files and size, never unpack it."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def dry_run(tmp_path, *sections, **env):
    environment = {**os.environ, "PY": sys.executable, "FASHION_LATENTS": str(tmp_path / "no-fashion"), **env}
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", *sections], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


def fake_bundle(root: Path, install=True, payload_bytes=1024) -> Path:
    root.mkdir()
    if install:
        (root / "install.sh").write_text("#!/usr/bin/env bash\necho unpacked\n")
    with open(root / "ray.tar.xz", "wb") as f:
        f.truncate(payload_bytes)  # sparse: its apparent size is what would travel
    return root


@pytest.mark.slow
def test_dry_run_passes_and_prints_the_plan(tmp_path):
    code, out = dry_run(tmp_path, "ray", BUNDLE=str(fake_bundle(tmp_path / "whl", payload_bytes=3 << 20)))
    assert code == 0, out
    assert "PROBLEM" not in out and "dry run: ok" in out
    assert "configs/imagenet256_dumo_xl2.yaml loads with the GPU overrides (DuMo-XL/2, dumo, zero 2, bf16, jvp jvp)" in out
    assert "synthetic latents: 12 rows in 3 shards written, verify-latents finds no problem" in out
    kib = int(re.search(r"bundle: \S+/whl, (\d+) KiB, 2 files", out).group(1))
    assert 3072 <= kib <= 3072 + 8  # 3 MiB + install.sh + the folder entry
    size = next(line for line in out.splitlines() if line.startswith("size: "))
    assert "bundle 3.0 MiB" in size and "data 0.0 MiB" in size and "(budget 64 MiB)" in size
    # the measurements the GPU run promises
    for promised in ("x_plain (goal <= 1.05)", "resumes (resumed=True)", "rank_param_max_diff",
                     "Ray Train + DeepSpeed ZeRO-2, 1 worker, 1 GPU, NCCL", "fashion32.yaml: skipped"):
        assert promised in out, promised
    assert "step_cost:" not in out  # only the section asked for


@pytest.mark.slow
def test_dry_run_fails_on_a_bundle_without_install_sh_or_too_big(tmp_path):
    bundle = fake_bundle(tmp_path / "whl", install=False, payload_bytes=65 << 20)
    code, out = dry_run(tmp_path, "ray", BUNDLE=str(bundle))
    assert code == 1, out
    assert f"PROBLEM: {bundle} has no install.sh" in out
    assert "PROBLEM: repository + bundle + data exceed 64 MiB" in out
    assert "dry run: 2 problem(s)" in out


@pytest.mark.slow
def test_dry_run_fails_without_the_bundle_and_on_a_bad_argument(tmp_path):
    code, out = dry_run(tmp_path, "ray", BUNDLE=str(tmp_path / "missing"))
    assert code == 1 and f"PROBLEM: no bundle folder {tmp_path / 'missing'}" in out, out
    code, out = dry_run(tmp_path, "--fast")
    assert code == 2 and "unknown argument '--fast'" in out


@pytest.mark.slow
def test_dry_run_of_the_fashion_section_checks_its_pack(tmp_path):
    """The fashion_quality section's pack (benchmarks/pack_fashion_gpu.sh; the real one needs the 71 MB wheel):
    missing, then holding files that are not the official ones and no pydantic wheel: named problems, and
    the rehearsal of the section's commands stops at the MD5 check, naming the file."""
    code, out = dry_run(tmp_path, "fashion_quality", FASHION_PACK=str(tmp_path / "none"))
    assert code == 1 and f"PROBLEM: no Fashion-MNIST pack {tmp_path / 'none'}" in out, out
    pack = tmp_path / "pack"
    pack.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (pack / name).write_bytes(b"not the official file")
    code, out = dry_run(tmp_path, "fashion_quality", FASHION_PACK=str(pack))
    assert code == 1, out
    assert f"PROBLEM: {pack} has no pydantic or no Python 3.12 pydantic_core wheel" in out
    assert f"Fashion-MNIST file {pack / 'train-images-idx3-ubyte.gz'} has MD5" in out
    assert "PROBLEM: the fashion_quality rehearsal failed" in out and "dry run: 2 problem(s)" in out
    assert "fashion_quality: Fashion-MNIST 60,000 training images" in out and "step_cost:" not in out
