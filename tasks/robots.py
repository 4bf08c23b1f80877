"""Opt-outs: the `X-Robots-Tag` response header and robots.txt per host (RFC 9309), cached per process."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import urlsplit
from urllib.robotparser import RobotFileParser

from tasks.ssrf import BlockedURL

ROBOTS_MAX_BYTES = 512 * 1024  # RFC 9309: parse at least 500 KiB


def x_robots_refusal(values: Iterable[str], ua_token: str, directives: Iterable[str]) -> str | None:
    """The first disallowed directive in X-Robots-Tag header values that applies to us, else None.

    A value is `directive, directive` (applies to every agent) or `agent: directive, ...` (applies to
    that agent only), as img2dataset reads it.
    """
    wanted = {d.lower() for d in directives}
    token = ua_token.lower()
    for value in values:
        agent, sep, rest = value.partition(":")
        agent = agent.strip().lower() if sep else None
        if agent is not None and agent != token:
            continue
        for directive in (rest if sep else value).split(","):
            if directive.strip().lower() in wanted:
                return directive.strip().lower()
    return None


# 4xx: robots.txt unavailable, everything may be fetched (RFC 9309 2.3.1.3).
ALLOW_ALL = "allow_all"


# fetch_text(url) -> (http status, body text); raises on network errors
TextFetcher = Callable[[str], Awaitable[tuple[int, str]]]


class RobotsCache:
    """One robots.txt fetch per host per process, shared by all concurrent requests to that host."""

    def __init__(self, ua_token: str, fetch_text: TextFetcher):
        self.ua_token = ua_token
        self._fetch_text = fetch_text
        self._rules: dict[str, asyncio.Future] = {}

    async def _load(self, origin: str) -> RobotFileParser | str:
        """Parsed rules, ALLOW_ALL, or the reason the host counts as disallowing everything."""
        try:
            status, text = await self._fetch_text(f"{origin}/robots.txt")
        except BlockedURL:
            raise
        except Exception as e:
            # 5xx / network error: unreachable, assume complete disallow (RFC 9309 2.3.1.4).
            return f"robots.txt unreachable ({type(e).__name__}: {e}); treated as disallow-all"
        if 200 <= status < 300:
            parser = RobotFileParser()
            parser.parse(text.splitlines())
            return parser
        if 400 <= status < 500:
            return ALLOW_ALL
        return f"robots.txt answered HTTP {status}; treated as disallow-all"

    async def refusal(self, url: str) -> str | None:
        """None if robots.txt lets us fetch `url`, else why not. Raises BlockedURL for a refused host."""
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        future = self._rules.get(origin)
        if future is None:
            future = asyncio.ensure_future(self._load(origin))
            self._rules[origin] = future
        rules = await asyncio.shield(future)
        if rules == ALLOW_ALL:
            return None
        if isinstance(rules, str):
            return rules
        if rules.can_fetch(self.ua_token, url):
            return None
        return f"robots.txt of {origin} disallows this path for {self.ua_token!r}"
