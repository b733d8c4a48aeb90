#!/usr/bin/env bash
# One prepared check for a lent H100/H200 (the `device` tool), run as one script:
#   bash benchmarks/gpu_check.sh [--dry-run] [SECTION ...]     (default: all sections, in this order)
# Sections (device minutes, estimated):
#  step_cost    (~4) step_cost.py: the DuMo-XL/2 step in bf16 with the flash kernel on the plain pass and the math
#               kernel for the fp32 JVP, compiled and eager (plus dual-number and finite-difference variants), flow
#               matching with guidance off and on: ms/step, images/s, x flow matching at the same guidance setting,
#               peak memory, forward-equivalents, MFU against the H200's 989 TFLOP/s dense bf16; then
#               check_compiled_jvp.py (DuMo-B/2, random weights): the compiled JVP's error against the eager one.
#  sample_speed (~2) sample_speed.py: XL/2 sampling images/s at 1/2/4 u-steps and 50 Euler steps, fp32 and bf16.
#  train_digits (~2) gpu_train_check.py: the single-process digits trainer with device/precision 'auto' (bf16).
#  ray          (~6) the real `dumo-ray train` through Ray Train + DeepSpeed ZeRO-2 (1 worker, 1 GPU, NCCL, bf16
#               autocast, compiled JVP) on DuMo-XL/2 with synthetic ImageNet-256-shaped latents, against the plain
#               loop (distributed.launcher=local) on the same GPU and steps (framework_overhead.py --gpu): overhead
#               (goal <= 1.05x), checkpoint save + resume (a rerun with a larger budget must resume), the ranks-agree
#               fingerprint (rank_param_max_diff); then configs/fashion32.yaml the same way when a Fashion-MNIST
#               latent folder travelled along (FASHION_LATENTS: a folder or .tar.xz; default data/fashion-latents.tar.xz).
#               Ray, DeepSpeed and friends come from the bundle of ../shared/tools/gpu-bundle.sh (BUNDLE, default
#               .whl/, carried with the device tool's `carry`): its install.sh unpacks them into BUNDLE/site, put
#               first on PYTHONPATH. MLflow is not packed: every run has tracking.enabled=false.
#  fashion_quality (~8, run it alone) issue 16's equal-wall-time table on the GPU with a larger model: Fashion-MNIST's
#               60,000 training images -> pixel latents in-process (benchmarks/fashion_data.py, no Ray), then
#               quality_digits.py: DuMo, MeanFlow and flow matching, each FQ_SECONDS (120) of its timed step,
#               FQ_PRESET (DuMo-S/2: 256 tokens) at batch FQ_BATCH (128), bf16 with the fp32 JVP (eager), judged
#               by FD-fashion and accuracy at 1/2/4 steps and 50 Euler steps; the 1-step grids come back. Needs the
#               folder of benchmarks/pack_fashion_gpu.sh (FASHION_PACK, default .gpu-fashion/, ~31 MB, carried):
#               the official training files, the FD-fashion classifier's cache and pydantic's wheels. No Ray,
#               DeepSpeed, diffusers or MLflow (the dry run rehearses it on the CPU with them made unimportable).
# --dry-run (on the CPU, no GPU needed): checks this script's inputs (scripts present, configs load with the GPU
# overrides, the synthetic-latent writer on a tiny size, the bundle with its install.sh and its size, repository +
# bundle + data <= BUDGET_MIB, 64 MiB), prints what the GPU run would measure, and exits non-zero on a problem.
# Knobs: BATCH STEPS TRAIN_STEPS (step_cost, digits), RAY_BATCH RAY_STEPS RAY_RESUME_STEPS SYNTHETIC_ROWS (ray),
# FQ_SECONDS FQ_PRESET FQ_BATCH FASHION_PACK (fashion_quality).
# Each section runs even if an earlier one failed; the exit status says whether all passed. Results go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
ALL=(step_cost sample_speed train_digits ray fashion_quality)
dry=0; sections=()
for arg in "$@"; do
  case $arg in
    --dry-run) dry=1 ;;
    step_cost|sample_speed|train_digits|ray|fashion_quality) sections+=("$arg") ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (use --dry-run and sections: ${ALL[*]})" >&2; exit 2 ;;
  esac
done
[[ ${#sections[@]} -gt 0 ]] || sections=("${ALL[@]}")
wants() { [[ " ${sections[*]} " == *" $1 "* ]]; }
bundle=${BUNDLE:-.whl}; [[ $bundle = /* ]] || bundle=$PWD/$bundle  # absolute: it goes on PYTHONPATH
fashion=${FASHION_LATENTS:-data/fashion-latents.tar.xz}
budget_mib=${BUDGET_MIB:-64}
ray_batch=${RAY_BATCH:-64}; ray_steps=${RAY_STEPS:-30}; ray_resume=${RAY_RESUME_STEPS:-10}; rows=${SYNTHETIC_ROWS:-4096}
xl2=configs/imagenet256_dumo_xl2.yaml
pack=${FASHION_PACK:-.gpu-fashion}; [[ $pack = /* ]] || pack=$PWD/$pack
fq_seconds=${FQ_SECONDS:-120}; fq_preset=${FQ_PRESET:-DuMo-S/2}; fq_batch=${FQ_BATCH:-128}
# The GPU arms: configs/fashion32.yaml's settings but bf16 (auto on CUDA) with the fp32 JVP (a finite difference
# in bf16 would cancel to noise), eager (a compile per arm and per timing would cost minutes of the lease).
fq_args=(--config configs/fashion32.yaml --budget wall --seeds 0 --euler 50 --set train.device=auto
         --set train.precision=auto --set jvp.estimator=jvp --set jvp.compile_jvp=never)
without=ray,deepspeed,diffusers,mlflow  # not on the GPU machine's image, and not packed for this section
gpu_sets=(train.precision=bf16 jvp.estimator=jvp jvp.compile_jvp=always distributed.use_gpu=true
          distributed.num_workers=1 distributed.zero_stage=2 tracking.enabled=false eval.features=none)

plan() {  # what the GPU run measures, section by section
  echo "== the GPU run (sections: ${sections[*]}) will measure:"
  wants step_cost && echo "- step_cost: DuMo-XL/2 batch ${BATCH:-64}, ${STEPS:-10} timed steps, bf16: ms/step, images/s, x flow matching" \
    "(same guidance), peak GiB, guided rows, forward-equivalents, mfu and mfu_3F at 989 TFLOP/s, for: flow_matching" \
    "guidance off/on, meanflow, dumo guidance off/on (tangent v_target), tangent v_hat, eager JVP, dual numbers," \
    "finite-diff;" \
    "check_compiled_jvp: compiled vs eager JVP relative error (DuMo-B/2)"
  wants sample_speed && echo "- sample_speed: DuMo-XL/2 images/s at 1/2/4 u-steps and 50 Euler steps, fp32 and bf16"
  wants train_digits && echo "- train_digits: digits, ${TRAIN_STEPS:-1500} steps, single process, auto -> bf16: seconds, FD and accuracy at 1 and 2 steps"
  if wants ray; then
    echo "- ray: bundle $bundle -> install.sh -> $bundle/site first on PYTHONPATH; versions of ray, deepspeed, torch, pyarrow, pydantic"
    echo "- ray: synthetic latents, $rows rows of 2x4x32x32 (benchmarks/synthetic_latents.py)"
    echo "- ray: DuMo-XL/2 ($xl2), global batch $ray_batch, $ray_steps steps, dumo with guidance, tracking off:"
    echo "    plain loop (launcher=local) ms/step  vs  Ray Train + DeepSpeed ZeRO-2, 1 worker, 1 GPU, NCCL ms/step -> x_plain (goal <= 1.05)"
    echo "    wall_s of each (start-up, compile, checkpoint save included)"
    echo "    checkpoint save + resume: the Ray run rerun to $((ray_steps + ray_resume)) steps resumes (resumed=True)"
    echo "    ranks-agree fingerprint rank_param_max_diff of each checkpoint (one worker: 0, the check ran)"
    if [[ -e $fashion ]]; then
      echo "- ray: configs/fashion32.yaml on $fashion (jvp, bf16, eval off): plain vs Ray ms/step, x_plain, resume"
    else
      echo "- ray: configs/fashion32.yaml: skipped, no Fashion-MNIST latents at $fashion"
    fi
  fi
  wants fashion_quality && echo "- fashion_quality: Fashion-MNIST 60,000 training images -> latents (in-process, seconds);" \
    "$fq_preset batch $fq_batch, bf16 + fp32 JVP: dumo, meanflow, flow_matching, ${fq_seconds} s of timed steps each:" \
    "steps, FD-fashion and accuracy at 1/2/4 steps and 50 Euler steps (quality_fashion_gpu.json), 1-step grids"
}

size_of() { du -sb "$@" 2>/dev/null | awk '{s += $1} END {print s + 0}'; }  # apparent bytes: what travels

dry_run() {
  local py=${PY:-python3} problems=0 tmp
  [[ -x .venv/bin/python && -z ${PY:-} ]] && py=.venv/bin/python
  problem() { echo "PROBLEM: $*"; problems=$((problems + 1)); }
  for f in step_cost.py step_accounting.py check_compiled_jvp.py sample_speed.py gpu_train_check.py \
           framework_overhead.py synthetic_latents.py report.py bench_model.py digits_data.py; do
    [[ -f benchmarks/$f ]] || problem "benchmarks/$f is missing"
  done
  echo "scripts: checked"
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' RETURN
  # One Python process: the configs with the GPU overrides, then the synthetic-latent writer on a tiny size.
  PYTHONPATH="$PWD:$PWD/benchmarks" "$py" - "$xl2" "$tmp/latents" "${gpu_sets[@]}" <<'PYEOF' || problem "the Python checks failed (above)"
import sys
from dumo_ray.config import load_config
path, latents, sets = sys.argv[1], sys.argv[2], sys.argv[3:]
ok = True
for config in (path, "configs/fashion32.yaml"):
    try:
        cfg = load_config(config, sets + ["distributed.launcher=ray", "data.path=/tmp/x"])
        print(f"config: {config} loads with the GPU overrides ({cfg.model.preset}, {cfg.objective.name}, "
              f"zero {cfg.distributed.zero_stage}, {cfg.train.precision}, jvp {cfg.jvp.estimator})")
    except Exception as error:
        print(f"PROBLEM: {config} does not load with the GPU overrides: {error}")
        ok = False
try:
    from synthetic_latents import write_synthetic_latents
    from dumo_ray.data.verify import verify_latents
    write_synthetic_latents(latents, rows=12, shape=(4, 8, 8), classes=10, shard_size=5)
    found = verify_latents(latents)
    assert not found["problems"] and found["rows"] == 12 and found["shards"] == 3, found
    print("synthetic latents: 12 rows in 3 shards written, verify-latents finds no problem")
except Exception as error:
    print(f"PROBLEM: the synthetic-latent writer failed on a tiny size: {type(error).__name__}: {error}")
    ok = False
sys.exit(0 if ok else 1)
PYEOF
  local repo bundle_bytes=0 data=0 total
  repo=$(git ls-files -z -co --exclude-standard | xargs -0 du -cb 2>/dev/null | awk '$2 == "total" {s += $1} END {print s + 0}')
  if wants ray; then
    if [[ ! -d $bundle ]]; then
      problem "no bundle folder $bundle (make it: bash ../shared/tools/gpu-bundle.sh $bundle)"
    else
      [[ -f $bundle/install.sh ]] || problem "$bundle has no install.sh"
      [[ -d $bundle/site ]] && problem "$bundle/site exists (unpacked here): delete it, it must not travel"
      bundle_bytes=$(size_of "$bundle")
      echo "bundle: $bundle, $((bundle_bytes / 1024)) KiB, $(find "$bundle" -maxdepth 1 -type f | wc -l) files"
    fi
    [[ -e $fashion ]] && data=$(size_of "$fashion")
  fi
  if wants fashion_quality; then
    local pack_bytes=0
    if [[ ! -d $pack ]]; then
      problem "no Fashion-MNIST pack $pack (make it: bash benchmarks/pack_fashion_gpu.sh ${pack#"$PWD"/})"
    else
      pack_bytes=$(size_of "$pack"); data=$((data + pack_bytes))
      echo "pack: $pack, $((pack_bytes / 1024)) KiB"
      ls "$pack"/pydantic-*.whl "$pack"/pydantic_core-*cp312*.whl >/dev/null 2>&1 \
        || problem "$pack has no pydantic or no Python 3.12 pydantic_core wheel (rerun benchmarks/pack_fashion_gpu.sh)"
      fashion_rehearsal "$py" || problem "the fashion_quality rehearsal failed (above)"
    fi
  fi
  total=$((repo + bundle_bytes + data))
  awk -v r="$repo" -v b="$bundle_bytes" -v d="$data" -v t="$total" -v m="$budget_mib" 'BEGIN {
    printf "size: repository %.1f MiB + bundle %.1f MiB + data %.1f MiB = %.1f MiB (budget %s MiB)\n",
           r / 1048576, b / 1048576, d / 1048576, t / 1048576, m }'
  (( total <= budget_mib * 1048576 )) || problem "repository + bundle + data exceed $budget_mib MiB"
  plan
  if (( problems )); then echo "dry run: $problems problem(s)"; return 1; fi
  local carry=()
  wants ray && carry+=("\"${bundle#"$PWD"/}\"")
  wants fashion_quality && carry+=("\"${pack#"$PWD"/}\"")
  echo "dry run: ok (device tool: run 'bash benchmarks/gpu_check.sh ${sections[*]}' with carry [$(IFS=,; echo "${carry[*]}")]" \
       "plus the Fashion-MNIST latents for the ray section if used)"
}

fashion_rehearsal() {  # PY: the section's own commands on a few images, the GPU image's missing packages left out
  local tmp rc=0 run
  tmp=$(mktemp -d)
  run=(env "PYTHONPATH=$PWD:$PWD/benchmarks" "DUMO_RAY_FASHION_MNIST=$pack" "DUMO_RAY_CACHE=$pack"
       "$1" benchmarks/run_without.py "$without")
  "${run[@]}" benchmarks/fashion_data.py --source "$pack" --output "$tmp/latents" \
    --limit 64 --shard-size 32 >"$tmp/log" 2>&1 \
  && "${run[@]}" benchmarks/quality_digits.py "${fq_args[@]}" --data "$tmp/latents" \
    --preset DuMo-Micro/2 --set optim.batch_size=4 --set eval.num_images=10 --euler 2 --wall-seconds 0.2 \
    --keep "$tmp/runs" --json "$tmp/q.json" >>"$tmp/log" 2>&1 || rc=1
  if (( rc == 0 )); then
    echo "fashion rehearsal: the section's commands ran on 64 images without $without: $(grep -c '"arm"' "$tmp/log") arms scored"
  else
    tail -n 20 "$tmp/log"
  fi
  rm -rf "$tmp"
  return $rc
}

if (( dry )); then dry_run; exit $?; fi

export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
out="${OUT:-.}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
plan
status=0
if wants step_cost; then
  python3 benchmarks/step_cost.py --preset DuMo-XL/2 --batch "${BATCH:-64}" --steps "${STEPS:-10}" \
    --json "$out/step_cost_xl2.json" 2>&1 | tee "$out/step_cost.log" || status=1
  python3 benchmarks/check_compiled_jvp.py --preset DuMo-B/2 --batch 64 2>&1 | tail -n 1 \
    | tee "$out/check_compiled_jvp.log" || status=1
fi
if wants sample_speed; then
  python3 benchmarks/sample_speed.py --preset DuMo-XL/2 --chunk 256 --json "$out/sample_speed_xl2.json" 2>&1 \
    | tee "$out/sample_speed.log" || status=1
fi
if wants train_digits; then
  python3 benchmarks/gpu_train_check.py --steps "${TRAIN_STEPS:-1500}" --json "$out/gpu_train_digits.json" 2>&1 \
    | tail -n 12 | tee "$out/gpu_train.log" || status=1
fi
if wants ray; then
  if [[ -d $bundle ]]; then
    [[ -d $bundle/site ]] || bash "$bundle/install.sh" 2>&1 | tail -n 3 || status=1
    export PYTHONPATH="$bundle/site:$PYTHONPATH"
  fi
  python3 -c "import ray, deepspeed, torch, pyarrow, pydantic; print('ray', ray.__version__, 'deepspeed', deepspeed.__version__,
'torch', torch.__version__, 'pyarrow', pyarrow.__version__, 'pydantic', pydantic.__version__)" 2>&1 | tail -n 3 | tee "$out/ray_versions.log"
  work=$(mktemp -d)
  overhead() {  # name config data batch steps [--set ...]: plain vs Ray on one GPU, then the resume rerun
    local name=$1 config=$2 data=$3 batch=$4 steps=$5; shift 5
    python3 benchmarks/framework_overhead.py --gpu --config "$config" --data "$data" --batch "$batch" --steps "$steps" \
      --resume-steps "$ray_resume" --workers 1 --out "$work/$name" --json "$out/framework_overhead_$name.json" \
      "${@/#/--set=}" 2>&1 | tail -n 30 | tee "$out/framework_overhead_$name.log"
    local rc=${PIPESTATUS[0]}
    cp "$work/$name"/*.log "$out/" 2>/dev/null
    for run in "$work/$name"/runs/*/; do cp "$run/metrics.jsonl" "$out/metrics_${name}_$(basename "$run").jsonl" 2>/dev/null; done
    return "$rc"
  }
  python3 benchmarks/synthetic_latents.py "$work/latents" --rows "$rows" || status=1
  overhead xl2 "$xl2" "$work/latents" "$ray_batch" "$ray_steps" || status=1
  rm -rf "$work/xl2"  # XL/2 checkpoints: ~16 GB a run
  if [[ -e $fashion ]]; then
    fdata=$fashion
    if [[ -f $fashion ]]; then mkdir -p "$work/fashion" && tar xJf "$fashion" -C "$work/fashion" || status=1
      fdata=$(dirname "$(find "$work/fashion" -name manifest.json | head -n 1)"); fi
    overhead fashion32 configs/fashion32.yaml "$fdata" 128 "${FASHION_STEPS:-200}" eval.features=none || status=1
  fi
  rm -rf "$work"
fi
if wants fashion_quality; then
  fq=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --target "$fq/site" "$pack"/*.whl 2>&1 | tail -n 3 || status=1
  fq_env=(env "PYTHONPATH=$fq/site:$PWD:$PWD/benchmarks" "DUMO_RAY_FASHION_MNIST=$pack" "DUMO_RAY_CACHE=$pack")
  "${fq_env[@]}" python3 benchmarks/fashion_data.py --source "$pack" --output "$fq/latents" 2>&1 \
    | tail -n 3 | tee "$out/fashion_data.log" || status=1
  "${fq_env[@]}" python3 benchmarks/quality_digits.py "${fq_args[@]}" --data "$fq/latents" --preset "$fq_preset" \
    --set "optim.batch_size=$fq_batch" --wall-seconds "$fq_seconds" --keep "$fq/runs" --json "$out/quality_fashion_gpu.json" \
    2>&1 | grep -v "^\[dumo-ray\] checkpoint" | tee "$out/quality_fashion_gpu.log" || status=1
  for run in "$fq"/runs/*-0; do cp "$run/samples/final_1step.png" "$out/fashion_gpu_$(basename "$run")_1step.png" 2>/dev/null; done
  rm -rf "$fq"
fi
exit $status
