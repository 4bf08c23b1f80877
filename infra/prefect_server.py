"""The temporary local Prefect API server of a run that has no configured API.

It is the slowest thing a local run starts (about 4 s of CPU: Prefect's server imports, its database, its
services), so a command starts it first, before it imports Prefect or Dask itself or plans the run
(`start_early`), and `infra.runtime.flow_runtime` takes that server over (`take_early`). This module imports
nothing of Prefect for that reason.

Each server has its own SQLite database in a temporary folder, removed when it stops (not the shared
$PREFECT_HOME/prefect.db, which concurrent runs lock and fill up); it starts as a copy of an already migrated one,
which saves 5-10 s. It never outlives the process that started it: after a SIGKILL the kernel stops it
(parent-death signal), and one that was started early but never taken over is stopped at exit.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import importlib.util
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import closing
from pathlib import Path

from infra.net import free_port

SERVER_START_TIMEOUT = 120.0

# Runs in the server's process before uvicorn (argv: parent pid, database folder, uvicorn's arguments). On Linux
# the kernel sends it SIGTERM when the thread that started it dies, SIGKILL included; if that already happened
# before the signal was armed, it does not start at all. It removes its database folder when it stops: uvicorn
# re-raises the SIGTERM it handled after shutting down, and the handler set here turns that into SystemExit.
_SERVER_CHILD = """
import ctypes, os, runpy, shutil, signal, sys
parent, home = int(sys.argv[1]), sys.argv[2]
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
if sys.platform == "linux":
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
try:
    if os.getppid() == parent:
        sys.argv = ["uvicorn", *sys.argv[3:]]
        runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
finally:
    shutil.rmtree(home, ignore_errors=True)
"""

_early: list[tuple[subprocess.Popen, str]] = []  # a server started by start_early, not yet taken over


def _prefect_version() -> str:
    return importlib.metadata.version("prefect")


def template_db() -> Path:
    """The database each server starts from (per Prefect version: its migrations differ), in $PREFECT_HOME."""
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    return home / f"capfactory-server-{_prefect_version()}.db"


def start_temporary_server() -> tuple[subprocess.Popen, str]:
    """Start a local Prefect API server (SQLite in its own temporary folder, no UI) on a free loopback port that
    stops with the calling thread; returns (process, API URL). `stop_server` stops it."""
    port = free_port()
    home = tempfile.mkdtemp(prefix="capfactory-prefect-server-")
    if template_db().is_file():
        shutil.copyfile(template_db(), f"{home}/prefect.db")
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
           "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db"}
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # its telemetry heartbeat goes to the internet
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)  # the older name of the same setting
    app_dir = Path(importlib.util.find_spec("prefect").origin).parent.parent
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER_CHILD, str(os.getpid()), home, "--app-dir", str(app_dir), "--factory",
         "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "error",
         "--lifespan", "on"],
        env=env,
    )
    proc.home = home  # for stop_server
    return proc, f"http://127.0.0.1:{port}/api"


def save_template(server: subprocess.Popen) -> None:
    """Keep a copy of a healthy (so migrated) server's database as the template, if there is none yet."""
    template = template_db()
    if template.exists():
        return
    tmp = template.with_name(f".{template.name}.{os.getpid()}.tmp")
    template.parent.mkdir(parents=True, exist_ok=True)
    try:
        # SQLite's online backup: a consistent copy while the server writes.
        with closing(sqlite3.connect(f"{server.home}/prefect.db")) as db, closing(sqlite3.connect(tmp)) as copy:
            db.backup(copy)
        os.replace(tmp, template)
    except sqlite3.Error:  # busy: a later run saves it
        tmp.unlink(missing_ok=True)


def wait_until_healthy(proc: subprocess.Popen, api_url: str, timeout: float = SERVER_START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the temporary Prefect server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"the temporary Prefect server did not answer on {api_url} within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    shutil.rmtree(proc.home, ignore_errors=True)  # the server removes it itself, unless it had to be killed


def start_early() -> None:
    """Start the temporary server now, unless PREFECT_API_URL is set in the environment or one was started early
    already; call it from the main thread (the server stops when the starting thread dies). An API URL configured
    elsewhere (a Prefect profile) is found only once Prefect is imported: `flow_runtime` then stops this one."""
    if _early or os.environ.get("PREFECT_API_URL"):
        return
    _early.append(start_temporary_server())
    atexit.register(_stop_untaken)


def early_url() -> str | None:
    """The API URL of the server `start_early` started (not yet taken over), or None."""
    return _early[0][1] if _early else None


def take_early() -> tuple[subprocess.Popen, str] | None:
    """The server `start_early` started, now owned by the caller (who stops it); None if there is none."""
    return _early.pop() if _early else None


def _stop_untaken() -> None:
    while _early:
        stop_server(_early.pop()[0])

