"""Proxy headers: the client, scheme and host a trusted proxy reports.

A proxy in front of fpy3 tells who the client was in ``X-Forwarded-For``,
``X-Forwarded-Proto`` and ``X-Forwarded-Host`` (what nginx, Caddy, Traefik and HAProxy
send) or in RFC 7239 ``Forwarded``. Anyone can send those headers, so they are applied
only when the peer is a trusted proxy: an address or network of the allow-list
(``proxy.forwarded_allow_ips``, uvicorn's ``--forwarded-allow-ips``; ``*`` trusts
every peer). A peer without an address (a Unix socket, reachable only by local
processes its file mode lets in) is trusted, as gunicorn does.

The scope builder (``scope.build_scope``) calls ``ProxyHeaders.resolve`` only for a
trusted peer; the trust of an address is computed once and remembered.

Through a chain of proxies each one appends the address it received the request from,
so the list is read from the right: trusted proxies are skipped and the first address
that is not one is the client (with ``*``, the leftmost). The scheme and the host are
the nearest proxy's (the rightmost value; with ``Forwarded``, those of the element the
client was found in).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

# Trust answers remembered, per peer address (a bounded cache: emptied when full).
_CACHE_MAX = 4096

_X_FOR = b"x-forwarded-for"
_X_PROTO = b"x-forwarded-proto"
_X_HOST = b"x-forwarded-host"
_FORWARDED = b"forwarded"
_X_NAMES = frozenset({_X_FOR, _X_PROTO, _X_HOST})

# The transport schemes a proxy may report; the scope builder turns them into ws/wss
# for websockets.
_SCHEMES = {"http": "http", "https": "https", "ws": "http", "wss": "https"}
# A host as a proxy may report it: a name or an address, with an optional port.
_HOST = re.compile(rb"(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def parse_allow_list(entries: Iterable[str]) -> tuple[bool, frozenset, tuple]:
    """(everyone, addresses, networks) from ``*``, addresses and CIDR networks.
    Raises ValueError naming a bad entry (config.py checks the same way)."""
    everyone = False
    addresses = set()
    networks = []
    for entry in entries:
        entry = entry.strip()
        if entry == "*":
            everyone = True
        elif "/" in entry:
            networks.append(ipaddress.ip_network(entry))
        else:
            addresses.add(ipaddress.ip_address(entry))
    return everyone, frozenset(addresses), tuple(networks)


class TrustedPeers:
    """The allow-list, precomputed; ``cache`` maps an address string to its answer."""

    __slots__ = ("everyone", "addresses", "networks", "cache")

    def __init__(self, entries: Iterable[str]):
        self.everyone, self.addresses, self.networks = parse_allow_list(entries)
        self.cache: dict[str, bool] = {}

    def trusts(self, host: str | None) -> bool:
        """Whether the peer ``host`` is a trusted proxy (None: a Unix socket peer)."""
        if host is None:
            return True
        answer = self.cache.get(host)
        if answer is None:
            answer = self._check(host)
            if len(self.cache) >= _CACHE_MAX:
                self.cache.clear()
            self.cache[host] = answer
        return answer

    def _check(self, host: str) -> bool:
        if self.everyone:
            return True
        try:
            ip = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
            if self._match(ip.ipv4_mapped):
                return True
        return self._match(ip)

    def _match(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if ip in self.addresses:
            return True
        return any(ip.version == net.version and ip in net for net in self.networks)


class ProxyHeaders:
    """Applies the proxy headers of one style to a trusted peer's request."""

    __slots__ = ("peers", "rfc7239", "names")

    def __init__(self, peers: TrustedPeers, style: str = "x-forwarded"):
        self.peers = peers
        self.rfc7239 = style == "forwarded"  # else X-Forwarded-*
        self.names = frozenset({_FORWARDED}) if self.rfc7239 else _X_NAMES

    def resolve(
        self, scheme: str, client: list | None, headers: list[tuple[bytes, bytes]]
    ) -> tuple[str, list | None, list[tuple[bytes, bytes]]] | None:
        """The scheme, client and headers (with the host replaced) the proxy reports;
        None when the request carries none of its headers (the common case: one pass
        over the names, nothing built)."""
        names = self.names
        for pair in headers:
            if pair[0] in names:
                return self._apply(scheme, client, headers)
        return None

    def _apply(
        self, scheme: str, client: list | None, headers: list[tuple[bytes, bytes]]
    ) -> tuple[str, list | None, list[tuple[bytes, bytes]]]:
        if self.rfc7239:
            value = b",".join(v for name, v in headers if name == _FORWARDED)
            found = self._forwarded(value)
            if found is None:
                return scheme, client, headers
            node, proto, host = found
        else:
            xff = proto = host = None
            for name, v in headers:
                if name in _X_NAMES:
                    # Repeated fields are one comma-separated list (RFC 9110 5.3).
                    if name == _X_FOR:
                        xff = v if xff is None else xff + b"," + v
                    elif name == _X_PROTO:
                        proto = v if proto is None else proto + b"," + v
                    else:
                        host = v if host is None else host + b"," + v
            node = self._client_of(xff.decode("latin-1").split(",")) if xff else None
            proto = _last(proto)
            host = _last(host)
        if node is not None:
            client = node
        if proto is not None:
            scheme = _SCHEMES.get(proto.decode("latin-1").lower(), scheme)
        if host is not None and _HOST.fullmatch(host):
            headers = _with_host(headers, host)
        return scheme, client, headers

    def _client_of(self, entries: list[str]) -> list | None:
        """The client from X-Forwarded-For entries: the first from the right that is
        not a trusted proxy, else the leftmost; as [host, port]."""
        entries = [e.strip() for e in entries]
        entries = [e for e in entries if e]
        if not entries:
            return None
        peers = self.peers
        chosen = entries[0]
        if not peers.everyone:
            for entry in reversed(entries):
                if not peers.trusts(_node(entry)[0]):
                    chosen = entry
                    break
        return _node(chosen)

    def _forwarded(self, value: bytes) -> tuple[list | None, bytes | None, bytes | None] | None:
        """(client, proto, host) of the element describing the client's connection, or
        None for a malformed header (ignored as a whole)."""
        elements = parse_forwarded(value.decode("latin-1"))
        if not elements:
            return None
        chosen = elements[0]
        peers = self.peers
        if not peers.everyone:
            for element in reversed(elements):
                node = element.get("for")
                if node is None or not peers.trusts(_node(node)[0]):
                    chosen = element
                    break
        node = chosen.get("for")
        proto = chosen.get("proto")
        host = chosen.get("host")
        return (
            _node(node) if node else None,
            proto.encode("latin-1") if proto else None,
            host.encode("latin-1") if host else None,
        )


def _last(value: bytes | None) -> bytes | None:
    """The rightmost entry of a comma-separated value: the nearest proxy's."""
    if value is None:
        return None
    last = value.rpartition(b",")[2].strip()
    return last or None


def _node(entry: str) -> list:
    """[host, port] from "1.2.3.4", "1.2.3.4:80", "[::1]", "[::1]:80" or "::1"."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif entry.count(":") == 1:
        host, _, port = entry.partition(":")
    else:
        host, port = entry, ""
    return [host, int(port) if port.isdigit() and len(port) <= 5 else 0]


def _with_host(headers: list[tuple[bytes, bytes]], host: bytes) -> list[tuple[bytes, bytes]]:
    out = [(name, host) if name == b"host" else (name, value) for name, value in headers]
    if not any(name == b"host" for name, _ in headers):
        out.append((b"host", host))
    return out


# RFC 7239 4: forwarded-element = [ forwarded-pair ] *( ";" [ forwarded-pair ] ),
# forwarded-pair = token "=" value, value = token / quoted-string.
_PAIR = re.compile(
    r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)=([!#$%&\'*+.^_`|~0-9A-Za-z:\[\]-]+|"(?:[^"\\]|\\.)*")\s*'
)


def parse_forwarded(text: str) -> list[dict[str, str]]:
    """The elements of a Forwarded value, each {lowercase name: value}; [] when the
    value is malformed."""
    elements: list[dict[str, str]] = []
    element: dict[str, str] = {}
    pos, end = 0, len(text)
    while True:
        m = _PAIR.match(text, pos)
        if m is not None:
            name, value = m.group(1).lower(), m.group(2)
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            if name in element:
                return []  # a parameter twice in one element (RFC 7239 4)
            element[name] = value
            pos = m.end()
        else:
            while pos < end and text[pos] in " \t":
                pos += 1  # an empty pair or element
        if pos >= end:
            break
        if text[pos] == ",":
            elements.append(element)
            element = {}
        elif text[pos] != ";":
            return []
        pos += 1
    elements.append(element)
    return [e for e in elements if e]
