"""`dumo-ray tune`'s options without a sweep (issue 18): grid search runs its grid once and repeats it as
seeded replicates summarised as mean ± std, an interrupted sweep says so (exit 130, MLflow parent KILLED
until a rerun resumes it), and a sweep name cannot leave the storage path. The Tune pieces used here are
pure (`generate_variants` enumerates a param space, `Result` is a record); MLflow is a real sqlite store."""
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray.tune import Result
from ray.tune.search.variant_generator import generate_variants

from dumo_ray.cli import build_parser, main
from dumo_ray.config import load_config
from dumo_ray.tune.sweep import (SWEEP_FILE, apply_params, check_same_sweep, choose_best, expected_trials,
                                 finish_sweep, format_summary, load_space, parent_run, read_record, replicate_seeds,
                                 results_table, sampling_plan, summarise_replicates, sweep_interrupted, sweep_name,
                                 sweep_outcome, tune_param_space)

ROOT = Path(__file__).resolve().parents[1]
TOTAL = 768


def tune_args(*extra):
    return build_parser().parse_args(["tune", "--config", "c.yaml", "--space", "objective", *extra])


def plan(*extra):
    args = tune_args(*extra)
    return sampling_plan(args.search, args.num_samples, args.replicates)


def grid_trials(space, seeds):
    """The trial configs Tune's grid search makes of a param space (its own variant generator)."""
    return [config for _, config in generate_variants(tune_param_space(space, "grid", seeds))]


def test_grid_search_runs_the_grid_once_and_repeats_it_with_new_seeds():
    # The README's example: 3 trials, not 8 bit-identical copies of each.
    assert plan("--search", "grid") == (1, 1)
    space = load_space("objective")
    once = grid_trials(space, replicate_seeds(0, 1))
    assert [t["objective.name"] for t in once] == ["dumo", "meanflow", "flow_matching"]
    assert all("train.seed" not in t for t in once)
    assert expected_trials(space, "grid", 1, 1) == 3

    # Repeats are replicates: every objective once per seed, seeds from train.seed on.
    assert plan("--search", "grid", "--replicates", "3") == (1, 3)
    assert plan("--search", "grid", "--num-samples", "3") == (1, 3)
    trials = grid_trials(space, replicate_seeds(5, 3))
    assert sorted((t["objective.name"], t["train.seed"]) for t in trials) == sorted(
        (o, s) for o in ("dumo", "meanflow", "flow_matching") for s in (5, 6, 7))
    assert expected_trials(space, "grid", 1, 3) == len(trials) == 9
    base = load_config(ROOT / "configs/quickstart.yaml").to_dict()
    assert {apply_params(base, t)["train"]["seed"] for t in trials} == {5, 6, 7}

    # Random search keeps drawing 8 distinct configs on the base seed (trials differ by config alone).
    assert plan() == (8, 1) and plan("--num-samples", "4") == (4, 1)
    assert expected_trials(load_space("loss_weighting"), "random", 4, 1) == 4
    with pytest.raises(ValueError, match="--replicates needs --search grid"):
        plan("--replicates", "2")
    with pytest.raises(ValueError, match="give --replicates 3 alone"):
        plan("--search", "grid", "--replicates", "3", "--num-samples", "2")
    with pytest.raises(ValueError, match="--replicates must be an integer >= 1"):
        plan("--search", "grid", "--replicates", "0")
    with pytest.raises(ValueError, match="sweeps train.seed itself"):
        tune_param_space({"train.seed": {"grid": [1, 2]}}, "grid", [0, 1])


def row(name, seed, fd, status="complete"):
    return {"trial": f"{name}-{seed}", "objective.name": name, "train.seed": seed, "fd_1step": fd, "fd_2step": fd / 2,
            "images": TOTAL if status == "complete" else TOTAL // 3, "status": status}


def test_replicates_summarise_to_mean_and_std_and_the_best_point_is_the_best_mean():
    # dumo has the single best trial (9) but the worse mean; meanflow's replicates are steadier and better.
    rows = [row("dumo", 0, 9.0), row("dumo", 1, 15.0), row("dumo", 2, 18.0),
            row("meanflow", 0, 11.0), row("meanflow", 1, 12.0), row("meanflow", 2, 13.0),
            row("flow_matching", 0, 50.0), row("flow_matching", 1, 5.0, "stopped early")]
    summary = summarise_replicates(rows, ["objective.name"], ["fd_1step", "fd_2step"])
    by_name = {s["objective.name"]: s for s in summary}
    assert by_name["dumo"]["fd_1step_mean"] == pytest.approx(14.0)
    assert by_name["dumo"]["fd_1step_std"] == pytest.approx(4.582576, rel=1e-6)  # sample std of 9, 15, 18
    assert by_name["meanflow"]["fd_2step_mean"] == pytest.approx(6.0)
    # A trial stopped early was measured at fewer images: left out of the mean, counted as not complete.
    assert by_name["flow_matching"]["complete"] == "1/2"
    assert by_name["flow_matching"]["fd_1step_mean"] == 50.0 and by_name["flow_matching"]["fd_1step_std"] is None
    shown = {r["objective.name"]: r for r in format_summary(summary, ["fd_1step"])}
    assert shown["dumo"]["fd_1step (mean ± std)"] == "14 ± 4.6"
    assert shown["flow_matching"]["fd_1step (mean ± std)"] == "50"

    best, value, std = choose_best(rows, summary, "fd_1step")
    assert best["objective.name"] == "meanflow" and value == pytest.approx(12.0) and std == pytest.approx(1.0)


def result(trial, name, metrics, error=None):
    """A trial's record as Tuner.fit hands it back (its last reported metrics carry its config)."""
    return Result(metrics={**metrics, "config": {"objective.name": name}}, checkpoint=None, error=error,
                  path=f"/sweeps/s/tuner/{trial}")


def test_a_trial_cut_off_by_an_interrupt_is_not_taken_for_one_asha_stopped():
    grid = [result("a", "dumo", {"fd_1step": 12.0, "images": TOTAL, "done": True}),
            result("b", "meanflow", {"fd_1step": 30.0, "images": 256, "done": True}),  # ASHA's stop: done
            result("c", "flow_matching", {"fd_1step": 40.0, "images": 256}),  # Ctrl-C: Tune never marked it done
            result("d", "dumo", {}, error=RuntimeError("boom")),
            # Cut off before its first evaluation: Tune knows only its id, not even its config.
            Result(metrics={"trial_id": "e"}, checkpoint=None, error=None, path="/sweeps/s/tuner/e")]
    rows = results_table(grid, ["objective.name"], ["fd_1step"], TOTAL)
    assert [r["status"] for r in rows] == ["complete", "stopped early", "interrupted", "error", "interrupted"]
    assert rows[-1]["objective.name"] is None and rows[-1]["images"] == 0
    assert sweep_interrupted(rows, expected=5)
    ended = [r for r in rows if r["status"] != "interrupted"]
    assert not sweep_interrupted(ended, expected=3)
    # Stopped before its search made all its trials (optuna makes them a few at a time).
    assert sweep_interrupted(ended, expected=4)


def quickstart(tmp_path, *overrides):
    return load_config(ROOT / "configs/quickstart.yaml", [
        f"train.storage_path={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *overrides])


def test_an_interrupted_sweep_exits_130_and_its_parent_run_is_killed_until_a_rerun_finishes_it(tmp_path):
    cfg = quickstart(tmp_path)
    sweep_dir = tmp_path / "runs/s"
    sweep_dir.mkdir(parents=True)
    settings = {"space": "objective", "search": "grid", "num_samples": 1, "replicates": 1, "scheduler": "fifo"}
    parent_id = parent_run(cfg, sweep_dir, "s", settings)
    client = MlflowClient(cfg.tracking.uri)
    assert client.get_run(parent_id).info.status == "RUNNING"

    # Ctrl-C after one of the three trials: the other two were cut off.
    cut = [result("a", "dumo", {"fd_1step": 12.0, "fd_2step": 8.0, "images": TOTAL, "done": True}),
           result("b", "meanflow", {"fd_1step": 30.0, "fd_2step": 20.0, "images": 256}),
           result("c", "flow_matching", {})]
    rows = results_table(cut, ["objective.name"], ["fd_1step", "fd_2step"], TOTAL)
    out = finish_sweep(cfg, "s", sweep_dir, ["objective.name"], rows, 3, 1, ["fd_1step", "fd_2step"], parent_id)
    assert out["interrupted"] and out["best_config"] is None and not (sweep_dir / "best.yaml").exists()
    assert sweep_outcome(out) == (130, "the sweep was interrupted; rerun the same command to resume it")
    parent = client.get_run(parent_id)
    assert parent.info.status == "KILLED" and parent.data.tags["dumo_ray.sweep_status"] == "interrupted"
    assert "best_fd_1step" not in parent.data.metrics

    # The rerun resumes the same parent (running again) and closes it FINISHED with the best.
    assert parent_run(cfg, sweep_dir, "s", settings) == parent_id
    parent = client.get_run(parent_id)
    assert parent.info.status == "RUNNING" and parent.data.tags["dumo_ray.sweep_status"] == "running"
    done = [cut[0], result("b", "meanflow", {"fd_1step": 9.0, "fd_2step": 6.0, "images": TOTAL, "done": True}),
            result("c", "flow_matching", {"fd_1step": 70.0, "fd_2step": 50.0, "images": TOTAL, "done": True})]
    rows = results_table(done, ["objective.name"], ["fd_1step", "fd_2step"], TOTAL)
    out = finish_sweep(cfg, "s", sweep_dir, ["objective.name"], rows, 3, 1, ["fd_1step", "fd_2step"], parent_id)
    assert not out["interrupted"] and sweep_outcome(out) == (0, None)
    assert load_config(out["best_config"]).objective.name == "meanflow"
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["dumo_ray.sweep_status"] == "finished"
    assert parent.data.metrics["best_fd_1step"] == 9.0 and parent.data.tags["best.objective.name"] == "meanflow"


def test_a_rerun_with_other_trials_is_refused_and_the_record_is_kept_without_mlflow(tmp_path):
    cfg = quickstart(tmp_path, "tracking.enabled=false")
    sweep_dir = tmp_path / "runs/s"
    sweep_dir.mkdir(parents=True)
    shape = {"space": "objective", "search": "grid", "num_samples": 1, "replicates": 1}
    assert parent_run(cfg, sweep_dir, "s", {**shape, "metric": "fd_1step"}) is None
    assert (sweep_dir / SWEEP_FILE).is_file()  # the options a resume is checked against
    check_same_sweep(read_record(sweep_dir), shape, "s")
    with pytest.raises(ValueError, match=r"sweep s was started with other options \(replicates 1 -> 3\)"):
        check_same_sweep(read_record(sweep_dir), {**shape, "replicates": 3}, "s")


@pytest.mark.parametrize("name", ["..", ".", "../elsewhere", "a/b", "/tmp/abs", "a\\b"])
def test_a_sweep_name_cannot_leave_the_storage_path(tmp_path, capsys, name):
    cfg = quickstart(tmp_path)
    with pytest.raises(ValueError, match="--name must be a plain name"):
        sweep_name(cfg, "objective", name)
    assert sweep_name(cfg, "objective", None) == "quickstart-objective"
    # The CLI: one line, exit 2, before Ray or any folder.
    assert main(["tune", "--config", str(ROOT / "configs/quickstart.yaml"), "--space", "objective", "--search", "grid",
                 "--set", f"train.storage_path={tmp_path / 'runs'}", "--name", name]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dumo-ray tune: error: --name must be a plain name") and "\n" not in err
    assert list(tmp_path.iterdir()) == []
