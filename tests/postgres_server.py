"""A throwaway PostgreSQL server for tests: the machine's own binaries (PATH, then /usr/lib/postgresql/*/bin),
a fresh cluster from `initdb`, listening on 127.0.0.1 at a free port and on a unix socket in its own private
directory, stopped with `pg_ctl stop -m fast` at the end.

PostgreSQL refuses to run as root: under root the cluster belongs to an unprivileged account (`postgres`,
else `nobody`) and the binaries run as that account (subprocess's user=/group=), in a directory it owns.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

TOOLS = ("initdb", "pg_ctl", "postgres")
UNPRIVILEGED_USERS = ("postgres", "nobody")


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries on this machine (the caller skips)."""


@dataclasses.dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    password: str
    database: str
    bin_dir: Path
    data_dir: Path

    @property
    def url(self) -> str:
        """SQLAlchemy / MLflow URI of the test database."""
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"

    def connect(self, database: str | None = None, autocommit: bool = False):
        """A psycopg (3) connection: the driver SQLAlchemy >= 2.1, hence MLflow, uses for postgresql:// URIs."""
        import psycopg

        return psycopg.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                               dbname=database or self.database, connect_timeout=10, autocommit=autocommit)


def _version_key(path: str) -> tuple:
    return tuple(int(n) for n in re.findall(r"\d+", path)) or (0,)


def find_bin_dir() -> Path:
    """The directory holding initdb, pg_ctl and postgres: PATH first, then the newest /usr/lib/postgresql/*/bin."""
    candidates = []
    found = shutil.which("pg_ctl")
    if found:
        candidates.append(Path(os.path.realpath(found)).parent)
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)]
    for directory in candidates:
        if all(os.access(directory / tool, os.X_OK) for tool in TOOLS):
            return directory
    raise PostgresUnavailable("no PostgreSQL server binaries (initdb, pg_ctl, postgres) on PATH or in "
                              "/usr/lib/postgresql/*/bin; install the Debian `postgresql` package to run this test")


def _run_as() -> pwd.struct_passwd | None:
    """None when not root; else the unprivileged account the server runs as."""
    if os.geteuid() != 0:
        return None
    for name in UNPRIVILEGED_USERS:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise PostgresUnavailable(f"running as root and none of the accounts {UNPRIVILEGED_USERS} exists; "
                              "PostgreSQL refuses to run as root")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def postgres_server(base_dir: str | Path, database: str = "mlflow") -> Iterator[PostgresServer]:
    """Start a PostgreSQL server with a fresh cluster under base_dir (when not root) and an empty `database`;
    yield its address; stop it. Raises PostgresUnavailable when the machine has no server binaries."""
    bin_dir = find_bin_dir()
    account = _run_as()
    if account is None:
        # A short path: the unix socket's full path must fit in 107 bytes.
        work = Path(tempfile.mkdtemp(prefix="pg-", dir=base_dir))
        as_user: dict = {}
    else:
        # pytest's root-owned tmp directories are 0700: the server account could not reach them.
        work = Path(tempfile.mkdtemp(prefix="dumo-pg-"))
        os.chown(work, account.pw_uid, account.pw_gid)
        as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    data_dir, log = work / "data", work / "server.log"
    user, password = "dumo", secrets.token_hex(12)
    pwfile = work / "pwfile"
    pwfile.write_text(password + "\n")
    if account is not None:
        os.chown(pwfile, account.pw_uid, account.pw_gid)
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PGTZ": "UTC"}

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=work, env=env, capture_output=True,
                                text=True, timeout=120, **as_user)
        if check and result.returncode != 0:
            log_text = log.read_text()[-3000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({result.returncode}):\n{result.stdout}\n"
                               f"{result.stderr}\n{log_text}")
        return result

    started = False
    try:
        pwfile.chmod(0o600)
        run("initdb", "-D", str(data_dir), "-U", user, f"--pwfile={pwfile}", "--auth-host=scram-sha-256",
            "--auth-local=scram-sha-256", "-E", "UTF8", "--no-locale", "--no-sync")
        for attempt in range(3):  # the free port may be taken between probing and binding
            port = _free_port()
            options = (f"-p {port} -k {work} -c listen_addresses=127.0.0.1 -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off")
            result = run("pg_ctl", "start", "-w", "-t", "60", "-D", str(data_dir), "-l", str(log), "-o", options,
                         check=attempt == 2)
            if result.returncode == 0:
                break
        started = True
        server = PostgresServer("127.0.0.1", port, user, password, database, bin_dir, data_dir)
        with server.connect("postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{database}"')
        yield server
    finally:
        if started:
            run("pg_ctl", "stop", "-m", "fast", "-w", "-D", str(data_dir), check=False)
        shutil.rmtree(work, ignore_errors=True)
