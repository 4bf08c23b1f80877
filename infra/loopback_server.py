"""A real HTTP image server on loopback, with fault endpoints, for tests, the demo and benchmarks.

In-process use (tests)::

    with ImageServer(sorted(Path("photos").glob("*.jpg"))) as srv:
        urls = srv.image_urls(100)
        ...
        assert srv.hits["/img/0/a.jpg"] == 1

The server runs its own asyncio loop in a daemon thread, so synchronous tests and other event loops can use it.
As a separate process (benchmarks, so the server's CPU is not the crawler's)::

    python -m infra.loopback_server --images DIR [--port P] [--delay S]

prints the base URL as stdout line 1 and serves until SIGINT/SIGTERM.

Routes: `/img/{i}/{name}` and `/private/{i}/{name}` serve image `i % len(images)`; `/robots.txt`; and the fault
endpoints under `/fault/` (see `_FAULT_ROUTES` below). Everything else is 404. Every request is counted in `hits`.
For benchmarks measuring start-up (command to first request on the wire): `GET /_first-hit` answers the wall time
(epoch seconds, or null) of the first request since the last `POST /_reset`; these two are not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import signal
import struct
import sys
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

from aiohttp import web
from multidict import CIMultiDict

# How long stop() lets in-flight handlers finish before cancelling them. aiohttp waits up to this twice (graceful
# wait, then cancel-and-wait), so stop() takes at most about twice this plus thread join.
SHUTDOWN_TIMEOUT = 0.2
START_TIMEOUT = 10.0

SLOW_BODY_CHUNK = 100  # bytes per trickle in /fault/slow-body
SLOW_BODY_INTERVAL = 1.0  # seconds between trickles
SLOW_HEADERS_DELAY = 60.0

HUGE_SIZE = 50 * 1024 * 1024  # /fault/huge*.jpg body size
HUGE_CHUNK = 256 * 1024

BOMB_SIDE = 30_000  # /fault/bomb.png is BOMB_SIDE x BOMB_SIDE, 1-bit grayscale

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def sniff_content_type(data: bytes) -> str:
    """The MIME type from the magic bytes (jpeg/png/gif/webp), else application/octet-stream."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def build_png_bomb(side: int = BOMB_SIDE) -> bytes:
    """A valid `side` x `side` 1-bit grayscale all-black PNG, about 110 KB for side=30000.

    The IDAT is produced by streaming all-zero scanlines (filter byte 0 + packed zero pixels) through one
    compressobj, so the ~112 MB of raw scanlines never exist in memory at once.
    """
    row = bytes(1 + (side + 7) // 8)  # filter type 0 (None) + 1 bit per pixel, padded to whole bytes
    comp = zlib.compressobj(9)
    parts = [comp.compress(row) for _ in range(side)]
    parts.append(comp.flush())
    # IHDR: width, height, bit depth 1, colour type 0 (grayscale), compression 0, filter 0, interlace 0.
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", ihdr),
            _png_chunk(b"IDAT", b"".join(parts)),
            _png_chunk(b"IEND", b""),
        )
    )


_HTML_PAGE = (
    b"<!DOCTYPE html><html><head><title>Not an image</title></head>"
    b"<body><h1>Hello</h1><p>This is an HTML page, not an image.</p></body></html>"
)


class ImageServer:
    """An aiohttp image server on loopback, running in a background thread. See the module docstring."""

    def __init__(
        self,
        images: Sequence[Path | str] | Mapping[str, bytes],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        robots_txt: str | None = None,
        delay: float = 0.0,
    ) -> None:
        if isinstance(images, str | Path):
            raise TypeError("images must be a sequence of paths or a mapping name -> bytes, not a single path")
        if isinstance(images, Mapping):
            items = [(str(name), bytes(data)) for name, data in images.items()]
        else:
            items = [(Path(p).name, Path(p).read_bytes()) for p in images]
        if not items:
            raise ValueError("ImageServer needs at least one image")
        self._names = [name for name, _ in items]
        self._bodies = [data for _, data in items]
        # Precomputed per image so the hot handler only indexes lists.
        self._headers = [{"Content-Type": sniff_content_type(data)} for data in self._bodies]

        self._host = host
        self._port = port
        self._robots_txt = robots_txt
        self.delay = delay  # seconds each /img and /private response waits (slow crawls for resume tests)
        self.base_url = ""
        self.hits: collections.Counter[str] = collections.Counter()
        self.first_hit: float | None = None  # time.time() of the first counted request since the last reset
        self._flaky_counts: collections.Counter[str] = collections.Counter()
        self._bomb: bytes | None = None
        self._bomb_lock = threading.Lock()

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> ImageServer:
        """Start the loop thread and block until the socket is listening; sets `base_url`."""
        if self._thread is not None:
            raise RuntimeError("ImageServer already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="loopback-image-server", daemon=True)
        self._thread.start()
        try:
            port = asyncio.run_coroutine_threadsafe(self._setup(), loop).result(START_TIMEOUT)
        except BaseException:
            self._stop_loop()
            raise
        self.base_url = f"http://{self._host}:{port}"
        return self

    def stop(self) -> None:
        """Stop serving; in-flight slow handlers are cancelled after SHUTDOWN_TIMEOUT. Idempotent."""
        loop = self._loop
        if loop is None:
            return
        if self._runner is not None:
            # Best effort: the loop is stopped below regardless.
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._teardown(), loop).result(START_TIMEOUT)
        self._stop_loop()

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _setup(self) -> int:
        app = web.Application(middlewares=[self._count_hits])
        app.router.add_get("/img/{i:\\d+}/{name}", self._image)
        app.router.add_get("/private/{i:\\d+}/{name}", self._image)
        app.router.add_get("/robots.txt", self._robots)
        app.router.add_get("/_first-hit", self._first_hit)
        app.router.add_post("/_reset", self._reset)
        for path, handler in self._fault_routes().items():
            app.router.add_get(path, handler)
        # handler_cancellation: a client disconnect cancels its handler (slow-body/huge streams stop at once).
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, handler_cancellation=True, shutdown_timeout=SHUTDOWN_TIMEOUT
        )
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        await site.start()
        self._runner = runner
        return int(runner.addresses[0][1])

    async def _teardown(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        # Anything still pending (e.g. a handler that swallowed its cancellation) is cancelled here.
        current = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not current]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=SHUTDOWN_TIMEOUT)

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(START_TIMEOUT)
        if not loop.is_running():
            loop.close()

    # ---- helpers for callers ---------------------------------------------------------------------------------

    def url(self, path: str) -> str:
        return self.base_url + path

    def image_urls(self, n: int) -> list[str]:
        """`n` distinct URLs `/img/{i}/{name}`, cycling over the images."""
        k = len(self._names)
        return [f"{self.base_url}/img/{i}/{self._names[i % k]}" for i in range(n)]

    def reset_hits(self) -> None:
        self.hits.clear()
        self.first_hit = None

    # ---- handlers ----------------------------------------------------------------------------------------------

    @web.middleware
    async def _count_hits(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # Runs for unmatched paths too (aiohttp routes them to a 404 handler), so every request is counted.
        if request.path not in ("/_first-hit", "/_reset"):
            self.hits[request.path] += 1
            if self.first_hit is None:
                self.first_hit = time.time()
        return await handler(request)

    async def _first_hit(self, request: web.Request) -> web.Response:
        return web.json_response({"first_hit": self.first_hit})

    async def _reset(self, request: web.Request) -> web.Response:
        self.reset_hits()
        return web.json_response({"ok": True})

    async def _image(self, request: web.Request) -> web.Response:
        # Hot path: one int parse and two list lookups; Content-Length comes from the bytes body.
        i = int(request.match_info["i"]) % len(self._bodies)
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.Response(body=self._bodies[i], headers=self._headers[i])

    async def _robots(self, request: web.Request) -> web.Response:
        if self._robots_txt is None:
            return web.Response(status=404, text="no robots.txt")
        return web.Response(text=self._robots_txt, content_type="text/plain")

    def _image0(self, extra: CIMultiDict[str] | None = None) -> web.Response:
        headers: CIMultiDict[str] = CIMultiDict(self._headers[0])
        if extra:
            headers.extend(extra)
        return web.Response(body=self._bodies[0], headers=headers)

    def _fault_routes(self) -> dict[str, Handler]:
        return {
            "/fault/status/{code:\\d+}": self._status,
            "/fault/flaky/{n:\\d+}/{token}": self._flaky,
            "/fault/slow-body": self._slow_body,
            "/fault/slow-headers": self._slow_headers,
            "/fault/truncated.jpg": self._truncated,
            "/fault/html-as-image.jpg": self._html_as_image,
            "/fault/html": self._html,
            "/fault/empty.jpg": self._empty,
            "/fault/bomb.png": self._bomb_png,
            "/fault/huge.jpg": self._huge,
            "/fault/huge-chunked.jpg": self._huge,
            "/fault/loop/{which:[ab]}": self._loop_redirect,
            "/fault/redirect/{n:\\d+}": self._redirect_chain,
            "/fault/to-link-local": _redirect_to("http://169.254.169.254/latest/meta-data/iam"),
            "/fault/to-private": _redirect_to("http://10.0.0.1/x.jpg"),
            "/fault/to-file": _redirect_to("file:///etc/passwd"),
            "/fault/to-localhost-name": self._to_localhost_name,
            "/fault/noai.jpg": self._noai,
            "/fault/other-bot-noai.jpg": self._other_bot_noai,
            "/fault/noindex.jpg": self._noindex,
            "/fault/not-found-image.jpg": self._not_found,
        }

    async def _status(self, request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        if not 200 <= code <= 599:
            return web.Response(status=404, text="status code out of range")
        headers = {"Retry-After": "0"} if code in (429, 503) else None
        if code in (204, 304):  # These must not carry a body.
            return web.Response(status=code, headers=headers)
        return web.Response(status=code, text=f"status {code}\n", headers=headers)

    async def _flaky(self, request: web.Request) -> web.Response:
        # Counted separately from `hits` so that reset_hits() does not make a flaky URL fail again.
        self._flaky_counts[request.path] += 1
        if self._flaky_counts[request.path] <= int(request.match_info["n"]):
            return web.Response(status=503, text="try again\n", headers={"Retry-After": "0"})
        return self._image0()

    async def _slow_body(self, request: web.Request) -> web.StreamResponse:
        body = self._bodies[0]
        resp = web.StreamResponse(headers=self._headers[0])
        resp.content_length = len(body)
        await resp.prepare(request)
        try:
            for off in range(0, len(body), SLOW_BODY_CHUNK):
                await resp.write(body[off : off + SLOW_BODY_CHUNK])
                await asyncio.sleep(SLOW_BODY_INTERVAL)
            await resp.write_eof()
        except ConnectionError:
            pass  # Client went away; with handler_cancellation we are usually cancelled instead.
        return resp

    async def _slow_headers(self, request: web.Request) -> web.Response:
        await asyncio.sleep(SLOW_HEADERS_DELAY)
        return self._image0()

    async def _truncated(self, request: web.Request) -> web.Response:
        body = self._bodies[0]
        return web.Response(body=body[: len(body) // 2], content_type="image/jpeg")

    async def _html_as_image(self, request: web.Request) -> web.Response:
        return web.Response(body=_HTML_PAGE, content_type="image/jpeg")

    async def _html(self, request: web.Request) -> web.Response:
        return web.Response(body=_HTML_PAGE, content_type="text/html", charset="utf-8")

    async def _empty(self, request: web.Request) -> web.Response:
        return web.Response(body=b"", content_type="image/jpeg")

    async def _bomb_png(self, request: web.Request) -> web.Response:
        if self._bomb is None:
            # Built once, off the loop thread (~0.1 s of zlib), so other requests keep flowing meanwhile.
            await asyncio.get_running_loop().run_in_executor(None, self._build_bomb)
        return web.Response(body=self._bomb, content_type="image/png")

    def _build_bomb(self) -> None:
        with self._bomb_lock:
            if self._bomb is None:
                self._bomb = build_png_bomb()

    async def _huge(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        if request.path.endswith("-chunked.jpg"):
            resp.enable_chunked_encoding()
        else:
            resp.content_length = HUGE_SIZE
        await resp.prepare(request)
        zeros = bytes(HUGE_CHUNK)
        try:
            await resp.write(b"\xff\xd8\xff")
            left = HUGE_SIZE - 3
            while left > 0:
                n = min(left, HUGE_CHUNK)
                await resp.write(zeros if n == HUGE_CHUNK else zeros[:n])
                left -= n
            await resp.write_eof()
        except ConnectionError:
            pass
        return resp

    async def _loop_redirect(self, request: web.Request) -> web.Response:
        target = "/fault/loop/b" if request.match_info["which"] == "a" else "/fault/loop/a"
        return web.Response(status=302, headers={"Location": target})

    async def _redirect_chain(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        if n == 0:
            return self._image0()
        return web.Response(status=302, headers={"Location": f"/fault/redirect/{n - 1}"})

    async def _to_localhost_name(self, request: web.Request) -> web.Response:
        port = self.base_url.rsplit(":", 1)[1]
        return web.Response(status=302, headers={"Location": f"http://localhost:{port}/img/0/a.jpg"})

    async def _noai(self, request: web.Request) -> web.Response:
        return self._image0(CIMultiDict([("X-Robots-Tag", "noai")]))

    async def _other_bot_noai(self, request: web.Request) -> web.Response:
        return self._image0(CIMultiDict([("X-Robots-Tag", "otherbot: noai, noimageai")]))

    async def _noindex(self, request: web.Request) -> web.Response:
        return self._image0(CIMultiDict([("X-Robots-Tag", "nofollow"), ("X-Robots-Tag", "noindex")]))

    async def _not_found(self, request: web.Request) -> web.Response:
        return web.Response(status=404, text="not found\n")


def _redirect_to(location: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": location})

    return handler


def _image_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a directory of images on loopback (with fault endpoints).")
    parser.add_argument("--images", type=Path, required=True, help="directory of .jpg/.jpeg/.png/.gif/.webp files")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds each image response waits")
    parser.add_argument("--robots-txt", type=Path, default=None, help="file served at /robots.txt (default: 404)")
    args = parser.parse_args(argv)

    files = _image_files(args.images)
    if not files:
        parser.error(f"no image files in {args.images}")
    robots = args.robots_txt.read_text() if args.robots_txt else None
    # Block the stop signals before the server thread exists (threads inherit the mask), then wait for one.
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    server = ImageServer(files, port=args.port, robots_txt=robots, delay=args.delay).start()
    print(server.base_url, flush=True)
    try:
        signal.sigwait(stop_signals)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
