"""`dumo-ray submit` / `dumo-ray jobs` against a real Ray head with its job server (the run's shared local
Ray, tests/conftest.py: on its own port and temp dir, shut down by the tests; never `ray stop`). The cluster
has token authentication on (Ray's default), so the submission authenticates for real."""
import contextlib
import io
import sys
from pathlib import Path

import pytest

from dumo_ray.cli import main
from dumo_ray.jobs import ALWAYS_EXCLUDED, runtime_env

ROOT = Path(__file__).resolve().parents[1]


def test_runtime_env_uploads_the_code_not_the_data():
    env = runtime_env(ROOT)
    assert env["working_dir"] == str(ROOT)
    assert {"/data/", "/runs/", "*.db", "*.safetensors"} <= set(env["excludes"])
    assert "data" not in env["excludes"] and "data/" not in env["excludes"]  # would drop the dumo_ray/data package
    assert all(not p.startswith("!") for p in env["excludes"]) and "*.pt" in ALWAYS_EXCLUDED


# The submitted run: one Ray Train worker (DeepSpeed ZeRO-2), batch 32, 20 steps. The single-process
# launcher trains the same settings in the test after next, against the job's weights.
RUN = ["model.preset=DuMo-Micro/2", "optim.batch_size=32", "optim.lr=3e-3", "distributed.num_workers=1",
       "train.total_images=640", "train.log_every_images=128", "train.checkpoint_every_images=320",
       "train.num_sample_images=20", "eval.features=none"]


@pytest.fixture(scope="module")
def submitted(local_ray, digits_latents, tmp_path_factory):
    """Submits `dumo-ray train` to the run's local Ray as a job and waits for it: (submit's exit code, the run
    settings, the job's tmp folder, what `submit` printed). One Ray Train start (~45 s on 2 cores) for two tests."""
    tmp_path = tmp_path_factory.mktemp("job")
    settings = [f"data.path={digits_latents}", *RUN, f"train.storage_path={tmp_path / 'runs'}", "train.name=submitted",
                f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    train = ["train", "--config", "configs/quickstart.yaml", *[a for s in settings for a in ("--set", s)]]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # a module fixture has no capsys
        # This local cluster runs the interpreter of this test (a venv that is not on PATH).
        code = main(["submit", "--address", local_ray, "--python", sys.executable, "--submission-id", "dumo-test-train",
                     "--", *train])
    return code, settings, tmp_path, printed.getvalue()


@pytest.mark.ray
@pytest.mark.slow
def test_submit_a_training_run_and_read_its_logs(local_ray, submitted, capsys):
    address, (code, _, tmp_path, printed) = local_ray, submitted
    assert code == 0
    assert "job dumo-test-train: SUCCEEDED" in printed and "[dumo-ray] done at image 640" in printed
    assert (tmp_path / "runs" / "submitted" / "export" / "model.safetensors").is_file()
    # The job's MLflow run names the commit it was submitted from (the upload has no .git; from a checkout
    # without git there is no commit and no tag).
    from mlflow.tracking import MlflowClient

    from dumo_ray.tracking import git_commit

    store = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = store.search_runs([e.experiment_id for e in store.search_experiments()])
    assert [r.data.tags.get("mlflow.source.git.commit") for r in runs] == [git_commit()]

    assert main(["jobs", "logs", "dumo-test-train", "--address", address]) == 0
    assert "[dumo-ray] done at image 640" in capsys.readouterr().out
    assert main(["jobs", "list", "--address", address]) == 0
    listed = capsys.readouterr().out
    assert "dumo-test-train" in listed and "SUCCEEDED" in listed

    # A job that fails (bad config) makes `submit` exit non-zero with the job's own error in the logs.
    submit = ["submit", "--address", address, "--python", sys.executable]
    assert main([*submit, "--", "train", "--config", "configs/missing.yaml"]) == 1
    printed = capsys.readouterr().out
    assert "config file configs/missing.yaml does not exist" in printed and ": FAILED" in printed


@pytest.mark.ray
@pytest.mark.slow
def test_the_single_process_and_the_ray_launcher_train_the_same_weights(submitted, tmp_path):
    """One training loop: DeepSpeed ZeRO-2 in the job's Ray Train worker and the plain-PyTorch backend in
    this process, the same Parquet digits, seed and batch plan (one worker, batch 32, 20 steps)."""
    from safetensors.torch import load_file
    import torch

    from dumo_ray.config import load_config
    from dumo_ray.flow.jvp import relative_error
    from dumo_ray.train.launch import train_local

    def flat(run_dir):
        weights = load_file(Path(run_dir) / "export" / "model.safetensors")
        return torch.cat([weights[k].flatten() for k in sorted(weights)])

    code, settings, job_tmp, _ = submitted
    assert code == 0

    def local(name, *extra):
        cfg = load_config(ROOT / "configs/quickstart.yaml", [*settings, "distributed.launcher=local", "tracking.enabled=false",
                                                             f"train.storage_path={tmp_path}", f"train.name={name}", *extra])
        assert train_local(cfg)["images"] == 640
        return cfg.run_dir

    alone, other_seed = local("alone"), local("seed-1", "train.seed=1")
    on_ray = job_tmp / "runs" / "submitted"
    # Not bit for bit: DeepSpeed reduces the gradients in its flat fp32 buffers and computes the clipping
    # norm there, torch per parameter, so single gradients differ in their last bits, and Adam turns the
    # near-zero ones of the zero-initialised layers into lr-sized steps of either sign. Measured: 4.0e-6
    # relative (norm of the difference over the norm of the weights) after 20 steps; another seed: 1.2.
    same = relative_error(flat(on_ray), flat(alone))
    different = relative_error(flat(other_seed), flat(alone))
    print(f"relative difference: launchers {same:.3g}, seeds {different:.3g}")
    assert same < 1e-4 and different > 0.1


def test_submit_errors_are_clear(capsys):
    assert main(["submit", "--address", "http://127.0.0.1:9", "--", "train", "--config", "x.yaml"]) == 2
    assert "cannot reach the Ray job server at http://127.0.0.1:9" in capsys.readouterr().err
    assert main(["submit", "--address", "http://127.0.0.1:9"]) == 2
    assert "nothing to submit" in capsys.readouterr().err


def fake_checkout(folder: Path) -> Path:
    """A checkout as a user's may look: code, plus secrets and a file its .rayignore names."""
    files = {
        "pyproject.toml": '[project]\nname = "dumo-ray"\ndependencies = []\n',
        "dumo_ray/__init__.py": "", "dumo_ray/tokenizer.py": "# code whose name holds 'token'\n",
        "dumo_ray/data/latents.py": "", "configs/quickstart.yaml": "model: {}\n", "README.md": "# x\n",
        ".env": "HF_TOKEN=x\n", ".env.local": "X=1\n", ".netrc": "machine h login u password p\n",
        "key.pem": "-----BEGIN PRIVATE KEY-----\n", "deploy/id_ed25519": "k", "secrets/x": "s",
        "gcp-sa.json": "{}", ".aws/credentials": "[default]\n", "auth_token": "t", "cluster/aws.local.yaml": "a: 1\n",
        ".rayignore": "# mine\nnotes/scratch.txt\n!key.pem\n", "notes/scratch.txt": "private notes",
        "notes/keep.md": "kept",
    }
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


CODE = {"pyproject.toml", "dumo_ray/__init__.py", "dumo_ray/tokenizer.py", "dumo_ray/data/latents.py",
        "configs/quickstart.yaml", "README.md", ".rayignore", "notes/keep.md"}
WITHHELD = {".env", ".env.local", ".netrc", "key.pem", "deploy/id_ed25519", "secrets/x", "gcp-sa.json",
            ".aws/credentials", "auth_token", "cluster/aws.local.yaml", "notes/scratch.txt"}


def test_submit_dry_run_lists_the_code_and_withholds_secrets(tmp_path, monkeypatch, capsys):
    import dumo_ray.jobs

    root = fake_checkout(tmp_path)
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_RUNTIME_ENV_IGNORE_GITIGNORE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(dumo_ray.jobs, "client", lambda *a, **k: pytest.fail("a dry run must not connect"))
    monkeypatch.chdir(root)  # the checkout to ship is the one we are in
    train = ["train", "--config", "configs/quickstart.yaml"]
    assert main(["submit", "--dry-run", "--address", "http://127.0.0.1:9", "--", *train]) == 0
    printed = capsys.readouterr().out.splitlines()
    listed = {line for line in printed if not line.startswith("[dumo-ray]")}
    assert listed == CODE  # every code file, no secret, not the .rayignore'd file (its `!key.pem` is ignored)
    total = sum((root / name).stat().st_size for name in CODE)
    assert f"{len(CODE)} files, {total:,} bytes" in printed[-2] and "nothing was sent" in printed[-1]
    assert "python -m dumo_ray.cli train --config configs/quickstart.yaml" in printed[-1]

    # The same list is what the job's runtime_env excludes leave, matched as Ray matches them.
    from ray._private.thirdparty.pathspec import PathSpec

    excludes = PathSpec.from_lines("gitwildmatch", runtime_env(root)["excludes"])
    assert not any(excludes.match_file(name) for name in CODE)
    assert all(excludes.match_file(name) for name in WITHHELD)


@pytest.mark.parametrize("variable", ["RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"])
def test_submit_refuses_an_address_the_environment_overrides(variable, tmp_path, monkeypatch, capsys):
    import ray.job_submission

    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    connections = []
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient",
                        lambda *a, **k: connections.append(a) or pytest.fail("connected despite the conflict"))
    monkeypatch.setenv(variable, "http://10.1.2.3:8265")
    monkeypatch.chdir(fake_checkout(tmp_path))
    assert main(["submit", "--address", "http://127.0.0.1:9", "--", "train", "--config", "x.yaml"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "http://127.0.0.1:9" in error and "http://10.1.2.3:8265" in error
    assert f"unset {variable}" in error and "--address http://10.1.2.3:8265" in error
    assert connections == []
    assert main(["jobs", "list", "--address", "http://127.0.0.1:9"]) == 2  # the same rule for `jobs`
    assert "unset" in capsys.readouterr().err and connections == []

    # The same address in both is no conflict; the environment's alone is used, and said so.
    assert main(["submit", "--dry-run", "--address", "http://10.1.2.3:8265/", "--", "train"]) == 0
    assert "on http://10.1.2.3:8265/" in capsys.readouterr().out
    assert main(["submit", "--dry-run", "--", "train"]) == 0
    captured = capsys.readouterr()
    assert "on http://10.1.2.3:8265;" in captured.out and f"using ${variable}=http://10.1.2.3:8265" in captured.err
