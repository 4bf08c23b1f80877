"""A Dask cluster of separate processes, as docker-compose runs it: `dask scheduler`, one `dask worker` advertising
`--resources GPU=1` and one without. Flows attach to it by address (`dask_address`), and the extract flow of the
gpu profile sends its model tasks only to the GPU worker.

No GPU here: the gpu profile's own models are absent, so the spec keeps the gpu profile (which is what annotates
the model tasks with resources={"GPU": 1}) and overrides the OCR backend with the CPU one (rapidocr). The placement
is read from the scheduler's task stream: which worker ran which task key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dask.utils import key_split

from infra.deploy import stop_process_group
from infra.settings import DatasetSpec, DownloadConfig, ExtractConfig, IngestConfig, InputSpec, OCRConfig

START_TIMEOUT = 120.0


def _wait_for(predicate, what: str, procs: list[subprocess.Popen], timeout: float = START_TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args[:3]} exited with code {p.returncode} while waiting for {what}")
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"no {what} within {timeout:.0f} s")


def _spawn(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:  # a group of its own: stopping it stops the nanny's worker process too
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def prefect_api():
    """One Prefect API for this process and the Dask worker processes (they report their task runs to it)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from infra.prefect_server import start_temporary_server, stop_server, wait_until_healthy

    server, api_url = start_temporary_server()
    try:
        wait_until_healthy(server, api_url)
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            yield api_url
    finally:
        stop_server(server)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, prefect_api):
    """(scheduler address, GPU worker address, CPU worker address)."""
    from distributed import Client

    tmp = tmp_path_factory.mktemp("dask")
    scheduler_file = tmp / "scheduler.json"
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "OMP_NUM_THREADS": "1"}
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    procs = [_spawn([*dask, "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0", "--scheduler-file",
                     str(scheduler_file)], env, tmp / "scheduler.log")]
    try:
        _wait_for(lambda: scheduler_file.exists() and scheduler_file.stat().st_size, "scheduler file", procs)
        address = json.loads(scheduler_file.read_text())["address"]
        worker = [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--nworkers",
                  "1", "--no-dashboard", "--memory-limit", "4GiB"]
        for name, extra in (("gpu", ["--resources", "GPU=1"]), ("cpu", [])):
            procs.append(_spawn([*worker, "--name", name, *extra], env, tmp / f"worker-{name}.log"))
        with Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=START_TIMEOUT)
            by_name = {w["name"]: a for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
            assert client.scheduler_info(n_workers=-1)["workers"][by_name["gpu"]]["resources"] == {"GPU": 1}
            yield address, by_name["gpu"], by_name["cpu"]
    finally:
        for p in reversed(procs):
            stop_process_group(p)


def test_gpu_profile_model_tasks_run_only_on_the_gpu_worker(cluster, image_server, tmp_path):
    from distributed import Client

    from flows.stage import run_stage

    address, gpu_worker, cpu_worker = cluster
    urls = image_server.image_urls(12)
    pq.write_table(pa.table({"url": urls, "caption": ["a photo"] * len(urls)}), tmp_path / "urls.parquet")
    store = str(tmp_path / "store")
    ingest_cfg = IngestConfig(shard_size=2, download=DownloadConfig(allow_cidrs=("127.0.0.0/8",), retries=0))
    experts = ExtractConfig(profile="gpu", experts=("ocr",), ocr=OCRConfig(backend="rapidocr"))

    with Client(address) as client:
        client.get_task_stream()  # installs the scheduler's task-stream plugin; records start now
        inputs = [InputSpec(path=str(tmp_path / "urls.parquet"))]
        run_stage("ingest", DatasetSpec(name="placed", store=store, inputs=inputs, ingest=ingest_cfg),
                  dask_address=address)
        result = run_stage("extract", DatasetSpec(name="placed", store=store, extract=experts), dask_address=address)
        stream = client.get_task_stream()

    assert len(result["shards_run"]) == 6 and result["counts"] == {"ok": 12}
    ran_on: dict[str, set[str]] = {}
    for record in stream:
        ran_on.setdefault(key_split(record["key"]), set()).add(record["worker"])
    assert ran_on["extract_shard_task"] == {gpu_worker}  # all 6 model tasks ...
    assert cpu_worker not in ran_on["extract_shard_task"]  # ... none on the CPU worker
    assert "ingest_shard_task" in ran_on  # unannotated tasks ran too, placed by the scheduler where it liked
    assert Path(store, "placed", "extract", "shard-00005.stats.json").is_file()
