"""The paper's central claim at a scale we can run: DuMo vs MeanFlow (75% r = t) vs flow matching, same
model, same number of training steps, several seeds, judged by FD-digits and class accuracy at 1, 2 and
4 sampling steps (flow matching also at 50 Euler steps).

    python benchmarks/quality_digits.py [--steps 3000] [--seeds 0 1 2] [--budget steps|wall] [--json out.json]

Each run is `configs/digits_local.yaml` (DuMo-Tiny/2, batch 128, the single-process trainer) with only
the objective and the seed changed; the final EMA weights sample the fixed 1,000-image evaluation set.
Wall time per run is reported too (the objectives' step costs differ). Prints mean +- std over seeds.

--budget wall gives every objective the wall time of `--steps` DuMo steps instead: each objective's step
is timed first on this machine (same model and batch, 20 steps), and its step count scaled by
DuMo's step time / its own.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from report import report  # benchmarks/report.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = ("dumo", "meanflow", "flow_matching")


def step_seconds(objective: str) -> float:
    """This machine's time for one training step of `objective` on the digits model and batch."""
    import torch

    from step_cost import time_variant  # benchmarks/step_cost.py

    from dumo_ray.config import load_config
    from dumo_ray.flow import build_objective
    from dumo_ray.train.loop import build_model_from_config

    cfg = load_config(ROOT / "configs/digits_local.yaml", [f"objective.name={objective}"])
    torch.manual_seed(0)
    model = build_model_from_config(cfg)
    objective_fn = build_objective(cfg.objective, cfg.model.num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = {"x0": torch.randn(128, 1, 8, 8), "y": torch.randint(0, 10, (128,))}
    return time_variant(model, objective_fn, optimizer, data, torch.device("cpu"), "fp32", steps=20, warmup=5)


def run(objective: str, seed: int, steps: int, storage: str) -> dict:
    from dumo_ray.config import load_config
    from dumo_ray.train.loop import train_single_process

    total = steps * 128
    sample_steps = [1, 2, 4, 50] if objective == "flow_matching" else [1, 2, 4]
    cfg = load_config(ROOT / "configs/digits_local.yaml", [
        f"objective.name={objective}", f"train.seed={seed}", f"train.total_images={total}",
        f"train.log_every_images={total // 10 // 128 * 128 or 128}", f"train.checkpoint_every_images={total}",
        f"train.storage_path={storage}", f"train.name={objective}-{seed}", f"eval.steps={sample_steps}",
        "eval.every_images=0", "train.sample_steps=[1, 2]"])
    started = time.perf_counter()
    summary = train_single_process(cfg)
    return {"objective": objective, "seed": seed, "steps": steps, "seconds": time.perf_counter() - started,
            **{k: v for k, v in summary.items() if k.startswith(("fd_", "accuracy_"))}}


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3g} +- {spread:.2g}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    p.add_argument("--budget", choices=["steps", "wall"], default="steps",
                   help="steps: every objective trains --steps steps; wall: the wall time of --steps DuMo steps")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    steps = {objective: args.steps for objective in args.objectives}
    if args.budget == "wall":
        cost = {objective: step_seconds(objective) for objective in set(args.objectives) | {"dumo"}}
        steps = {objective: round(args.steps * cost["dumo"] / cost[objective]) for objective in args.objectives}
        print("step time (ms): " + ", ".join(f"{k} {1000 * v:.1f}" for k, v in cost.items())
              + " -> steps: " + ", ".join(f"{k} {v}" for k, v in steps.items()), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="dumo-quality-") as storage:
        for objective in args.objectives:
            for seed in args.seeds:
                results.append(run(objective, seed, steps[objective], storage))

    columns = ["fd_1step", "accuracy_1step", "fd_2step", "accuracy_2step", "fd_4step", "accuracy_4step", "fd_50step"]
    table = []
    for objective in args.objectives:
        runs = [r for r in results if r["objective"] == objective]
        table.append({"objective": objective, "steps": steps[objective],
                      "s_per_run": statistics.mean(r["seconds"] for r in runs),
                      **{c: mean_std([r[c] for r in runs if c in r]) for c in columns}})
    budget = f"{args.steps:,} training steps" if args.budget == "steps" else f"the wall time of {args.steps:,} DuMo steps"
    report(f"{budget} of batch 128, seeds {args.seeds}, 1,000 evaluation samples (mean +- std)",
           table, ["objective", "steps", "s_per_run"] + columns, args.json, {**vars(args), "runs": results})


if __name__ == "__main__":
    main()
