"""The loopback image server: routes, hit counting, faults, and a prompt stop(). Talks to 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from infra.loopback_server import ImageServer, build_png_bomb, sniff_content_type

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos" / "images"
REPO = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def photo_paths() -> list[Path]:
    return sorted(PHOTOS.glob("*.jpg"))[:3]


@pytest.fixture(scope="module")
def server(photo_paths: list[Path]) -> Iterator[ImageServer]:
    with ImageServer(photo_paths, robots_txt="User-agent: *\nDisallow: /private/\n") as srv:
        yield srv


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # Surface the 3xx as an HTTPError instead of following it.


def _get(url: str, *, follow: bool = True) -> tuple[int, dict[str, str], bytes]:
    assert url.startswith("http://127.0.0.1:"), url
    opener = urllib.request.build_opener() if follow else urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(url, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_image_served_with_type_and_bytes(server: ImageServer, photo_paths: list[Path]) -> None:
    urls = server.image_urls(5)
    assert len(set(urls)) == 5
    assert urls[0] == f"{server.base_url}/img/0/{photo_paths[0].name}"
    status, headers, body = _get(urls[4])  # 4 % 3 == 1
    assert status == 200
    assert headers["Content-Type"] == "image/jpeg"
    assert int(headers["Content-Length"]) == len(body)
    assert body == photo_paths[1].read_bytes()
    status, _, body = _get(server.url("/private/2/x.jpg"))
    assert status == 200 and body == photo_paths[2].read_bytes()


def test_hits_counted_including_404(server: ImageServer) -> None:
    server.reset_hits()
    for _ in range(3):
        _get(server.url("/img/7/a.jpg?q=1"))
    assert _get(server.url("/nope"))[0] == 404
    assert server.hits["/img/7/a.jpg"] == 3
    assert server.hits["/nope"] == 1
    server.reset_hits()
    assert not server.hits


def test_first_hit_time_for_start_up_benchmarks(server: ImageServer) -> None:
    """`/_first-hit` answers when the first request since `/_reset` came; the two admin paths are not counted."""
    reset = urllib.request.Request(server.url("/_reset"), method="POST")
    assert urllib.request.urlopen(reset, timeout=5).status == 200
    assert json.loads(_get(server.url("/_first-hit"))[2]) == {"first_hit": None}
    before = time.time()
    _get(server.url("/img/3/a.jpg"))
    _get(server.url("/img/4/a.jpg"))
    first = json.loads(_get(server.url("/_first-hit"))[2])["first_hit"]
    assert before <= first <= time.time()
    assert "/_first-hit" not in server.hits and "/_reset" not in server.hits
    urllib.request.urlopen(reset, timeout=5)
    assert server.first_hit is None and not server.hits


def test_keepalive_and_flaky_retry(server: ImageServer, photo_paths: list[Path]) -> None:
    async def go() -> list[int]:
        codes = []
        connector = aiohttp.TCPConnector(limit=1)  # One connection: all requests reuse it (keep-alive).
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(4):
                async with session.get(server.url("/fault/flaky/2/tok-a")) as resp:
                    body = await resp.read()
                    codes.append(resp.status)
                    if resp.status == 503:
                        assert resp.headers["Retry-After"] == "0"
                    else:
                        assert body == photo_paths[0].read_bytes()
        return codes

    assert asyncio.run(go()) == [503, 503, 200, 200]


def test_status_endpoint(server: ImageServer) -> None:
    status, headers, _ = _get(server.url("/fault/status/429"))
    assert status == 429 and headers["Retry-After"] == "0"
    status, headers, _ = _get(server.url("/fault/status/500"))
    assert status == 500 and "Retry-After" not in headers


def test_bomb_png_declares_huge_size(server: ImageServer, monkeypatch: pytest.MonkeyPatch) -> None:
    status, headers, body = _get(server.url("/fault/bomb.png"))
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert len(body) < 1_000_000
    assert sniff_content_type(body) == "image/png"
    # With Pillow's default limit, open() itself refuses it: that is the point of the endpoint.
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(body))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with Image.open(io.BytesIO(body)) as im:  # Header only: nothing is decoded.
        assert im.size == (30_000, 30_000)


def test_small_bomb_decodes_to_zeros() -> None:
    # The same builder at a decodable size proves the IDAT stream and CRCs are valid, not just the header.
    with Image.open(io.BytesIO(build_png_bomb(64))) as im:
        im.load()
        assert im.size == (64, 64) and im.mode == "1"
        assert im.getextrema() == (0, 0)


def test_redirects(server: ImageServer) -> None:
    status, headers, _ = _get(server.url("/fault/loop/a"), follow=False)
    assert status == 302 and headers["Location"] == "/fault/loop/b"
    status, headers, _ = _get(server.url("/fault/loop/b"), follow=False)
    assert status == 302 and headers["Location"] == "/fault/loop/a"
    status, headers, _ = _get(server.url("/fault/to-link-local"), follow=False)
    assert status == 302 and headers["Location"].startswith("http://169.254.169.254/")
    port = server.base_url.rsplit(":", 1)[1]
    status, headers, _ = _get(server.url("/fault/to-localhost-name"), follow=False)
    assert headers["Location"] == f"http://localhost:{port}/img/0/a.jpg"
    status, headers, _ = _get(server.url("/fault/redirect/2"), follow=False)
    assert status == 302 and headers["Location"] == "/fault/redirect/1"
    status, _, body = _get(server.url("/fault/redirect/2"))  # A good chain ends at image 0.
    assert status == 200 and sniff_content_type(body) == "image/jpeg"


def test_header_and_body_faults(server: ImageServer, photo_paths: list[Path]) -> None:
    image0 = photo_paths[0].read_bytes()
    status, headers, body = _get(server.url("/fault/truncated.jpg"))
    assert status == 200 and body == image0[: len(image0) // 2] and headers["Content-Type"] == "image/jpeg"
    status, headers, body = _get(server.url("/fault/html-as-image.jpg"))
    assert headers["Content-Type"] == "image/jpeg" and body.startswith(b"<!DOCTYPE html>")
    status, headers, body = _get(server.url("/fault/empty.jpg"))
    assert status == 200 and body == b""
    assert _get(server.url("/fault/not-found-image.jpg"))[0] == 404

    async def robots_tags() -> list[str]:
        async with aiohttp.ClientSession() as session, session.get(server.url("/fault/noindex.jpg")) as resp:
            await resp.read()
            return resp.headers.getall("X-Robots-Tag")

    assert asyncio.run(robots_tags()) == ["nofollow", "noindex"]
    assert _get(server.url("/fault/noai.jpg"))[1]["X-Robots-Tag"] == "noai"


def test_robots_txt(server: ImageServer, photo_paths: list[Path]) -> None:
    status, headers, body = _get(server.url("/robots.txt"))
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert b"Disallow: /private/" in body
    with ImageServer({"a.png": b"\x89PNG\r\n\x1a\n" + bytes(20)}) as bare:
        assert _get(bare.url("/robots.txt"))[0] == 404
        status, headers, _ = _get(bare.image_urls(1)[0])
        assert status == 200 and headers["Content-Type"] == "image/png"


def test_huge_is_streamed_with_length(server: ImageServer) -> None:
    async def head_of(path: str) -> tuple[str | None, bool, bytes]:
        async with aiohttp.ClientSession() as session, session.get(server.url(path)) as resp:
            first = await resp.content.readexactly(3)
            return resp.headers.get("Content-Length"), resp.headers.get("Transfer-Encoding") == "chunked", first

    assert asyncio.run(head_of("/fault/huge.jpg")) == (str(50 * 1024 * 1024), False, b"\xff\xd8\xff")
    assert asyncio.run(head_of("/fault/huge-chunked.jpg")) == (None, True, b"\xff\xd8\xff")


def test_stop_is_prompt_with_slow_body_in_flight(photo_paths: list[Path]) -> None:
    srv = ImageServer(photo_paths[:1]).start()
    host, port = srv.base_url.removeprefix("http://").split(":")
    got_headers = threading.Event()

    def slow_client() -> None:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"GET /fault/slow-body HTTP/1.1\r\nHost: x\r\n\r\n")
            if b"200" in sock.recv(1024):
                got_headers.set()
            while sock.recv(65536):  # Drain until the server closes the connection.
                pass

    client = threading.Thread(target=slow_client, daemon=True)
    client.start()
    assert got_headers.wait(5)
    srv.stop()
    t0 = time.monotonic()
    client.join(2)
    assert not client.is_alive(), "server did not close the slow connection"
    assert time.monotonic() - t0 < 2

    t0 = time.monotonic()
    srv2 = ImageServer(photo_paths[:1]).start()

    def slow_headers_client() -> None:
        with contextlib.suppress(OSError):  # The server hangs up without a response: expected.
            _get(srv2.url("/fault/slow-headers"))

    slow = threading.Thread(target=slow_headers_client, daemon=True)
    slow.start()
    time.sleep(0.2)
    srv2.stop()
    assert time.monotonic() - t0 < 2
    srv2.stop()  # Idempotent.


def test_cli_prints_base_url(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "infra.loopback_server", "--images", str(PHOTOS), "--delay", "0.01"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        base = proc.stdout.readline().strip()
        assert base.startswith("http://127.0.0.1:")
        status, headers, _ = _get(base + "/img/0/x.jpg")
        assert status == 200 and headers["Content-Type"] == "image/jpeg"
    finally:
        proc.terminate()
        assert proc.wait(5) == 0
