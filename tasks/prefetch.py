"""A crawl's head start: the command fetches the first shards' URLs while Prefect and the Dask workers start.

Starting a run takes seconds (the workers import the stage code; without a configured API a temporary Prefect server
boots), and a crawl's first requests need none of it. So the command that starts a local cluster for an ingest of a
new dataset also starts a `Prefetcher` thread: it reads the inputs as planning will (tasks/ingest.py plan_ingest) and
fetches the http(s) URLs of the first shards, one per worker, taking them in turn, with the shard tasks' own
`Downloader` (SSRF guard on every hop, robots.txt, X-Robots-Tag, size cap, retries) into a `Spool` folder, one file
per URL. The first shard task to start stops it: the prefetcher cancels what it has in flight (so no host gets the
same URL twice at once) and says it stopped; then each shard task takes a URL's result from the spool, where there is
one, instead of fetching it. The spool is a local folder, so only a LocalCluster started by the command uses it;
the command removes it at exit. A corrupt or missing spool entry just means the task fetches the URL itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import pickle
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from infra.settings import DownloadConfig, InputSpec
from infra.store import ArtifactStore
from tasks.download import Downloader, FetchResult
from tasks.inputs import detect_format, first_occurrences, read_inputs
from tasks.shards import planned_shards

log = logging.getLogger(__name__)
SPOOL_PREFIX = "capfactory-prefetch-"  # + pid + random: the spool folders in the temp folder
SPOOL_ENV = "CAPFACTORY_PREFETCH_SPOOL"  # set in the workers' environment: where the spool is
MAX_SPOOL_BYTES = 256 << 20  # stop prefetching beyond this many body bytes
STOP_WAIT_S = 2.0  # how long a shard task waits for the prefetcher to say it stopped
STOP_GRACE_S = 1.5  # how long the prefetcher lets its requests in flight finish once asked to stop


class Spool:
    """The folder the prefetcher writes a FetchResult per URL to, and the shard tasks take them from."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, url: str) -> Path:
        return self.root / hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()

    def put(self, url: str, result: FetchResult) -> None:
        tmp = self.root / f".{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_bytes(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
        os.replace(tmp, self._path(url))  # a reader sees the whole entry or none

    def take(self, url: str) -> FetchResult | None:
        """The prefetched result for `url`, removed from the spool; None if there is none (or it is unreadable)."""
        path = self._path(url)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        path.unlink(missing_ok=True)
        try:
            result = pickle.loads(data)  # a folder this run made (mode 0700): no outside data
        except Exception:
            return None
        return result if isinstance(result, FetchResult) else None

    def request_stop(self, wait_s: float = STOP_WAIT_S) -> None:
        """Ask the prefetcher to stop and, if it has begun fetching, wait (at most `wait_s`) until it has: nothing
        of it is then in flight. (It marks `fetching` before it looks for `stop`, and this looks for `fetching`
        after it wrote `stop`: one of the two sees the other.)"""
        with contextlib.suppress(OSError):
            (self.root / "stop").touch()
        if not (self.root / "fetching").exists():
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and self.root.is_dir() and not (self.root / "stopped").exists():
            time.sleep(0.02)

    def stop_requested(self) -> bool:
        return (self.root / "stop").exists() or not self.root.is_dir()

    def mark_fetching(self) -> None:
        (self.root / "fetching").touch()

    def mark_stopped(self) -> None:
        with contextlib.suppress(OSError):
            (self.root / "stopped").touch()


def worker_spool() -> Spool | None:
    """The spool of this worker's run (from SPOOL_ENV), or None when the run has no head start."""
    root = os.environ.get(SPOOL_ENV)
    return Spool(root) if root and Path(root).is_dir() else None


def head_start_urls(store: ArtifactStore, dataset: str, inputs: list[InputSpec], shard_size: int,
                    shards: int) -> list[str]:
    """The http(s) URLs of the first `shards` shards that planning will write, taking the shards in turn (they
    start together, one per worker); none for a dataset that has planned shards already (a resume plans in
    another order, and most of its URLs are done). It stops reading inputs at a folder or once it has enough rows:
    a URL spooled for another shard than planned is still taken by the task that gets it."""
    if planned_shards(store, dataset):
        return []
    wanted, tables = shards * shard_size, []
    for spec in inputs:  # only as many inputs as it takes; folders hold files, not URLs
        if spec.format == "folder" or (spec.format == "auto" and detect_format(Path(spec.path)) == "folder"):
            break
        tables.append(read_inputs([spec])[0])
        if sum(t.num_rows for t in tables) >= wanted:
            break
    if not tables:
        return []
    table = first_occurrences(pa.concat_tables(tables, promote_options="permissive")).slice(0, wanted)
    rows = [u for u, s in zip(table.column("url").to_pylist(), table.column("source").to_pylist(), strict=True)
            if s == "url" and u and u.lower().startswith(("http://", "https://"))]
    per_shard = [rows[i * shard_size:(i + 1) * shard_size] for i in range(shards)]
    return [shard[j] for j in range(shard_size) for shard in per_shard if j < len(shard)]


class Prefetcher:
    """Fetches the URLs `urls()` lists (called in its thread: reading the inputs is part of the head start) into
    `spool` in a background thread until they are done, the spool holds MAX_SPOOL_BYTES, a shard task asks it to
    stop, or `close()`."""

    def __init__(self, urls: Callable[[], list[str]], cfg: DownloadConfig, spool: Spool):
        self.urls, self.cfg, self.spool = urls, cfg, spool
        self.planned = 0  # URLs it was given
        self.fetched = 0
        self.bytes = 0
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)

    def start(self) -> Prefetcher:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as e:  # best effort: the shard tasks fetch what it did not, and report real errors
            log.debug("head start stopped: %s: %s", type(e).__name__, e)
        finally:
            self.spool.mark_stopped()

    def _stopping(self) -> bool:
        return self._closing.is_set() or self.bytes >= MAX_SPOOL_BYTES or self.spool.stop_requested()

    async def _main(self) -> None:
        urls = self.urls()
        self.planned = len(urls)
        self.spool.mark_fetching()  # before the first look at `stop` (see Spool.request_stop)
        gate = asyncio.Semaphore(self.cfg.concurrency)
        async with Downloader(self.cfg) as downloader:

            async def one(url: str) -> None:
                async with gate:
                    if self._stopping():
                        return
                    result = await downloader.fetch(url)
                    self.spool.put(url, result)
                    self.fetched += 1
                    self.bytes += len(result.data or b"")

            fetches = asyncio.gather(*(one(u) for u in urls), return_exceptions=True)
            while not fetches.done() and not self._stopping():
                await asyncio.wait([fetches], timeout=0.02)
            # What is in flight may finish (within the time a shard task waits for us); what does not is cancelled
            # and fetched again by the shard task.
            await asyncio.wait([fetches], timeout=STOP_GRACE_S)
            fetches.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await fetches

    def close(self) -> None:
        """Stop (cancelling what is in flight) and remove the spool; the shard tasks took what they needed."""
        self._closing.set()
        self._thread.join(timeout=10)
        shutil.rmtree(self.spool.root, ignore_errors=True)


def new_spool() -> Spool:
    """A new spool folder (mode 0700) named after this process; those of processes that are gone (killed before
    they could remove theirs) are removed first."""
    for old in Path(tempfile.gettempdir()).glob(f"{SPOOL_PREFIX}*-*"):
        pid = old.name[len(SPOOL_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Spool(tempfile.mkdtemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True
