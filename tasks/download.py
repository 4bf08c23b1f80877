"""The downloader: concurrent, bounded, guarded HTTP fetching of image URLs.

Every failure becomes a FetchResult with a status and an error class; nothing raises out of `fetch`.
Redirects are followed here (not by the client) so that every hop passes the SSRF guard and robots.txt.
"""

from __future__ import annotations

import asyncio
import random
import socket
from dataclasses import dataclass
from urllib.parse import urljoin

import aiohttp

from infra.settings import DownloadConfig
from tasks.lib.openai_http import retry_after_seconds
from tasks.robots import ROBOTS_MAX_BYTES, RobotsCache, RobotsUnavailable, x_robots_refusal
from tasks.ssrf import AddressPolicy, BlockedURL, GuardedResolver

REDIRECTS = frozenset({301, 302, 303, 307, 308})
TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
IMAGE_LIKE_TYPES = ("application/octet-stream", "binary/octet-stream", "application/binary")
MAX_RETRY_AFTER = 30.0
# robots.txt failures that say the host itself cannot be reached: the sample records that class, not
# robots_unavailable (the robots.txt outcome stays in the error text).
HOST_FAILURES = frozenset({"bad_url", "dns", "connect"})


@dataclass(slots=True)
class FetchResult:
    status: str  # "ok", "error" or "opted_out"
    data: bytes | None = None
    error: str | None = None
    error_class: str | None = None
    http_status: int | None = None
    content_type: str | None = None
    final_url: str | None = None
    attempts: int = 1


class FetchError(Exception):
    def __init__(self, error_class: str, message: str, *, transient: bool = False, http_status=None,
                 retry_after: float | None = None, status: str = "error"):
        super().__init__(message)
        self.error_class = error_class
        self.transient = transient
        self.http_status = http_status
        self.retry_after = retry_after
        self.status = status


class Downloader:
    """Use as `async with Downloader(cfg) as d: await d.fetch(url)`; one per shard task (per event loop)."""

    def __init__(self, cfg: DownloadConfig):
        self.cfg = cfg
        self.policy = AddressPolicy.from_cidrs(cfg.allow_cidrs)
        self.session: aiohttp.ClientSession | None = None
        self.robots = RobotsCache(cfg.user_agent_token, self._fetch_robots_text)

    async def __aenter__(self) -> Downloader:
        connector = aiohttp.TCPConnector(
            limit=self.cfg.concurrency,
            limit_per_host=self.cfg.per_host,
            resolver=GuardedResolver(self.policy),
            ttl_dns_cache=300,
            family=socket.AF_UNSPEC,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=self.cfg.total_timeout,
                sock_connect=self.cfg.connect_timeout,
                sock_read=self.cfg.read_timeout,
            ),
            headers={"User-Agent": self.cfg.user_agent, "Accept": "image/*,*/*;q=0.5"},
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,  # never route through a proxy from the environment
        )
        return self

    async def __aexit__(self, *exc) -> None:
        if self.session is not None:
            await self.session.close()

    async def fetch(self, url: str) -> FetchResult:
        """Download one image URL; retries transient failures with exponential backoff."""
        attempt = 0
        while True:
            attempt += 1
            try:
                result = await self._fetch_once(url)
                result.attempts = attempt
                return result
            except FetchError as e:
                if not e.transient or attempt > self.cfg.retries:
                    return FetchResult(status=e.status, error=str(e), error_class=e.error_class,
                                       http_status=e.http_status, attempts=attempt)
                delay = self.cfg.backoff * 2 ** (attempt - 1) * (1 + random.random() / 4)
                if e.retry_after is not None:
                    delay = max(delay, min(e.retry_after, MAX_RETRY_AFTER))
                await asyncio.sleep(delay)

    async def _fetch_once(self, url: str) -> FetchResult:
        body, resp_info = await self._get(url, self.cfg.max_bytes, image=True)
        status, content_type, final_url = resp_info
        return FetchResult(status="ok", data=body, http_status=status, content_type=content_type,
                           final_url=final_url)

    async def _fetch_robots_text(self, url: str) -> tuple[int, str]:
        try:
            body, (status, _, _) = await self._get(url, ROBOTS_MAX_BYTES, image=False)
        except FetchError as e:
            if e.error_class == "blocked":
                raise BlockedURL(str(e)) from None
            if e.http_status is not None:
                return e.http_status, ""
            raise
        return status, body.decode("utf-8", "replace")

    async def _get(self, url: str, max_bytes: int, *, image: bool):
        """GET following redirects by hand. Returns (body, (status, content type, final URL))."""
        assert self.session is not None, "use Downloader as an async context manager"
        seen = {url}
        current = url
        for _hop in range(self.cfg.max_redirects + 1):
            try:
                self.policy.check_url(current)
                if image and self.cfg.respect_robots_txt:
                    try:
                        reason = await self.robots.refusal(current)
                    except RobotsUnavailable as e:
                        cls = e.cause_class if e.cause_class in HOST_FAILURES else "robots_unavailable"
                        raise FetchError(cls, str(e)) from None
                    if reason:
                        raise FetchError("robots_txt", reason, status="opted_out")
                async with self.session.get(current, allow_redirects=False) as resp:
                    if resp.status in REDIRECTS:
                        location = resp.headers.get("Location")
                        if not location:
                            raise FetchError("bad_redirect", f"HTTP {resp.status} without a Location header",
                                             http_status=resp.status)
                        nxt = urljoin(current, location)
                        if nxt in seen:
                            raise FetchError("redirect_loop", f"redirect loop back to {nxt}",
                                             http_status=resp.status)
                        seen.add(nxt)
                        current = nxt
                        continue
                    return await self._read(resp, current, max_bytes, image), (
                        resp.status, resp.content_type, current)
            except FetchError:
                raise
            except BlockedURL as e:
                raise FetchError("blocked", str(e)) from None
            except aiohttp.ClientConnectorError as e:
                if isinstance(e.os_error, BlockedURL):
                    raise FetchError("blocked", str(e.os_error)) from None
                if isinstance(e, aiohttp.ClientConnectorDNSError):
                    raise FetchError("dns", f"cannot resolve host: {e.os_error}") from None
                raise FetchError("connect", f"cannot connect: {e.os_error}", transient=True) from None
            except (TimeoutError, aiohttp.ServerTimeoutError):
                raise FetchError("timeout", f"timed out (limits: connect {self.cfg.connect_timeout}s, "
                                 f"read {self.cfg.read_timeout}s, total {self.cfg.total_timeout}s)",
                                 transient=True) from None
            except aiohttp.InvalidURL as e:
                raise FetchError("bad_url", f"invalid URL: {e}") from None
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError,
                    aiohttp.ClientOSError) as e:
                raise FetchError("connection", f"{type(e).__name__}: {e}", transient=True) from None
            except aiohttp.ClientResponseError as e:
                raise FetchError("bad_response", f"malformed response: {e.message}") from None
            except aiohttp.ClientError as e:
                raise FetchError("client", f"{type(e).__name__}: {e}") from None
            except UnicodeError as e:
                raise FetchError("bad_url", f"invalid host name: {e}") from None
            except ValueError as e:  # e.g. urljoin() on a malformed Location header ("http://[::1/x")
                raise FetchError("bad_url", f"invalid URL: {e}") from None
        raise FetchError("too_many_redirects", f"more than {self.cfg.max_redirects} redirects")

    async def _read(self, resp: aiohttp.ClientResponse, url: str, max_bytes: int, image: bool) -> bytes:
        if image and self.cfg.respect_x_robots_tag:
            directive = x_robots_refusal(resp.headers.getall("X-Robots-Tag", []),
                                         self.cfg.user_agent_token, self.cfg.disallowed_directives)
            if directive:
                raise FetchError("x_robots_tag", f"X-Robots-Tag: {directive}", status="opted_out",
                                 http_status=resp.status)
        if resp.status in TRANSIENT_HTTP:
            raise FetchError(f"http_{resp.status}", f"HTTP {resp.status} {resp.reason or ''}".strip(),
                             transient=True, http_status=resp.status,
                             retry_after=retry_after_seconds(resp.headers.get("Retry-After")))
        if resp.status != 200:
            raise FetchError(f"http_{resp.status}", f"HTTP {resp.status} {resp.reason or ''}".strip(),
                             http_status=resp.status)
        ctype = resp.content_type or ""
        if image and ctype and not (ctype.startswith("image/") or ctype in IMAGE_LIKE_TYPES):
            raise FetchError("not_image", f"content-type {ctype!r} is not an image", http_status=resp.status)
        if image and resp.content_length is not None and resp.content_length > max_bytes:
            raise FetchError("too_large", f"Content-Length {resp.content_length} exceeds the {max_bytes}-byte cap",
                             http_status=resp.status)
        chunks, size = [], 0
        async for chunk in resp.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > max_bytes:
                if not image:  # robots.txt: parse the first max_bytes (RFC 9309 2.5), never drop the whole file
                    chunks.append(chunk[: len(chunk) - (size - max_bytes)])
                    break
                raise FetchError("too_large", f"body exceeds the {max_bytes}-byte cap", http_status=resp.status)
            chunks.append(chunk)
        return b"".join(chunks)
