"""Proxy headers in-process: the allow-list, X-Forwarded-*, RFC 7239 Forwarded, and
how the scope builder applies them (only for trusted peers)."""

from __future__ import annotations

import asyncio

import pytest

from fpy3.core.forwarded import ProxyHeaders, TrustedPeers, parse_forwarded
from fpy3.core.scope import build_scope


class Host:
    def __init__(self, proxy_headers: ProxyHeaders | None):
        self.app = None
        self.loop = asyncio.new_event_loop()
        self.debug = False
        self.root_path = ""
        self.state: dict = {}
        self.access_log = None
        self.proxy_headers = proxy_headers
        self.health = None


def scope_for(
    headers: list[tuple[bytes, bytes]],
    peer: str | None = "127.0.0.1",
    allow: tuple[str, ...] = ("127.0.0.1",),
    style: str = "x-forwarded",
    kind: str = "http",
    scheme: str = "http",
    enabled: bool = True,
) -> dict:
    proxy = ProxyHeaders(TrustedPeers(allow), style) if enabled else None
    host = Host(proxy)
    try:
        return build_scope(
            host,
            kind,
            "1.1",
            scheme,
            "GET",
            "/",
            b"/",
            b"",
            headers,
            [peer, 40000] if peer is not None else None,
            ["127.0.0.1", 8000],
        )
    finally:
        host.loop.close()


# --- the allow-list ------------------------------------------------------------------


def test_addresses_networks_and_everyone():
    peers = TrustedPeers(["10.0.0.1", "192.168.0.0/16", "2001:db8::/32", " ::1 "])
    assert peers.trusts("10.0.0.1")
    assert not peers.trusts("10.0.0.2")
    assert peers.trusts("192.168.44.5")
    assert peers.trusts("2001:db8:1::7")
    assert peers.trusts("::1")
    assert not peers.trusts("2001:db9::1")
    assert not peers.trusts("not an address")
    assert TrustedPeers(["*"]).trusts("203.0.113.9")


def test_ipv4_mapped_peers_of_a_dual_stack_socket_match_ipv4_entries():
    peers = TrustedPeers(["127.0.0.1", "10.0.0.0/8"])
    assert peers.trusts("::ffff:127.0.0.1")
    assert peers.trusts("::ffff:10.1.2.3")
    assert not peers.trusts("::ffff:11.1.2.3")


def test_unix_socket_peers_are_trusted():
    assert TrustedPeers(["10.0.0.1"]).trusts(None)


def test_answers_are_cached_and_the_cache_is_bounded():
    peers = TrustedPeers(["127.0.0.1"])
    assert peers.trusts("127.0.0.1")
    assert peers.cache == {"127.0.0.1": True}
    for i in range(5000):
        peers.trusts(f"10.0.{i // 256}.{i % 256}")
    assert len(peers.cache) <= 4096


def test_bad_entries_raise():
    with pytest.raises(ValueError):
        TrustedPeers(["10.0.0.0/33"])
    with pytest.raises(ValueError):
        TrustedPeers(["example.com"])


# --- X-Forwarded-* ---------------------------------------------------------------------

XFF = b"x-forwarded-for"


def test_trusted_peer_sets_client_scheme_and_host():
    scope = scope_for(
        [
            (b"host", b"backend:8000"),
            (XFF, b"203.0.113.7"),
            (b"x-forwarded-proto", b"https"),
            (b"x-forwarded-host", b"example.com"),
        ]
    )
    assert scope["client"] == ["203.0.113.7", 0]
    assert scope["scheme"] == "https"
    assert (b"host", b"example.com") in scope["headers"]
    assert (b"host", b"backend:8000") not in scope["headers"]
    assert scope["headers"][0] == (b"host", b"example.com")  # in place


def test_untrusted_peer_changes_nothing():
    headers = [(b"host", b"a"), (XFF, b"203.0.113.7"), (b"x-forwarded-proto", b"https")]
    scope = scope_for(headers, peer="198.51.100.1")
    assert scope["client"] == ["198.51.100.1", 40000]
    assert scope["scheme"] == "http"
    assert scope["headers"] is headers


def test_proxy_headers_off_changes_nothing():
    scope = scope_for([(XFF, b"203.0.113.7")], enabled=False)
    assert scope["client"] == ["127.0.0.1", 40000]


def test_no_proxy_header_keeps_the_same_headers_list():
    headers = [(b"host", b"a"), (b"accept", b"*/*")]
    scope = scope_for(headers)
    assert scope["headers"] is headers
    assert scope["client"] == ["127.0.0.1", 40000]


def test_chain_is_read_from_the_right_skipping_trusted_proxies():
    allow = ("127.0.0.1", "10.0.0.0/8")
    # client, then an untrusted hop, then a trusted one, then our peer.
    headers = [(XFF, b"198.51.100.20, 203.0.113.7, 10.1.1.1")]
    assert scope_for(headers, allow=allow)["client"] == ["203.0.113.7", 0]
    # A client cannot push a fake address past the first untrusted hop.
    headers = [(XFF, b"10.9.9.9, 203.0.113.7")]
    assert scope_for(headers, allow=allow)["client"] == ["203.0.113.7", 0]


def test_all_hops_trusted_gives_the_leftmost():
    headers = [(XFF, b"10.0.0.5, 10.0.0.6")]
    assert scope_for(headers, allow=("127.0.0.1", "10.0.0.0/8"))["client"] == ["10.0.0.5", 0]


def test_everyone_trusted_gives_the_leftmost():
    headers = [(XFF, b"203.0.113.7, 198.51.100.1")]
    scope = scope_for(headers, peer="192.0.2.50", allow=("*",))
    assert scope["client"] == ["203.0.113.7", 0]


def test_repeated_fields_are_one_list():
    headers = [(XFF, b"198.51.100.20"), (XFF, b"203.0.113.7")]
    assert scope_for(headers)["client"] == ["203.0.113.7", 0]


@pytest.mark.parametrize(
    "entry, client",
    [
        (b"203.0.113.7:4711", ["203.0.113.7", 4711]),
        (b"[2001:db8::7]:4711", ["2001:db8::7", 4711]),
        (b"[2001:db8::7]", ["2001:db8::7", 0]),
        (b"2001:db8::7", ["2001:db8::7", 0]),
    ],
)
def test_addresses_with_ports_and_ipv6(entry: bytes, client: list):
    assert scope_for([(XFF, entry)])["client"] == client


def test_empty_entries_are_skipped():
    assert scope_for([(XFF, b" , 203.0.113.7 ,")])["client"] == ["203.0.113.7", 0]
    assert scope_for([(XFF, b" , ")])["client"] == ["127.0.0.1", 40000]


@pytest.mark.parametrize(
    "proto, kind, scheme",
    [
        (b"https", "http", "https"),
        (b"HTTPS", "http", "https"),
        (b"http", "http", "http"),
        (b"wss", "http", "https"),
        (b"https", "websocket", "wss"),
        (b"http", "websocket", "ws"),
        (b"wss", "websocket", "wss"),
        (b"gopher", "http", "http"),  # not a scheme a proxy may report: ignored
        (b"http, https", "http", "https"),  # the nearest proxy's
    ],
)
def test_scheme(proto: bytes, kind: str, scheme: str):
    headers = [(b"host", b"a"), (b"x-forwarded-proto", proto)]
    if kind == "websocket":
        headers.append((b"sec-websocket-key", b"x"))
    assert scope_for(headers, kind=kind)["scheme"] == scheme


def test_host_is_added_when_missing_and_bad_hosts_are_ignored():
    scope = scope_for([(b"x-forwarded-host", b"example.com:8443")])
    assert scope["headers"][-1] == (b"host", b"example.com:8443")
    scope = scope_for([(b"host", b"a"), (b"x-forwarded-host", b"evil/path")])
    assert scope["headers"] == [(b"host", b"a"), (b"x-forwarded-host", b"evil/path")]
    scope = scope_for([(b"host", b"a"), (b"x-forwarded-host", b"one.example, two.example")])
    assert (b"host", b"two.example") in scope["headers"]


def test_unix_socket_peer_applies_headers():
    scope = scope_for([(XFF, b"203.0.113.7")], peer=None, allow=("10.0.0.1",))
    assert scope["client"] == ["203.0.113.7", 0]


def test_x_forwarded_style_ignores_forwarded():
    scope = scope_for([(b"forwarded", b"for=203.0.113.7")])
    assert scope["client"] == ["127.0.0.1", 40000]


# --- RFC 7239 Forwarded -------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        # RFC 7239 section 4 and 7.1 examples.
        ('for="_gazonk"', [{"for": "_gazonk"}]),
        ('For="[2001:db8:cafe::17]:4711"', [{"for": "[2001:db8:cafe::17]:4711"}]),
        (
            "for=192.0.2.60;proto=http;by=203.0.113.43",
            [{"for": "192.0.2.60", "proto": "http", "by": "203.0.113.43"}],
        ),
        ("for=192.0.2.43, for=198.51.100.17", [{"for": "192.0.2.43"}, {"for": "198.51.100.17"}]),
        ('for=a;host="ex\\"ample"', [{"for": "a", "host": 'ex"ample'}]),
        (" for=a ; proto=https ,, for=b ", [{"for": "a", "proto": "https"}, {"for": "b"}]),
        ("for=a;for=b", []),  # a parameter twice in one element
        ("for a", []),
        ('for="unterminated', []),
        ("", []),
    ],
)
def test_parse_forwarded(value: str, expected: list):
    assert parse_forwarded(value) == expected


def test_forwarded_sets_client_scheme_and_host_of_one_element():
    value = b'for="[2001:db8:cafe::17]:4711";proto=https;host=example.com, for=10.0.0.9;proto=http'
    scope = scope_for(
        [(b"host", b"backend"), (b"forwarded", value)],
        allow=("127.0.0.1", "10.0.0.0/8"),
        style="forwarded",
    )
    assert scope["client"] == ["2001:db8:cafe::17", 4711]
    assert scope["scheme"] == "https"
    assert scope["headers"][0] == (b"host", b"example.com")


def test_forwarded_stops_at_the_first_untrusted_element():
    value = b"for=198.51.100.20;proto=https, for=203.0.113.7;proto=http"
    scope = scope_for([(b"forwarded", value)], style="forwarded")
    assert scope["client"] == ["203.0.113.7", 0]
    assert scope["scheme"] == "http"


def test_forwarded_element_without_for_keeps_the_peer():
    scope = scope_for([(b"forwarded", b"proto=https")], style="forwarded")
    assert scope["client"] == ["127.0.0.1", 40000]
    assert scope["scheme"] == "https"


def test_malformed_forwarded_is_ignored():
    scope = scope_for([(b"forwarded", b"for=a;for=b")], style="forwarded")
    assert scope["client"] == ["127.0.0.1", 40000]
    assert scope["scheme"] == "http"


def test_forwarded_style_ignores_x_forwarded():
    scope = scope_for([(XFF, b"203.0.113.7")], style="forwarded")
    assert scope["client"] == ["127.0.0.1", 40000]


def test_forwarded_untrusted_peer_changes_nothing():
    scope = scope_for([(b"forwarded", b"for=203.0.113.7")], peer="192.0.2.1", style="forwarded")
    assert scope["client"] == ["192.0.2.1", 40000]
