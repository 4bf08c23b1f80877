"""URL normalisation and sample keys: two spellings of one URL become one sample before any download."""

from __future__ import annotations

import hashlib
import posixpath
import re
from urllib.parse import quote, unquote, urlsplit, urlunsplit

KEY_HEX = 24  # 96 bits: no collisions expected below ~1e13 samples
_DEFAULT_PORTS = {"http": 80, "https": 443}
_PCT = re.compile(r"%[0-9A-Fa-f]{2}")
# Keep reserved characters and existing escapes as they are; escape what must be escaped.
_SAFE_PATH = "/:@!$&'()*+,;=-._~%"
_SAFE_QUERY = _SAFE_PATH + "?"


def _normalise_escapes(part: str, safe: str) -> str:
    # Decode escapes of unreserved characters (%41 -> A), upper-case the rest (%2f -> %2F).
    def fix(m: re.Match) -> str:
        ch = unquote(m.group(0))
        return ch if re.fullmatch(r"[A-Za-z0-9._~-]", ch) else m.group(0).upper()

    return quote(_PCT.sub(fix, part), safe=safe, errors="surrogatepass")


def normalize_url(url: str) -> str:
    """A canonical spelling: lower-case scheme and host, IDNA host, no default port, no fragment,
    resolved dot-segments, normalised percent-escapes. Unparseable input is returned stripped."""
    url = url.strip()
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return url
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not host:
        return url
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host.lower()
    except UnicodeError:
        host = host.lower()
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    if parts.username or parts.password:
        netloc = f"{parts.username or ''}{':' + parts.password if parts.password else ''}@{netloc}"
    # Escapes first (so %2E%2E is a dot segment too), then dot segments; `/a/b/..` names the folder `/a/`.
    path = _normalise_escapes(parts.path or "/", _SAFE_PATH)
    normed = posixpath.normpath(path)
    path = normed + ("/" if path.endswith(("/", "/.", "/..")) and normed != "/" else "")
    path = "/" + path.lstrip("/")
    return urlunsplit((scheme, netloc, path, _normalise_escapes(parts.query, _SAFE_QUERY), ""))


def url_key(normalized_url: str) -> str:
    return hashlib.sha256(normalized_url.encode("utf-8", "surrogatepass")).hexdigest()[:KEY_HEX]


def bytes_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:KEY_HEX]
