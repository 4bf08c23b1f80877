"""The client side of an OpenAI-compatible chat-completions server, shared by the captioner (tasks.caption), the
fusion LLM (tasks.llm) and, through it, the LLM translator (tasks.translators).

One attempt is `post_chat` (a bounded read of the reply, parsed as JSON); it raises `AttemptError`, marked transient
(timeouts, connection errors, 408/429/5xx, with the server's Retry-After) or not (other 4xx, oversized or malformed
replies). `with_retries` retries the transient ones with exponential backoff and jitter; `message_text` takes the
assistant text out of a reply; `chat_session` is the aiohttp session (bounded connections, no cookies, no proxy from
the environment); `run_sync` runs the client's coroutines from sync code, inside a running event loop too.
`retry_after_seconds` (the Retry-After header) is the image downloader's too (tasks.download).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import random
from collections.abc import Awaitable, Callable, Coroutine
from email.utils import parsedate_to_datetime
from time import time
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp

from infra.models import ModelUnavailable

TRANSIENT_HTTP = frozenset({408, 429, 500, 502, 503, 504})  # plus any other 5xx
MAX_RESPONSE_BYTES = 1 << 20  # a chat completion with <= 4096 tokens is far below this
MAX_RETRY_AFTER = 30.0

_T = TypeVar("_T")


class AttemptError(Exception):
    def __init__(self, message: str, *, transient: bool, retry_after: float | None = None):
        super().__init__(message)
        self.transient = transient
        self.retry_after = retry_after


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or unparsable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time())
    except (TypeError, ValueError):
        return None


def server_address(endpoint: str, role: str, backend: str, setting: str) -> tuple[str, str]:
    """(base URL without a trailing slash, host[:port]) of an OpenAI-compatible server; ModelUnavailable (for
    `role`/`backend`, naming the `setting`) when `endpoint` is not an http(s) base URL."""
    parts = urlsplit(endpoint.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ModelUnavailable(
            role, backend, f"{setting} {endpoint!r} is not an http(s) base URL (e.g. http://vllm:8000/v1)"
        )
    return endpoint.strip().rstrip("/"), parts.hostname + (f":{parts.port}" if parts.port else "")


def json_headers(api_key_env: str) -> dict[str, str]:
    """JSON request headers, with `Authorization: Bearer <key>` when the environment variable `api_key_env` is set."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    api_key = os.environ.get(api_key_env, "").strip()
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


async def read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, or AttemptError (not transient) once it exceeds `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            raise AttemptError(f"bad_response: reply larger than {limit} bytes (HTTP {resp.status})", transient=False)
        chunks.append(chunk)
    return b"".join(chunks)


def message_text(payload: Any) -> str:
    """The assistant text of a chat completion; raises AttemptError (not transient) if the shape is wrong."""
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise AttemptError("bad_response: no choices[0].message.content in the reply", transient=False) from None
    if isinstance(content, list):  # some servers return content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise AttemptError(f"bad_response: content is {type(content).__name__}, not text", transient=False)
    return content.strip()


async def post_chat(session: aiohttp.ClientSession, url: str, body: bytes, timeout: float) -> Any:
    """POST one chat-completions request and return the parsed JSON reply. Raises AttemptError, marked
    transient (timeouts, connection errors, 408/429/5xx) or not."""
    try:
        async with session.post(url, data=body) as resp:
            raw = await read_bounded(resp, MAX_RESPONSE_BYTES)
            if resp.status != 200:
                detail = raw[:300].decode("utf-8", "replace").strip()
                raise AttemptError(
                    f"http_{resp.status}: {detail}",
                    transient=resp.status in TRANSIENT_HTTP or resp.status >= 500,
                    retry_after=retry_after_seconds(resp.headers.get("Retry-After")),
                )
    except AttemptError:
        raise
    except (TimeoutError, aiohttp.ServerTimeoutError):
        raise AttemptError(f"timeout: no complete reply within {timeout}s", transient=True) from None
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
        raise AttemptError(f"connection: {type(e).__name__}: {e}", transient=True) from None
    except aiohttp.ClientError as e:
        raise AttemptError(f"client: {type(e).__name__}: {e}", transient=False) from None
    try:
        return json.loads(raw)
    except ValueError:
        raise AttemptError("bad_response: reply is not JSON", transient=False) from None


def chat_session(concurrency: int, timeout: float, headers: dict[str, str]) -> aiohttp.ClientSession:
    """A session for an OpenAI-compatible server: `concurrency` connections, `timeout` seconds per attempt, no
    cookies, and never a proxy from the environment."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                 timeout=aiohttp.ClientTimeout(total=timeout), headers=headers,
                                 cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)


async def with_retries(attempt: Callable[[], Awaitable[_T]], *, retries: int, backoff: float, max_backoff: float,
                       max_retry_after: float) -> tuple[_T | None, str | None, int]:
    """Await `attempt()` until it succeeds, retrying transient AttemptErrors with exponential backoff and jitter
    (at least Retry-After, capped). Returns (result, None, attempts) or (None, error message, attempts)."""
    n = 0
    while True:
        n += 1
        try:
            return await attempt(), None, n
        except AttemptError as e:
            if not e.transient or n > retries:
                return None, f"{e}" + (f" (after {n} attempts)" if n > 1 else ""), n
            delay = min(max_backoff, backoff * 2 ** (n - 1)) * (1 + random.random() / 4)
            if e.retry_after is not None:
                delay = max(delay, min(e.retry_after, max_retry_after))
        await asyncio.sleep(delay)


def run_sync(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine to completion from sync code: asyncio.run here, or in a helper thread if this thread
    already runs an event loop (asyncio.run refuses to nest)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="capfactory-caption") as pool:
        return pool.submit(asyncio.run, coro).result()
