"""Ray Train + DeepSpeed vs the plain single-process loop: same model, batch and number of steps.

    python benchmarks/framework_overhead.py [--steps 400] [--preset DuMo-Tiny/2]

Rows: the plain PyTorch loop (all cores as torch threads); Ray Train + DeepSpeed ZeRO-2 with 1 worker
(all cores); with 2 workers (1 core each). Step time is the median of the steady-state logging intervals
(start-up excluded; it is reported separately). Data: the bundled digits as Parquet latents (precomputed
here), read whole by the plain loop and through Ray Data by the workers: the same training loop on both.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from report import report  # benchmarks/report.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]


def steady_step_ms(rows: list[dict]) -> float:
    times = [r["step_time_s"] for r in rows if "step_time_s" in r][1:]  # the first interval holds warm-up
    return statistics.median(times) * 1000


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--preset", default="DuMo-Tiny/2")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import ray
    from mlflow.tracking import MlflowClient

    from dumo_ray.config import load_config
    from dumo_ray.data.digits import write_digits_tree
    from dumo_ray.train.launch import fit, train_local
    from dumo_ray.pipelines.precompute_latents import precompute_latents

    cpus = os.cpu_count() or 2
    total = args.steps * args.batch
    every = total // 5
    common = [f"model.preset={args.preset}", f"optim.batch_size={args.batch}", f"train.total_images={total}",
              f"train.log_every_images={every}", f"train.checkpoint_every_images={total}", "train.num_sample_images=10",
              "train.sample_steps=[1]", "eval.features=none"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        try:
            write_digits_tree(tmp / "digits")
            precompute_latents(str(tmp / "digits"), str(tmp / "latents"), vae=None, resolution=8, mode="L", shard_size=500)
            for workers in (1, 2):
                uri = f"sqlite:///{tmp / 'mlflow.db'}"
                cfg = load_config(ROOT / "configs/quickstart.yaml", common + [
                    f"data.path={tmp / 'latents'}", f"train.storage_path={tmp / 'runs'}", f"train.name=ray{workers}",
                    f"distributed.num_workers={workers}", f"distributed.cpus_per_worker={cpus // workers}",
                    f"tracking.uri={uri}"])
                start = time.perf_counter()
                fit(cfg)
                wall = time.perf_counter() - start
                client = MlflowClient(uri)
                run = client.search_runs(client.get_experiment_by_name(cfg.tracking.experiment).experiment_id,
                                         filter_string=f"attributes.run_name = 'ray{workers}'")[0]
                history = sorted(client.get_metric_history(run.info.run_id, "step_time_s"), key=lambda m: m.step)
                rows.append({"setup": f"Ray Train + DeepSpeed ZeRO-2, {workers} worker(s) x {cpus // workers} threads",
                             "ms_per_step": steady_step_ms([{"step_time_s": m.value} for m in history]), "wall_s": wall})
        finally:
            ray.shutdown()  # the plain loop runs with no Ray beside it
        cfg = load_config(ROOT / "configs/digits_local.yaml", common + [
            f"data.path={tmp / 'latents'}", f"train.storage_path={tmp}", "train.name=plain", "tracking.enabled=false"])
        start = time.perf_counter()
        train_local(cfg)
        wall = time.perf_counter() - start
        metrics = [json.loads(line) for line in (tmp / "plain" / "metrics.jsonl").read_text().splitlines()]
        rows.insert(0, {"setup": f"plain PyTorch loop, 1 process x {cpus} threads", "ms_per_step": steady_step_ms(metrics),
                        "wall_s": wall})

    base = rows[0]["ms_per_step"]
    for r in rows:
        r["x_plain"] = r["ms_per_step"] / base
        r["steps_per_s"] = 1000 / r["ms_per_step"]
    report(f"{args.preset}, global batch {args.batch}, {args.steps} steps, {cpus} CPU cores (ms/step: steady state; "
           "wall_s: incl. start-up)", rows, ["setup", "ms_per_step", "x_plain", "steps_per_s", "wall_s"], args.json, vars(args))


if __name__ == "__main__":
    main()
