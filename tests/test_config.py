import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dumo_ray.cli import main
from dumo_ray.config import (Config, ConfigError, ObjectiveConfig, config_from_dict, load_config, parse_override,
                             save_config)

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_paper_recipe():
    cfg = Config()
    assert cfg.model.preset == "DuMo-XL/2" and cfg.model.time_scale == 1.0
    assert (cfg.optim.lr, cfg.optim.beta1, cfg.optim.beta2, cfg.optim.batch_size, cfg.optim.ema_decay) == (1e-4, 0.9, 0.95, 256, 0.9999)
    assert cfg.objective.name == "dumo" and cfg.objective.resolved_equal_fraction == 0.0
    # The DuMo study's winner (README): tangent v_target, u-loss weighted with p = 0.5; MeanFlow keeps p = 1.
    assert cfg.objective.tangent == "v_target" and cfg.objective.resolved_adaptive_p_u == 0.5
    assert ObjectiveConfig(name="meanflow").resolved_adaptive_p_u == 1.0
    # The v-loss: dumo p = 0.5 (the study's round 3); the baselines keep their papers' p = 1.
    assert cfg.objective.resolved_adaptive_p_v == 0.5
    assert [ObjectiveConfig(name=n).resolved_adaptive_p_v for n in ("meanflow", "flow_matching")] == [1.0, 1.0]
    assert ObjectiveConfig(name="dumo", adaptive_p_v=1.0).resolved_adaptive_p_v == 1.0
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
    ("objective.u_fraction=0", "objective.u_fraction must be in (0, 1], got 0"),
    ("model.preset=DuMo-XXL/2", "model.preset must be one of"),
    ("objective.name=shortcut", "objective.name must be one of dumo, meanflow, flow_matching"),
    ("jvp.estimator=fd", "jvp.estimator must be one of auto, jvp, dual, finite_difference; got 'fd'"),
    ("jvp.fd_step=0", "jvp.fd_step must be > 0, got 0"),
    # Keys that moved out get their new place named, not just "unknown".
    ("objective.estimator=dual", "objective.estimator moved to jvp.estimator"),
    ("objective.fd_step=0.01", "objective.fd_step moved to jvp.fd_step"),
    ("objective.compile_jvp=never", "objective.compile_jvp moved to jvp.compile_jvp"),
    ("train.fail_once_at_images=416", "train.fail_once_at_images is no longer a config key: the fault drill is a "
                                      "test hook, the environment variable DUMO_RAY_FAIL_ONCE_AT_IMAGES=N"),
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
    ("data.source=digits", "data.source is gone: both launchers read a latent folder"),
    ("lr", "override 'lr' must look like section.key=value"),
    ("tracking.enabled=1", "tracking.enabled must be true or false, got 1"),
    ("optim.lr=true", "optim.lr must be a number, got True"),
    ("train.name=7", "train.name must be a string, got 7"),
    ("train.name=a/b", "train.name must be a plain name (one folder inside train.storage_path: no '/' or '\\', "
                       "not '.' or '..'), got 'a/b'"),
    ("train.sample_steps=[1, x]", "train.sample_steps[1] must be an integer, got 'x'"),
    ("train.sample_steps=2", "train.sample_steps must be a list, got 2"),
    ("eval.steps=[]", "eval.steps must not be empty, got []"),
    ("objective=5", "objective must be a mapping, got 5"),
    ("objectives.name=dumo", "unknown config key objectives (known: data, distributed, eval, jvp, model, objective"),
    ("distributed.zero_stage=4", "distributed.zero_stage must be 1, 2 or 3, got 4"),
    ("model.head_depth=3", "model.head_depth must be in [0, 2] for DuMo-Tiny/2, got 3"),
])
def test_bad_values_fail_with_one_clear_error_naming_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/digits_local.yaml", [override])
    assert message in str(err.value)


def test_an_old_yaml_names_the_new_key(tmp_path):
    """A user's YAML from before the jvp section fails on the first moved key, saying where it went."""
    old = tmp_path / "old.yaml"
    old.write_text((ROOT / "configs/digits_local.yaml").read_text().replace(
        "objective:\n", "objective:\n  estimator: finite_difference\n  fd_step: 0.01\n"))
    with pytest.raises(ConfigError, match=r"^objective.estimator moved to jvp.estimator$"):
        load_config(old)


def test_jvp_estimator_auto_is_settled_when_the_config_loads(tmp_path):
    """ZeRO-3's partitioned parameters have no forward-mode derivative: `auto` (the default) resolves to
    finite differences there, and the saved config says so; an explicit jvp or dual is an error naming the fix."""
    quickstart = ROOT / "configs/quickstart.yaml"
    assert load_config(quickstart).jvp.estimator == "finite_difference"  # the CPU configs ask for it
    assert Config().jvp.estimator == "jvp" and load_config(quickstart, ["jvp.estimator=auto"]).jvp.estimator == "jvp"
    zero3 = load_config(quickstart, ["jvp.estimator=auto", "distributed.zero_stage=3"])
    assert zero3.jvp.estimator == "finite_difference"
    save_config(zero3, tmp_path / "config.yaml")
    assert "estimator: finite_difference" in (tmp_path / "config.yaml").read_text()
    assert load_config(tmp_path / "config.yaml") == zero3
    # Flow matching differentiates nothing: auto stays the exact JVP (unused), and jvp is allowed.
    assert load_config(quickstart, ["jvp.estimator=auto", "distributed.zero_stage=3", "objective.name=flow_matching"]).jvp.estimator == "jvp"
    load_config(quickstart, ["jvp.estimator=auto", "distributed.zero_stage=3", "objective.name=flow_matching", "jvp.estimator=jvp"])
    for estimator in ("jvp", "dual"):
        with pytest.raises(ConfigError) as err:
            load_config(quickstart, ["jvp.estimator=auto", "distributed.zero_stage=3", f"jvp.estimator={estimator}"])
        assert str(err.value) == (f"jvp.estimator '{estimator}' does not run under distributed.zero_stage 3 "
                                  "(partitioned parameters have no forward-mode derivative): set "
                                  "jvp.estimator=finite_difference (or auto), or distributed.zero_stage=2")
    explicit = load_config(quickstart, ["jvp.estimator=dual", "jvp.fd_step=1e-3", "jvp.compile_jvp=never"])
    assert (explicit.jvp.estimator, explicit.jvp.fd_step, explicit.jvp.compile_jvp) == ("dual", 1e-3, "never")


def test_a_saved_config_from_before_the_jvp_section_still_loads():
    """Exports and checkpoints written before the split keep loading (`saved=True`); the estimator the old
    worker switched to at run time under ZeRO-3 is what `auto` gives now."""
    values = load_config(ROOT / "configs/quickstart.yaml").to_dict()
    del values["jvp"]
    values["objective"].update(estimator="jvp", fd_step=0.01, compile_jvp="never")
    values["train"]["fail_once_at_images"] = 416
    values["distributed"]["zero_stage"] = 3
    with pytest.raises(ConfigError, match="moved to jvp"):
        config_from_dict(values)
    cfg = config_from_dict(values, saved=True)
    assert (cfg.jvp.estimator, cfg.jvp.fd_step, cfg.jvp.compile_jvp) == ("finite_difference", 0.01, "never")
    values["distributed"]["zero_stage"] = 2
    assert config_from_dict(values, saved=True).jvp.estimator == "jvp"


def test_every_field_has_a_one_line_doc():
    cfg = Config()
    for section in dataclasses.fields(Config):
        for name, info in type(getattr(cfg, section.name)).__pydantic_fields__.items():
            assert info.description and "\n" not in info.description, f"{section.name}.{name} has no one-line doc"


def test_config_command_prints_the_resolved_config_with_docs_and_defaults(capsys):
    """`dumo-ray config`: YAML that loads back, each field with its doc and default, `*` on changed values."""
    assert main(["config", "--config", str(ROOT / "configs/quickstart.yaml"), "--set", "optim.lr=3e-4",
                 "--set", "distributed.zero_stage=3"]) == 0
    out = capsys.readouterr().out
    lines = {line.split(":")[0].strip(): line for line in out.splitlines() if line.startswith("  ")}
    assert lines["lr"].startswith("  lr: 0.0003 ") and "# * Adam learning rate (constant) (default 0.0001)" in lines["lr"]
    assert "#   Adam beta1 (default 0.9)" in lines["beta1"]  # unchanged: no mark
    assert lines["preset"].startswith("  preset: DuMo-Tiny/2 ") and "(default DuMo-XL/2)" in lines["preset"]
    # The quickstart sets finite_difference (a CPU config): marked; the header names the sources.
    assert lines["estimator"].startswith("  estimator: finite_difference ") and "# * " in lines["estimator"]
    assert lines["estimator"].endswith("(default auto)")
    assert out.splitlines()[0] == f"# dumo-ray config: {ROOT / 'configs/quickstart.yaml'} --set optim.lr=3e-4 --set distributed.zero_stage=3"
    assert "jvp:  # How du/dt" in out
    # The output is the config itself: it loads back to the same values.
    loaded = config_from_dict(yaml.safe_load(out))
    assert loaded == load_config(ROOT / "configs/quickstart.yaml", ["optim.lr=3e-4", "distributed.zero_stage=3"])

    # Without --config: the defaults, nothing marked; an estimator set by hand is marked.
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "# dumo-ray config: the defaults"
    assert not [line for line in out.splitlines() if line.startswith("  ") and "# * " in line]
    assert config_from_dict(yaml.safe_load(out), check=False) == Config()
    # auto, left alone, shows what it resolved to, unmarked.
    assert main(["config", "--set", "distributed.zero_stage=3"]) == 0
    estimator = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("  estimator:"))
    assert estimator.startswith("  estimator: finite_difference ") and "#   " in estimator
    assert main(["config", "--set", "jvp.estimator=jvp"]) == 0
    estimator = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("  estimator:"))
    assert estimator.startswith("  estimator: jvp ") and "# * " in estimator
    assert main(["config", "--set", "optim.lr=-1"]) == 2
    assert capsys.readouterr().err.strip() == "dumo-ray config: error: optim.lr must be > 0, got -1"


def test_config_does_not_import_torch():
    """The config sits below the models: checking a preset name must not import torch or timm."""
    code = "import sys, dumo_ray.config; print(sorted(m for m in ('torch', 'timm') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.stdout.strip() == "[]"


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


def test_u_fraction_is_dumo_only():
    with pytest.raises(ValueError, match="objective.u_fraction applies to dumo only"):
        load_config(ROOT / "configs/digits_local.yaml", ["objective.name=meanflow", "objective.u_fraction=0.5"])


@pytest.mark.parametrize("name", ["..", ".", "../elsewhere", "/tmp/elsewhere", "runs\\..\\..", "", " "])
def test_run_name_cannot_leave_storage_path(name, tmp_path, capsys):
    """The run lives in storage_path/name: a name that is a parent, a path or absolute would put it (and the
    checkpoints a rerun resumes from) elsewhere. Refused when the config loads, before any cluster resource."""
    with pytest.raises(ConfigError, match=r"^train.name must be a plain name \(one folder inside train.storage_path"):
        load_config(ROOT / "configs/digits_local.yaml", [f"train.name={name}"])
    assert main(["train", "--config", str(ROOT / "configs/digits_local.yaml"), "--set", f"train.name={name}",
                 "--set", f"train.storage_path={tmp_path}"]) == 2
    assert "dumo-ray train: error: train.name must be a plain name" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    # Dots inside a name are fine.
    assert load_config(ROOT / "configs/digits_local.yaml", ["train.name=run..v2.1"]).train.name == "run..v2.1"


BAD_FILES = {
    # file bytes, the position PyYAML's mark gives (1-based), what is wrong
    "unclosed.yaml": (b"model:\n  preset: [DuMo-Tiny/2\n", "line 3, column 1",
                      "expected ',' or ']', but got '<stream end>' (while parsing a flow sequence at line 2, column 11)"),
    "indent.yaml": (b"optim:\n  lr: 1e-3\n batch_size: 8\n", "line 3, column 2", "expected <block end>, but found"),
    "colon.yaml": (b"model:\n  preset: DuMo: Tiny\n", "line 2, column 15", "mapping values are not allowed here"),
    "nul.yaml": (b"model:\n\x00\n", "line 2, column 1", "unacceptable character #x0000"),
    "binary.yaml": (b"model:\n  pr\xb5\xff\x00\x01", "line 2, column 5", None),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_a_malformed_or_binary_config_file_is_one_line_naming_file_and_position(name, tmp_path, capsys):
    """Not PyYAML's traceback nor a bare UTF-8 decode error: one ConfigError naming the file and the line
    and column, and `dumo-ray train` exits 2 with that one line on stderr."""
    data, where, what = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(data)
    kind = "is not UTF-8 text (byte 0xb5 at" if what is None else "is not valid YAML:"
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"config file {path} {kind}") and where in message and "\n" not in message
    assert what is None or what in message
    assert main(["train", "--config", str(path)]) == 2
    out = capsys.readouterr()
    assert out.err == f"dumo-ray train: error: {message}\n" and out.out == ""
    # A bad --set value is the same kind of one line.
    with pytest.raises(ConfigError, match=r"^override 'optim.lr=\[1,': the value is not valid YAML: line 1, column 4"):
        load_config(ROOT / "configs/digits_local.yaml", ["optim.lr=[1,"])
