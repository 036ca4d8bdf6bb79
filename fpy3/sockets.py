"""Listening sockets, bound before any worker starts."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from .config import Settings


class BindError(Exception):
    """A socket could not be bound; the message names the setting and the address."""


@dataclass
class Listeners:
    tls: socket.socket  # HTTP/1.1 over TLS on server.port
    http: socket.socket | None = None  # cleartext HTTP/1.1 on server.http_port

    def all(self) -> list[socket.socket]:
        return [s for s in (self.tls, self.http) if s is not None]

    def close(self) -> None:
        for sock in self.all():
            sock.close()


def bind_tcp(host: str, port: int, backlog: int, key: str) -> socket.socket:
    try:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
        )
    except socket.gaierror as exc:
        raise BindError(f"{key}: cannot resolve host {host!r}: {exc.strerror}") from None
    family, socktype, proto, _, addr = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        where = f"[{addr[0]}]:{addr[1]}" if family == socket.AF_INET6 else f"{addr[0]}:{addr[1]}"
        raise BindError(f"{key}: cannot listen on {where} (TCP): {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def bind_listeners(settings: Settings) -> Listeners:
    server = settings.server
    backlog = settings.http1.backlog
    tls = bind_tcp(server.host, server.port, backlog, "server.port")
    http = None
    if server.http_port:
        try:
            http = bind_tcp(server.host, server.http_port, backlog, "server.http_port")
        except BindError:
            tls.close()
            raise
    return Listeners(tls=tls, http=http)
