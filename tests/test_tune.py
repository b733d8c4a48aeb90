"""A real Ray Tune sweep on CPU: 2 trials of a tiny model, each a Ray Train DeepSpeed run (one worker:
the 2-worker paths are tested in test_distributed.py), ASHA stopping
the weak ones early, MLflow parent and child runs, and a best-config YAML that `dumo-ray train` runs."""
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dumo_ray.cli import main
from dumo_ray.config import load_config
from dumo_ray.tune.sweep import load_space, sweep, tune_param_space

ROOT = Path(__file__).resolve().parents[1]


def test_named_spaces_load_and_bad_ones_fail(tmp_path):
    for name in ("loss_weighting", "time_sampling", "objective"):
        assert load_space(name)
    assert set(tune_param_space(load_space("objective"), "grid")) == {"objective.name"}
    with pytest.raises(ValueError, match="--search grid needs listed values"):
        tune_param_space(load_space("loss_weighting"), "grid")
    (tmp_path / "bad.yaml").write_text("params:\n  optim.learning_rate: {choice: [1, 2]}\n")
    with pytest.raises(ValueError, match="'optim.learning_rate' is not a config key"):
        load_space(str(tmp_path / "bad.yaml"))
    with pytest.raises(ValueError, match="unknown search space 'nope'.*loss_weighting"):
        load_space("nope")


def test_optuna_search_suggests_values_inside_the_space():
    from ray.tune.search.optuna import OptunaSearch

    space = load_space("time_sampling")
    searcher = OptunaSearch(seed=0)
    assert searcher.set_search_properties("fd_1step", "min", tune_param_space(space, "optuna"))
    for trial in ("a", "b", "c"):
        suggested = searcher.suggest(trial)
        assert set(suggested) == set(space)
        assert -1.2 <= suggested["objective.time_mean"] <= 0.4 and suggested["objective.zero_fraction"] in (0.0, 0.1, 0.25)


@pytest.mark.ray
@pytest.mark.slow
def test_asha_sweep_with_mlflow_parent_and_children(local_ray, digits_latents, tmp_path):
    # One good learning rate, then one that cannot learn in 24 steps: ASHA must stop it at its first rung
    # (one trial at a time, so the good one's figures are the rung's cutoff).
    space = tmp_path / "lr.yaml"
    space.write_text("params:\n  optim.lr: {grid: [3.0e-3, 1.0e-7]}\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(ROOT / "configs/quickstart.yaml", [
        f"data.path={digits_latents}", "model.preset=DuMo-Micro/2", "optim.batch_size=32", "distributed.num_workers=1",
        "train.total_images=768", "train.log_every_images=128", "train.checkpoint_every_images=768",
        "train.num_sample_images=10", "eval.every_images=256", "eval.num_images=100", "eval.chunk=20",
        f"train.storage_path={tmp_path / 'runs'}", "train.name=t", f"tracking.uri={uri}"])
    result = sweep(cfg, str(space), num_samples=1, scheduler="asha", search="grid", max_concurrent=1, name="lr-sweep")

    rows = {r["trial"]: r for r in result["rows"]}
    assert len(rows) == 2
    assert sorted(r["status"] for r in rows.values()) == ["complete", "stopped early"], result["table"]
    best = load_config(result["best_config"])
    assert best.optim.lr == 3e-3 and best.train.name == "lr-sweep-best"
    assert (Path(result["dir"]) / "results.csv").is_file()

    client = MlflowClient(uri)
    parent = client.get_run(result["parent_run_id"])
    assert parent.data.params["sweep.scheduler"] == "asha" and "best_fd_1step" in parent.data.metrics
    assert parent.data.tags["best.optim.lr"] == "0.003"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2
    for child in children:
        assert child.data.params["optim.lr"] in ("0.003", "1e-07") and "fd_1step" in child.data.metrics

    # Rerunning resumes: the finished trials are kept, none runs again.
    again = sweep(cfg, str(space), num_samples=1, scheduler="asha", search="grid", max_concurrent=1, name="lr-sweep")
    assert {r["trial"]: r["images"] for r in again["rows"]} == {t: r["images"] for t, r in rows.items()}
    assert again["parent_run_id"] == result["parent_run_id"]

    # The best config is a config `dumo-ray train` runs as it is (here on the single-process launcher, the
    # same training loop as the trials' without a third Ray Train start).
    assert main(["train", "--config", result["best_config"], "--set", "distributed.launcher=local", "--set", "train.total_images=64",
                 "--set", "train.log_every_images=64", "--set", "eval.every_images=0",
                 "--set", f"train.storage_path={tmp_path / 'best'}"]) == 0
