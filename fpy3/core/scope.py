"""The one ASGI scope builder, for every protocol and both scope types."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote_to_bytes

from .host import Host

ASGI_VERSION = {"version": "3.0", "spec_version": "2.4"}

_WS_SCHEME = {"https": "wss", "http": "ws"}


def build_scope(
    host: Host,
    kind: str,
    http_version: str,
    scheme: str,
    method: str,
    path: str,
    raw_path: bytes,
    query_string: bytes,
    headers: list[tuple[bytes, bytes]],
    client: list | None,
    server: list | None,
) -> dict[str, Any]:
    """An ``http`` or ``websocket`` scope. ``scheme`` is the transport's (http or https);
    ``path`` is percent-decoded, without the root path. ``client`` is the peer (None
    for a Unix socket); when it is a trusted proxy, the client, scheme and host it
    reports in its headers replace the connection's (``forwarded.py``)."""
    proxy = host.proxy_headers
    if proxy is not None:
        trusted: bool | None = True  # a Unix socket peer
        if client is not None:
            trusted = proxy.peers.cache.get(client[0])
            if trusted is None:
                trusted = proxy.peers.trusts(client[0])
        if trusted:
            found = proxy.resolve(scheme, client, headers)
            if found is not None:
                scheme, client, headers = found
    root = host.root_path
    scope = {
        "type": kind,
        "asgi": ASGI_VERSION.copy(),
        "http_version": http_version,
        "server": server,
        "client": client,
        "scheme": scheme,
        "method": method,
        "root_path": root,
        "path": root + path if root else path,
        "raw_path": raw_path,
        "query_string": query_string,
        "headers": headers,
        "state": host.state.copy(),
    }
    if kind == "http":
        if http_version != "1.0":  # HTTP/1.0 has no chunked encoding to carry them
            scope["extensions"] = {"http.response.trailers": {}}
    else:  # websocket
        del scope["method"]
        scope["scheme"] = _WS_SCHEME.get(scheme, scheme)
        scope["subprotocols"] = subprotocols(headers)
        scope["extensions"] = {"websocket.http.response": {}}
    return scope


def decode_path(raw_path: bytes) -> str:
    """The scope's ``path`` from the request target's path (percent-decoded, UTF-8)."""
    if b"%" in raw_path:
        return unquote_to_bytes(raw_path).decode("utf-8", "replace")
    try:
        return raw_path.decode()
    except UnicodeDecodeError:
        return raw_path.decode("utf-8", "replace")


def subprotocols(headers) -> list[str]:
    """The websocket subprotocols the client offers, in its order."""
    out = []
    for name, value in headers:
        if name == b"sec-websocket-protocol":
            out += [p.strip() for p in value.decode("latin-1").split(",") if p.strip()]
    return out
