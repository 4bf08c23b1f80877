"""The Dask cluster factory: a LocalCluster sized to the machine, with worker processes tuned for this work."""

from __future__ import annotations

import os

import dask
from distributed import LocalCluster

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
}


def start_local_cluster(n_workers: int | None = None, resources: dict[str, float] | None = None) -> LocalCluster:
    """One single-threaded worker process per core (or `n_workers`), each advertising `resources`."""
    n = n_workers or max(1, os.cpu_count() or 1)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": WORKER_PRE_SPAWN_ENV,
                          "distributed.worker.profile.enabled": False}):
        return LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                            resources=resources)
