"""Opt-outs without a network: X-Robots-Tag parsing, RFC 9309 rule matching, and RobotsCache with a fake fetcher."""

from __future__ import annotations

import asyncio
import collections

import pytest

from tasks.robots import RobotsCache, RobotsRules, RobotsUnavailable, x_robots_refusal
from tasks.ssrf import BlockedURL

pytestmark = pytest.mark.timeout(30)

DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex", "none")


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], None),
        (["noai"], "noai"),
        (["NoAI"], "noai"),
        ([" noimageai "], "noimageai"),
        (["none"], "none"),
        (["nofollow"], None),
        (["all"], None),
        (["nofollow", "noindex"], "noindex"),  # several header lines
        (["nofollow, noimageindex"], "noimageindex"),  # one comma-separated line
        (["otherbot: noai, noimageai"], None),  # another agent's directives
        (["capfactory: noai"], "noai"),
        (["CapFactory : noimageai"], "noimageai"),  # agent names are case-insensitive
        (["capfactory: nofollow"], None),
        (["otherbot: noai", "noindex"], "noindex"),
        (["unavailable_after: 25 Jun 2010 15:00:00 PST"], None),  # a 'name: value' is not an agent rule for us
        (["noindexing"], None),  # whole directives only
    ],
)
def test_x_robots_refusal(values: list[str], expected: str | None) -> None:
    assert x_robots_refusal(values, "capfactory", DIRECTIVES) == expected


def test_x_robots_refusal_directives_and_token_are_configurable() -> None:
    assert x_robots_refusal(["noindex"], "capfactory", ("noai",)) is None
    assert x_robots_refusal(["noindex"], "capfactory", ("NOINDEX",)) == "noindex"
    assert x_robots_refusal(["otherbot: noai"], "OtherBot", DIRECTIVES) == "noai"


@pytest.mark.parametrize(
    ("robots", "path", "allowed"),
    [
        ("User-agent: *\nDisallow: /private/\n", "/private/a.jpg", False),
        ("User-agent: *\nDisallow: /private/\n", "/public/a.jpg", True),
        ("User-agent: *\nDisallow:\n", "/anything", True),  # empty Disallow allows all
        ("User-agent: *\nDisallow: /\n", "/", False),
        ("", "/x", True),
        # wildcards and end anchors (RFC 9309 2.2.3)
        ("User-agent: *\nDisallow: /*.jpg$\n", "/img/0/a.jpg", False),
        ("User-agent: *\nDisallow: /*.jpg$\n", "/img/0/a.jpg?x=1", True),
        ("User-agent: *\nDisallow: /*.jpg$\n", "/img/0/a.png", True),
        ("User-agent: *\nDisallow: /*.jpg\n", "/img/0/a.jpg?x=1", False),
        ("User-agent: *\nDisallow: /img/*/thumb\n", "/img/7/thumb-1.png", False),
        ("User-agent: *\nDisallow: /*?\n", "/search?q=1", False),
        ("User-agent: *\nDisallow: /*?\n", "/search", True),
        ("User-agent: *\nDisallow: /a$\n", "/a$b", True),  # a literal '$' in the URL is not the anchor
        # longest match wins, whatever the order; allow wins a tie (RFC 9309 2.2.2)
        ("User-agent: *\nDisallow: /img/\nAllow: /img/ok/\n", "/img/ok/a.jpg", True),
        ("User-agent: *\nAllow: /img/ok/\nDisallow: /img/\n", "/img/no/a.jpg", False),
        ("User-agent: *\nDisallow: /img/ok/\nAllow: /img/\n", "/img/ok/a.jpg", False),
        ("User-agent: *\nDisallow: /img\nAllow: /img\n", "/img/a.jpg", True),
        # groups: ours, else '*'
        ("User-agent: otherbot\nDisallow: /\n", "/a.jpg", True),
        ("User-agent: CapFactory\nDisallow: /\n\nUser-agent: *\nAllow: /\n", "/a.jpg", False),
        ("User-agent: *\nDisallow: /\n\nUser-agent: capfactory\nAllow: /\n", "/a.jpg", True),
        ("User-agent: capfactory\nUser-agent: otherbot\nDisallow: /a\n", "/a.jpg", False),  # shared group
        ("User-agent: capfactory\nDisallow: /a\n\nUser-agent: capfactory\nDisallow: /b\n", "/b.jpg", False),
        ("User-agent: capfactory/1.0\nDisallow: /\n", "/a.jpg", False),  # version suffix ignored
        ("User-agent: capfactoryx\nDisallow: /\n", "/a.jpg", True),  # a product token matches exactly
        ("User-agent: factory\nDisallow: /\n", "/a.jpg", True),  # ... not as a substring
        ("User-agent: capfactory\n\nUser-agent: *\nDisallow: /\n", "/a.jpg", False),  # blank lines do not split
        ("User-agent: capfactory\nAllow: /x\n\nUser-agent: *\nDisallow: /\n", "/a.jpg", True),  # ours only
        # syntax: comments, BOM, CRLF, unknown lines, rules outside a group
        ("\ufeffUser-agent: * # all\r\nDisallow: /p/ # private\r\n", "/p/a.jpg", False),
        ("Disallow: /\nUser-agent: *\nAllow: /x\n", "/a.jpg", True),
        ("User-agent: *\nSitemap: http://example.test/s.xml\nCrawl-delay: 5\nDisallow: /p\n", "/p.jpg", False),
        ("user-AGENT: *\nDISALLOW: /p\n", "/p.jpg", False),
        # percent-encoding is compared in one normal form
        ("User-agent: *\nDisallow: /caf%C3%A9/\n", "/café/a.jpg", False),
        ("User-agent: *\nDisallow: /café/\n", "/caf%c3%a9/a.jpg", False),
    ],
)
def test_robots_rules_rfc9309(robots: str, path: str, allowed: bool) -> None:
    assert RobotsRules.parse(robots).allows("capfactory", "http://example.test" + path) is allowed


class FakeFetcher:
    """robots.txt 'fetches' answered from a table, counted per URL; a tiny sleep makes callers overlap."""

    def __init__(self, answers: dict[str, tuple[int, str] | BaseException]):
        self.answers = answers
        self.calls: collections.Counter[str] = collections.Counter()

    async def __call__(self, url: str) -> tuple[int, str]:
        self.calls[url] += 1
        await asyncio.sleep(0.02)
        answer = self.answers[url]
        if isinstance(answer, BaseException):
            raise answer
        return answer


def _refusals(fetcher: FakeFetcher, urls: list[str]) -> list[str | None]:
    """Each URL's refusal; a RobotsUnavailable is returned as 'unavailable: <message>'."""

    async def one(cache: RobotsCache, url: str) -> str | None:
        try:
            return await cache.refusal(url)
        except RobotsUnavailable as e:
            return f"unavailable: {e}"

    async def go() -> list[str | None]:
        cache = RobotsCache("capfactory", fetcher)
        return list(await asyncio.gather(*(one(cache, u) for u in urls)))

    return asyncio.run(go())


def test_one_fetch_per_origin_under_concurrency() -> None:
    fetcher = FakeFetcher(
        {
            "http://a.test/robots.txt": (200, "User-agent: *\nDisallow: /private/\n"),
            "http://a.test:8080/robots.txt": (200, "User-agent: *\nDisallow: /\n"),
            "https://a.test/robots.txt": (404, ""),
        }
    )
    urls = [f"http://a.test/img/{i}.jpg" for i in range(30)] + [f"http://a.test/private/{i}.jpg" for i in range(30)]
    urls += [f"http://a.test:8080/img/{i}.jpg" for i in range(10)] + [f"https://a.test/private/{i}" for i in range(10)]
    got = _refusals(fetcher, urls)
    assert got[:30] == [None] * 30
    assert all(r and "disallows" in r and "http://a.test" in r for r in got[30:60])
    assert all(r and "http://a.test:8080" in r for r in got[60:70])  # another port is another origin
    assert got[70:] == [None] * 10  # https has its own (missing) robots.txt
    assert fetcher.calls == {
        "http://a.test/robots.txt": 1,
        "http://a.test:8080/robots.txt": 1,
        "https://a.test/robots.txt": 1,
    }


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 451])
def test_4xx_allows_all(status: int) -> None:
    fetcher = FakeFetcher({"http://a.test/robots.txt": (status, "User-agent: *\nDisallow: /\n")})
    assert _refusals(fetcher, ["http://a.test/x.jpg", "http://a.test/private/y"]) == [None, None]


@pytest.mark.parametrize("status", [500, 502, 503, 599, 304])
def test_5xx_and_other_statuses_disallow_all(status: int) -> None:
    fetcher = FakeFetcher({"http://a.test/robots.txt": (status, "")})
    got = _refusals(fetcher, ["http://a.test/x.jpg", "http://a.test/y.jpg"])
    assert all(r and r.startswith("unavailable: ") and f"HTTP {status}" in r for r in got)
    assert fetcher.calls["http://a.test/robots.txt"] == 1


@pytest.mark.parametrize("exc", [ConnectionRefusedError("refused"), TimeoutError(), RuntimeError("boom")])
def test_fetch_exception_disallows_all(exc: Exception) -> None:
    fetcher = FakeFetcher({"http://a.test/robots.txt": exc})
    got = _refusals(fetcher, ["http://a.test/x.jpg"] * 5)
    assert all(r and r.startswith("unavailable: ") and type(exc).__name__ in r for r in got)
    assert fetcher.calls["http://a.test/robots.txt"] == 1


def test_blocked_url_propagates_to_every_caller() -> None:
    fetcher = FakeFetcher({"http://a.test/robots.txt": BlockedURL("address 10.0.0.1 is private; refused")})

    async def go() -> list[object]:
        cache = RobotsCache("capfactory", fetcher)
        first = await asyncio.gather(*(cache.refusal("http://a.test/x.jpg") for _ in range(3)), return_exceptions=True)
        later = await asyncio.gather(cache.refusal("http://a.test/y.jpg"), return_exceptions=True)
        return [*first, *later]

    got = asyncio.run(go())
    assert all(isinstance(e, BlockedURL) and "10.0.0.1" in str(e) for e in got), got
    assert fetcher.calls["http://a.test/robots.txt"] == 1


def test_a_cancelled_caller_does_not_cancel_the_shared_fetch() -> None:
    fetcher = FakeFetcher({"http://a.test/robots.txt": (200, "User-agent: *\nDisallow: /p/\n")})

    async def go() -> tuple[str | None, str | None]:
        cache = RobotsCache("capfactory", fetcher)
        first = asyncio.ensure_future(cache.refusal("http://a.test/p/1"))
        await asyncio.sleep(0.005)  # the fetch is in flight
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        return await cache.refusal("http://a.test/p/2"), await cache.refusal("http://a.test/q")

    disallowed, allowed = asyncio.run(go())
    assert disallowed and "disallows" in disallowed
    assert allowed is None
    assert fetcher.calls["http://a.test/robots.txt"] == 1
