"""Faults of the model stages' backends, replayed against a real OpenAI-compatible HTTP server on loopback (an aiohttp
app that can refuse the key, answer garbage, reject some prompts or hang) and the real stage code:
- a backend that fails is never a done shard: the completions that arrived are kept and a re-run asks only for the
  rest; a refusal (401, 400, a garbage 200) is not retried, and a health check before any shard says what to do;
- a hanging server costs a few timeouts (circuit breaker), not one per request;
- where the server lives (its spelling) is neither in the config hash nor in the completion cache;
- a shard task run again after its worker died returns the stored result and recomputes nothing;
- errors that cross the task boundary pickle with their message.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import shutil
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web

from infra.models import ModelUnavailable
from infra.net import free_port
from infra.settings import FuseConfig, IngestConfig, InputSpec
from infra.store import LocalStore
from tasks.fuse import FuseStage
from tasks.ingest import IngestStage, ingest_shard, plan_ingest
from tasks.llm import OpenAILLM
from tasks.shards import read_marker, stage_key
from tasks.stage import BackendError

CAPTION = "A small brown dog sits on a wooden table next to a red cup."


class FakeOpenAI:
    """An OpenAI-compatible chat server on 127.0.0.1 whose behaviour the test sets: `mode` is ok | unauthorized |
    garbage | hang, and prompts containing `reject` get HTTP 400 while it is set."""

    def __init__(self):
        self.mode, self.reject, self.calls = "ok", None, 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.calls += 1
        if self.mode == "unauthorized":
            return web.json_response({"error": {"message": "invalid api key"}}, status=401)
        if self.mode == "garbage":
            return web.Response(text="<html>it works</html>", content_type="text/html")
        if self.mode == "hang":
            await self._release.wait()  # until the test ends
        if self.reject and self.reject in json.dumps(body):
            return web.json_response({"error": {"message": "bad request"}}, status=400)
        return web.json_response({"choices": [{"message": {"role": "assistant", "content": CAPTION}}],
                                  "usage": {"prompt_tokens": 10, "completion_tokens": 12}})

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._started.set()
        self._loop.run_forever()

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._release.set)
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def server():
    with FakeOpenAI() as srv:
        yield srv


@pytest.fixture
def dataset(tmp_path, photos) -> LocalStore:
    """An ingested shard of four photos from a folder; the third one's alt-text carries the word REJECTME."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, p in enumerate(photos[:4]):
        shutil.copy(p, folder / p.name)
        (folder / p.name).with_suffix(".txt").write_text("REJECTME a dog" if i == 2 else f"a photo number {i}")
    store = LocalStore(tmp_path / "store")
    cfg = IngestConfig(shard_size=4)
    plan_ingest(store, "d", [InputSpec(path=str(folder))], cfg)
    ingest_shard(store.uri, "d", 0, cfg)
    return store


def _fuse(url: str, **options) -> FuseStage:
    return FuseStage(FuseConfig(backend="openai", endpoint=url, model="served-model", outputs=("short",), **options))


def test_a_refusing_backend_leaves_the_shard_not_done_and_a_rerun_asks_only_for_the_rest(server, dataset):
    server.reject = "REJECTME"
    with pytest.raises(BackendError, match=r"1 fuse calls failed \(http_400=1\).*not marked done") as info:
        _fuse(server.url).run_shard(dataset.uri, "d", 0)
    assert not info.value.transient  # a refusal: the task is not retried
    assert server.calls == 4 and read_marker(dataset, "d", "fuse", 0) is None
    kept = dataset.get_parquet(stage_key("d", "fuse", 0, "parquet")).to_pylist()
    assert sum(1 for r in kept if r["fused_short"] == CAPTION) == 3  # what arrived is kept

    server.reject = None  # the server is fixed: the re-run makes exactly the one missing call
    stats = _fuse(server.url).run_shard(dataset.uri, "d", 0)
    assert server.calls == 5 and stats["llm_calls"] == 1 and stats["cache_hits"] == 3
    assert read_marker(dataset, "d", "fuse", 0) is not None


@pytest.mark.parametrize(("mode", "message"), [
    ("unauthorized", "the server refused the API key: set CAPFACTORY_LLM_API_KEY"),
    ("garbage", "is not a working OpenAI-compatible server: bad_response"),
])
def test_the_health_check_says_what_is_wrong_before_any_shard(server, mode, message):
    server.mode = mode
    started = time.monotonic()
    with pytest.raises(ModelUnavailable, match=message):
        _fuse(server.url).check_backends()
    assert server.calls == 1 and time.monotonic() - started < 10


def test_every_call_refused_is_one_clear_error_and_no_done_marker(server, dataset):
    server.mode = "unauthorized"
    with pytest.raises(BackendError, match=r"4 fuse calls failed \(http_401=4\)"):
        _fuse(server.url).run_shard(dataset.uri, "d", 0)
    assert read_marker(dataset, "d", "fuse", 0) is None


def test_a_hanging_server_is_found_by_the_health_check_and_stopped_by_the_breaker(server):
    server.mode = "hang"
    llm = OpenAILLM(server.url, "served-model", concurrency=4, timeout=1.0, retries=0)
    started = time.monotonic()
    with pytest.raises(ModelUnavailable, match="gave no answer to a 1-token completion within 1 s"):
        llm.health_check()
    assert time.monotonic() - started < 5
    conversations = [[{"role": "user", "content": f"caption {i}"}] for i in range(40)]
    started = time.monotonic()
    out = llm.generate(conversations, max_tokens=8)
    elapsed = time.monotonic() - started
    # 8 failures in a row open the breaker: 2-3 rounds of 4 in flight time out, the other ~30 are not sent.
    assert all(c.text is None for c in out)
    assert sum(1 for c in out if c.error.startswith("circuit_open")) >= 28
    assert elapsed < 10  # without the breaker: 40 / 4 x 1 s = 10 s (x attempts)


def test_where_the_server_lives_is_not_part_of_the_cache_or_the_config(server, dataset):
    local = _fuse(f"http://localhost:{server.port}/v1")
    loopback = _fuse(server.url)
    assert local.config_hash == loopback.config_hash
    first = local.run_shard(dataset.uri, "d", 0)
    assert first["llm_calls"] == 4
    assert loopback.status(dataset, "d") == ([], [0], [])  # the same model under another spelling: done
    dataset.delete(stage_key("d", "fuse", 0, "stats.json"))  # even recomputed, no completion is asked again
    again = loopback.run_shard(dataset.uri, "d", 0)
    assert again["llm_calls"] == 0 and again["cache_hits"] == 4 and server.calls == 4


def test_a_shard_task_run_again_after_its_worker_died_returns_the_stored_result(server, dataset, image_server,
                                                                                 tmp_path):
    stage = _fuse(server.url)
    first = stage.run_shard(dataset.uri, "d", 0)
    table = Path(dataset.root) / "d" / "fuse" / "shard-00000.parquet"
    written = table.stat().st_mtime_ns
    again = stage.run_shard(dataset.uri, "d", 0)  # what Prefect does when a worker dies after the task finished
    assert again == read_marker(dataset, "d", "fuse", 0) and again["finished_at"] == first["finished_at"]
    assert server.calls == 4 and table.stat().st_mtime_ns == written

    # Ingest too: a finished raw shard is not downloaded again.
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"url": image_server.image_urls(3), "caption": ["a photo"] * 3}), tmp_path / "u.parquet")
    cfg = IngestConfig(download={"allow_cidrs": ["127.0.0.0/8"], "retries": 0})
    ingest = IngestStage(cfg, inputs=[InputSpec(path=str(tmp_path / "u.parquet"))])
    store = LocalStore(tmp_path / "web")
    ingest.prepare(store.uri, "web")
    done = ingest.run_shard(store.uri, "web", 0)
    hits = sum(image_server.hits.values())
    assert ingest.run_shard(store.uri, "web", 0) == done and sum(image_server.hits.values()) == hits


def test_errors_that_cross_the_task_boundary_pickle():
    from tasks.lib.openai_http import AttemptError

    for error in (BackendError("3 fuse calls failed", transient=False),
                  ModelUnavailable("llm", "openai", "the server refused the API key"),
                  AttemptError("http_401: no", transient=False, retry_after=2.0)):
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and str(again) == str(error)
    assert pickle.loads(pickle.dumps(BackendError("x", transient=True))).transient


def test_an_s3_server_that_lost_its_state_is_one_plain_picklable_error():
    """The store's bucket vanished (the S3 server restarted empty): every call says so in one line that pickles
    across the task boundary, with no object repr, and is never taken for a missing object."""
    import urllib.request

    from moto.server import ThreadedMotoServer

    from infra.settings import Settings
    from infra.store import StoreError, StoreUnavailable, open_store

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        settings = Settings(s3_endpoint=f"{host}:{port}", s3_access_key="test", s3_secret_key="test",
                            s3_secure=False, s3_region="us-east-1")
        store = open_store("s3://lost-state/prefix", settings)
        store.put_bytes("d/ingest/shard-00000.stats.json", b"{}")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        opener.open(urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST"), timeout=10)
        for call in (lambda: store.get_bytes("d/ingest/shard-00000.stats.json"), lambda: store.put_bytes("d/x", b"1"),
                     lambda: store.list("d")):
            with pytest.raises(StoreUnavailable, match=r"S3 (get|put|list) of .* failed: NoSuchBucket") as info:
                call()
            again = pickle.loads(pickle.dumps(info.value))
            assert str(again) == str(info.value) and " at 0x" not in str(again)
            assert info.value.__context__ is None  # Dask with tblib pickles the chain too
        with pytest.raises(StoreUnavailable):  # a marker the store cannot read is not a shard that is not done
            read_marker(store, "d", "ingest", 0)
        store2 = open_store("s3://other-bucket/p", settings)  # a missing object: StoreError, also without context
        with pytest.raises(StoreError) as missing:
            store2.get_bytes("nope")
        assert missing.value.__context__ is None and pickle.loads(pickle.dumps(missing.value)).args
    finally:
        server.stop()
