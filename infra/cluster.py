"""The Dask cluster factory: LocalCluster settings sized to the machine."""

from __future__ import annotations

import os

# Each worker process runs one task at a time; native libraries inside it get one thread, so N workers on
# N cores do not oversubscribe.
WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def local_cluster_kwargs(n_workers: int | None = None) -> dict:
    n = n_workers or max(1, os.cpu_count() or 1)
    return {
        "n_workers": n,
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": ":0",
        "env": WORKER_ENV,
    }
