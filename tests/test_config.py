from pathlib import Path

import pytest

from dumo_ray.config import Config, ConfigError, ObjectiveConfig, load_config, parse_override, save_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_paper_recipe():
    cfg = Config()
    assert cfg.model.preset == "DuMo-XL/2" and cfg.model.time_scale == 1.0
    assert (cfg.optim.lr, cfg.optim.beta1, cfg.optim.beta2, cfg.optim.batch_size, cfg.optim.ema_decay) == (1e-4, 0.9, 0.95, 256, 0.9999)
    assert cfg.objective.name == "dumo" and cfg.objective.resolved_equal_fraction == 0.0
    # The DuMo study's winner (README): tangent v_target, u-loss weighted with p = 0.5; MeanFlow keeps p = 1.
    assert cfg.objective.tangent == "v_target" and cfg.objective.resolved_adaptive_p_u == 0.5
    assert ObjectiveConfig(name="meanflow").resolved_adaptive_p_u == 1.0
    assert (cfg.objective.time_mean, cfg.objective.time_std) == (-0.4, 1.0)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    load_config(path)


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(ROOT / "configs/digits_local.yaml",
                      ["optim.lr=3e-4", "objective.equal_fraction=0.25", "train.sample_steps=[1, 4]", "objective.name=meanflow"])
    assert cfg.optim.lr == 3e-4 and cfg.objective.equal_fraction == 0.25
    assert cfg.train.sample_steps == [1, 4] and cfg.objective.resolved_equal_fraction == 0.25
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert parse_override("a.b.c=1") == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize("override,message", [
    ("optim.lr=-1", "optim.lr must be > 0, got -1"),
    ("objective.equal_fraction=1.5", "objective.equal_fraction must be in [0, 1], got 1.5"),
    ("objective.zero_fraction=-0.1", "objective.zero_fraction must be in [0, 1]"),
    ("model.preset=DuMo-XXL/2", "model.preset must be one of"),
    ("objective.name=shortcut", "objective.name must be one of dumo, meanflow, flow_matching"),
    ("objective.estimator=fd", "objective.estimator must be one of jvp, dual, finite_difference"),
    ("optim.lr=fast", "optim.lr must be a number, got 'fast'"),
    ("optim.batch_size=12.5", "optim.batch_size must be an integer"),
    ("optim.momentum=0.9", "unknown config key optim.momentum"),
    ("distributed.num_workers=[4, 2]", "distributed.num_workers must be N or [min, max] with 1 <= min <= max, got [4, 2]"),
    ("distributed.num_workers=two", "distributed.num_workers must be an integer or a list, got 'two'"),
    ("distributed.num_workers=300", "optim.batch_size 128 is smaller than distributed.num_workers 300"),
    ("optim.micro_batch_size=0", "optim.micro_batch_size must be > 0"),
    ("distributed.worker_resources={spot: many}", "distributed.worker_resources.spot must be a number, got 'many'"),
    ("objective.cfg_k=1.0", "objective.cfg_k must be < 1"),
    ("objective.tangent=u_hat", "objective.tangent must be one of v_hat, v_target, blend"),
    ("objective.tangent_query=r0", "objective.tangent_query must be one of own_r, r_equals_t"),
    ("objective.identity_velocity=v_hat", "objective.identity_velocity must be one of v_target, tangent"),
    ("objective.interval_cap_start=0", "objective.interval_cap_start must be in (0, 1], got 0"),
    ("objective.lambda_u_warmup_images=-128", "objective.lambda_u_warmup_images must be >= 0"),
    ("objective.lambda_boundary=-1", "objective.lambda_boundary must be >= 0"),
    ("objective.time_sampler=sorted", "objective.time_sampler must be one of logit_normal, uniform, separate"),
    ("objective.r_std=0", "objective.r_std must be > 0"),
    ("model.input_size=32", "eval.features 'digits' judges 8x8 one-channel images"),
    ("data.source=digits", "unknown config key data.source"),  # gone: both launchers read latent folders
    ("lr", "override 'lr' must look like section.key=value"),
])
def test_bad_values_fail_with_one_clear_error_naming_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/digits_local.yaml", [override])
    assert message in str(err.value)


def test_fractions_must_not_exceed_one():
    with pytest.raises(ConfigError, match=r"equal_fraction \+ objective.zero_fraction must be <= 1"):
        load_config(ROOT / "configs/digits_local.yaml", ["objective.equal_fraction=0.7", "objective.zero_fraction=0.5"])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.yaml")


def test_relative_paths_are_resolved_for_ray_workers(tmp_path, monkeypatch):
    from dumo_ray.train.launch import absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "configs/quickstart.yaml")
    resolved = absolute_paths(cfg)
    assert resolved.train.storage_path == str(tmp_path / "runs")
    assert resolved.tracking.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolved.data.path == str(tmp_path / "data/digits-latents")
    s3 = absolute_paths(load_config(ROOT / "configs/quickstart.yaml", ["train.storage_path=s3://bucket/runs",
                                                                        "tracking.uri=http://mlflow:5000"]))
    assert s3.train.storage_path == "s3://bucket/runs" and s3.tracking.uri == "http://mlflow:5000"
