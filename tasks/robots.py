"""Opt-outs: the `X-Robots-Tag` response header and robots.txt per host (RFC 9309), cached per process."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from urllib.parse import quote, unquote, urlsplit

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


def _normalise(path: str) -> str:
    """One percent-encoding form for rule paths and URL paths alike (UTF-8, upper-case hex)."""
    return quote(unquote(path), safe="/?&=:;@!$'()*+,~")


@lru_cache(maxsize=4096)
def _rule_regex(pattern: str) -> re.Pattern[str]:
    """A rule path as a regex: '*' matches any sequence, a final '$' anchors the end (RFC 9309 2.2.3)."""
    anchored = pattern.endswith("$")
    parts = (pattern[:-1] if anchored else pattern).split("*")
    return re.compile(".*".join(re.escape(_normalise(p)) for p in parts) + ("$" if anchored else ""))


@dataclass
class RobotsRules:
    """A parsed robots.txt (RFC 9309). The stdlib's RobotFileParser is not used: it matches literal prefixes in
    file order, so `Disallow: /*.jpg$` never matched, and it drops a trailing '?' (`Disallow: /*?`)."""

    groups: list[tuple[set[str], list[tuple[str, bool]]]] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> RobotsRules:
        rules = cls()
        agents: set[str] | None = None  # the group being read; a user-agent line after rules starts a new one
        lines: list[tuple[str, bool]] = []
        for raw in text.removeprefix("\ufeff").splitlines():
            key, sep, value = raw.split("#", 1)[0].partition(":")
            key, value = key.strip().lower(), value.strip()
            if not sep:
                continue
            if key == "user-agent":
                if agents is None or lines:
                    agents, lines = set(), []
                    rules.groups.append((agents, lines))
                agents.add(value.split("/")[0].strip().lower())
            elif key in ("allow", "disallow") and agents is not None and value:
                lines.append((value, key == "allow"))
        return rules

    def allows(self, ua_token: str, url: str) -> bool:
        """Our product token's groups (all of them, merged), else the '*' groups; the longest matching rule
        wins and allow wins a tie (RFC 9309 2.2.1-2.2.2). No matching rule: allowed."""
        token = ua_token.lower()
        rules = [r for agents, lines in self.groups if token in agents for r in lines]
        if not any(token in agents for agents, _ in self.groups):
            rules = [r for agents, lines in self.groups if "*" in agents for r in lines]
        parts = urlsplit(url)
        path = _normalise((parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
        best: tuple[int, bool] | None = None
        for pattern, allow in rules:
            if _rule_regex(pattern).match(path):
                best = max(best or (-1, False), (len(pattern), allow))
        return True if best is None else best[1]


# 4xx: robots.txt unavailable, everything may be fetched (RFC 9309 2.3.1.3).
ALLOW_ALL = "allow_all"


# fetch_text(url) -> (http status, body text); raises on network errors (with an `error_class` attribute, if any)
TextFetcher = Callable[[str], Awaitable[tuple[int, str]]]


class RobotsUnavailable(Exception):
    """robots.txt could not be read (5xx or a network error). RFC 9309 says to assume complete disallow; the
    sample is recorded as an error rather than an opt-out, so `--retry-failed` tries it again later.
    `cause_class` is the fetch error's class (its `error_class` attribute, e.g. dns), None for an HTTP answer."""

    def __init__(self, message: str, cause_class: str | None = None):
        super().__init__(message)
        self.cause_class = cause_class


class RobotsCache:
    """One robots.txt fetch per host per process, shared by all concurrent requests to that host."""

    def __init__(self, ua_token: str, fetch_text: TextFetcher):
        self.ua_token = ua_token
        self._fetch_text = fetch_text
        self._rules: dict[str, asyncio.Future] = {}

    async def _load(self, origin: str) -> RobotsRules | str | tuple[str, str | None]:
        """Parsed rules, ALLOW_ALL, or (why the host counts as disallowing everything, the fetch error's class)."""
        try:
            status, text = await self._fetch_text(f"{origin}/robots.txt")
        except BlockedURL:
            raise
        except Exception as e:
            # 5xx / network error: unreachable, assume complete disallow (RFC 9309 2.3.1.4).
            return (f"robots.txt unreachable ({type(e).__name__}: {e}); treated as disallow-all",
                    getattr(e, "error_class", None))
        if 200 <= status < 300:
            return RobotsRules.parse(text)
        if 400 <= status < 500:
            return ALLOW_ALL
        return f"robots.txt answered HTTP {status}; treated as disallow-all", None

    async def refusal(self, url: str) -> str | None:
        """None if robots.txt lets us fetch `url`, else why not. Raises RobotsUnavailable when robots.txt could
        not be read, and BlockedURL for a host the SSRF guard refuses."""
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        future = self._rules.get(origin)
        if future is None:
            future = asyncio.ensure_future(self._load(origin))
            self._rules[origin] = future
        rules = await asyncio.shield(future)
        if rules == ALLOW_ALL:
            return None
        if isinstance(rules, tuple):
            raise RobotsUnavailable(*rules)
        if rules.allows(self.ua_token, url):
            return None
        return f"robots.txt of {origin} disallows this path for {self.ua_token!r}"
