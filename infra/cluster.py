"""The Dask cluster factory: a LocalCluster sized to the machine, with worker processes tuned for this work."""

from __future__ import annotations

import os

import dask
from distributed import LocalCluster

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


def start_local_cluster(n_workers: int | None = None, resources: dict[str, float] | None = None) -> LocalCluster:
    """One single-threaded worker process per core (or `n_workers`), each advertising `resources`."""
    n = local_workers(n_workers)
    # The cores each worker may use for its own thread pools (llama.cpp's n_threads): cores / workers.
    env = {**WORKER_PRE_SPAWN_ENV, WORKER_THREADS_ENV: str(max(1, (os.cpu_count() or 1) // n))}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": env,
                          "distributed.worker.profile.enabled": False}):
        return LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                            resources=resources)
