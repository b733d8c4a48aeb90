"""`dumo-ray submit` and `dumo-ray jobs`: any dumo-ray command as a Ray job, through the cluster's job
server (`ray.job_submission.JobSubmissionClient`).

The project travels as the job's `working_dir` (Ray puts it on the PYTHONPATH of the job's driver and of
every worker it starts, so the cluster runs exactly this checkout's code, `pipelines/` and `tune/` included:
see dumo_ray/__init__.py), minus what `.gitignore` and `.rayignore` list and never data, runs, checkpoints,
MLflow stores or secrets (SECRETS_EXCLUDED). `--dry-run` lists what would be uploaded, found by Ray's own
walk and matching, and connects to nothing. `--pip` also installs the package's dependencies into the job's
own virtualenv (for clusters whose image lacks them). The entrypoint is `python -m dumo_ray.cli <command>
<args>` (`--python` names another interpreter on the cluster). The job server is `--address`; one that
$RAY_API_SERVER_ADDRESS / $RAY_ADDRESS contradicts is an error (see resolve_address).

Token authentication (a local `ray.init()` turns it on by itself; `ray start` clusters when
RAY_AUTH_MODE=token, as the configs in cluster/ set it): the token is read from `$RAY_AUTH_TOKEN`,
`$RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token` and sent as a bearer header; it is never printed.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any, Sequence

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded, whatever .gitignore says: data, outputs, stores, environments.
# Anchored at the root where a bare name would also hit packages (dumo_ray/data is code, /data is data).
ALWAYS_EXCLUDED = [".git/", "/.venv/", "/venv/", "/data/", "/runs/", "/mlruns/", "/mlartifacts/", "/outputs/", "*.db",
                   "*.npz", "*.parquet", "*.safetensors", "*.pt", "*.pth", "__pycache__/", "*.egg-info/", ".pytest_cache/"]
# Never uploaded either: secrets a checkout may hold. The package lands in the cluster's object store and on
# every node's disk, readable by anyone who can run a job there. Unanchored patterns match at any depth.
SECRETS_EXCLUDED = [
    ".env", ".env.*", ".envrc",                                      # dotenv / direnv files
    ".netrc", "_netrc", ".pypirc", ".git-credentials", ".npmrc",     # logins for hosts and registries
    "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore",       # private keys and certificate stores
    "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", ".ssh/",       # SSH keys
    ".aws/", ".gcp/", ".azure/", ".kube/", ".docker/", "credentials",  # cloud / cluster logins
    "*credentials*.json", "*-sa.json", "*service?account*.json",     # GCP service-account and OAuth keys
    "*token", "*.token", "*token.txt", "*token.json",                # auth_token, .hf_token, github-token.json
    "secrets/", ".secrets/", "*.secret",
    # Launcher configs: a filled-in copy names real accounts and networks, and the job never reads them.
    "/cluster/",
]
# Ray reads the job server address from these, the first one set, and lets it override the one it is given.
ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def is_checkout(folder: Path) -> bool:
    pyproject = folder / "pyproject.toml"
    return pyproject.is_file() and tomllib.loads(pyproject.read_text()).get("project", {}).get("name") == "dumo-ray"


def project_root(start: Path | None = None) -> Path:
    """The checkout to upload: the nearest folder above `start` (default: here) with dumo-ray's
    pyproject.toml, else the checkout of an editable install. An install from a wheel has no checkout to
    ship (its folder is site-packages): a clear error then."""
    import dumo_ray

    start = start or Path.cwd()
    installed_from = Path(dumo_ray.__file__).resolve().parents[1]
    for folder in [start, *start.parents, installed_from]:
        if is_checkout(folder):
            return folder
    raise ValueError(f"no dumo-ray checkout to ship as the job's working_dir: run `dumo-ray submit` inside one (a "
                     f"folder with dumo-ray's pyproject.toml); {start} is not in one and dumo_ray is installed "
                     f"at {installed_from}, not from a checkout")


def gitignore_patterns(root: Path, name: str = ".gitignore") -> list[str]:
    """The patterns of the ignore file `name` at the checkout root. Negations (`!keep`) are dropped: in the
    one excludes list they could bring back a file that another pattern (a secret, data) keeps out."""
    path = root / name
    if not path.is_file():
        return []
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith(("#", "!"))]


def package_dependencies(root: Path) -> list[str]:
    return list(tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"])


def runtime_env(root: Path, *, pip: bool = False, env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    # Ray itself also honours every folder's .gitignore and .rayignore; the root ones are copied into the
    # excludes so they hold even with RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 and show in the job's runtime_env.
    patterns = ALWAYS_EXCLUDED + SECRETS_EXCLUDED + gitignore_patterns(root) + gitignore_patterns(root, ".rayignore")
    env: dict[str, Any] = {"working_dir": str(root), "excludes": list(dict.fromkeys(patterns))}
    if pip:
        env["pip"] = package_dependencies(root)
    if env_vars:
        env["env_vars"] = dict(env_vars)
    return env


def auth_headers() -> dict[str, str]:
    """A bearer header from the first token found (env, token path, ~/.ray/auth_token); {} without one."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token = path.read_text().strip() if path.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def package_files(root: Path, excludes: Sequence[str]) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file Ray would put in the working_dir package of `root`: Ray's own walk
    and gitwildmatch matching (ray._private.runtime_env.packaging, as `upload_working_dir_if_needed` uses
    them), its default excludes before ours, each folder's .gitignore/.rayignore, so a dry run is truthful."""
    import logging

    import ray
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = root.absolute()
    include_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    patterns = ray_constants.get_runtime_env_default_excludes() + list(excludes)
    files: list[tuple[str, int]] = []

    def collect(path: Path) -> None:
        if path.is_file():
            files.append((path.relative_to(root).as_posix(), path.stat().st_size))

    try:
        _dir_travel(root, [_get_excludes(root, patterns)], collect, include_gitignore=include_gitignore,
                    logger=logging.getLogger(__name__))
    except TypeError as err:  # a private function: say so rather than list the wrong files
        raise ValueError(f"--dry-run reuses Ray's packaging walk, whose signature differs in Ray {ray.__version__} "
                         f"({err}); this project pins ray==2.60.0 (constraints/ci.txt)") from err
    return sorted(files)


def resolve_address(address: str | None) -> str:
    """The job server to use. JobSubmissionClient replaces the address it is given by $RAY_API_SERVER_ADDRESS
    (else $RAY_ADDRESS) whenever one is set, so the job and the bearer token would silently go to the cluster
    the environment names: an --address that the environment contradicts is an error, raised before anything
    connects. Without --address the environment's address is used (and said so); with neither, DEFAULT_ADDRESS."""
    name, value = next(((name, os.environ[name]) for name in ADDRESS_VARIABLES if os.environ.get(name)), (None, None))
    if name is None:
        return address or DEFAULT_ADDRESS
    if address is None:
        print(f"[dumo-ray] no --address given: using ${name}={value}", file=sys.stderr, flush=True)
        return value
    if address.strip().rstrip("/") != value.strip().rstrip("/"):
        raise ValueError(f"--address is {address} but ${name} is {value}, and Ray would use ${name} instead: "
                         f"`unset {name}`, or pass --address {value} if that is the cluster you mean")
    return address


def client(address: str | None = None):
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    try:
        return JobSubmissionClient(url, headers=auth_headers())
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ConnectionError(
            f"cannot reach the Ray job server at {url}: {err}. Is the cluster up, and is its dashboard port "
            "forwarded (`ray dashboard cluster/aws.yaml`, or `kubectl port-forward svc/<cluster>-head-svc 8265:8265`)? "
            "With token authentication set RAY_AUTH_TOKEN or keep the token in ~/.ray/auth_token.") from err


def entrypoint(command: Sequence[str], python: str = "python") -> str:
    return shlex.join([python, "-m", "dumo_ray.cli", *command])


async def _follow(job_client, job_id: str) -> None:
    async for lines in job_client.tail_job_logs(job_id):
        sys.stdout.write(lines)
        sys.stdout.flush()


def wait_for(job_client, job_id: str, follow_logs: bool = True, poll_s: float = 1.0) -> str:
    """Streams the job's logs until it ends; returns its final status name."""
    if follow_logs:
        asyncio.run(_follow(job_client, job_id))
    while (status := str(job_client.get_job_status(job_id).value)) not in TERMINAL:
        time.sleep(poll_s)
    return status


def check_command(command: Sequence[str]) -> None:
    if not command:
        raise ValueError("nothing to submit: give a dumo-ray command after --, e.g. "
                         "dumo-ray submit -- train --config configs/quickstart.yaml")
    if command[0] in ("submit", "jobs"):
        raise ValueError(f"`{command[0]}` runs on your machine, not as a job")


def dry_run(command: Sequence[str], *, address: str | None = None, pip: bool = False,
            env_vars: dict[str, str] | None = None, python: str = "python") -> list[tuple[str, int]]:
    """What `submit` would send, without connecting to anything: prints each file of the working_dir package
    (relative path), their total size, the entrypoint and the job server; returns the (path, bytes) list.
    The command may be left out, to see just the files."""
    if command:
        check_command(command)
    root = project_root()
    url = resolve_address(address)  # an address conflict fails the dry run as it would fail the submission
    files = package_files(root, runtime_env(root, pip=pip, env_vars=env_vars)["excludes"])
    for path, _ in files:
        print(path)
    total = sum(size for _, size in files)
    print(f"[dumo-ray] dry run: {len(files)} files, {total:,} bytes ({total / 2**20:.1f} MiB) from {root} "
          "would be uploaded as the job's working_dir")
    what = f"run `{entrypoint(command, python)}`" if command else "submit"
    print(f"[dumo-ray] dry run: would {what} on {url}; nothing was sent")
    return files


def submit(command: Sequence[str], *, address: str | None = None, wait: bool = True, submission_id: str | None = None,
           pip: bool = False, entrypoint_num_cpus: float | None = None, entrypoint_num_gpus: float | None = None,
           entrypoint_memory: int | None = None, env_vars: dict[str, str] | None = None,
           python: str = "python") -> tuple[str, str | None]:
    """Submits `dumo-ray <command>`; returns (submission id, final status or None with wait=False)."""
    from dumo_ray.tracking import GIT_COMMIT_ENV, git_commit

    check_command(command)
    root = project_root()
    url = resolve_address(address)  # before connecting: an address the environment overrides is an error
    # The package travels without .git: the commit goes along as a variable, for the MLflow runs' tag.
    commit = git_commit()
    env_vars = {**({GIT_COMMIT_ENV: commit} if commit else {}), **(env_vars or {})}
    job_client = client(url)
    submission_id = submission_id or f"dumo-{command[0]}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    job_id = job_client.submit_job(
        entrypoint=entrypoint(command, python), submission_id=submission_id, runtime_env=runtime_env(root, pip=pip, env_vars=env_vars),
        entrypoint_num_cpus=entrypoint_num_cpus, entrypoint_num_gpus=entrypoint_num_gpus,
        entrypoint_memory=entrypoint_memory, metadata={"dumo_ray.command": command[0]})
    print(f"[dumo-ray] submitted {job_id} to {url} (working_dir {root})", flush=True)
    if not wait:
        print(f"[dumo-ray] follow it with: dumo-ray jobs logs {job_id} --follow; stop it with: dumo-ray jobs stop {job_id}")
        return job_id, None
    try:
        status = wait_for(job_client, job_id)
    except KeyboardInterrupt:
        print(f"\n[dumo-ray] stopped following; the job keeps running. dumo-ray jobs stop {job_id} stops it.", flush=True)
        raise
    print(f"[dumo-ray] job {job_id}: {status}", flush=True)
    return job_id, status


def list_jobs(address: str | None = None) -> list[dict[str, Any]]:
    rows = []
    for job in client(address).list_jobs():
        if job.submission_id is None:  # drivers connected directly (ray.init), not submitted jobs
            continue
        rows.append({"submission_id": job.submission_id, "status": str(job.status.value), "entrypoint": job.entrypoint,
                     "start_time": job.start_time, "message": job.message or ""})
    return sorted(rows, key=lambda r: r["start_time"] or 0)


def job_logs(job_id: str, address: str | None = None, follow: bool = False) -> str | None:
    job_client = client(address)
    if follow:
        wait_for(job_client, job_id)
        return None
    return job_client.get_job_logs(job_id)


def stop_job(job_id: str, address: str | None = None) -> bool:
    return client(address).stop_job(job_id)
