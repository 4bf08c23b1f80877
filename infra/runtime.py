"""The run-time for a flow run: one Prefect API and one Dask cluster, started side by side.

Left to itself, Prefect's ephemeral mode starts a temporary API server in the CLI process *and* another one
inside every Dask worker process (seconds each, and the run's records split). Here the CLI process starts one
temporary server (the same uvicorn command Prefect's ephemeral mode runs), exports PREFECT_API_URL before the
workers are spawned, and lets the server boot while the LocalCluster starts and its workers import the task
code, so the fixed start-up cost is paid once and in parallel.

Nothing it starts outlives the CLI: SIGTERM unwinds the runtime (`stop_on_sigterm`); after a SIGKILL the kernel
stops the server (parent-death signal) and Dask's workers exit when their nanny's pipe closes. Each temporary server
has its own SQLite database in a temporary folder, removed when it stops (not the shared $PREFECT_HOME/prefect.db,
which concurrent runs lock and fill up); it starts as a copy of an already migrated one, which saves 5-10 s.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from pathlib import Path

import httpx
from prefect_dask import DaskTaskRunner

from infra.cluster import local_workers, start_local_cluster
from infra.net import free_port

log = logging.getLogger("capfactory")

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


def _warm_worker(modules: tuple[str, ...]) -> None:
    # Import what a worker's first task needs, before the first task arrives.
    for module in ("prefect.task_engine", *modules):
        importlib.import_module(module)


async def _drain_worker() -> None:
    # Ship a worker's last Prefect logs and events while the API is still up: the process then exits when asked,
    # instead of flushing them at interpreter exit past the nanny's 4 s grace (and being killed, with a warning).
    # Run in the worker's event loop, where drain_all returns an awaitable.
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        await service.drain_all(timeout=5)


def _close_cluster(cluster) -> None:
    from distributed import Client

    try:
        with Client(cluster) as client:
            client.run(_drain_worker)
    except Exception as e:  # a worker already gone: close the rest anyway
        log.debug("draining the workers failed: %s", e)
    cluster.close()


def _start_cluster(n_workers: int | None, gpu: bool, warm: tuple[str, ...], out: dict) -> None:
    try:
        from distributed import Client

        cluster = start_local_cluster(n_workers, resources={"GPU": 1} if gpu else None)
        with Client(cluster) as client:
            client.run(_warm_worker, warm)
        out["cluster"] = cluster
    except BaseException as e:  # re-raised in the caller's thread
        out["error"] = e


def start_temporary_server() -> tuple[subprocess.Popen, str]:
    """Start a local Prefect API server (SQLite in its own temporary folder, no UI) on a free loopback port that
    stops with this process; returns (process, API URL). `_stop` stops it."""
    import prefect

    port = free_port()
    home = tempfile.mkdtemp(prefix="capfactory-prefect-server-")
    if _template_db().is_file():
        shutil.copyfile(_template_db(), f"{home}/prefect.db")
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
           "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db"}
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)  # the older name of the same setting
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER_CHILD, str(os.getpid()), home, "--app-dir",
         str(Path(prefect.__file__).parent.parent), "--factory", "prefect.server.api.server:create_app", "--host",
         "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
        env=env,
    )
    proc.home = home  # for _stop
    return proc, f"http://127.0.0.1:{port}/api"


def _template_db() -> Path:
    # The database each server starts from (per Prefect version: its migrations differ).
    import prefect
    from prefect.settings import PREFECT_HOME

    return Path(PREFECT_HOME.value()) / f"capfactory-server-{prefect.__version__}.db"


def _save_template(server: subprocess.Popen) -> None:
    """Keep a copy of a healthy (so migrated) server's database as the template, if there is none yet."""
    template = _template_db()
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
    with httpx.Client(timeout=2) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the temporary Prefect server exited with code {proc.returncode}")
            try:
                if client.get(f"{api_url}/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"the temporary Prefect server did not answer on {api_url} within {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    shutil.rmtree(proc.home, ignore_errors=True)  # the server removes it itself, unless it had to be killed


def stop_on_sigterm() -> None:
    """Make SIGTERM raise SystemExit in the main thread (call it there), so `with flow_runtime(...)` unwinds and
    stops the server and the cluster; by default SIGTERM ends the process at once and they are left running. A
    second SIGTERM during that clean-up ends it at once."""

    def exit_cleanly(signum, frame):
        signal.signal(signum, signal.SIG_DFL)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_cleanly)


def _starting_line(dask_address: str | None, n_workers: int | None, api_url: str | None) -> str:
    api = f"using the Prefect API at {api_url}" if api_url else "starting a Prefect API"
    dask = f"attaching to the Dask scheduler at {dask_address}" if dask_address else \
        f"a Dask cluster ({n_workers or local_workers()} workers)"
    return f"{api} and {dask}..."


@contextmanager
def flow_runtime(dask_address: str | None = None, n_workers: int | None = None, *, gpu: bool = False,
                 warm: tuple[str, ...] = ()) -> Iterator[DaskTaskRunner]:
    """Yields a DaskTaskRunner on `dask_address` or on a new LocalCluster, with a Prefect API available to this
    process and the workers (the configured PREFECT_API_URL, or a temporary local server). `gpu`: local workers
    advertise a GPU resource, which model tasks of the gpu profile request. `warm`: modules the local workers
    import while the Prefect server boots."""
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Said when something starts (seconds of start-up follow); attaching to both is instant (and, inside `build`,
    # already said by the CLI's runtime).
    log.log(logging.DEBUG if dask_address and PREFECT_API_URL.value() else logging.INFO, "%s",
            _starting_line(dask_address, n_workers, PREFECT_API_URL.value()))
    with ExitStack() as stack:
        server = None
        if not PREFECT_API_URL.value():
            server, api_url = start_temporary_server()
            stack.callback(_stop, server)
            # Dask worker processes started from here inherit the environment and report to this server.
            os.environ["PREFECT_API_URL"] = api_url
            stack.callback(os.environ.pop, "PREFECT_API_URL", None)
        started: dict = {}
        thread = None
        if not dask_address:
            thread = threading.Thread(target=_start_cluster, args=(n_workers, gpu, warm, started), daemon=True)
            thread.start()
        if server is not None:
            wait_until_healthy(server, api_url)
            _save_template(server)
            stack.callback(APILogWorker.drain_all, timeout=5)  # runs before _stop: ship the last logs
            stack.enter_context(temporary_settings(updates={PREFECT_API_URL: api_url}))
        if thread is not None:
            thread.join()
            if "error" in started:
                raise started["error"]
            cluster = started["cluster"]
            stack.callback(_close_cluster, cluster)
            dask_address = cluster.scheduler_address
            log.info("Dask dashboard: %s", cluster.dashboard_link)
        yield DaskTaskRunner(address=dask_address)
