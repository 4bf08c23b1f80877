"""The Dask cluster factory: a LocalCluster sized to the machine, with worker processes tuned for this work."""

from __future__ import annotations

import atexit
import importlib
import os
import threading

import dask
from distributed import Client, LocalCluster

from infra.models import WORKER_THREADS_ENV

# Set before each worker process starts (Dask's "pre-spawn" environment): later is too late for malloc and
# for native thread pools.
WORKER_PRE_SPAWN_ENV = {
    # One thread per native pool: N single-threaded workers on N cores do not oversubscribe.
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    # Dask's default MALLOC_TRIM_THRESHOLD_=65536 also pins glibc's mmap threshold at 128 KiB, so every decoded
    # image buffer (~1 MB) is mmapped and unmapped: measured here +1.4 ms CPU per image (3.8 -> 5.2 ms).
    "MALLOC_TRIM_THRESHOLD_": str(32 << 20),
    "MALLOC_MMAP_THRESHOLD_": str(16 << 20),
    # Idle OpenMP threads (llama.cpp's) sleep instead of spin-waiting: a spinning pool on cores that other workers
    # use starves them and itself (measured: llama.cpp 10-15x slower with another busy process on the cores).
    "OMP_WAIT_POLICY": "PASSIVE",
}


def local_workers(n_workers: int | None = None) -> int:
    """How many worker processes a LocalCluster gets: `n_workers`, or one per core."""
    return n_workers or max(1, os.cpu_count() or 1)


def start_local_cluster(n_workers: int | None = None, resources: dict[str, float] | None = None,
                        env: dict[str, str] | None = None) -> LocalCluster:
    """One single-threaded worker process per core (or `n_workers`), each advertising `resources`, with `env`
    set in the worker processes (there, not in this process: Dask's pre-spawn variables land in ours too)."""
    n = local_workers(n_workers)
    # The cores each worker may use for its own thread pools (llama.cpp's n_threads): cores / workers.
    pre_spawn = {**WORKER_PRE_SPAWN_ENV, WORKER_THREADS_ENV: str(max(1, (os.cpu_count() or 1) // n))}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": pre_spawn,
                          "distributed.worker.profile.enabled": False}):
        return LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                            resources=resources, env=env or {})


def _warm_worker(modules: tuple[str, ...]) -> None:
    # Import what a worker's first task needs, before the first task arrives.
    for module in ("prefect.task_engine", *modules):
        importlib.import_module(module)


class ClusterStart:
    """A LocalCluster started in a background thread, its workers importing `warm` meanwhile; `result()` waits for
    it. `api_url`: the Prefect API the workers report to (default: the PREFECT_API_URL they inherit); `env`: more
    variables for the workers."""

    def __init__(self, n_workers: int | None, gpu: bool, warm: tuple[str, ...], api_url: str | None = None,
                 env: dict[str, str] | None = None):
        self.key = (local_workers(n_workers), gpu, tuple(warm))
        self._out: dict = {}
        self.env = dict(env or {})  # what a replacement cluster passes on (infra/runtime.py)
        env = {**self.env, **({"PREFECT_API_URL": api_url} if api_url else {})}
        self._thread = threading.Thread(target=self._start, args=(env,), daemon=True)
        self._thread.start()

    def _start(self, env: dict[str, str]) -> None:
        try:
            cluster = start_local_cluster(self.key[0], resources={"GPU": 1} if self.key[1] else None, env=env)
            with Client(cluster) as client:
                client.run(_warm_worker, self.key[2])
            self._out["cluster"] = cluster
        except BaseException as e:  # re-raised in the caller's thread
            self._out["error"] = e

    def result(self) -> LocalCluster:
        self._thread.join()
        if "error" in self._out:
            raise self._out["error"]
        return self._out["cluster"]

    def close(self) -> None:
        self._thread.join()
        if "cluster" in self._out:
            self._out["cluster"].close()


_early: list[ClusterStart] = []  # started by start_early, not yet taken over


def start_early(n_workers: int | None, gpu: bool, warm: tuple[str, ...], api_url: str | None,
                env: dict[str, str] | None = None) -> None:
    """Start the run's LocalCluster now, before the command imports Prefect: the workers' imports overlap the
    command's own. `infra.runtime.flow_runtime` takes it over; one never taken over is closed at exit."""
    if not _early:
        _early.append(ClusterStart(n_workers, gpu, warm, api_url, env))
        atexit.register(_close_untaken)


def take_early(n_workers: int | None, gpu: bool, warm: tuple[str, ...]) -> ClusterStart | None:
    """The cluster start_early began, if it was started for these settings (else it is closed); None if none."""
    if not _early:
        return None
    early = _early.pop()
    if early.key == (local_workers(n_workers), gpu, tuple(warm)):
        return early
    early.close()
    return None


def _close_untaken() -> None:
    while _early:
        _early.pop().close()
