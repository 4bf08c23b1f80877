"""The dataset lease (issue 15): the conditional writes it is built on, on a local folder and on a real
S3-protocol server (moto) on loopback; two concurrent ingests into one dataset through the lease; stale leases,
renewal, release."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import test_store

from infra.lease import LEASE, DatasetLease, LeaseHeld, LeaseLost, dataset_lease
from infra.loopback_server import ImageServer
from infra.settings import DownloadConfig, IngestConfig, InputSpec
from infra.store import ArtifactStore, LocalStore, S3Store, StoreError
from tasks.ingest import ingest_shard, plan_ingest

pytestmark = pytest.mark.timeout(120)

s3_settings = test_store.s3_settings  # the session's moto server on loopback


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return S3Store(test_store._bucket(), "p", request.getfixturevalue("s3_settings"))


def _record(store: ArtifactStore, dataset: str) -> dict:
    return json.loads(store.get_bytes(f"{dataset}/{LEASE}"))


# --- the conditional writes -----------------------------------------------------------------------------------


def test_put_bytes_if_absent_creates_once(store: ArtifactStore) -> None:
    assert store.put_bytes_if_absent("ds/k", b"first")
    assert not store.put_bytes_if_absent("ds/k", b"second")
    assert store.get_bytes("ds/k") == b"first"
    assert store.list("ds") == ["ds/k"]  # no temporary or lock file shows


def test_replace_and_delete_only_if_unchanged(store: ArtifactStore) -> None:
    assert not store.replace_bytes_if("ds/k", b"new", b"old")  # missing
    assert not store.delete_if("ds/k", b"old")
    store.put_bytes("ds/k", b"old")
    assert not store.replace_bytes_if("ds/k", b"new", b"other")
    assert store.get_bytes("ds/k") == b"old"
    assert store.replace_bytes_if("ds/k", b"new", b"old")
    assert store.get_bytes("ds/k") == b"new"
    assert not store.delete_if("ds/k", b"old")
    assert store.exists("ds/k")
    assert store.delete_if("ds/k", b"new")
    assert not store.exists("ds/k")
    assert store.list("ds") == []


def test_racing_creates_one_winner_local(tmp_path: Path) -> None:
    # Only the local store: moto checks If-None-Match and then writes, without a lock between (S3 and MinIO
    # decide atomically), so racing requests against moto can both win.
    store = LocalStore(tmp_path / "store")
    barrier = threading.Barrier(8)

    def create(i: int) -> bool:
        barrier.wait()
        return store.put_bytes_if_absent("ds/k", str(i).encode())

    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(create, range(8)))
    assert won.count(True) == 1
    assert store.get_bytes("ds/k") == str(won.index(True)).encode()


# --- two concurrent ingests into one dataset --------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    photos = sorted((Path(__file__).resolve().parents[2] / "shared" / "data" / "photos" / "images").glob("*.jpg"))
    with ImageServer(photos[:10]) as srv:
        yield srv


def _url_list(path: Path, urls: list[str]) -> InputSpec:
    pq.write_table(pa.table({"url": urls, "caption": [f"caption {u}" for u in urls]}), path)
    return InputSpec(path=str(path))


def _ingest(store: ArtifactStore, dataset: str, inputs: list[InputSpec], cfg: IngestConfig, run_id: str) -> int:
    """One ingest run as the CLI does it, inside the lease; returns its new samples."""
    with dataset_lease(store, dataset, run_id=run_id):
        plan = plan_ingest(store, dataset, inputs, cfg)
        for shard in plan.todo:
            ingest_shard(store.uri, dataset, shard, cfg)
        return plan.new_samples


def test_concurrent_ingests_one_waits_and_every_sample_lands_once(server, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    cfg = IngestConfig(shard_size=20, download=DownloadConfig(allow_cidrs=("127.0.0.0/8",), retries=0))
    lists = {"A": [server.url(f"/img/{i}/a.jpg") for i in range(60)],
             "B": [server.url(f"/img/{i}/b.jpg") for i in range(60)]}
    inputs = {name: [_url_list(tmp_path / f"{name}.parquet", urls)] for name, urls in lists.items()}
    barrier = threading.Barrier(2)

    def run(name: str) -> int | LeaseHeld:
        barrier.wait()
        try:
            return _ingest(store, "ds", inputs[name], cfg, run_id=f"run-{name}")
        except LeaseHeld as e:
            return e

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip("AB", pool.map(run, "AB"), strict=True))
    (winner,) = [n for n, r in results.items() if r == 60]
    loser = "B" if winner == "A" else "A"
    held = results[loser]
    assert isinstance(held, LeaseHeld) and isinstance(held, StoreError)
    assert f"run run-{winner}" in str(held) and "since" in str(held) and "expires at" in str(held)
    assert f"deleting {store.uri}/ds/{LEASE}" in str(held)
    assert not store.exists(f"ds/{LEASE}")  # released

    assert _ingest(store, "ds", inputs[loser], cfg, run_id=f"run-{loser}-again") == 60
    rows = [pq.read_table(p).to_pylist() for p in sorted((store.root / "ds" / "ingest").glob("shard-*.parquet"))]
    urls = Counter(r["url"] for shard in rows for r in shard)
    assert urls == Counter(lists["A"] + lists["B"])  # every sample of A and B exactly once
    assert all(r["status"] == "ok" for shard in rows for r in shard)

    server.reset_hits()  # the same list again: nothing new, nothing downloaded
    assert _ingest(store, "ds", inputs["A"], cfg, run_id="run-A-again") == 0
    assert not server.hits


# --- stale leases, renewal, release ----------------------------------------------------------------------------


def _stale(store: ArtifactStore, dataset: str) -> None:
    store.put_json(f"{dataset}/{LEASE}", {"run_id": "dead-run", "owner": {"host": "h", "pid": 1, "user": "u"},
                                          "acquired": "2026-01-01T00:00:00.000+00:00",
                                          "renewed": "2026-01-01T00:00:00.000+00:00",
                                          "expires": "2026-01-01T00:02:00.000+00:00"})


def test_stale_lease_is_taken_over(store: ArtifactStore) -> None:
    _stale(store, "ds")
    with dataset_lease(store, "ds", run_id="new-run") as lease:
        record = _record(store, "ds")
        assert record["run_id"] == "new-run" and record["owner"] == lease.owner
    assert not store.exists(f"ds/{LEASE}")


def test_the_lease_of_a_killed_run_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    """A run killed with SIGKILL cannot release its lease: on the same host a dead holder process frees it before
    it expires, so `kill -9` then resume works at once; a live holder is still refused."""
    import socket

    store = LocalStore(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer exists
    for pid, refused in ((os.getpid(), True), (dead.pid, False)):
        record = {"run_id": "killed", "owner": {"host": socket.gethostname(), "pid": pid, "user": "x"},
                  "acquired": "2026-01-01T00:00:00+00:00", "renewed": "2026-01-01T00:00:00+00:00",
                  "expires": "2999-01-01T00:00:00+00:00"}
        store.put_bytes(f"d/{LEASE}", json.dumps(record).encode())
        if refused:
            with pytest.raises(LeaseHeld, match="run killed"):
                DatasetLease(store, "d", "next").acquire()
        else:
            DatasetLease(store, "d", "next").acquire()
            assert json.loads(store.get_bytes(f"d/{LEASE}"))["run_id"] == "next"


def test_two_runs_taking_over_one_stale_lease_one_wins(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    _stale(store, "ds")
    stale = store.get_bytes(f"ds/{LEASE}")
    leases = [DatasetLease(store, "ds", f"run-{i}") for i in range(6)]
    original = store.get_bytes
    barrier = threading.Barrier(len(leases))
    first_reads: set[int] = set()

    def read_then_race(key: str) -> bytes:
        data = original(key)
        if threading.get_ident() not in first_reads:
            first_reads.add(threading.get_ident())
            barrier.wait()  # every taker has seen the stale lease before any takes it over
        return data

    store.get_bytes = read_then_race

    def take(lease: DatasetLease) -> str:
        try:
            lease.acquire()
            return "won"
        except LeaseHeld:
            return "held"

    with ThreadPoolExecutor(len(leases)) as pool:
        outcome = list(pool.map(take, leases))
    store.get_bytes = original
    assert outcome.count("won") == 1
    assert _record(store, "ds")["run_id"] == leases[outcome.index("won")].run_id != json.loads(stale)["run_id"]


def test_renewal_keeps_a_long_run_alive_past_its_ttl(store: ArtifactStore) -> None:
    started = time.time()
    with dataset_lease(store, "ds", run_id="long", ttl=1.0, renew_every=0.2):
        time.sleep(2.5)
        record = _record(store, "ds")
        assert record["run_id"] == "long"
        with pytest.raises(LeaseHeld, match="run long"):
            DatasetLease(store, "ds", "other").acquire()
    assert time.time() - started > 2.5
    assert not store.exists(f"ds/{LEASE}")


def test_without_renewal_the_lease_expires_and_is_taken_over(store: ArtifactStore) -> None:
    DatasetLease(store, "ds", "killed", ttl=0.5).acquire()  # a run that died: nobody renews or releases
    with pytest.raises(LeaseHeld, match="run killed"):
        DatasetLease(store, "ds", "early").acquire()
    time.sleep(0.7)
    with dataset_lease(store, "ds", run_id="later"):
        assert _record(store, "ds")["run_id"] == "later"


def test_release_removes_the_lease_even_when_the_run_fails(store: ArtifactStore) -> None:
    with pytest.raises(ZeroDivisionError), dataset_lease(store, "ds", run_id="failing"):
        assert store.exists(f"ds/{LEASE}")
        1 / 0  # noqa: B018
    assert not store.exists(f"ds/{LEASE}")
    with dataset_lease(store, "ds", run_id="next"):  # at once, no waiting for an expiry
        pass


def test_a_broken_lease_is_reported_at_the_end(store: ArtifactStore) -> None:
    with pytest.raises(LeaseLost, match="run victim lost its lease"), \
            dataset_lease(store, "ds", run_id="victim", ttl=1.0, renew_every=0.1):
        store.delete(f"ds/{LEASE}")  # someone broke it by hand
        store.put_bytes_if_absent(f"ds/{LEASE}", b'{"run_id": "intruder"}')
        time.sleep(0.4)
    assert json.loads(store.get_bytes(f"ds/{LEASE}")) == {"run_id": "intruder"}  # not removed: not ours


# --- the CLI ----------------------------------------------------------------------------------------------------

CAPFACTORY = [sys.executable, "-m", "flows.cli"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_cli_second_ingest_into_a_busy_dataset_fails_naming_the_first(tmp_path: Path) -> None:
    """NEEDS the lease call in `flows.stage.run_stage` (`with dataset_lease(open_store(store), spec.name): ...`
    around the stage run): it fails until that line is in."""
    repo = Path(__file__).resolve().parents[1]
    photos = sorted((repo.parent / "shared" / "data" / "photos" / "images").glob("*.jpg"))[:10]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    env.pop("PREFECT_API_URL", None)
    with ImageServer(photos, delay=0.05) as slow:  # slow enough that the first run is still busy
        lists = {name: _url_list(tmp_path / f"{name}.parquet", [slow.url(f"/img/{i}/{name}.jpg") for i in range(60)])
                 for name in "AB"}

        def cli(name: str) -> list[str]:
            return [*CAPFACTORY, "ingest", lists[name].path, "--dataset", "ds", "--store", str(tmp_path / "store"),
                    "--shard-size", "20", "--workers", "1", "--concurrency", "2", "--allow-cidr", "127.0.0.0/8"]

        first = subprocess.Popen(cli("A"), cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        lease = tmp_path / "store" / "ds" / LEASE
        deadline = time.monotonic() + 120
        while not lease.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        holder = json.loads(lease.read_text())["run_id"]
        second = subprocess.run(cli("B"), cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        out, err = first.communicate(timeout=240)
        assert first.returncode == 0, err[-3000:]
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"is being written by run {holder}" in second.stderr and "expires at" in second.stderr

        again = subprocess.run(cli("B"), cwd=repo, env=env, capture_output=True, text=True, timeout=240)
        assert again.returncode == 0, again.stderr[-3000:]
    assert "new samples: 60" in out and "new samples: 60" in again.stdout
    store = LocalStore(tmp_path / "store")
    urls = Counter(r["url"] for k in store.list("ds/ingest") if k.endswith(".parquet") and "/_inputs/" not in k
                   for r in store.get_parquet(k, columns=["url"]).to_pylist())
    assert len(urls) == 120 and set(urls.values()) == {1}
    assert not lease.exists()
