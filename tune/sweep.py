"""`dumo-ray tune`: a Ray Tune sweep in which every trial is a full `dumo-ray train` run (a Train V2
`TorchTrainer` with DeepSpeed, built and fitted by a small driver function per trial).

Trials are ranked by the in-training evaluation (`fd_1step` by default, lower is better), which the
workers report with their status lines; ASHA stops weak trials at its rungs and frees their workers for
the next. MLflow gets one parent run per sweep and one child run per trial (the trial's own training
run, tagged with the parent). At the end the sweep prints a results table and writes `results.csv` and
`best.yaml` (a config `dumo-ray train --config` accepts) into `<train.storage_path>/<sweep name>/`.
With `--search grid --replicates N` every grid point runs N times with seeds train.seed .. train.seed+N-1,
and the sweep also prints and writes (`summary.csv`) each point's mean and std over its complete replicates.
Rerunning the same command resumes an interrupted sweep (`Tuner.restore`): finished trials are kept.
An interrupted sweep (Ctrl-C) reports itself as such: its MLflow parent run is KILLED with the tag
`dumo_ray.sweep_status=interrupted` until a rerun resumes it, and `sweep()` returns `interrupted=True`.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

import yaml

from dumo_ray.config import (Config, ConfigError, _merge, _plain_name, config_from_dict, resolved_eval_features,
                             save_config)

SPACES_DIR = Path(__file__).resolve().parent / "spaces"
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
SWEEP_FILE = "sweep.json"
SEED_KEY = "train.seed"
DEFAULT_RANDOM_SAMPLES = 8
# The options that decide which trials a sweep has: a rerun that resumes it must give the same ones.
SHAPE_KEYS = ("space", "search", "num_samples", "replicates")
STATUS_TAG = "dumo_ray.sweep_status"
# The sweep's state -> the MLflow parent run's status (KILLED: MLflow's word for a run stopped by the user).
PARENT_STATUS = {"running": "RUNNING", "interrupted": "KILLED", "finished": "FINISHED"}


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


def sampling_plan(search: str, num_samples: int | None, replicates: int | None) -> tuple[int, int]:
    """(Tune's num_samples, seeded replicates of each config) from the CLI's options.

    Grid search repeats the grid once unless asked: a repeat with the same seed is bit-identical, so
    repeats are replicates, each with its own seed (`--replicates N`, or the older `--num-samples N`).
    Random and optuna search draw a new config for every trial (default 8), all with the base seed, so
    that two trials differ by their config alone; replicates of a drawn config are not offered there."""
    for flag, value in (("--num-samples", num_samples), ("--replicates", replicates)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{flag} must be an integer >= 1, got {value!r}")
    if search == "grid":
        if num_samples and replicates and num_samples > 1 and replicates > 1 and num_samples != replicates:
            raise ValueError(f"--search grid repeats the grid once per seed: give --replicates {replicates} alone, "
                             f"not also --num-samples {num_samples}")
        return 1, max(num_samples or 1, replicates or 1)
    if replicates is not None and replicates > 1:
        raise ValueError(f"--replicates needs --search grid ({search} search draws a new config for every trial; "
                         "list the values to repeat in the space and use --search grid)")
    return num_samples or DEFAULT_RANDOM_SAMPLES, 1


def replicate_seeds(base_seed: int, replicates: int) -> list[int]:
    """One seed per replicate: the base config's own seed first, so replicate 0 is the unreplicated run."""
    return [base_seed + i for i in range(replicates)]


def expected_trials(space: dict[str, dict[str, Any]], search: str, num_samples: int, replicates: int) -> int:
    """How many trials the finished sweep has: the grid's size (times its seeds), or the samples drawn."""
    if search != "grid":
        return num_samples
    return num_samples * replicates * math.prod(len(next(iter(spec.values()))) for spec in space.values())


def tune_param_space(space: dict[str, dict[str, Any]], search: str, seeds: list[int] | None = None) -> dict[str, Any]:
    """Tune's param_space. Grid search enumerates choice/grid values; random and optuna sample. Several
    seeds (grid only) add train.seed as one more grid axis: every point runs once per seed."""
    from ray import tune

    out = {}
    if seeds is not None and len(seeds) > 1:
        if search != "grid":
            raise ValueError(f"seeded replicates need --search grid, got --search {search}")
        if SEED_KEY in space:
            raise ValueError(f"the search space sweeps {SEED_KEY} itself: drop it from the space or use --replicates 1")
        out[SEED_KEY] = tune.grid_search(list(seeds))
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


def sweep_name(cfg: Config, space_name: str, name: str | None) -> str:
    """The sweep's folder inside train.storage_path, held to the rule train.name follows."""
    name = f"{cfg.train.name}-{Path(space_name).stem}" if name is None else name
    if not _plain_name(name):
        raise ValueError(f"--name must be a plain name (one folder inside train.storage_path: no '/' or '\\', "
                         f"not '.' or '..'), got {name!r}")
    return name


def read_record(sweep_dir: Path) -> dict[str, Any] | None:
    record = sweep_dir / SWEEP_FILE
    return json.loads(record.read_text()) if record.is_file() else None


def check_same_sweep(record: dict[str, Any] | None, shape: dict[str, Any], name: str) -> None:
    """Tune resumes the trials it recorded, whatever the rerun asks for: refuse a rerun that asks for others.
    (Records written before replicates existed lack the key: they ran one replicate.)"""
    if record is None:
        return
    recorded = {"replicates": 1, **record}
    changed = [f"{k} {recorded.get(k)!r} -> {shape[k]!r}" for k in SHAPE_KEYS if recorded.get(k) != shape[k]]
    if changed:
        raise ValueError(f"sweep {name} was started with other options ({'; '.join(changed)}): rerun it with its "
                         "own options to resume it, or give a new --name")


def mark_parent_run(uri: str, run_id: str, state: str) -> None:
    """The parent run's MLflow status and the `dumo_ray.sweep_status` tag: running, interrupted or finished."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    client.set_tag(run_id, STATUS_TAG, state)
    if state == "running":
        client.update_run(run_id, status=PARENT_STATUS[state])
    else:
        client.set_terminated(run_id, PARENT_STATUS[state])


def parent_run(cfg: Config, sweep_dir: Path, name: str, settings: dict[str, Any]) -> str | None:
    """The sweep's MLflow parent run: created once, its id kept in sweep.json so a resumed sweep reuses it
    (and marks it running again). sweep.json is written even without tracking: it holds the sweep's options."""
    record = read_record(sweep_dir)
    parent_id = (record or {}).get("mlflow_parent_run_id")
    if cfg.tracking.enabled and parent_id is not None:
        mark_parent_run(cfg.tracking.uri, parent_id, "running")
        return parent_id
    if cfg.tracking.enabled:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(cfg.tracking.uri)
        from dumo_ray.tracking import experiment_id_for

        run = client.create_run(experiment_id_for(client, cfg), run_name=name, tags={"dumo_ray.sweep": name, STATUS_TAG: "running"})
        for key, value in settings.items():
            client.log_param(run.info.run_id, f"sweep.{key}", str(value)[:500])
        parent_id = run.info.run_id
    if record is None or parent_id != record.get("mlflow_parent_run_id"):
        record = {**settings, **(record or {}), "mlflow_parent_run_id": parent_id}
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(record, indent=2, default=str))
    return parent_id if cfg.tracking.enabled else None


def trial_status(last: dict[str, Any], failed: bool, total_images: int) -> str:
    """A trial has ended when it failed, trained all its images, or was stopped (Tune then marks its last
    result `done`: ASHA's stops, a driver function that returned). Anything else was cut off by an
    interrupted sweep: Tune's cleanup calls such a trial TERMINATED too, but never marks it done."""
    if failed:
        return "error"
    if int(last.get("images", 0)) >= total_images:
        return "complete"
    return "stopped early" if last.get("done") else "interrupted"


def sweep_interrupted(rows: list[dict[str, Any]], expected: int) -> bool:
    """Interrupted: a trial was cut off, or the sweep stopped before its search made all its trials."""
    return len(rows) < expected or any(r["status"] == "interrupted" for r in rows)


def results_table(grid, space_keys: list[str], metrics: list[str], total_images: int) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        last = result.metrics or {}
        config = result.config or {}  # none for a trial that never reported (cut off, or failed first)
        row = {"trial": Path(result.path).name if result.path else "?"}
        row.update({key: config.get(key) for key in space_keys})
        row.update({m: last.get(m) for m in metrics})
        row["images"] = int(last.get("images", 0))
        row["status"] = trial_status(last, result.error is not None, total_images)
        rows.append(row)
    return rows


def summarise_replicates(rows: list[dict[str, Any]], config_keys: list[str],
                         metrics: list[str]) -> list[dict[str, Any]]:
    """One row per distinct config: the mean and (sample) std of each metric over its complete replicates.
    Trials stopped early are left out: their metrics were measured at fewer images."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(str(row[k]) for k in config_keys), []).append(row)
    summary = []
    for members in groups.values():
        complete = [r for r in members if r["status"] == "complete"]
        out = {k: members[0][k] for k in config_keys}
        out["complete"] = f"{len(complete)}/{len(members)}"
        for m in metrics:
            values = [float(r[m]) for r in complete if r[m] is not None]
            out[f"{m}_mean"] = statistics.fmean(values) if values else None
            out[f"{m}_std"] = statistics.stdev(values) if len(values) > 1 else None
        summary.append(out)
    return summary


def format_summary(summary: list[dict[str, Any]], metrics: list[str]) -> list[dict[str, Any]]:
    """The summary as printed: `mean ± std` in one column per metric."""
    def cell(mean, std):
        if mean is None:
            return "-"
        return f"{mean:.4g} ± {std:.2g}" if std is not None else f"{mean:.4g}"
    shown = []
    for row in summary:
        out = {k: v for k, v in row.items() if not k.endswith(("_mean", "_std"))}
        out.update({f"{m} (mean ± std)": cell(row[f"{m}_mean"], row[f"{m}_std"]) for m in metrics})
        shown.append(out)
    return shown


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no trials)"
    keys = list(rows[0])
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    widths = {k: max(len(k), *(len(cell(r[k])) for r in rows)) for k in keys}
    lines = ["  ".join(k.ljust(widths[k]) for k in keys)]
    lines += ["  ".join(cell(r[k]).ljust(widths[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def sweep(cfg: Config, space_name: str, *, num_samples: int | None = None, replicates: int | None = None,
          scheduler: str = "asha", search: str = "random", max_concurrent: int | None = None, metric: str = "fd_1step",
          name: str | None = None) -> dict[str, Any]:
    """Run (or resume) a sweep. `num_samples` / `replicates`: see `sampling_plan`. The result's `interrupted`
    is True when Ctrl-C stopped it before every trial ended (no best.yaml then: rerun to resume)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from dumo_ray.train.launch import absolute_paths

    if search not in ("random", "grid", "optuna"):
        raise ValueError(f"--search must be random, grid or optuna, got {search!r}")
    name = sweep_name(cfg, space_name, name)
    num_samples, replicates = sampling_plan(search, num_samples, replicates)
    if resolved_eval_features(cfg) == "none":
        raise ConfigError("sweeps rank trials by the in-training evaluation: set eval.features (digits or inception)")
    if scheduler == "asha" and not cfg.eval.every_images:
        raise ConfigError("--scheduler asha compares trials during training: set eval.every_images (e.g. a tenth of "
                          "train.total_images) or use --scheduler fifo")
    space = load_space(space_name)
    param_space = tune_param_space(space, search, replicate_seeds(cfg.train.seed, replicates))
    cfg = absolute_paths(cfg)
    sweep_dir = Path(cfg.train.storage_path) / name
    shape = {"space": space_name, "search": search, "num_samples": num_samples, "replicates": replicates}
    check_same_sweep(read_record(sweep_dir), shape, name)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        # The dashboard serves the state API, which Ray Train's placement-group cleaner needs to release
        # each finished trial's worker reservation (without it they linger and later trials wait forever).
        ray.init(address=cfg.distributed.address, include_dashboard=True if cfg.distributed.address is None else None)
    max_concurrent = max_concurrent or default_max_concurrent(cfg)
    settings = {**shape, "scheduler": scheduler, "max_concurrent": max_concurrent, "metric": metric}
    parent_id = parent_run(cfg, sweep_dir, name, settings)
    repeats = f", {replicates} seeded replicates of each point" if replicates > 1 else ""
    print(f"[dumo-ray] sweep {name}: space {space_name} ({', '.join(space)}), {search} search{repeats}, {scheduler} "
          f"scheduler, {expected_trials(space, search, num_samples, replicates)} trial(s), up to {max_concurrent} at "
          f"once, ranked by {metric}", flush=True)

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
        tuner = tune.Tuner(trainable, param_space=param_space, run_config=run_config,
                           tune_config=tune.TuneConfig(metric=metric, mode="min", scheduler=sched, search_alg=searcher,
                                                       num_samples=num_samples, max_concurrent_trials=max_concurrent))
    try:
        # Tune catches the first Ctrl-C itself (it saves its state and returns); a second one lands here.
        grid = tuner.fit()
    except KeyboardInterrupt:
        if parent_id is not None:
            mark_parent_run(cfg.tracking.uri, parent_id, "interrupted")
        raise

    steps = [f"fd_{s}step" for s in cfg.eval.steps]
    metrics = list(dict.fromkeys([metric, *steps]))
    rows = results_table(grid, list(space) + ([SEED_KEY] if replicates > 1 else []), metrics, cfg.train.total_images)
    expected = expected_trials(space, search, num_samples, replicates)
    return finish_sweep(cfg, name, sweep_dir, list(space), rows, expected, replicates, metrics, parent_id)


def finish_sweep(cfg: Config, name: str, sweep_dir: Path, config_keys: list[str], rows: list[dict[str, Any]],
                 expected: int, replicates: int, metrics: list[str], parent_id: str | None) -> dict[str, Any]:
    """After Tuner.fit: the tables, results.csv / summary.csv, best.yaml (not for an interrupted sweep) and
    the MLflow parent run's closing status. `metrics[0]` ranks the trials."""
    metric = metrics[0]
    interrupted = sweep_interrupted(rows, expected)
    rows.sort(key=lambda r: (r["status"] != "complete", r[metric] if r[metric] is not None else math.inf))
    table = format_table(rows)
    print(table, flush=True)
    written = []
    if rows:
        written.append(write_csv(rows, sweep_dir / "results.csv"))
    summary = summarise_replicates(rows, config_keys, metrics) if replicates > 1 else None
    if summary:
        summary.sort(key=lambda r: r[f"{metric}_mean"] if r[f"{metric}_mean"] is not None else math.inf)
        print(f"[dumo-ray] each point over its complete replicates (seeds {cfg.train.seed}.."
              f"{cfg.train.seed + replicates - 1}):\n{format_table(format_summary(summary, metrics))}", flush=True)
        written.append(write_csv(summary, sweep_dir / "summary.csv"))

    # A partial sweep names no best: the rerun that resumes it does.
    best, best_value, best_std = (None, None, None) if interrupted else choose_best(rows, summary, metric)
    best_path = None
    if best is not None:
        best_values = apply_params(cfg.to_dict(), {k: best[k] for k in config_keys})
        best_values["train"]["name"] = f"{name}-best"
        best_path = sweep_dir / "best.yaml"
        save_config(config_from_dict(best_values), best_path)
        which = f"point ({best['complete']} replicates complete)" if summary else f"trial {best['trial']}"
        spread = f" ± {best_std:.2g}" if best_std is not None else ""
        print(f"[dumo-ray] best {which}: {metric} {best_value:.4g}{spread}; config -> {best_path}", flush=True)
    if parent_id is not None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(cfg.tracking.uri)
        for path in written:
            client.log_artifact(parent_id, str(path))
        if best is not None:
            client.log_artifact(parent_id, str(best_path))
            client.log_metric(parent_id, f"best_{metric}", float(best_value))
            if best_std is not None:
                client.log_metric(parent_id, f"best_{metric}_std", float(best_std))
            for key in config_keys:  # tags, not params: a resumed sweep may find a different best
                client.set_tag(parent_id, f"best.{key}", str(best[key]))
        mark_parent_run(cfg.tracking.uri, parent_id, "interrupted" if interrupted else "finished")
    if interrupted:
        print(f"[dumo-ray] sweep {name} interrupted before every trial ended: rerun the same command to resume it",
              flush=True)
    return {"name": name, "dir": str(sweep_dir), "rows": rows, "summary": summary, "interrupted": interrupted,
            "best_config": str(best_path) if best_path else None, "parent_run_id": parent_id, "table": table}


def choose_best(rows: list[dict[str, Any]], summary: list[dict[str, Any]] | None, metric: str):
    """(row, value, std): the point with the lowest mean over its complete replicates when there are
    replicates, else the first ranked trial with the metric (rows are sorted complete first)."""
    if summary:
        best = min((r for r in summary if r[f"{metric}_mean"] is not None), key=lambda r: r[f"{metric}_mean"],
                   default=None)
        return (best, best[f"{metric}_mean"], best[f"{metric}_std"]) if best else (None, None, None)
    best = next((r for r in rows if r[metric] is not None and r["status"] != "error"), None)
    return (best, best[metric], None) if best else (None, None, None)


def sweep_outcome(result: dict[str, Any]) -> tuple[int, str | None]:
    """`dumo-ray tune`'s exit status and error line. 130 (128 + SIGINT, the shell's code for Ctrl-C) for an
    interrupted sweep, so that scripts and job runners do not take it for a finished one."""
    if result["interrupted"]:
        return 130, "the sweep was interrupted; rerun the same command to resume it"
    if result["best_config"] is None:
        return 1, "no trial finished with the metric"
    return 0, None


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
