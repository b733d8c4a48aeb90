"""`dumo-ray tune`: a Ray Tune sweep in which every trial is a full `dumo-ray train` run (a Train V2
`TorchTrainer` with DeepSpeed, built and fitted by a small driver function per trial).

Trials are ranked by the in-training evaluation (`fd_1step` by default, lower is better), which the
workers report with their status lines; ASHA stops weak trials at its rungs and frees their workers for
the next. MLflow gets one parent run per sweep and one child run per trial (the trial's own training
run, tagged with the parent). At the end the sweep prints a results table and writes `results.csv` and
`best.yaml` (a config `dumo-ray train --config` accepts) into `<train.storage_path>/<sweep name>/`.
Rerunning the same command resumes an interrupted sweep (`Tuner.restore`): finished trials are kept.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import yaml

from dumo_ray.config import Config, ConfigError, _merge, config_from_dict, resolved_eval_features, save_config

SPACES_DIR = Path(__file__).resolve().parent / "spaces"
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
SWEEP_FILE = "sweep.json"


# ---------------------------------------------------------------------------------------------------
# Search spaces: {dotted config key: {distribution: arguments}}


def available_spaces() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def load_space(name: str) -> dict[str, dict[str, Any]]:
    """A named space from tune/spaces/ or a YAML file path; keys are checked against the config."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else SPACES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown search space {name!r}; named spaces: {', '.join(available_spaces())} (or a .yaml path)")
    params = (yaml.safe_load(path.read_text()) or {}).get("params")
    if not isinstance(params, dict) or not params:
        raise ValueError(f"search space {path} needs a non-empty 'params' mapping")
    fields = Config().flat()
    for key, spec in params.items():
        if key not in fields:
            raise ValueError(f"search space {path.name}: {key!r} is not a config key (e.g. objective.lambda_u)")
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
            raise ValueError(f"search space {path.name}: {key} must be one of {{{' | '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
    return params


def tune_param_space(space: dict[str, dict[str, Any]], search: str) -> dict[str, Any]:
    """Tune's param_space. Grid search enumerates choice/grid values; random and optuna sample."""
    from ray import tune

    out = {}
    for key, spec in space.items():
        (kind, args), = spec.items()
        if search == "grid":
            if kind not in ("choice", "grid"):
                raise ValueError(f"--search grid needs listed values; {key} is {kind} (use --search random or optuna)")
            out[key] = tune.grid_search(list(args))
        elif kind in ("choice", "grid"):
            out[key] = tune.choice(list(args))
        else:
            out[key] = getattr(tune, kind)(*args)
    return out


def apply_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys -> the nested config dict."""
    nested: dict[str, Any] = {}
    for key, value in params.items():
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = value
    return _merge(base, nested)


# ---------------------------------------------------------------------------------------------------
# One trial


def eval_report_callback(metric: str):
    """Tune requires the metric in every result; only reports that carry a fresh evaluation (made at the
    report's image count) are forwarded, so ASHA compares trials at the images where they were measured."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EvalReportCallback(TuneReportCallback):
        last_images = -1

        def after_report(self, run_context, metrics, checkpoint):
            row = metrics[0]
            if metric in row and row.get("eval_images") == row.get("images") and row["images"] != self.last_images:
                self.last_images = row["images"]
                super().after_report(run_context, metrics, checkpoint)

    return EvalReportCallback()


def run_trial(params: dict[str, Any], base: dict[str, Any], sweep_dir: str, metric: str, parent_run_id: str | None) -> None:
    """Tune's trainable: the base config + this trial's values -> one Ray Train run."""
    from ray import tune

    from dumo_ray.train.launch import fit

    trial = tune.get_context().get_trial_name()
    values = apply_params(base, params)
    values["train"].update(storage_path=f"{sweep_dir}/trials", name=trial)
    values["tracking"].update(parent_run_id=parent_run_id)
    result = fit(config_from_dict(values), callbacks=[eval_report_callback(metric)])
    if result.error is not None:
        raise result.error


# ---------------------------------------------------------------------------------------------------
# The sweep


def default_max_concurrent(cfg: Config) -> int:
    """Trials that fit the cluster at once: by GPUs when it has them, else by CPUs (workers + one for Ray Data)."""
    import ray

    resources = ray.cluster_resources()
    d = cfg.distributed
    if resources.get("GPU", 0) > 0 and d.use_gpu is not False:
        return max(1, int(resources["GPU"] // (d.max_workers * d.gpus_per_worker)))
    return max(1, int(resources.get("CPU", 1) // (d.max_workers * d.cpus_per_worker + 1)))


def parent_run(cfg: Config, sweep_dir: Path, name: str, settings: dict[str, Any]) -> str | None:
    """The sweep's MLflow parent run: created once, its id kept in sweep.json so a resumed sweep reuses it."""
    if not cfg.tracking.enabled:
        return None
    record = sweep_dir / SWEEP_FILE
    if record.is_file():
        return json.loads(record.read_text())["mlflow_parent_run_id"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.tracking.experiment)
    run = client.create_run(experiment_id, run_name=name, tags={"dumo_ray.sweep": name})
    for key, value in settings.items():
        client.log_param(run.info.run_id, f"sweep.{key}", str(value)[:500])
    record.write_text(json.dumps({"mlflow_parent_run_id": run.info.run_id, **settings}, indent=2, default=str))
    return run.info.run_id


def results_table(grid, space_keys: list[str], metrics: list[str], total_images: int) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        last = result.metrics or {}
        images = int(last.get("images", 0))
        row = {"trial": Path(result.path).name if result.path else "?"}
        row.update({key: result.config.get(key) for key in space_keys})
        row.update({m: last.get(m) for m in metrics})
        row["images"] = images
        row["status"] = "error" if result.error else ("complete" if images >= total_images else "stopped early")
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no trials)"
    keys = list(rows[0])
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    widths = {k: max(len(k), *(len(cell(r[k])) for r in rows)) for k in keys}
    lines = ["  ".join(k.ljust(widths[k]) for k in keys)]
    lines += ["  ".join(cell(r[k]).ljust(widths[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def sweep(cfg: Config, space_name: str, *, num_samples: int = 8, scheduler: str = "asha", search: str = "random",
          max_concurrent: int | None = None, metric: str = "fd_1step", name: str | None = None) -> dict[str, Any]:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from dumo_ray.train.launch import absolute_paths

    if resolved_eval_features(cfg) == "none":
        raise ConfigError("sweeps rank trials by the in-training evaluation: set eval.features (digits or inception)")
    if scheduler == "asha" and not cfg.eval.every_images:
        raise ConfigError("--scheduler asha compares trials during training: set eval.every_images (e.g. a tenth of "
                          "train.total_images) or use --scheduler fifo")
    if search not in ("random", "grid", "optuna"):
        raise ValueError(f"--search must be random, grid or optuna, got {search!r}")
    space = load_space(space_name)
    cfg = absolute_paths(cfg)
    name = name or f"{cfg.train.name}-{Path(space_name).stem}"
    sweep_dir = Path(cfg.train.storage_path) / name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        # The dashboard serves the state API, which Ray Train's placement-group cleaner needs to release
        # each finished trial's worker reservation (without it they linger and later trials wait forever).
        ray.init(address=cfg.distributed.address, include_dashboard=True if cfg.distributed.address is None else None)
    max_concurrent = max_concurrent or default_max_concurrent(cfg)
    settings = {"space": space_name, "num_samples": num_samples, "scheduler": scheduler, "search": search,
                "max_concurrent": max_concurrent, "metric": metric}
    parent_id = parent_run(cfg, sweep_dir, name, settings)
    print(f"[dumo-ray] sweep {name}: space {space_name} ({', '.join(space)}), {search} search, {scheduler} scheduler, "
          f"{num_samples} sample(s), up to {max_concurrent} trial(s) at once, ranked by {metric}", flush=True)

    base = cfg.to_dict()
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, sweep_dir=str(sweep_dir), metric=metric, parent_run_id=parent_id),
        # The driver function only waits on its trainer, whose workers hold the real resources; Tune refuses
        # an empty request, so it asks for a sliver of a CPU.
        {"CPU": 0.01})
    run_config = tune.RunConfig(name="tuner", storage_path=str(sweep_dir), verbose=0)
    tuner_path = str(sweep_dir / "tuner")
    if tune.Tuner.can_restore(tuner_path):
        print(f"[dumo-ray] resuming the sweep from {tuner_path} (finished trials are kept)", flush=True)
        tuner = tune.Tuner.restore(tuner_path, trainable=trainable, resume_errored=True)
    else:
        searcher = None
        if search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            searcher = OptunaSearch(seed=cfg.train.seed)
        elif search == "random":
            searcher = tune.search.BasicVariantGenerator(random_state=cfg.train.seed)
        sched = (ASHAScheduler(time_attr="images", max_t=cfg.train.total_images, grace_period=cfg.eval.every_images,
                               reduction_factor=2) if scheduler == "asha" else FIFOScheduler())
        tuner = tune.Tuner(trainable, param_space=tune_param_space(space, search), run_config=run_config,
                           tune_config=tune.TuneConfig(metric=metric, mode="min", scheduler=sched, search_alg=searcher,
                                                       num_samples=num_samples, max_concurrent_trials=max_concurrent))
    grid = tuner.fit()

    steps = [f"fd_{s}step" for s in cfg.eval.steps]
    rows = results_table(grid, list(space), list(dict.fromkeys([metric, *steps])), cfg.train.total_images)
    rows.sort(key=lambda r: (r["status"] != "complete", r[metric] if r[metric] is not None else math.inf))
    table = format_table(rows)
    print(table, flush=True)
    with open(sweep_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    best = next((r for r in rows if r[metric] is not None and r["status"] != "error"), None)
    best_path = None
    if best is not None:
        best_values = apply_params(cfg.to_dict(), {k: best[k] for k in space})
        best_values["train"]["name"] = f"{name}-best"
        best_path = sweep_dir / "best.yaml"
        save_config(config_from_dict(best_values), best_path)
        print(f"[dumo-ray] best trial {best['trial']}: {metric} {best[metric]:.4g}; config -> {best_path}", flush=True)
    if parent_id is not None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(cfg.tracking.uri)
        client.log_artifact(parent_id, str(sweep_dir / "results.csv"))
        if best is not None:
            client.log_artifact(parent_id, str(best_path))
            client.log_metric(parent_id, f"best_{metric}", float(best[metric]))
            for key in space:  # tags, not params: a resumed sweep may find a different best
                client.set_tag(parent_id, f"best.{key}", str(best[key]))
        client.set_terminated(parent_id, "FINISHED")
    return {"name": name, "dir": str(sweep_dir), "rows": rows, "best_config": str(best_path) if best_path else None,
            "parent_run_id": parent_id, "table": table}
