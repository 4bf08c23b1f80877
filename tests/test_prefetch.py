"""The crawl's head start (tasks/prefetch.py): the spool, the prefetcher against a real loopback server (guards,
stopping), the URLs it picks, and a CLI run that fetches every URL once and leaves no spool behind."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infra.loopback_server import ImageServer
from infra.settings import DownloadConfig, InputSpec
from infra.store import LocalStore, open_store
from tasks.download import FetchResult
from tasks.prefetch import SPOOL_PREFIX, Prefetcher, Spool, head_start_urls, new_spool
from tasks.shards import input_key, stage_key

REPO = Path(__file__).resolve().parents[1]
PHOTOS = sorted((REPO.parent / "shared" / "data" / "photos" / "images").glob("*.jpg"))
ROBOTS = "User-agent: *\nDisallow: /private/\n"
LOOPBACK = ("127.0.0.0/8",)


def fast_download(**kw) -> DownloadConfig:
    return DownloadConfig(**{"allow_cidrs": LOOPBACK, "connect_timeout": 2, "read_timeout": 2, "total_timeout": 4,
                             "retries": 0, **kw})


def run_prefetcher(urls: list[str], cfg: DownloadConfig, spool: Spool, timeout: float = 30) -> Prefetcher:
    prefetcher = Prefetcher(lambda: urls, cfg, spool).start()
    prefetcher._thread.join(timeout)
    assert not prefetcher._thread.is_alive()
    return prefetcher


def test_spool_hands_each_result_over_once_and_survives_bad_entries(tmp_path):
    spool = Spool(tmp_path)
    spool.put("http://a/1.jpg", FetchResult("ok", data=b"\xff\xd8\xffbody", http_status=200, attempts=2))
    got = spool.take("http://a/1.jpg")
    assert (got.status, got.data, got.http_status, got.attempts) == ("ok", b"\xff\xd8\xffbody", 200, 2)
    assert spool.take("http://a/1.jpg") is None  # taken: the next reader fetches it itself
    assert spool.take("http://a/never.jpg") is None
    spool._path("http://a/corrupt.jpg").write_bytes(b"not a pickle")
    spool._path("http://a/other.jpg").write_bytes(pickle.dumps({"status": "ok"}))
    assert spool.take("http://a/corrupt.jpg") is None and spool.take("http://a/other.jpg") is None
    assert not list(tmp_path.iterdir())  # bad entries are removed too


def test_prefetcher_applies_the_downloaders_guards(tmp_path):
    with ImageServer(PHOTOS[:3], robots_txt=ROBOTS) as srv:
        good = srv.image_urls(3)
        private = srv.url("/private/0/secret.jpg")
        noai = srv.url("/fault/noai.jpg")
        spool = Spool(tmp_path)
        prefetcher = run_prefetcher([*good, private, noai], fast_download(), spool)
        assert prefetcher.fetched == 5 and (tmp_path / "stopped").exists()
        assert all(spool.take(u).status == "ok" for u in good)
        assert (spool.take(private).status, spool.take(noai).status) == ("opted_out", "opted_out")
        assert srv.hits["/private/0/secret.jpg"] == 0  # robots.txt said no: never requested
        # Without an allowed range, loopback is a private address: refused before any request.
        blocked = Spool(tmp_path / "blocked")
        blocked.root.mkdir()
        srv.reset_hits()
        run_prefetcher(good[:1], fast_download(allow_cidrs=()), blocked)
        assert blocked.take(good[0]).error_class == "blocked" and sum(srv.hits.values()) == 0


def test_prefetcher_stops_when_a_shard_task_asks(tmp_path):
    with ImageServer(PHOTOS[:5], delay=0.2) as srv:
        urls = srv.image_urls(60)
        spool = Spool(tmp_path)
        prefetcher = Prefetcher(lambda: urls, fast_download(concurrency=2), spool).start()
        deadline = time.monotonic() + 20
        while prefetcher.fetched < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        spool.request_stop()
        assert (tmp_path / "stopped").exists()  # it said it stopped: nothing of it is in flight
        requested = sum(srv.hits.values())
        time.sleep(0.5)
        assert sum(srv.hits.values()) == requested < 61
        prefetcher.close()
        assert not tmp_path.exists()  # close removes the spool


def test_a_shard_task_does_not_wait_for_a_prefetcher_still_reading_its_inputs(tmp_path):
    with ImageServer(PHOTOS[:2]) as srv:
        urls = srv.image_urls(4)

        def slow_inputs() -> list[str]:
            time.sleep(1.5)  # a large URL list
            return urls

        spool = Spool(tmp_path)
        prefetcher = Prefetcher(slow_inputs, fast_download(), spool).start()
        started = time.monotonic()
        spool.request_stop()
        assert time.monotonic() - started < 1.0  # nothing of it can be in flight yet
        prefetcher._thread.join(10)
        assert prefetcher.fetched == 0 and sum(srv.hits.values()) == 0 and (tmp_path / "stopped").exists()


def test_head_start_urls_take_the_first_shards_in_turn(tmp_path):
    urls = [f"http://h/{i}.jpg" for i in range(10)] + ["http://h/0.jpg"]  # a repeat planning skips too
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": urls, "caption": ["c"] * len(urls)}), path)
    store = LocalStore(tmp_path / "store")
    picked = head_start_urls(store, "d", [InputSpec(path=str(path))], shard_size=3, shards=2)
    assert picked == [f"http://h/{i}.jpg" for i in (0, 3, 1, 4, 2, 5)]
    store.put_parquet(input_key("d", 0), pa.table({"key": ["k"]}))
    assert head_start_urls(store, "d", [InputSpec(path=str(path))], shard_size=3, shards=2) == []  # a resume
    folder = tmp_path / "photos"
    folder.mkdir()
    second = tmp_path / "more.parquet"
    pq.write_table(pa.table({"url": ["http://h/x.jpg"], "caption": ["c"]}), second)
    fresh = LocalStore(tmp_path / "fresh")
    assert head_start_urls(fresh, "d", [InputSpec(path=str(folder)), InputSpec(path=str(path))], 3, 2) == []
    both = [InputSpec(path=str(path)), InputSpec(path=str(second))]  # 10 distinct URLs are not enough: reads on
    order = [0, 6, 1, 7, 2, 8, 3, 9, 4, "x", 5]
    assert head_start_urls(fresh, "d", both, shard_size=6, shards=2) == [f"http://h/{i}.jpg" for i in order]


def test_new_spool_removes_those_of_dead_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{SPOOL_PREFIX}{dead.stdout.strip()}-abc"
    live = tmp_path / f"{SPOOL_PREFIX}{os.getppid()}-def"
    stale.mkdir()
    live.mkdir()
    spool = new_spool()
    assert spool.root.parent == tmp_path and spool.root.name.startswith(f"{SPOOL_PREFIX}{os.getpid()}-")
    assert not stale.exists() and live.exists()


@pytest.mark.slow
def test_cli_head_start_fetches_every_url_once_and_leaves_no_spool(tmp_path):
    with ImageServer(PHOTOS[:10], robots_txt=ROBOTS, delay=0.02) as srv:
        good = srv.image_urls(80)
        urls = [*good, srv.url("/private/0/secret.jpg"), srv.url("/fault/noai.jpg"), srv.url("/fault/status/404")]
        url_list = tmp_path / "urls.parquet"
        pq.write_table(pa.table({"url": urls, "caption": ["c"] * len(urls)}), url_list)
        tmp = tmp_path / "tmp"
        tmp.mkdir()
        env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp)}
        proc = subprocess.run(
            [sys.executable, "-m", "flows.cli", "ingest", str(url_list), "--dataset", "d", "--store",
             str(tmp_path / "store"), "--shard-size", "40", "--workers", "2", "--allow-cidr", "127.0.0.0/8"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "head start: " in proc.stderr  # it did fetch ahead
        image_hits = {p: n for p, n in srv.hits.items() if p.startswith("/img/")}
        assert len(image_hits) == 80 and set(image_hits.values()) == {1}  # never twice, head start or not
        assert srv.hits["/private/0/secret.jpg"] == 0
    store = open_store(str(tmp_path / "store"))
    rows = {r["url"]: r for shard in range(3) for r in store.get_parquet(stage_key("d", "ingest", shard, "parquet"))
            .to_pylist()}
    assert all(rows[u]["status"] == "ok" for u in good)
    assert (rows[urls[80]]["error_class"], rows[urls[81]]["error_class"], rows[urls[82]]["error_class"]) == (
        "robots_txt", "x_robots_tag", "http_404")
    assert not list(tmp.glob(f"{SPOOL_PREFIX}*"))  # removed at exit


@pytest.mark.slow
def test_head_start_survives_an_api_found_in_a_prefect_profile(tmp_path):
    """The early cluster is replaced when the API comes from a Prefect profile (its workers were told another
    server): the replacement's workers must still find the spool, or every prefetched URL would be fetched twice."""
    from infra.prefect_server import start_temporary_server, stop_server, wait_until_healthy

    server, api = start_temporary_server()
    try:
        wait_until_healthy(server, api)
        with ImageServer(PHOTOS[:10]) as srv:
            urls = srv.image_urls(120)
            url_list = tmp_path / "urls.parquet"
            pq.write_table(pa.table({"url": urls, "caption": ["c"] * len(urls)}), url_list)
            profiles = tmp_path / "profiles.toml"
            profiles.write_text(f'active = "lasting"\n[profiles.lasting]\nPREFECT_API_URL = "{api}"\n')
            env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
            env.update(PYTHONPATH=str(REPO), PREFECT_PROFILES_PATH=str(profiles))
            proc = subprocess.run(
                [sys.executable, "-m", "flows.cli", "ingest", str(url_list), "--dataset", "d", "--store",
                 str(tmp_path / "store"), "--shard-size", "60", "--workers", "2", "--allow-cidr", "127.0.0.0/8"],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert f"using the Prefect API at {api}" in proc.stderr and "head start: " in proc.stderr
            image_hits = [n for p, n in srv.hits.items() if p.startswith("/img/")]
            assert len(image_hits) == 120 and set(image_hits) == {1}
    finally:
        stop_server(server)


def test_a_failing_head_start_says_it_stopped_and_raises_nothing(tmp_path, capsys):
    def unreadable() -> list[str]:
        raise OSError("input went away")

    spool = Spool(tmp_path)
    prefetcher = run_prefetcher([], fast_download(), spool)  # nothing to fetch
    assert prefetcher.fetched == 0 and (tmp_path / "stopped").exists()
    (tmp_path / "stopped").unlink()
    Prefetcher(unreadable, fast_download(), spool).start()._thread.join(10)
    assert (tmp_path / "stopped").exists() and "Traceback" not in capsys.readouterr().err
