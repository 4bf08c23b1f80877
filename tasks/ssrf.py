"""The SSRF guard: only http(s), and only to globally routable addresses unless a range is opened.

The check runs on the *resolved* address inside the HTTP client's resolver (so the address checked is the
address connected to: no DNS-rebinding gap), on IP-literal hosts before connecting, and again on every
redirect hop, because the downloader follows redirects itself.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
ALLOWED_SCHEMES = ("http", "https")
# A host whose last label is a number is an IPv4 address to socket libraries and browsers (WHATWG "ends in a
# number"): 2130706433, 127.1, 0x7f.1, 0177.0.0.1, 127.000.000.001.
_NUMERIC_LAST_LABEL = re.compile(r"(?:^|\.)(?:[0-9]+|0x[0-9a-f]*)\.?$", re.IGNORECASE)


class BlockedURL(OSError):
    """A URL the guard refuses; the message says why. An OSError so the HTTP client passes it through."""


def address_kind(ip: IPAddress) -> str | None:
    """Why an address is not public ('loopback', 'private', ...), or None for a global address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv6Address) and ip.sixtofour is not None:
        inner = address_kind(ip.sixtofour)  # 2002:a00:1:: carries 10.0.0.1
        if inner is not None:
            return f"6to4 for a {inner} address"
    for kind, flag in (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
    ):
        if flag:
            return kind
    return None if ip.is_global else "non-global"


@dataclass(frozen=True)
class AddressPolicy:
    allowed: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_cidrs(cls, cidrs: Iterable[str]) -> AddressPolicy:
        return cls(tuple(ipaddress.ip_network(c, strict=False) for c in cidrs))

    def refusal(self, ip: IPAddress) -> str | None:
        """None if `ip` may be contacted, else the reason."""
        plain = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip
        if any(plain in net for net in self.allowed):
            return None
        kind = address_kind(plain)
        return None if kind is None else f"address {plain} is {kind}; refused (open it with --allow-cidr)"

    def check_url(self, url: str) -> None:
        """Scheme and IP-literal checks that need no DNS; raises BlockedURL."""
        try:
            parts = urlsplit(url)
            host = parts.hostname
        except ValueError as e:
            raise BlockedURL(f"malformed URL: {e}") from None
        if parts.scheme.lower() not in ALLOWED_SCHEMES:
            raise BlockedURL(f"scheme {parts.scheme or '(none)'!r} refused: only http and https are fetched")
        if not host:
            raise BlockedURL("URL has no host")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            # Not canonical, but the HTTP client may still hand it to the socket as an address and skip the
            # resolver (and so this guard): aiohttp 3.12 does for "2130706433" or "127.1".
            if ":" in host or _NUMERIC_LAST_LABEL.search(host):
                raise BlockedURL(f"host {host!r} is not a canonical IP address; refused") from None
            return
        reason = self.refusal(ip)
        if reason:
            raise BlockedURL(reason)


class GuardedResolver(AbstractResolver):
    """Resolves with getaddrinfo, then drops refused addresses; refuses the host if none is left."""

    def __init__(self, policy: AddressPolicy):
        self.policy = policy
        self._inner = ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family=0) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed, reasons = [], []
        for r in results:
            reason = self.policy.refusal(ipaddress.ip_address(r["host"]))
            if reason:
                reasons.append(reason)
            else:
                allowed.append(r)
        if not allowed:
            raise BlockedURL(f"host {host!r} resolves only to refused addresses: {reasons[0]}")
        return allowed

    async def close(self) -> None:
        await self._inner.close()
