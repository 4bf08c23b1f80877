"""End-to-end ingest: real Prefect flow runs on a real Dask LocalCluster, crawling a real loopback HTTP server,
into the local store and into a real S3-protocol server; resume after a killed run; retries and increments."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infra.loopback_server import ImageServer
from infra.settings import DatasetSpec, DownloadConfig, ImageConfig, IngestConfig, InputSpec
from infra.store import LocalStore, open_store
from tasks.ingest import STAGE, dedup_dataset, ingest_shard, plan_ingest
from tasks.shards import is_analysis_member, is_image_member, member_key, stage_key

REPO = Path(__file__).resolve().parents[1]
PHOTOS = sorted((REPO.parent / "shared" / "data" / "photos" / "images").glob("*.jpg"))
CAPFACTORY = [sys.executable, "-m", "flows.cli"]
ROBOTS = "User-agent: *\nDisallow: /private/\n"
LOOPBACK = ("127.0.0.0/8",)
# Each fault URL and the (status, error class) it must be recorded with.
FAULTS = {
    "/fault/not-found-image.jpg": ("error", "http_404"),
    "/fault/status/500": ("error", "http_500"),
    "/fault/status/429": ("error", "http_429"),
    "/fault/html-as-image.jpg": ("error", "not_image"),
    "/fault/html": ("error", "not_image"),
    "/fault/truncated.jpg": ("error", "decode_error"),
    "/fault/empty.jpg": ("error", "not_image"),
    "/fault/bomb.png": ("error", "decompression_bomb"),
    "/fault/huge.jpg": ("error", "too_large"),
    "/fault/slow-body": ("error", "timeout"),
    "/fault/loop/a": ("error", "redirect_loop"),
    "/fault/to-file": ("error", "blocked"),
    "/fault/noai.jpg": ("opted_out", "x_robots_tag"),
    "/private/0/secret.jpg": ("opted_out", "robots_txt"),
}


def fast_config(**overrides) -> IngestConfig:
    download = DownloadConfig(allow_cidrs=LOOPBACK, connect_timeout=2, read_timeout=2, total_timeout=4, retries=1,
                              backoff=0.01, max_bytes=5_000_000)
    return IngestConfig(**{"shard_size": 25, "download": download, **overrides})


def write_url_list(path: Path, urls: list[str], **extra) -> Path:
    pq.write_table(pa.table({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))], **extra}), path)
    return path


def read_dataset(store, dataset: str) -> tuple[pa.Table, Counter]:
    """All raw shard rows, and how many times each key appears as an image in the tars."""
    keys = store.list(f"{dataset}/{STAGE}")
    tables = [store.get_parquet(k) for k in keys if k.endswith(".parquet") and "/_inputs/" not in k]
    members: Counter = Counter()
    for k in keys:
        if k.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(store.get_bytes(k))) as tar:
                members.update(m.name.rsplit(".", 1)[0] for m in tar if is_image_member(m.name))
    return pa.concat_tables(tables, promote_options="permissive"), members


def analysis_keys(store, dataset: str) -> Counter:
    """How many times each key has an analysis copy (KEY.analysis.jpg) in the tars."""
    found: Counter = Counter()
    for k in store.list(f"{dataset}/{STAGE}"):
        if k.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(store.get_bytes(k))) as tar:
                found.update(member_key(m.name) for m in tar if is_analysis_member(m.name))
    return found


@pytest.fixture(scope="module")
def server():
    with ImageServer(PHOTOS[:20], robots_txt=ROBOTS) as srv:
        yield srv


@pytest.mark.slow
def test_flow_on_local_cluster_records_every_fault_and_lands_every_good_image_once(server, tmp_path):
    from flows.stage import run_stage

    good = server.image_urls(60)
    urls = good + [server.url(p) for p in FAULTS] + [good[0].replace("http://127.0.0.1", "HTTP://127.0.0.1")]
    url_list = write_url_list(tmp_path / "urls.parquet", urls, license=["cc-by"] * len(urls))
    result = run_stage("ingest", DatasetSpec(name="e2e", store=str(tmp_path / "store"),
                                             inputs=[InputSpec(path=str(url_list))], ingest=fast_config()), workers=2)

    store = open_store(str(tmp_path / "store"))
    table, members = read_dataset(store, "e2e")
    rows = {r["url"]: r for r in table.to_pylist()}
    assert table.num_rows == len(urls) - 1  # the re-spelled URL normalises to the first one
    assert result["duplicate_urls"] == 1
    assert all(rows[u]["status"] == "ok" for u in good)
    assert members == Counter({rows[u]["key"]: 1 for u in good})  # every good image exactly once
    for path, (status, error_class) in FAULTS.items():
        row = rows[server.url(path)]
        assert (row["status"], row["error_class"]) == (status, error_class), (path, row["error"])
        assert row["error"]
    assert table.column("license").to_pylist() == ["cc-by"] * table.num_rows  # extra input columns kept
    # 60 URLs over 20 photos: each photo's first URL is canonical, the other 40 are exact duplicates of it.
    assert result["dedup"]["exact_duplicates"] == 40
    canonical = {rows[u]["sha256"]: rows[u]["key"] for u in reversed(good)}
    for u in good:
        dup = rows[u]["duplicate_of"]
        assert dup is None if canonical[rows[u]["sha256"]] == rows[u]["key"] else dup == canonical[rows[u]["sha256"]]
    markers = [k for k in store.list("e2e/ingest") if k.endswith(".stats.json")]
    assert len(markers) == 3  # 74 samples in shards of 25
    stats = store.get_json(markers[0])
    assert stats["config_hash"] == fast_config().config_hash() and stats["samples"] == 25


@pytest.mark.slow
def test_flow_writes_to_s3_protocol_server(server, tmp_path, monkeypatch):
    from moto.server import ThreadedMotoServer

    from flows.stage import run_stage

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    moto.start()
    try:
        host, port = moto.get_host_and_port()
        for name, value in {"CAPFACTORY_S3_ENDPOINT": f"{host}:{port}", "CAPFACTORY_S3_ACCESS_KEY": "test",
                            "CAPFACTORY_S3_SECRET_KEY": "testtest", "CAPFACTORY_S3_SECURE": "false",
                            "CAPFACTORY_S3_REGION": "us-east-1"}.items():
            monkeypatch.setenv(name, value)  # the Dask workers inherit these
        urls = [*server.image_urls(30), server.url("/fault/truncated.jpg")]
        url_list = write_url_list(tmp_path / "urls.csv.parquet", urls)
        result = run_stage("ingest", DatasetSpec(name="s3set", store="s3://capfactory-test/datasets",
                                                 inputs=[InputSpec(path=str(url_list), format="parquet")],
                                                 ingest=fast_config(shard_size=16)), workers=2)
        assert result["counts"] == {"ok": 30, "error": 1}
        store = open_store("s3://capfactory-test/datasets")
        keys = store.list("s3set/ingest")
        assert {"s3set/ingest/shard-00000.tar", "s3set/ingest/shard-00001.parquet",
                "s3set/ingest/_dedup.json"} <= set(keys)
        table, members = read_dataset(store, "s3set")
        assert sum(members.values()) == 30 and table.num_rows == 31
    finally:
        moto.stop()


def _run_cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([*CAPFACTORY, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
                          **kw)


@pytest.mark.slow
def test_cli_resume_after_kill_loses_and_duplicates_nothing(tmp_path):
    with ImageServer(PHOTOS[:10], delay=0.05) as slow:
        urls = slow.image_urls(240)
        url_list = write_url_list(tmp_path / "urls.parquet", urls)
        args = ["ingest", str(url_list), "--dataset", "resume", "--store", str(tmp_path / "store"), "--shard-size",
                "20", "--workers", "1", "--concurrency", "4", "--allow-cidr", "127.0.0.0/8"]
        proc = subprocess.Popen([*CAPFACTORY, *args], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        raw = tmp_path / "store" / "resume" / "ingest"
        deadline = time.monotonic() + 180
        try:
            while len(list(raw.glob("*.stats.json"))) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the CLI, its Prefect server and its Dask workers
            proc.wait()
        done_before = sorted(raw.glob("*.stats.json"))
        assert 3 <= len(done_before) < 12, "the kill should land halfway"
        hits_before = sum(slow.hits.values())

        rerun = _run_cli(args)
        assert rerun.returncode == 0, rerun.stderr[-3000:]

        store = open_store(str(tmp_path / "store"))
        table, members = read_dataset(store, "resume")
        assert table.num_rows == 240 and sorted(table.column("url").to_pylist()) == sorted(urls)
        assert set(table.column("status").to_pylist()) == {"ok"}
        assert members == Counter({k: 1 for k in table.column("key").to_pylist()})
        # Finished shards were not fetched again: 240 image requests at most, plus one robots.txt per run.
        image_hits = sum(n for p, n in slow.hits.items() if p.startswith("/img/"))
        assert hits_before >= 60 and image_hits <= 240 + 20  # a killed shard's in-flight part is refetched
        assert all(slow.hits[p] <= 2 for p in slow.hits if p.startswith("/img/"))
        for marker in done_before:  # untouched by the second run
            assert json.loads(marker.read_text())["finished_at"] < time.time()


def test_cli_reports_bad_options_naming_the_field(tmp_path):
    url_list = write_url_list(tmp_path / "urls.parquet", ["http://127.0.0.1:9/x.jpg"])
    bad = _run_cli(["ingest", str(url_list), "--dataset", "x", "--store", str(tmp_path), "--image-size", "-3"])
    assert bad.returncode == 2 and "ingest.images.image_size" in bad.stderr
    cidr = _run_cli(["ingest", str(url_list), "--dataset", "x", "--store", str(tmp_path), "--allow-cidr", "nope"])
    assert cidr.returncode == 2 and "allow_cidrs" in cidr.stderr and "'nope' is not a CIDR range" in cidr.stderr
    missing = _run_cli(["ingest", str(tmp_path / "missing.parquet"), "--dataset", "x", "--store", str(tmp_path)])
    assert missing.returncode == 2 and "does not exist" in missing.stderr


# The increments below exercise the plain functions the flow calls (same code path, no orchestration).

def _ingest(store, dataset, inputs, cfg, retry_failed=False) -> None:
    plan = plan_ingest(store, dataset, inputs, cfg, retry_failed)
    for shard in plan.todo:
        ingest_shard(store.uri, dataset, shard, cfg)
    for shard in plan.retry:
        ingest_shard(store.uri, dataset, shard, cfg, retry_failed=True)
    dedup_dataset(store, dataset, cfg.phash_threshold)


def test_retry_failed_refetches_only_failed_samples(server, tmp_path):
    store = LocalStore(tmp_path / "store")
    good = server.image_urls(30)
    # Fails 3 times: more than one retry allows, so the first run records it as an error.
    flaky = server.url(f"/fault/flaky/3/{tmp_path.name}")
    url_list = write_url_list(tmp_path / "urls.parquet", [*good, flaky])
    cfg = fast_config()
    _ingest(store, "retry", [InputSpec(path=str(url_list))], cfg)
    first, _ = read_dataset(store, "retry")
    assert Counter(first.column("status").to_pylist()) == {"ok": 30, "error": 1}
    server.reset_hits()

    _ingest(store, "retry", [], cfg, retry_failed=True)
    table, members = read_dataset(store, "retry")
    assert Counter(table.column("status").to_pylist()) == {"ok": 31}
    assert sum(members.values()) == 31 and max(members.values()) == 1
    assert analysis_keys(store, "retry") == members  # the kept samples keep their analysis copies
    assert not any(server.hits[u.removeprefix(server.base_url)] for u in good)  # good samples not refetched
    assert server.hits[flaky.removeprefix(server.base_url)] >= 1


def test_appending_a_list_downloads_only_unseen_urls_and_dedups_against_old_shards(server, tmp_path):
    store = LocalStore(tmp_path / "store")
    cfg = fast_config()
    first = server.image_urls(30)
    _ingest(store, "grow", [InputSpec(path=str(write_url_list(tmp_path / "a.parquet", first)))], cfg)
    server.reset_hits()
    # 10 old URLs, 10 new ones; the new ones serve photos already in the dataset (indices cycle over 20 photos).
    second = first[20:] + [server.url(f"/img/{i}/again.jpg") for i in range(100, 110)]
    _ingest(store, "grow", [InputSpec(path=str(write_url_list(tmp_path / "b.parquet", second)))], cfg)
    assert sum(n for p, n in server.hits.items() if p.startswith("/img/")) == 10
    table, members = read_dataset(store, "grow")
    rows = {r["url"]: r for r in table.to_pylist()}
    assert table.num_rows == 40 and sum(members.values()) == 40
    shards = sorted(k for k in store.list("grow/ingest") if k.endswith(".stats.json"))
    assert shards[-1].endswith("shard-00002.stats.json")
    for i in range(100, 110):  # photo i % 20 first appeared at /img/{i % 20}
        assert rows[server.url(f"/img/{i}/again.jpg")]["duplicate_of"] == rows[first[i % 20]]["key"]


def test_changed_image_config_reingests_and_same_config_skips(server, tmp_path):
    store = LocalStore(tmp_path / "store")
    url_list = write_url_list(tmp_path / "u.parquet", server.image_urls(10))
    cfg = fast_config()
    _ingest(store, "cfg", [InputSpec(path=str(url_list))], cfg)
    assert plan_ingest(store, "cfg", [InputSpec(path=str(url_list))], cfg).todo == []
    smaller = fast_config(images=ImageConfig(image_size=64))
    plan = plan_ingest(store, "cfg", [InputSpec(path=str(url_list))], smaller)
    assert plan.todo == [0] and plan.new_samples == 0
    ingest_shard(store.uri, "cfg", 0, smaller)
    table = store.get_parquet(stage_key("cfg", STAGE, 0, "parquet"))
    assert min(min(w, h) for w, h in zip(table.column("width").to_pylist(), table.column("height").to_pylist(),
                                         strict=True)) == 64


def test_local_folder_input_with_sidecar_captions(tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    for p in PHOTOS[:3]:
        (folder / p.name).symlink_to(p)
    (folder / PHOTOS[0].with_suffix(".txt").name).write_text("a sidecar caption")
    (folder / "broken.jpg").write_bytes(PHOTOS[0].read_bytes()[:500])
    store = LocalStore(tmp_path / "store")
    _ingest(store, "local", [InputSpec(path=str(folder))], fast_config())
    rows = {Path(r["path"]).name: r for r in read_dataset(store, "local")[0].to_pylist()}
    assert rows[PHOTOS[0].name]["alt_text"] == "a sidecar caption" and rows[PHOTOS[0].name]["status"] == "ok"
    assert rows["broken.jpg"]["error_class"] == "decode_error"
    assert {r["source"] for r in rows.values()} == {"file"}
