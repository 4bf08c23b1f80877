"""The run-time for a flow run: one Prefect API and one Dask cluster, started side by side.

Left to itself, Prefect's ephemeral mode starts a temporary API server in the CLI process *and* another one
inside every Dask worker process (seconds each, and the run's records split). Here the CLI process picks the
port, exports PREFECT_API_URL before the workers are spawned, and boots the server while the LocalCluster
starts and its workers import the task code, so the fixed start-up cost is paid once and in parallel.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from prefect_dask import DaskTaskRunner

from infra.cluster import local_cluster_kwargs


def _warm_worker() -> None:
    # Import what a worker's first task needs, before the first task arrives.
    import prefect.task_engine  # noqa: F401

    import tasks.ingest  # noqa: F401


def _start_cluster(n_workers: int | None, out: dict) -> None:
    try:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(**local_cluster_kwargs(n_workers))
        with Client(cluster) as client:
            client.run(_warm_worker)
        out["cluster"] = cluster
    except BaseException as e:  # re-raised in the caller's thread
        out["error"] = e


@contextmanager
def flow_runtime(dask_address: str | None = None, n_workers: int | None = None) -> Iterator[DaskTaskRunner]:
    """Yields a DaskTaskRunner on `dask_address` or on a new LocalCluster, with a Prefect API available to this
    process and the workers (the configured PREFECT_API_URL, or a temporary local server)."""
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with ExitStack() as stack:
        server = None
        if not PREFECT_API_URL.value():
            server = SubprocessASGIServer()
            server.port = server.find_available_port()
            os.environ["PREFECT_API_URL"] = server.api_url
            stack.callback(os.environ.pop, "PREFECT_API_URL", None)
        started: dict = {}
        thread = None
        if not dask_address:
            thread = threading.Thread(target=_start_cluster, args=(n_workers, started), daemon=True)
            thread.start()
        if server is not None:
            server.start()
            stack.callback(server.stop)
            stack.callback(APILogWorker.drain_all, timeout=5)  # runs before stop: ship the last logs
            stack.enter_context(temporary_settings(updates={PREFECT_API_URL: server.api_url}))
        if thread is not None:
            thread.join()
            if "error" in started:
                raise started["error"]
            cluster = started["cluster"]
            stack.callback(cluster.close)
            dask_address = cluster.scheduler_address
        yield DaskTaskRunner(address=dask_address)
