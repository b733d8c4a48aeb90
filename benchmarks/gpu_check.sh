#!/usr/bin/env bash
# One prepared check for a lent H100/H200 (the `device` tool): the DuMo-XL/2 step in bf16 with the
# flash kernel on the plain pass and the math kernel for the fp32 JVP; prints ms/step, images/s,
# peak memory and model FLOPs utilisation per objective. Needs only torch, timm and pyyaml there.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
out="${OUT:-.}"
python3 benchmarks/step_cost.py --preset DuMo-XL/2 --batch "${BATCH:-64}" --steps "${STEPS:-10}" --json "$out/step_cost_xl2.json"
