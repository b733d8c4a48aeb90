"""Ray Train + DeepSpeed vs the plain single-process loop: the real `dumo-ray train`, same model, batch and
number of steps, one launcher after the other.

    python benchmarks/framework_overhead.py [--steps 400] [--preset DuMo-Tiny/2]          # CPU, digits
    python benchmarks/framework_overhead.py --gpu --config configs/imagenet256_dumo_xl2.yaml \\
        --data DIR --batch 64 --steps 40 --resume-steps 10 --workers 1                    # one GPU (gpu_check.sh)

Rows: the plain loop (`distributed.launcher=local`); Ray Train + DeepSpeed ZeRO-2 with each --workers
count (on the CPU: all cores shared among the workers; on a GPU: 1 GPU a worker, NCCL, bf16 autocast,
compiled JVP). Step time is the median of the steady-state logging intervals of the run's metrics.jsonl
(the first interval holds start-up and compiles; wall_s includes them). With --resume-steps the first Ray
run is rerun with that many more steps: it must resume from its checkpoint (not start over) and reach the
new total. `rank_param_max_diff` is the ranks-agree fingerprint each checkpoint logs (0 with one worker:
then it only shows the check ran). MLflow is off: metrics.jsonl is the record. Data: --data (a latent
folder) or, by default, the bundled digits (benchmarks/digits_data.py).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import report  # benchmarks/report.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
FINGERPRINT = re.compile(r"ranks' parameters differ by at most ([-+0-9.eEinfa]+)")


def steady_step_ms(rows: list[dict]) -> float:
    times = [r["step_time_s"] for r in rows if "step_time_s" in r][1:]  # the first interval holds warm-up
    if not times:
        raise RuntimeError("fewer than 2 logging intervals: raise --steps")
    return statistics.median(times) * 1000


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train(config: str, overrides: list[str], log: Path) -> tuple[float, str]:
    """`dumo-ray train` in a subprocess (the command a user runs); returns (wall seconds, its output)."""
    command = [sys.executable, "-m", "dumo_ray.cli", "train", "--config", config]
    for item in overrides:
        command += ["--set", item]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    log.write_text(done.stdout)
    if done.returncode:
        tail = "\n".join(done.stdout.splitlines()[-25:])
        raise RuntimeError(f"dumo-ray train failed (exit {done.returncode}), log {log}:\n{tail}")
    return wall, done.stdout


def fingerprint(output: str) -> float | None:
    found = FINGERPRINT.findall(output)
    return float(found[-1]) if found else None


def settings(args, data: str, storage: Path, cpus: int) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """(common overrides, plain-loop overrides, Ray overrides by worker count)."""
    total = args.steps * args.batch
    every = max(args.batch, total // 5 // args.batch * args.batch)  # 5 logging intervals
    common = [f"optim.batch_size={args.batch}", f"train.total_images={total}", f"train.log_every_images={every}",
              f"train.checkpoint_every_images={total}", "train.num_sample_images=4", "train.sample_steps=[1]",
              "eval.features=none", "tracking.enabled=false", "train.keep_checkpoints=1", f"data.path={data}", f"train.storage_path={storage}",
              *args.set]
    if args.preset:
        common.append(f"model.preset={args.preset}")
    if args.gpu:
        common += ["train.precision=bf16", "jvp.estimator=jvp", "jvp.compile_jvp=always"]
    plain = ["distributed.launcher=local", "train.name=plain"]
    ray_runs = {}
    for workers in args.workers:
        run = ["distributed.launcher=ray", f"distributed.num_workers={workers}", "distributed.zero_stage=2",
               f"train.name=ray{workers}"]
        if args.gpu:
            run += ["distributed.use_gpu=true", "distributed.gpus_per_worker=1",
                    f"distributed.cpus_per_worker={max(1, min(8, (cpus - 1) // workers))}"]
        else:
            run += ["distributed.use_gpu=false", f"distributed.cpus_per_worker={max(1, cpus // workers)}"]
        ray_runs[workers] = run
    return common, plain, ray_runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="default: configs/quickstart.yaml (CPU) or the XL/2 config (--gpu)")
    p.add_argument("--data", default=None, help="latent folder (default: the bundled digits)")
    p.add_argument("--gpu", action="store_true", help="1 GPU a worker, bf16, compiled JVP")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--resume-steps", type=int, default=0, help="rerun the first Ray run with this many more steps")
    p.add_argument("--preset", default=None, help="model.preset (default: the config's; CPU: DuMo-Tiny/2)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, nargs="+", default=None, help="Ray worker counts (CPU: 1 2; GPU: 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more overrides for every run")
    p.add_argument("--out", default=None, help="keep the runs and logs here (default: a temporary folder)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    args.workers = args.workers or ([1] if args.gpu else [1, 2])
    config = args.config or str(ROOT / ("configs/imagenet256_dumo_xl2.yaml" if args.gpu else "configs/quickstart.yaml"))
    if not args.gpu and args.preset is None and args.config is None:
        args.preset = "DuMo-Tiny/2"
    cpus = os.cpu_count() or 2

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(args.out or scratch)
        out.mkdir(parents=True, exist_ok=True)
        if args.data is None:
            from digits_data import digits_latent_folder  # benchmarks/digits_data.py

            args.data = str(digits_latent_folder())
        storage = out / "runs"
        common, plain, ray_runs = settings(args, args.data, storage, cpus)
        rows = []
        wall, _ = train(config, common + plain, out / "plain.log")
        rows.append({"setup": f"plain loop, 1 process{' (GPU)' if args.gpu else f' x {cpus} threads'}",
                     "ms_per_step": steady_step_ms(read_metrics(storage / "plain")), "wall_s": wall})
        shutil.rmtree(storage / "plain" / "checkpoints", ignore_errors=True)  # XL/2: ~16 GB, not needed again
        for workers, overrides in ray_runs.items():
            wall, output = train(config, common + overrides, out / f"ray{workers}.log")
            rows.append({"setup": f"Ray Train + DeepSpeed ZeRO-2, {workers} worker(s)",
                         "ms_per_step": steady_step_ms(read_metrics(storage / f"ray{workers}")), "wall_s": wall,
                         "rank_param_max_diff": fingerprint(output)})
        if args.resume_steps:
            workers = args.workers[0]
            total = (args.steps + args.resume_steps) * args.batch
            wall, output = train(config, common + ray_runs[workers] + [f"train.total_images={total}",
                                                                      f"train.checkpoint_every_images={total}"],
                                 out / f"ray{workers}-resume.log")
            last = read_metrics(storage / f"ray{workers}")[-1]
            resumed = "resuming from" in output and last.get("images") == total
            rows.append({"setup": f"the same Ray run, rerun to {args.steps + args.resume_steps} steps",
                         "wall_s": wall, "resumed": resumed, "rank_param_max_diff": fingerprint(output)})

    base = rows[0]["ms_per_step"]
    for r in rows:
        if "ms_per_step" in r:
            r["x_plain"] = r["ms_per_step"] / base
            r["steps_per_s"] = 1000 / r["ms_per_step"]
    report(f"{Path(config).name} {args.preset or ''}, global batch {args.batch}, {args.steps} steps, "
           f"{'1 GPU a worker' if args.gpu else f'{cpus} CPU cores'} (ms/step: steady state; wall_s: incl. start-up)",
           rows, ["setup", "ms_per_step", "x_plain", "steps_per_s", "wall_s", "resumed", "rank_param_max_diff"],
           args.json, {**vars(args), "config": config})
    if args.resume_steps and not rows[-1]["resumed"]:
        sys.exit("the rerun did not resume from the checkpoint (see its log)")


if __name__ == "__main__":
    main()
