"""`dumo-ray submit` and `dumo-ray jobs`: any dumo-ray command as a Ray job, through the cluster's job
server (`ray.job_submission.JobSubmissionClient`).

The project travels as the job's `working_dir` (Ray puts it on the PYTHONPATH of the job's driver and of
every worker it starts, so the cluster runs exactly this checkout's code, `pipelines/` and `tune/` included:
see dumo_ray/__init__.py), minus what `.gitignore` lists and never data, runs, checkpoints or MLflow
stores. `--pip` also installs the package's dependencies into the job's own virtualenv (for clusters whose
image lacks them). The entrypoint is `python -m dumo_ray.cli <command> <args>` (`--python` names another
interpreter on the cluster).

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


def gitignore_patterns(root: Path) -> list[str]:
    path = root / ".gitignore"
    if not path.is_file():
        return []
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith(("#", "!"))]


def package_dependencies(root: Path) -> list[str]:
    return list(tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"])


def runtime_env(root: Path, *, pip: bool = False, env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    env: dict[str, Any] = {"working_dir": str(root),
                           "excludes": list(dict.fromkeys(ALWAYS_EXCLUDED + gitignore_patterns(root)))}
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


def resolve_address(address: str | None) -> str:
    return address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS


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


def submit(command: Sequence[str], *, address: str | None = None, wait: bool = True, submission_id: str | None = None,
           pip: bool = False, entrypoint_num_cpus: float | None = None, entrypoint_num_gpus: float | None = None,
           entrypoint_memory: int | None = None, env_vars: dict[str, str] | None = None,
           python: str = "python") -> tuple[str, str | None]:
    """Submits `dumo-ray <command>`; returns (submission id, final status or None with wait=False)."""
    if not command:
        raise ValueError("nothing to submit: give a dumo-ray command after --, e.g. "
                         "dumo-ray submit -- train --config configs/quickstart.yaml")
    if command[0] in ("submit", "jobs"):
        raise ValueError(f"`{command[0]}` runs on your machine, not as a job")
    root = project_root()
    job_client = client(address)
    submission_id = submission_id or f"dumo-{command[0]}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    job_id = job_client.submit_job(
        entrypoint=entrypoint(command, python), submission_id=submission_id, runtime_env=runtime_env(root, pip=pip, env_vars=env_vars),
        entrypoint_num_cpus=entrypoint_num_cpus, entrypoint_num_gpus=entrypoint_num_gpus,
        entrypoint_memory=entrypoint_memory, metadata={"dumo_ray.command": command[0]})
    print(f"[dumo-ray] submitted {job_id} to {resolve_address(address)} (working_dir {root})", flush=True)
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
