"""Hostile inputs through the real ingest stage: what each one is recorded as, how long it takes, how much memory.

Each input is a one-row URL list (Parquet) whose URL points at a loopback server: the thin images of issue 15,
a decompression bomb, a truncated JPEG, HTML served as image/jpeg, a gzip bomb body, a huge (lying)
Content-Length, a slow server (headers, body), a redirect loop, a 1M-character alt-text and NUL bytes in an
alt-text (both on a real photo). A fresh subprocess per input runs `plan_ingest` + `ingest_shard` on a LocalStore
in a temp dir; its peak RSS is the child's own VmHWM (ru_maxrss from os.wait4 where the child could not report it,
e.g. it crashed; ru_maxrss survives exec, so it starts at the forking parent's size). Children run under an 8 GiB
address-space cap so that a runaway input fails instead of taking the shared machine down.

Run:  .venv/bin/python bench/hostile.py [--timeout 120]
Prints a table; writes every row to bench/results/hostile.json (bench/results/ is git-ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from aiohttp import web  # noqa: E402
from PIL import Image  # noqa: E402

from infra.loopback_server import ImageServer  # noqa: E402
from infra.settings import DownloadConfig, IngestConfig, InputSpec  # noqa: E402

PHOTOS = ROOT.parent / "shared" / "data" / "photos" / "images"
RESULTS = ROOT / "bench" / "results" / "hostile.json"
CHILD_AS_LIMIT = 8 << 30
GZIP_BOMB_BYTES = 1 << 30  # what the gzip body inflates to (about 1 MB on the wire)
THIN = {
    "thin-300x1.png": (300, 1, "PNG"),
    "thin-1x500.gif": (1, 500, "GIF"),
    "thin-2560x10.png": (2560, 10, "PNG"),
    "thin-4000x1.png": (4000, 1, "PNG"),
    "thin-50000x2.jpg": (50000, 2, "JPEG"),
    "thin-20000x1.png": (20000, 1, "PNG"),
}


def config() -> IngestConfig:
    """The defaults, with loopback opened and timeouts short enough for a benchmark."""
    return IngestConfig(download=DownloadConfig(allow_cidrs=("127.0.0.0/8",), connect_timeout=5, read_timeout=5,
                                                total_timeout=15, retries=1, backoff=0.1))


def encode(w: int, h: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 40, 40)).save(buf, fmt)
    return buf.getvalue()


def gzip_bomb(size: int) -> bytes:
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: a gzip stream
    zeros = bytes(1 << 20)
    return b"".join([*(comp.compress(zeros) for _ in range(size >> 20)), comp.flush()])


class ExtraServer:
    """What ImageServer has no route for: a gzip bomb body and a Content-Length far beyond the body."""

    def __init__(self, photo: bytes):
        self.photo, self.bomb = photo, gzip_bomb(GZIP_BOMB_BYTES)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.runner = None
        self.base_url = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    async def _start(self) -> str:
        app = web.Application()
        app.router.add_get("/gzip-bomb.jpg", self._gzip_bomb)
        app.router.add_get("/lying-length.jpg", self._lying_length)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.2)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def _gzip_bomb(self, request: web.Request) -> web.Response:
        return web.Response(body=self.bomb, headers={"Content-Type": "image/jpeg", "Content-Encoding": "gzip"})

    async def _lying_length(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        resp.content_length = 10**12
        await resp.prepare(request)
        await resp.write(self.photo)
        return resp  # the connection closes short of the declared length

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


def inputs(images: ImageServer, extra: ExtraServer, photo_name: str) -> dict[str, tuple[str, str]]:
    """input name -> (URL, alt-text). The photo is image 0 of `images`, the thin ones 1..len(THIN)."""
    n = len(THIN) + 1  # /img/{i} serves image i % n: distinct URLs of the photo for the alt-text inputs
    photo = images.url(f"/img/0/{photo_name}")
    cases = {"normal photo (baseline)": (photo, "a photo")}
    cases |= {name: (images.url(f"/img/{i + 1}/{name}"), "thin") for i, name in enumerate(THIN)}
    cases |= {
        "decompression bomb (30000^2 PNG)": (images.url("/fault/bomb.png"), "bomb"),
        "truncated JPEG": (images.url("/fault/truncated.jpg"), "truncated"),
        "HTML as image/jpeg": (images.url("/fault/html-as-image.jpg"), "html"),
        "gzip bomb body (1 GiB inflated)": (extra.base_url + "/gzip-bomb.jpg", "gzip bomb"),
        "huge Content-Length (50 MB, sent)": (images.url("/fault/huge.jpg"), "huge"),
        "lying Content-Length (1 TB)": (extra.base_url + "/lying-length.jpg", "lying length"),
        "slow server (headers after 60 s)": (images.url("/fault/slow-headers"), "slow headers"),
        "slow body (100 B/s)": (images.url("/fault/slow-body"), "slow body"),
        "redirect loop": (images.url("/fault/loop/a"), "loop"),
        "1M-character alt-text": (images.url(f"/img/{n}/{photo_name}"), "x" * 1_000_000),
        "NUL bytes in alt-text": (images.url(f"/img/{2 * n}/{photo_name}"), "a\x00photo\x00with NULs"),
    }
    return cases


def child(store_dir: str, url_list: str) -> None:
    """One input through the stage; prints the sample's row (or why the shard failed) as JSON."""
    from infra.store import LocalStore
    from tasks.ingest import STAGE, ingest_shard, plan_ingest
    from tasks.shards import stage_key

    cfg, store = config(), LocalStore(store_dir)
    [shard] = plan_ingest(store, "bench", [InputSpec(path=url_list)], cfg).todo
    try:
        ingest_shard(store.uri, "bench", shard, cfg)
    except Exception as e:  # the stage must never get here; the table shows it if it does
        print(json.dumps({"status": "shard_failed", "error_class": type(e).__name__, "error": str(e)[:300]}))
        return
    [row] = store.get_parquet(stage_key("bench", STAGE, shard, "parquet")).to_pylist()
    # VmHWM: this process's own peak (ru_maxrss survives exec and starts at the forking parent's size).
    status = Path("/proc/self/status").read_text().splitlines()
    hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"status": row["status"], "error_class": row["error_class"], "error": row["error"],
                      "size": f"{row['width']}x{row['height']}" if row["width"] else None,
                      "alt_text_chars": len(row["alt_text"] or ""), "peak_rss_mb": round(hwm / 1024, 1)}))


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_AS_LIMIT, CHILD_AS_LIMIT))


def measure(name: str, url: str, alt: str, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="capfactory-hostile-") as tmp:
        url_list = Path(tmp) / "in.parquet"
        pq.write_table(pa.table({"url": [url], "caption": [alt]}), url_list)
        out, err = Path(tmp) / "out", Path(tmp) / "err"
        started = time.perf_counter()
        with open(out, "w") as fo, open(err, "w") as fe:
            proc = subprocess.Popen([sys.executable, __file__, "--child", str(Path(tmp) / "store"), str(url_list)],
                                    cwd=ROOT, stdout=fo, stderr=fe, preexec_fn=_limit_memory)
            killer = threading.Timer(timeout, proc.kill)
            killer.start()
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
            killer.cancel()
            proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        lines = out.read_text().strip().splitlines()
        row = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
            "status": "timed_out" if proc.returncode == -9 else "crashed", "error_class": None,
            "error": err.read_text()[-300:]}
    return {"input": name, "url": url, "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), **row,
            "seconds": round(seconds, 2), "returncode": proc.returncode}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--timeout", type=float, default=120, help="seconds before an input's process is killed")
    parser.add_argument("--child", nargs=2, metavar=("STORE", "URL_LIST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0

    photo = sorted(PHOTOS.glob("*.jpg"))[0]
    images = {photo.name: photo.read_bytes()} | {n: encode(*spec) for n, spec in THIN.items()}
    extra = ExtraServer(photo.read_bytes())
    results = []
    try:
        with ImageServer(images) as srv:
            for name, (url, alt) in inputs(srv, extra, photo.name).items():
                results.append(measure(name, url, alt, args.timeout))
                r = results[-1]
                print(f"{name:36} {r['status']:12} {r['error_class'] or '-':20} {r['seconds']:7.2f} "
                      f"{r['peak_rss_mb']:8.1f}", flush=True)
    finally:
        extra.stop()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    print("\n| input | status | error_class | seconds | peak RSS MB |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['input']} | {r['status']} | {r['error_class'] or ''} | {r['seconds']} | {r['peak_rss_mb']} |")
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
