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
    udp: socket.socket | None = None  # HTTP/3 on http3.port (or server.port)
    # MsQuic under fpy3-master: no shared socket; each worker's MsQuic binds this address.
    udp_addr: tuple | None = None

    def all(self) -> list[socket.socket]:
        return [s for s in (self.tls, self.http, self.udp) if s is not None]

    def close(self) -> None:
        for sock in self.all():
            sock.close()


def _resolve(host: str, port: int, socktype: int, key: str):
    try:
        infos = socket.getaddrinfo(
            host, port, type=socktype, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
        )
    except socket.gaierror as exc:
        raise BindError(f"{key}: cannot resolve host {host!r}: {exc.strerror}") from None
    family, _, _, _, addr = infos[0]
    return family, addr


def _where(family: int, addr) -> str:
    return f"[{addr[0]}]:{addr[1]}" if family == socket.AF_INET6 else f"{addr[0]}:{addr[1]}"


def bind_tcp(host: str, port: int, backlog: int, key: str) -> socket.socket:
    family, addr = _resolve(host, port, socket.SOCK_STREAM, key)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise BindError(
            f"{key}: cannot listen on {_where(family, addr)} (TCP): {exc.strerror}"
        ) from None
    sock.setblocking(False)
    return sock


def bind_udp(host: str, port: int, key: str) -> socket.socket:
    family, addr = _resolve(host, port, socket.SOCK_DGRAM, key)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise BindError(
            f"{key}: cannot bind {_where(family, addr)} (UDP): {exc.strerror}"
        ) from None
    sock.setblocking(False)
    return sock


def bind_listeners(settings: Settings) -> Listeners:
    server = settings.server
    backlog = settings.http1.backlog
    listeners = Listeners(tls=bind_tcp(server.host, server.port, backlog, "server.port"))
    try:
        if server.http_port:
            listeners.http = bind_tcp(server.host, server.http_port, backlog, "server.http_port")
        if settings.http3.enabled:
            key = "http3.port" if settings.http3.port else "server.port"
            listeners.udp = bind_udp(server.host, settings.udp_port, key)
    except BindError:
        listeners.close()
        raise
    return listeners
