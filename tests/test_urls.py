"""URL normalisation and sample keys: two spellings of one URL become one key; odd input never crashes."""

from __future__ import annotations

import hashlib
import random

import pytest

from tasks.urls import KEY_HEX, bytes_key, normalize_url, url_key


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # scheme and host case; path case kept
        ("HTTP://Example.COM/Path", "http://example.com/Path"),
        ("HTTPS://WWW.Example.com/A/B.JPG", "https://www.example.com/A/B.JPG"),
        # surrounding whitespace
        ("  http://example.com/a.jpg \n", "http://example.com/a.jpg"),
        # default ports dropped, others kept
        ("http://example.com:80/a", "http://example.com/a"),
        ("https://example.com:443/a", "https://example.com/a"),
        ("HTTPS://a.com:443", "https://a.com/"),
        ("http://example.com:443/a", "http://example.com:443/a"),
        ("https://example.com:80/a", "https://example.com:80/a"),
        ("https://example.com:8443/a", "https://example.com:8443/a"),
        ("http://1.2.3.4:80/x", "http://1.2.3.4/x"),
        # empty path is "/"
        ("http://example.com", "http://example.com/"),
        ("http://example.com?b=1", "http://example.com/?b=1"),
        # fragments dropped
        ("http://example.com/a#frag", "http://example.com/a"),
        ("http://example.com/a?x=1#frag?y", "http://example.com/a?x=1"),
        ("http://example.com/#", "http://example.com/"),
        # dot segments
        ("http://example.com/a/./b/../c", "http://example.com/a/c"),
        ("http://example.com/a/b/../../..", "http://example.com/"),
        ("http://example.com/../a", "http://example.com/a"),
        ("http://example.com/a/b/..", "http://example.com/a/"),
        ("http://example.com/a/b/.", "http://example.com/a/b/"),
        ("http://example.com/a/", "http://example.com/a/"),
        ("http://example.com/x/%2e%2E/y", "http://example.com/y"),
        # percent-escapes: unreserved decoded, others upper-cased, raw non-ASCII and spaces escaped
        ("http://example.com/%7euser/%41b", "http://example.com/~user/Ab"),
        ("http://example.com/a%2fb%2F", "http://example.com/a%2Fb%2F"),
        ("http://example.com/a%2f..%2fb", "http://example.com/a%2F..%2Fb"),  # an escaped slash is not a segment
        ("http://example.com/caf%c3%a9", "http://example.com/caf%C3%A9"),
        ("http://example.com/café", "http://example.com/caf%C3%A9"),
        ("http://example.com/a b", "http://example.com/a%20b"),
        ("http://example.com/a%20b", "http://example.com/a%20b"),
        ("http://example.com/100%", "http://example.com/100%"),
        ("http://example.com/%zz", "http://example.com/%zz"),
        # IDNA
        ("http://Bücher.DE/x", "http://xn--bcher-kva.de/x"),
        ("http://xn--bcher-kva.de/x", "http://xn--bcher-kva.de/x"),
        ("http://ドメイン.テスト/パス", "http://xn--eckwd4c7c.xn--zckzah/%E3%83%91%E3%82%B9"),
        ("http://💩.la/", "http://xn--ls8h.la/"),
        # IPv6
        ("http://[2001:DB8::1]:8080/x", "http://[2001:db8::1]:8080/x"),
        ("http://[::1]/", "http://[::1]/"),
        ("http://[::1]:80/", "http://[::1]/"),
        # query preserved (order, plus signs, escapes normalised)
        ("http://example.com/p?b=2&a=1", "http://example.com/p?b=2&a=1"),
        ("http://example.com/p?q=a%20b+c&x=%7e&y=%2f", "http://example.com/p?q=a%20b+c&x=~&y=%2F"),
        ("http://example.com/p?q=é", "http://example.com/p?q=%C3%A9"),
        ("http://example.com/p?u=http://x/y?z", "http://example.com/p?u=http://x/y?z"),
        ("http://example.com/p?", "http://example.com/p"),
        # userinfo kept, host lowered
        ("http://user:pw@Example.com/", "http://user:pw@example.com/"),
        # non-http schemes are left as they are (stripped)
        ("ftp://Example.com/A#x", "ftp://Example.com/A#x"),
        ("data:image/png;base64,AAA=", "data:image/png;base64,AAA="),
        ("mailto:x@y", "mailto:x@y"),
        ("//example.com/a", "//example.com/a"),
        ("file:///tmp/A.jpg", "file:///tmp/A.jpg"),
    ],
)
def test_normalize_url(raw: str, expected: str) -> None:
    assert normalize_url(raw) == expected
    assert normalize_url(expected) == expected  # idempotent


@pytest.mark.parametrize(
    "garbage",
    ["", "   ", "not a url", "http://", "http:///path", "http://[::1", "http://a.com:99999/", "http://a.com:x/",
     "http://[not-ipv6]/", "https://a.com/\ud800", "http://\ud800.com/", "http://a.com/\x00", "\x00\x01",
     "http://" + "a" * 300 + ".com/", "http://a..b.com/", "::::", "http://%/", "ht!tp://x"],
)
def test_garbage_does_not_crash(garbage: str) -> None:
    out = normalize_url(garbage)
    assert isinstance(out, str)
    assert len(url_key(out)) == KEY_HEX


def test_random_strings_do_not_crash() -> None:
    rng = random.Random(1234)
    alphabet = "abcXYZ019:/?#[]@!$&'()*+,;=%-._~ é中\ud800\t\n"
    for _ in range(2000):
        tail = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        url = rng.choice(["http://", "https://", "HTTP://", "", "ftp://"]) + tail
        first = normalize_url(url)
        assert isinstance(first, str)
        url_key(first)


@pytest.mark.parametrize(
    "spellings",
    [
        ["http://example.com/a.jpg", "HTTP://EXAMPLE.COM:80/a.jpg", "http://example.com/./b/../a.jpg#top",
         " http://example.com/%61.jpg "],
        ["https://bücher.de/caf%c3%a9", "https://xn--bcher-kva.de/café", "https://BÜCHER.de:443/caf%C3%A9"],
    ],
)
def test_spellings_share_a_key(spellings: list[str]) -> None:
    keys = {url_key(normalize_url(s)) for s in spellings}
    assert len(keys) == 1


def test_keys() -> None:
    a = url_key(normalize_url("http://example.com/a.jpg"))
    assert a == hashlib.sha256(b"http://example.com/a.jpg").hexdigest()[:KEY_HEX]
    assert len(a) == KEY_HEX and all(c in "0123456789abcdef" for c in a)
    assert a != url_key(normalize_url("http://example.com/A.jpg"))
    assert a != url_key(normalize_url("https://example.com/a.jpg"))
    assert a != url_key(normalize_url("http://example.com/a.jpg?x=1"))
    assert bytes_key(b"abc") == hashlib.sha256(b"abc").hexdigest()[:KEY_HEX]
    assert bytes_key(b"abc") != bytes_key(b"abd")
    assert len(url_key("\ud800")) == KEY_HEX  # lone surrogates (from JSON) still hash
