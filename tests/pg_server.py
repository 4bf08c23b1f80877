"""A throwaway PostgreSQL server on loopback for tests (Debian's `postgresql` package; `make test` installs it):
initdb in a temporary folder, started with pg_ctl on a free port with password auth, one database made, stopped
and removed on exit. As root it runs as the `postgres` user, since postgres refuses to run as root."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from infra.net import free_port

INSTALL_HINT = "install Debian's PostgreSQL server: apt-get install -y postgresql (`make test` does it)"


def server_bin_dir() -> Path:
    """The folder with initdb / pg_ctl: on PATH, or Debian's /usr/lib/postgresql/<version>/bin (newest). Raises
    FileNotFoundError, saying what to install, where the server cannot be run."""
    on_path = shutil.which("pg_ctl")
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    if not on_path and not found:
        raise FileNotFoundError(f"no PostgreSQL server binaries (pg_ctl): {INSTALL_HINT}")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise FileNotFoundError(f"running as root, and there is no `postgres` user to run the server as: "
                                    f"{INSTALL_HINT}") from None
    return Path(on_path).resolve().parent if on_path else Path(found[-1]).parent


def _as_server_user(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    if shutil.which("runuser") is None:
        raise FileNotFoundError("running as root, and `runuser` (util-linux) is missing to run postgres as a user")
    return ["runuser", "-u", "postgres", "--", *argv]


def _run(argv: list[str], env: dict[str, str] | None = None) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")


@contextmanager
def postgres_server(user: str = "prefect", password: str = "change-me", database: str = "prefect") -> Iterator[str]:
    """Start a server; yields the asyncpg URL of `database` in the form docker-compose.yml gives the Prefect server
    (postgresql+asyncpg://user:password@host:port/db)."""
    bin_dir = server_bin_dir()
    # Not under pytest's 0700 base temp: the postgres user must reach the folder.
    home = Path(tempfile.mkdtemp(prefix="capfactory-test-pg-"))
    pwfile, data, log, port = home / "password", home / "data", home / "server.log", free_port()
    pwfile.write_text(password + "\n")
    if os.geteuid() == 0:
        for path in (home, pwfile):
            shutil.chown(path, "postgres")
    pg_ctl = _as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-t", "60"])
    try:
        _run(_as_server_user([str(bin_dir / "initdb"), "-D", str(data), "-U", user, f"--pwfile={pwfile}",
                              "--auth=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8"]))
        # Durability is not under test: fsync off keeps Prefect's migrations fast on a busy disk.
        options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={home} -c fsync=off"
        try:
            _run([*pg_ctl, "-l", str(log), "-o", options, "start"])
        except RuntimeError as e:
            raise RuntimeError(f"{e}\nserver log: {log.read_text()[-2000:] if log.exists() else '-'}") from None
        try:
            _run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", user, database],
                 env={**os.environ, "PGPASSWORD": password})
            yield f"postgresql+asyncpg://{quote(user)}:{quote(password, safe='')}@127.0.0.1:{port}/{database}"
        finally:
            _run([*pg_ctl, "-m", "fast", "stop"])
    finally:
        shutil.rmtree(home, ignore_errors=True)
