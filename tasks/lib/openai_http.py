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

    def __reduce__(self):  # keyword-only arguments: pickle it with them
        return _attempt_error, (str(self), self.transient, self.retry_after)


def _attempt_error(message: str, transient: bool, retry_after: float | None) -> AttemptError:
    return AttemptError(message, transient=transient, retry_after=retry_after)


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


def server_address(endpoint: str, role: str, backend: str, setting: str) -> str:
    """The base URL (without a trailing slash) of an OpenAI-compatible server; ModelUnavailable (for
    `role`/`backend`, naming the `setting`) when `endpoint` is not an http(s) base URL."""
    parts = urlsplit(endpoint.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ModelUnavailable(
            role, backend, f"{setting} {endpoint!r} is not an http(s) base URL (e.g. http://vllm:8000/v1)"
        )
    return endpoint.strip().rstrip("/")


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


class CircuitBreaker:
    """Once `threshold` requests in a row have failed (after their retries), the requests still to come fail at
    once: a dead or hanging server costs a few timeouts, not a timeout per request."""

    def __init__(self, threshold: int = 8):
        self.threshold, self.failures, self.last = threshold, 0, None

    def refusal(self) -> str | None:
        if self.failures < self.threshold:
            return None
        return f"circuit_open: {self.failures} requests in a row failed (last: {self.last}); not sent"

    def record(self, error: str | None) -> None:
        self.failures, self.last = (self.failures + 1, error) if error else (0, self.last)


async def with_retries(attempt: Callable[[], Awaitable[_T]], *, retries: int, backoff: float, max_backoff: float,
                       max_retry_after: float, breaker: CircuitBreaker | None = None
                       ) -> tuple[_T | None, str | None, int]:
    """Await `attempt()` until it succeeds, retrying transient AttemptErrors with exponential backoff and jitter
    (at least Retry-After, capped); with an open `breaker` nothing more is sent. Returns (result, None, attempts)
    or (None, error message, attempts)."""
    n = 0
    while True:
        refused = breaker.refusal() if breaker else None
        if refused:
            return None, refused, n
        n += 1
        try:
            result = await attempt()
            if breaker:
                breaker.record(None)
            return result, None, n
        except AttemptError as e:
            if not e.transient or n > retries:
                error = f"{e}" + (f" (after {n} attempts)" if n > 1 else "")
                if breaker:
                    breaker.record(error)
                return None, error, n
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


def server_options(role: str, section: str, cfg) -> dict:
    """The options of an `openai` backend from a stage config with endpoint, model, concurrency and timeout;
    ModelUnavailable (naming the spec fields) when the server is not named."""
    if not (cfg.endpoint and cfg.model):
        raise ModelUnavailable(role, "openai", f"set {section}.endpoint (an OpenAI-compatible server such as `vllm "
                               f"serve` or llama.cpp's server) and {section}.model")
    return {"endpoint": cfg.endpoint, "model": cfg.model, "concurrency": cfg.concurrency, "timeout": cfg.timeout}


async def _probe(url: str, body: bytes, headers: dict[str, str], timeout: float) -> None:
    async with chat_session(1, timeout, headers) as session:
        message_text(await post_chat(session, url, body, timeout))


def check_server(endpoint: str, model: str, headers: dict[str, str], *, role: str, api_key_env: str,
                 timeout: float = 30.0) -> None:
    """One 1-token chat completion, once, before any shard: a server that is down, hangs, refuses the key or lacks
    the model fails here with what to do (ModelUnavailable), instead of failing every sample of every shard."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Say OK."}], "max_tokens": 1,
                       "temperature": 0}).encode()
    try:
        run_sync(_probe(endpoint + "/chat/completions", body, headers, timeout))
        return
    except AttemptError as e:
        kind = str(e).split(":", 1)[0]
        how = {
            "http_401": f"the server refused the API key: set {api_key_env} ({e})",
            "http_403": f"the server refused the API key: set {api_key_env} ({e})",
            "http_404": f"the server at {endpoint} does not serve model {model!r} ({e})",
            "timeout": f"{endpoint} took the request but gave no answer to a 1-token completion within {timeout:.0f} s",
            "connection": f"cannot connect to {endpoint} ({e})",
        }.get(kind, f"{endpoint} is not a working OpenAI-compatible server: {e}")
    raise ModelUnavailable(role, "openai", how)  # outside the handler: no __context__ to pickle
