"""The run-time for a flow run: one Prefect API and one Dask cluster, started side by side.

Left to itself, Prefect's ephemeral mode starts a temporary API server in the CLI process *and* another one
inside every Dask worker process (seconds each, and the run's records split). Here the CLI process starts one
temporary server (the same uvicorn command Prefect's ephemeral mode runs), exports PREFECT_API_URL before the
workers are spawned, and lets the server boot while the LocalCluster starts and its workers import the task
code, so the fixed start-up cost is paid once and in parallel.
"""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
from prefect_dask import DaskTaskRunner

from infra.cluster import start_local_cluster

SERVER_START_TIMEOUT = 120.0


def _warm_worker(modules: tuple[str, ...]) -> None:
    # Import what a worker's first task needs, before the first task arrives.
    for module in ("prefect.task_engine", *modules):
        importlib.import_module(module)


def _start_cluster(n_workers: int | None, gpu: bool, warm: tuple[str, ...], out: dict) -> None:
    try:
        from distributed import Client

        cluster = start_local_cluster(n_workers, resources={"GPU": 1} if gpu else None)
        with Client(cluster) as client:
            client.run(_warm_worker, warm)
        out["cluster"] = cluster
    except BaseException as e:  # re-raised in the caller's thread
        out["error"] = e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_temporary_server() -> tuple[subprocess.Popen, str]:
    """Start a local Prefect API server (SQLite, no UI) on a free loopback port; returns (process, API URL)."""
    import prefect

    port = _free_port()
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent), "--factory",
         "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port), "--log-level",
         "error", "--lifespan", "on"],
        env=env,
    )
    return proc, f"http://127.0.0.1:{port}/api"


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


@contextmanager
def flow_runtime(dask_address: str | None = None, n_workers: int | None = None, *, gpu: bool = False,
                 warm: tuple[str, ...] = ()) -> Iterator[DaskTaskRunner]:
    """Yields a DaskTaskRunner on `dask_address` or on a new LocalCluster, with a Prefect API available to this
    process and the workers (the configured PREFECT_API_URL, or a temporary local server). `gpu`: local workers
    advertise a GPU resource, which model tasks of the gpu profile request. `warm`: modules the local workers
    import while the Prefect server boots."""
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

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
            stack.callback(APILogWorker.drain_all, timeout=5)  # runs before _stop: ship the last logs
            stack.enter_context(temporary_settings(updates={PREFECT_API_URL: api_url}))
        if thread is not None:
            thread.join()
            if "error" in started:
                raise started["error"]
            cluster = started["cluster"]
            stack.callback(cluster.close)
            dask_address = cluster.scheduler_address
        yield DaskTaskRunner(address=dask_address)
