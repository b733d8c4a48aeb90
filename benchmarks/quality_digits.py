"""The paper's central claim at a scale we can run: DuMo vs MeanFlow (75% r = t) vs flow matching, same
model, same number of training steps (or the same wall time), several seeds, judged by FD-digits and class
accuracy at 1, 2 and 4 sampling steps (flow matching also at 50 Euler steps; with --euler, every arm's
v-head too).

    python benchmarks/quality_digits.py [--steps 3000] [--seeds 0 1 2] [--budget steps|wall] [--json out.json]
    python benchmarks/quality_digits.py --arms benchmarks/arms_dumo_study.yaml --only v_target lambda_v_025 \
        [--preset DuMo-Mini/2] [--reference-arm dumo_v1] [--euler 50]

Each run is `configs/digits_local.yaml` (DuMo-Tiny/2, batch 128, the single-process launcher on the
digits latent folder, written first if missing: benchmarks/digits_data.py) with only the arm's overrides
and the seed changed; the final EMA weights sample the fixed 1,000-image evaluation
set. An arm is a named list of config overrides (`--arms` YAML file); without one, the arms are the three
objectives at their defaults. Wall time per run is reported too (the arms' step costs differ). Prints
mean +- std over seeds.

`--config configs/fashion32.yaml --data data/fashion-latents` runs the same comparison on Fashion-MNIST
(README, "Fashion-MNIST"; FD-fashion judges); `--keep DIR` keeps each run's folder (sample grids, export)
and makes the sweep resumable: rerun the same command and finished runs are read back, unfinished ones go
on from their latest checkpoint (one per tenth of a run), with the first run's step counts (DIR/plan.json).

`--steps-from earlier.json` repeats an earlier table's step counts per arm (a new seed at the same budget).
`--set KEY=VALUE` overrides the config for every arm (e.g. a GPU run's batch size or JVP estimator); every
run, and the step timing of --budget wall, uses the config's device and precision (auto: CUDA and bf16 on
a GPU machine).

--budget wall gives every arm the wall time of `--steps` steps of `--reference-arm` (default: dumo at the
current defaults; in the study's arms file, `dumo_v1` is dumo as first shipped) instead: each arm's step is timed first on this machine (same model and batch, 20 steps),
and its step count scaled by the reference's step time / its own. `--wall-seconds S` gives every arm S
seconds of its timed step instead (a machine whose speed is not known beforehand).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from report import report  # benchmarks/report.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
DIGITS_CONFIG = ROOT / "configs/digits_local.yaml"
OBJECTIVES = ("dumo", "meanflow", "flow_matching")


def load_arms(path: str | None) -> dict[str, list[str]]:
    """Arm name -> overrides. A `_base` entry in the file is put before every arm's own overrides, so the
    arms keep their meaning when the shipped defaults move."""
    if path is None:
        return {name: [f"objective.name={name}"] for name in OBJECTIVES}
    import yaml

    arms = {name: list(overrides or []) for name, overrides in yaml.safe_load(Path(path).read_text()).items()}
    base = arms.pop("_base", [])
    return {name: [*base, *overrides] for name, overrides in arms.items()}


def arm_config(overrides: list[str], preset: str | None, extra: list[str] = (), config: Path = DIGITS_CONFIG,
               data: str | None = None):
    """The run's config: `config` (the digits' by default, on the digits latent folder, written first if
    missing) with the arm's overrides."""
    from dumo_ray.config import load_config

    if data is None:
        from digits_data import digits_latent_folder  # benchmarks/digits_data.py

        data = digits_latent_folder()
    return load_config(config, [f"data.path={data}", "tracking.enabled=false", *overrides,
                                *([f"model.preset={preset}"] if preset else []), *extra])


def step_seconds(overrides: list[str], preset: str | None, config: Path = DIGITS_CONFIG, data: str | None = None) -> float:
    """This machine's time for one training step of an arm on the config's model, image shape and batch."""
    import torch

    from step_cost import time_variant  # benchmarks/step_cost.py

    from dumo_ray.flow import build_objective
    from dumo_ray.models import build_model_from_config
    from dumo_ray.train.devices import resolve_device, resolve_precision

    cfg = arm_config(overrides, preset, config=config, data=data)
    device = resolve_device(cfg.train.device)  # the device and precision the run will train with
    torch.manual_seed(0)
    model = build_model_from_config(cfg).to(device)
    objective_fn = build_objective(cfg.objective, cfg.model.num_classes, cfg.jvp)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch, size = cfg.optim.batch_size, cfg.model.input_size
    data = {"x0": torch.randn(batch, cfg.model.in_channels, size, size, device=device),
            "y": torch.randint(0, cfg.model.num_classes, (batch,), device=device)}
    return time_variant(model, objective_fn, optimizer, data, device, resolve_precision(cfg.train.precision, device),
                        steps=20, warmup=5)


def run(arm: str, overrides: list[str], preset: str | None, seed: int, steps: int, euler: list[int], storage: str,
        config: Path = DIGITS_CONFIG, data: str | None = None) -> dict:
    """Trains and scores one (arm, seed). In a kept folder (--keep), a finished run is read back from its
    result.json and an unfinished one resumes from its latest checkpoint (one every tenth of the run), so
    an interrupted sweep loses at most a tenth of a run."""
    from dumo_ray.train.checkpoint import latest_checkpoint
    from dumo_ray.train.launch import train_local

    batch = arm_config(overrides, preset, config=config, data=data).optim.batch_size
    total = steps * batch
    tenth = total // 10 // batch * batch or batch  # a log line and a checkpoint every tenth of the run
    cfg = arm_config(overrides, preset, config=config, data=data, extra=[
        f"train.seed={seed}", f"train.total_images={total}",
        f"train.log_every_images={tenth}", f"train.checkpoint_every_images={tenth}",
        f"train.storage_path={storage}", f"train.name={arm}-{seed}".replace("/", "-"), "eval.steps=[1, 2, 4]",
        f"eval.euler_steps={euler}", "eval.every_images=0", "train.sample_steps=[1, 2]"])
    result_file = Path(cfg.run_dir) / "result.json"
    if result_file.is_file():
        done = json.loads(result_file.read_text())
        if done["steps"] == steps:
            print(f"# {arm} seed {seed}: finished earlier, read from {result_file}", flush=True)
            return done
        raise SystemExit(f"{result_file} is a run of {done['steps']:,} steps, not {steps:,}: use another --keep folder")
    resumed = latest_checkpoint(cfg.run_dir) is not None
    print(f"# {arm} seed {seed}: {steps:,} steps of batch {batch} -> {cfg.run_dir}"
          + (" (resuming from its latest checkpoint)" if resumed else ""), flush=True)
    if cfg.objective.name == "flow_matching":  # its default sampler is Euler on the v-head already
        cfg.eval.steps = sorted({*cfg.eval.steps, *euler})
        cfg.eval.euler_steps = []
    started = time.perf_counter()
    summary = train_local(cfg)
    scores = {k: v for k, v in summary.items() if k.startswith(("fd_", "accuracy_"))}
    if cfg.objective.name == "flow_matching":  # its N-step scores are Euler already: name them so
        scores.update({f"{m}_euler{n}": scores.pop(f"{m}_{n}step") for n in euler for m in ("fd", "accuracy")})
    result = {"arm": arm, "objective": cfg.objective.name, "preset": cfg.model.preset, "seed": seed, "steps": steps,
              "seconds": time.perf_counter() - started, "resumed": resumed, **scores}
    result_file.write_text(json.dumps(result, indent=2))
    return result


def step_counts(args: argparse.Namespace, arms: dict[str, list[str]], chosen: list[str], error) -> dict[str, int]:
    """Each chosen arm's training steps: --steps, or an earlier table's (--steps-from), or the wall time of
    --steps reference-arm steps on this machine (--budget wall). A rerun into the same --keep folder keeps
    the first run's counts (DIR/plan.json), whatever this machine's timing says now."""
    plan_file = Path(args.keep) / "plan.json" if args.keep else None
    planned = json.loads(plan_file.read_text()) if plan_file and plan_file.is_file() else {}
    kept = {arm: planned[arm] for arm in chosen if arm in planned}
    steps = {arm: args.steps for arm in chosen}
    if len(kept) == len(chosen):  # nothing to time or look up
        pass
    elif args.steps_from:  # the earlier table's step counts, not this machine's timing: a new seed, the same budget
        earlier = json.loads(Path(args.steps_from).read_text())
        earlier_steps = {row["arm"]: row["steps"] for row in earlier.get("rows", []) if "steps" in row}
        missing = [a for a in chosen if a not in earlier_steps]
        if missing:
            error(f"--steps-from {args.steps_from} has no steps for arm(s) {missing}; "
                  f"it has {', '.join(earlier_steps) or 'no arm with a step count'}")
        steps = {arm: earlier_steps[arm] for arm in chosen}
    elif args.budget == "wall":
        cost = {arm: step_seconds(arms[arm], args.preset, args.config, args.data)
                for arm in dict.fromkeys(chosen + [args.reference_arm] * (args.wall_seconds is None))}
        budget = args.wall_seconds or args.steps * cost[args.reference_arm]
        steps = {arm: max(1, round(budget / cost[arm])) for arm in chosen}
        print("step time (ms): " + ", ".join(f"{k} {1000 * v:.1f}" for k, v in cost.items())
              + " -> steps: " + ", ".join(f"{k} {v}" for k, v in steps.items()), flush=True)
    if kept:
        steps.update(kept)
        print(f"step counts of the first run in {plan_file}: {kept}", flush=True)
    if plan_file:
        plan_file.parent.mkdir(parents=True, exist_ok=True)
        plan_file.write_text(json.dumps({**planned, **steps}, indent=2))
    return steps


def log_to_mlflow(uri: str, experiment: str, title: str, settings: dict, runs: list[dict]) -> str:
    """One parent run for the sweep (its settings and the results JSON), one child run per (arm, seed) with
    the arm's overrides as params and its scores as metrics. Returns the parent's run id."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=title[:250]) as parent:
        mlflow.log_params({k: str(v)[:500] for k, v in settings.items() if k not in ("runs", "arm_overrides")})
        mlflow.log_dict({"title": title, "settings": settings}, "results.json")
        for r in runs:
            with mlflow.start_run(run_name=f"{r['arm']}-seed{r['seed']}", nested=True):
                overrides = settings.get("arm_overrides", {}).get(r["arm"], [])
                mlflow.log_params({"arm": r["arm"], "seed": r["seed"], "steps": r["steps"], "preset": r.get("preset"),
                                   **dict(o.split("=", 1) for o in overrides)})
                mlflow.log_metrics({k: float(v) for k, v in r.items() if k.startswith(("fd_", "accuracy_", "seconds"))})
        return parent.info.run_id


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3g} +- {spread:.2g}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", default=None, help="YAML file: arm name -> list of config overrides")
    p.add_argument("--only", nargs="+", default=None, help="run these arms of the file (default: all)")
    p.add_argument("--objectives", nargs="+", default=None, choices=OBJECTIVES, help="without --arms: these objectives")
    p.add_argument("--preset", default=None, help="model preset for every arm (default: the config's)")
    p.add_argument("--config", type=Path, default=DIGITS_CONFIG, help="the base config (default: configs/digits_local.yaml)")
    p.add_argument("--data", default=None, help="latent folder (default: the digits', written first if missing)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every arm, after the arm's own (repeatable), e.g. optim.batch_size=256")
    p.add_argument("--keep", default=None, metavar="DIR", help="keep each run's folder here (default: a temporary folder)")
    p.add_argument("--budget", choices=["steps", "wall"], default="steps",
                   help="steps: every arm trains --steps steps; wall: the wall time of --steps reference-arm steps")
    p.add_argument("--reference-arm", default="dumo", help="the arm whose --steps steps set the wall budget")
    p.add_argument("--wall-seconds", type=float, default=None, metavar="S",
                   help="with --budget wall: every arm trains for S seconds of its timed step (on a machine whose "
                        "speed is not known beforehand, e.g. a lent GPU), instead of --steps reference-arm steps")
    p.add_argument("--steps-from", default=None, metavar="JSON",
                   help="each arm trains the step count it had in this earlier --json result (another seed, same budget)")
    p.add_argument("--euler", type=int, nargs="*", default=[50], help="also score the v-head with N Euler steps")
    p.add_argument("--json", default=None)
    p.add_argument("--mlflow", default=None, metavar="URI",
                   help="log the sweep to this MLflow tracking URI (e.g. sqlite:///mlflow.db): a parent run, a child per run")
    p.add_argument("--experiment", default="dumo-ray-quality-digits")
    p.add_argument("--log-only", default=None, metavar="JSON",
                   help="train nothing: log an earlier --json result to --mlflow")
    args = p.parse_args()
    if args.log_only:
        if not args.mlflow:
            p.error("--log-only needs --mlflow URI (where to log the earlier result)")
        earlier = json.loads(Path(args.log_only).read_text())
        print("MLflow parent run:", log_to_mlflow(args.mlflow, args.experiment, earlier["title"], earlier["settings"],
                                                  earlier["settings"]["runs"]))
        return

    arms = {name: [*overrides, *args.set] for name, overrides in load_arms(args.arms).items()}
    chosen = args.only or args.objectives or list(arms)
    if args.wall_seconds is not None and (args.budget != "wall" or args.wall_seconds <= 0):
        p.error("--wall-seconds needs --budget wall and a positive number of seconds")
    unknown = [a for a in chosen + [args.reference_arm] * (args.budget == "wall") if a not in arms]
    if unknown:
        p.error(f"unknown arm(s) {unknown}; {args.arms or 'the default arms'} has {', '.join(arms)}")
    steps = step_counts(args, arms, chosen, p.error)
    results = []
    with tempfile.TemporaryDirectory(prefix="dumo-quality-") as scratch:
        storage = str(Path(args.keep).resolve()) if args.keep else scratch
        for arm in chosen:
            for seed in args.seeds:
                results.append(run(arm, arms[arm], args.preset, seed, steps[arm], args.euler, storage, args.config, args.data))
                print(json.dumps(results[-1]), flush=True)

    columns = ["fd_1step", "accuracy_1step", "fd_2step", "accuracy_2step", "fd_4step", "accuracy_4step",
               *[f"{m}_euler{n}" for n in args.euler for m in ("fd", "accuracy")]]
    table = []
    for arm in chosen:
        runs = [r for r in results if r["arm"] == arm]
        whole = [r["seconds"] for r in runs if not r.get("resumed")]  # a resumed run timed only its last part
        table.append({"arm": arm, "steps": steps[arm], "s_per_run": statistics.mean(whole) if whole else None,
                      **{c: mean_std([r[c] for r in runs if c in r]) for c in columns}})
    base = arm_config(args.set, args.preset, config=args.config, data=args.data)
    budget = (f"the step counts of {Path(args.steps_from).name}" if args.steps_from
              else f"{args.steps:,} training steps" if args.budget == "steps"
              else f"{args.wall_seconds:g} s of timed steps per arm" if args.wall_seconds
              else f"the wall time of {args.steps:,} {args.reference_arm} steps")
    title = (f"{base.model.preset} on {Path(base.data.path).name}, {budget} of batch {base.optim.batch_size}, "
             f"seeds {args.seeds}, {base.eval.num_images:,} evaluation samples (mean +- std)")
    settings = {**vars(args), "config": str(args.config), "arm_overrides": {a: arms[a] for a in chosen}, "runs": results}
    report(title, table, ["arm", "steps", "s_per_run"] + columns, args.json, settings)
    if args.mlflow:
        print("MLflow parent run:", log_to_mlflow(args.mlflow, args.experiment, title, settings, results))


if __name__ == "__main__":
    main()
