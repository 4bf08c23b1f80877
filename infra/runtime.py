"""The run-time for a flow run: one Prefect API and one Dask cluster, started side by side.

Left to itself, Prefect's ephemeral mode starts a temporary API server in the CLI process *and* another one
inside every Dask worker process (seconds each, and the run's records split). Here the CLI process starts one
temporary server (the same uvicorn command Prefect's ephemeral mode runs), exports PREFECT_API_URL before the
workers are spawned, and lets the server boot while the LocalCluster starts and its workers import the task
code, so the fixed start-up cost is paid once and in parallel.

The server is the slowest part: a CLI command starts it first thing (infra/prefect_server.py `start_early`) and
the runtime takes it over. Nothing it starts outlives the CLI: SIGTERM unwinds the runtime (`stop_on_sigterm`);
after a SIGKILL the kernel stops the server (parent-death signal) and Dask's workers exit when their nanny's pipe
closes.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from prefect_dask import DaskTaskRunner

from infra import cluster as clusters
from infra import prefect_server
from infra.cluster import ClusterStart, local_workers
from infra.prefect_server import save_template, start_temporary_server, stop_server, wait_until_healthy

log = logging.getLogger("capfactory")

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
        server, early = None, prefect_server.take_early()
        early_cluster = clusters.take_early(n_workers, gpu, warm) if not dask_address else None
        worker_env: dict[str, str] = {}  # e.g. the head start's spool (tasks/prefetch.py)
        if PREFECT_API_URL.value() and early:  # an API configured in a Prefect profile: not needed after all
            stop_server(early[0])
            if early_cluster is not None:  # its workers were told the early server's address
                worker_env = early_cluster.env
                early_cluster.close()
                early_cluster = None
        elif not PREFECT_API_URL.value():
            server, api_url = early or start_temporary_server()
            stack.callback(stop_server, server)
            # Dask worker processes started from here inherit the environment and report to this server.
            os.environ["PREFECT_API_URL"] = api_url
            stack.callback(os.environ.pop, "PREFECT_API_URL", None)
        starting = None if dask_address else early_cluster or ClusterStart(n_workers, gpu, warm, env=worker_env)
        if server is not None:
            wait_until_healthy(server, api_url)
            save_template(server)
            stack.callback(APILogWorker.drain_all, timeout=5)  # runs before stop_server: ship the last logs
            stack.enter_context(temporary_settings(updates={PREFECT_API_URL: api_url}))
        if starting is not None:
            cluster = starting.result()
            stack.callback(_close_cluster, cluster)
            dask_address = cluster.scheduler_address
            log.info("Dask dashboard: %s", cluster.dashboard_link)
        yield DaskTaskRunner(address=dask_address)
