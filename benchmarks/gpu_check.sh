#!/usr/bin/env bash
# One prepared check for a lent H100/H200 (the `device` tool), about 9 minutes, needing only torch, timm,
# pyyaml and scikit-learn there:
#  1. step_cost.py: the DuMo-XL/2 step in bf16 with the flash kernel on the plain pass and the math kernel
#     for the fp32 JVP, compiled and eager (plus the dual-number and finite-difference variants): ms/step,
#     images/s, peak memory, model FLOPs utilisation; then check_compiled_jvp.py (DuMo-B/2, random
#     weights): the compiled JVP's error against the eager one;
#  2. sample_speed.py: XL/2 sampling images/s at 1/2/4 u-steps and 50 Euler steps, fp32 and bf16;
#  3. gpu_train_check.py: the single-process digits trainer with device/precision 'auto' (must pick bf16).
# Each step runs even if an earlier one failed; the exit status says whether all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
out="${OUT:-.}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
status=0
python3 benchmarks/step_cost.py --preset DuMo-XL/2 --batch "${BATCH:-64}" --steps "${STEPS:-10}" \
  --json "$out/step_cost_xl2.json" 2>&1 | tee "$out/step_cost.log" || status=1
python3 benchmarks/check_compiled_jvp.py --preset DuMo-B/2 --batch 64 2>&1 | tail -n 1 \
  | tee "$out/check_compiled_jvp.log" || status=1
python3 benchmarks/sample_speed.py --preset DuMo-XL/2 --chunk 256 --json "$out/sample_speed_xl2.json" 2>&1 \
  | tee "$out/sample_speed.log" || status=1
python3 benchmarks/gpu_train_check.py --steps "${TRAIN_STEPS:-1500}" --json "$out/gpu_train_digits.json" 2>&1 \
  | tail -n 12 | tee "$out/gpu_train.log" || status=1
exit $status
