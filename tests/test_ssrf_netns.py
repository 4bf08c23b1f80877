"""The SSRF guard. Address-policy unit tests run anywhere (no sockets). Everything that could open a socket to a
non-loopback address (redirects to 169.254.169.254 / 10.0.0.1, IP-literal URLs, host names) is marked `netns` and
runs only inside a network namespace that has nothing but loopback, started by `test_netns_suite`:

    unshare -n sh -c 'ip link set lo up && CAPFACTORY_IN_NETNS=1 exec python -m pytest -m netns THIS_FILE'

There a connection to 10.0.0.1 fails with "network unreachable" before any packet exists, so a guard that let one
through shows up as error_class 'connect' instead of 'blocked'."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest
from aiohttp import web

from infra.loopback_server import ImageServer
from infra.settings import DownloadConfig
from tasks.download import Downloader, FetchResult
from tasks.ssrf import AddressPolicy, BlockedURL, GuardedResolver, address_kind

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
IN_NETNS = os.environ.get("CAPFACTORY_IN_NETNS") == "1"
EXPECTED_NETNS_TESTS = 30  # what `-m netns` must report as passed; update when adding netns tests


def netns(test: Callable[..., Any]) -> Callable[..., Any]:
    test = pytest.mark.skipif(not IN_NETNS, reason="runs inside the netns runner")(test)
    return pytest.mark.usefixtures("loopback_only_namespace")(pytest.mark.netns(test))


@pytest.fixture(scope="module")
def loopback_only_namespace() -> None:
    """Refuse to run unless the only interface with an address is lo, holding only loopback addresses."""
    assert IN_NETNS
    out = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True, timeout=10).stdout
    entries = [line.split()[1:4] for line in out.splitlines() if line.strip()]  # [ifname, family, cidr]
    interfaces = {ifname for ifname, _, _ in entries}
    if interfaces != {"lo"}:
        pytest.fail(f"not a loopback-only network namespace; interfaces with addresses: {sorted(interfaces)}")
    for _, _, cidr in entries:
        if not ipaddress.ip_interface(cidr).ip.is_loopback:
            pytest.fail(f"lo carries a non-loopback address {cidr}")


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Every address the client's event loop tried to connect a socket to (aiohttp connects via sock_connect)."""
    seen: list[tuple[Any, ...]] = []
    original = asyncio.selector_events.BaseSelectorEventLoop.sock_connect

    async def spy(self: Any, sock: Any, address: Any) -> Any:
        seen.append(tuple(address))
        return await original(self, sock, address)

    monkeypatch.setattr(asyncio.selector_events.BaseSelectorEventLoop, "sock_connect", spy)
    return seen


def _only_loopback(seen: list[tuple[Any, ...]]) -> bool:
    return all(ipaddress.ip_address(addr[0].split("%")[0]).is_loopback for addr in seen)


def make_cfg(**overrides: Any) -> DownloadConfig:
    base: dict[str, Any] = dict(
        allow_cidrs=("127.0.0.0/8",), connect_timeout=1, read_timeout=1, total_timeout=3, retries=1, backoff=0.01
    )
    base.update(overrides)
    return DownloadConfig(**base)


def fetch(url: str, **overrides: Any) -> FetchResult:
    async def go() -> FetchResult:
        async with Downloader(make_cfg(**overrides)) as d:
            return await d.fetch(url)

    return asyncio.run(go())


# ---- the launcher (runs normally) ---------------------------------------------------------------------------------


def test_netns_suite() -> None:
    if IN_NETNS:
        pytest.skip("already inside the namespace")
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare (util-linux) and ip (iproute2) to build a loopback-only network namespace")
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace (needs root or CAP_SYS_ADMIN): {probe.stderr.strip()}")
    script = (
        'ip link set lo up && CAPFACTORY_IN_NETNS=1 exec "$0" -m pytest -m netns tests/test_ssrf_netns.py '
        "-q -p no:cacheprovider"
    )
    proc = subprocess.run(
        ["unshare", "-n", "sh", "-c", script, sys.executable], cwd=REPO, capture_output=True, text=True, timeout=240
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    summary = output.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) == EXPECTED_NETNS_TESTS, summary  # a skipped suite is a failure
    assert not re.search(r"skipped|failed|error", summary), summary


# ---- address policy: pure functions, no sockets -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("fd00::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "link-local"),
        ("::a00:1", "reserved"),  # IPv4-compatible, deprecated
        ("100.64.0.1", "non-global"),  # carrier-grade NAT
        ("2002:a00:1::", "6to4 for a private address"),
        ("2002:7f00:1::", "6to4 for a loopback address"),
    ],
)
def test_address_kind_and_refusal(address: str, kind: str) -> None:
    ip = ipaddress.ip_address(address)
    assert address_kind(ip) == kind
    reason = AddressPolicy().refusal(ip)
    assert reason is not None and kind in reason and "refused" in reason


@pytest.mark.parametrize("address", ["240.0.0.1", "255.255.255.255", "192.0.2.1", "198.18.0.1", "0.1.2.3"])
def test_special_purpose_ipv4_is_refused(address: str) -> None:
    assert AddressPolicy().refusal(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "2002:808:808::"])
def test_global_addresses_are_allowed(address: str) -> None:
    ip = ipaddress.ip_address(address)
    assert address_kind(ip) is None
    assert AddressPolicy().refusal(ip) is None


def test_allow_list_opens_exactly_its_ranges() -> None:
    policy = AddressPolicy.from_cidrs(["10.0.0.0/8", "fd00::/8", "127.0.0.1/32"])
    for ok in ("10.0.0.1", "10.255.255.255", "::ffff:10.1.2.3", "fd00::5", "127.0.0.1", "8.8.8.8"):
        assert policy.refusal(ipaddress.ip_address(ok)) is None, ok
    for refused in ("172.16.0.1", "192.168.0.1", "127.0.0.2", "::1", "fc00::1", "169.254.1.1", "::ffff:127.0.0.2"):
        assert policy.refusal(ipaddress.ip_address(refused)) is not None, refused
    with pytest.raises(pydantic.ValidationError, match="not a CIDR range"):
        DownloadConfig(allow_cidrs=("10.0.0.0/33",))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("file:///etc/passwd", "scheme 'file'"),
        ("ftp://8.8.8.8/x", "scheme 'ftp'"),
        ("gopher://8.8.8.8:70/_x", "scheme 'gopher'"),
        ("data:image/png;base64,AAAA", "scheme 'data'"),
        ("javascript:alert(1)", "scheme 'javascript'"),
        ("//8.8.8.8/x", "scheme '(none)'"),
        ("http:///x.jpg", "no host"),
        ("http://[::1/x", "malformed URL"),
        ("http://127.0.0.1/", "loopback"),
        ("http://[::1]:8080/", "loopback"),
        ("http://10.0.0.1/", "private"),
        ("http://user:pw@169.254.169.254/", "link-local"),
        ("http://[::ffff:10.0.0.1]/", "private"),
        ("http://[fe80::1%25lo]/", "link-local"),
        ("http://0.0.0.0:80/", "unspecified"),
        ("http://[2002:a00:1::]/", "6to4"),
        # legacy numeric IPv4 forms, which the socket layer would read as 127.0.0.1
        ("http://2130706433/", "not a canonical"),
        ("http://127.1/", "not a canonical"),
        ("http://0x7f.0.0.1/", "not a canonical"),
        ("http://0177.0.0.1/", "not a canonical"),
        ("http://017700000001/", "not a canonical"),
        ("http://127.000.000.001/", "not a canonical"),
        ("http://0x7f000001/", "not a canonical"),
        ("http://1.2.3.4./", "not a canonical"),
    ],
)
def test_check_url_refuses(url: str, message: str) -> None:
    with pytest.raises(BlockedURL, match=re.escape(message)):
        AddressPolicy().check_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://8.8.8.8/a.jpg",
        "HTTPS://[2606:4700:4700::1111]:443/",
        "https://example.com/x.jpg",
        "http://123.example.com/",
        "http://cafe/",
    ],
)
def test_check_url_passes_public_literals_and_defers_names(url: str) -> None:
    AddressPolicy().check_url(url)  # host names are checked by GuardedResolver on the resolved address


def test_guarded_resolver_drops_refused_addresses() -> None:
    class FakeInner:
        def __init__(self, hosts: list[str]):
            self.hosts = hosts

        async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[dict[str, Any]]:
            return [
                {"hostname": host, "host": h, "port": port, "family": 0, "proto": 0, "flags": 0} for h in self.hosts
            ]

        async def close(self) -> None:
            pass

    async def resolve(hosts: list[str], allow: tuple[str, ...] = ()) -> list[str]:
        resolver = GuardedResolver(AddressPolicy.from_cidrs(allow))
        resolver._inner = FakeInner(hosts)  # type: ignore[assignment]
        return [r["host"] for r in await resolver.resolve("rebind.test", 80)]

    assert asyncio.run(resolve(["10.0.0.1", "8.8.8.8", "::1", "2606:4700::1"])) == ["8.8.8.8", "2606:4700::1"]
    assert asyncio.run(resolve(["127.0.0.1", "::1"], allow=("127.0.0.0/8",))) == ["127.0.0.1"]
    with pytest.raises(BlockedURL, match=re.escape("resolves only to refused addresses: address 169.254.169.254")):
        asyncio.run(resolve(["169.254.169.254", "10.0.0.1"]))


# ---- inside the loopback-only namespace ---------------------------------------------------------------------------


@pytest.fixture
def server(photos: list[Path]) -> Iterator[ImageServer]:
    with ImageServer(photos[:1]) as srv:
        yield srv


@netns
@pytest.mark.parametrize(
    ("path", "target", "kind"),
    [
        ("/fault/to-link-local", "169.254.169.254", "link-local"),
        ("/fault/to-private", "10.0.0.1", "private"),
    ],
)
@pytest.mark.parametrize("robots", [True, False])
def test_redirect_to_internal_address_is_blocked_before_connecting(
    server: ImageServer, connects: list[tuple[Any, ...]], path: str, target: str, kind: str, robots: bool
) -> None:
    r = fetch(server.url(path), respect_robots_txt=robots)
    assert (r.status, r.error_class, r.attempts) == ("error", "blocked", 1), r  # 'connect' would mean it tried
    assert target in (r.error or "") and kind in (r.error or "")
    assert server.hits[path] == 1  # the first hop was fetched; the second never left the guard
    assert connects and _only_loopback(connects), connects


@netns
@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/x.jpg",
        "http://192.168.0.1/x.jpg",
        "http://172.16.0.1/x.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]/x.jpg",
        "http://224.0.0.1/x.jpg",
        "http://[ff02::1]/x.jpg",
        "http://240.0.0.1/x.jpg",
        "http://0.0.0.0/x.jpg",
        "http://[::]/x.jpg",
        "http://[::ffff:10.0.0.1]/x.jpg",
        "http://[::ffff:169.254.169.254]/",
        "http://100.64.0.1/x.jpg",
        "http://[fd12::1]/x.jpg",
        "http://[2002:a00:1::]/x.jpg",
        "http://[::a00:1]/x.jpg",
        "http://2130706433/x.jpg",
        "http://127.1/x.jpg",
        "http://0x7f.0.0.1/x.jpg",
        "http://127.000.000.001/x.jpg",
    ],
)
def test_internal_ip_literals_are_refused(connects: list[tuple[Any, ...]], url: str) -> None:
    r = fetch(url)  # 127.0.0.0/8 is open, and still none of these may be contacted
    assert (r.status, r.error_class, r.attempts) == ("error", "blocked", 1), r
    assert connects == []


@netns
def test_localhost_name_is_resolved_then_refused(server: ImageServer, connects: list[tuple[Any, ...]]) -> None:
    port = server.base_url.rsplit(":", 1)[1]
    url = f"http://localhost:{port}/img/0/a.jpg"
    r = fetch(url, allow_cidrs=())
    assert (r.status, r.error_class, r.attempts) == ("error", "blocked", 1), r
    assert "resolves only to refused addresses" in (r.error or "") and "loopback" in (r.error or "")
    assert connects == [] and sum(server.hits.values()) == 0
    # Opening 127.0.0.0/8 opens the name too (it resolves to 127.0.0.1; a ::1 answer would be dropped).
    ok = fetch(url)
    assert (ok.status, ok.final_url) == ("ok", url), ok
    assert connects and _only_loopback(connects)


@netns
def test_redirect_to_localhost_name(photos: list[Path], connects: list[tuple[Any, ...]]) -> None:
    # /fault/to-localhost-name sends the client to http://localhost:<same port>/img/0/a.jpg.
    # With 127.0.0.0/8 open, that is allowed: localhost is 127.0.0.1, which is open.
    with ImageServer(photos[:1]) as srv:
        r = fetch(srv.url("/fault/to-localhost-name"))
        assert r.status == "ok" and (r.final_url or "").startswith("http://localhost:"), r
    # With only the server's own address open (127.0.0.2), the same hop resolves to a refused 127.0.0.1.
    connects.clear()
    with ImageServer(photos[:1], host="127.0.0.2") as srv:
        r = fetch(srv.url("/fault/to-localhost-name"), allow_cidrs=("127.0.0.2/32",))
        assert (r.status, r.error_class, r.attempts) == ("error", "blocked", 1), r
        assert "resolves only to refused addresses" in (r.error or "")
        assert srv.hits["/fault/to-localhost-name"] == 1 and srv.hits["/img/0/a.jpg"] == 0
    assert connects and {addr[0] for addr in connects} == {"127.0.0.2"}


@netns
@pytest.mark.parametrize(
    ("url", "cidr", "target"),
    [
        ("http://10.0.0.1/x.jpg", "10.0.0.0/8", "10.0.0.1"),
        ("http://169.254.169.254/latest/", "169.254.169.254/32", "169.254.169.254"),
    ],
)
def test_allow_list_opens_exactly_that_range(connects: list[tuple[Any, ...]], url: str, cidr: str, target: str) -> None:
    # Opened: the guard lets it through and the unreachable network answers ('connect', retried as transient).
    r = fetch(url, allow_cidrs=(cidr,), respect_robots_txt=False)
    assert (r.status, r.error_class, r.attempts) == ("error", "connect", 2), r
    assert {addr[0] for addr in connects} == {target}
    # With robots.txt on, the robots.txt fetch is what fails: recorded with its class, robots.txt in the text.
    r = fetch(url, allow_cidrs=(cidr,))
    assert (r.status, r.error_class) == ("error", "connect"), r
    assert "unreachable" in (r.error or "")
    # Not opened: blocked without a connection attempt.
    connects.clear()
    r = fetch(url, allow_cidrs=("127.0.0.0/8", "192.168.0.0/16"))
    assert (r.status, r.error_class) == ("error", "blocked") and connects == []


@netns
def test_redirect_into_an_opened_range_is_followed(server: ImageServer, connects: list[tuple[Any, ...]]) -> None:
    # The per-hop check uses the same policy: opening 10.0.0.0/8 lets the redirect through to the (dead) network.
    r = fetch(server.url("/fault/to-private"), allow_cidrs=("127.0.0.0/8", "10.0.0.0/8"), respect_robots_txt=False)
    assert (r.status, r.error_class) == ("error", "connect"), r
    assert ("10.0.0.1", 80) in connects


@netns
def test_robots_txt_redirect_to_internal_address_blocks_the_fetch(
    photos: list[Path], connects: list[tuple[Any, ...]]
) -> None:
    # robots.txt is fetched through the same guarded path: its redirect hop is checked too.
    async def robots(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "http://10.0.0.1/robots.txt"})

    async def image(request: web.Request) -> web.Response:
        return web.Response(body=photos[0].read_bytes(), content_type="image/jpeg")

    async def go() -> FetchResult:
        app = web.Application()
        app.router.add_get("/robots.txt", robots)
        app.router.add_get("/a.jpg", image)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            async with Downloader(make_cfg()) as d:
                return await d.fetch(f"http://127.0.0.1:{runner.addresses[0][1]}/a.jpg")
        finally:
            await runner.cleanup()

    r = asyncio.run(go())
    assert (r.status, r.error_class) == ("error", "blocked"), r
    assert "10.0.0.1" in (r.error or "") and "private" in (r.error or "")
    assert connects and _only_loopback(connects)
