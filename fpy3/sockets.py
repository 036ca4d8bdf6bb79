"""Listening sockets, bound before any worker starts."""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

from .config import Settings


class BindError(OSError):
    """A socket could not be bound; the message names the setting and the address, and
    ``errno`` is the system's (EADDRINUSE, EACCES, ...)."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.errno = code


@dataclass
class Listeners:
    tls: socket.socket | None  # HTTP/1.1 over TLS on server.port (None: cleartext only)
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
            f"{key}: cannot listen on {_where(family, addr)} (TCP): {exc.strerror}", exc.errno
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
            f"{key}: cannot bind {_where(family, addr)} (UDP): {exc.strerror}", exc.errno
        ) from None
    sock.setblocking(False)
    return sock


# Tries at a system-picked TCP port (server.port 0) whose UDP twin is free too.
UDP_PICK_ATTEMPTS = 20


def bind_listeners(settings: Settings) -> Listeners:
    """TCP on server.port (TLS), TCP on server.http_port (cleartext, when set), UDP on
    http3.port or server.port (when HTTP/3 is on). With server.port 0 the system picks
    the port, and HTTP/3 gets the same number on UDP (another pick if it is taken)."""
    server = settings.server
    backlog = settings.http1.backlog
    udp_key = "http3.port" if settings.http3.port else "server.port"
    # Only a system-picked port may be picked again; a port asked for is used or refused.
    attempts = UDP_PICK_ATTEMPTS if server.port == 0 and not settings.http3.port else 1
    for attempt in range(attempts):
        tls = bind_tcp(server.host, server.port, backlog, "server.port")
        listeners = Listeners(tls=tls)
        try:
            if settings.http3.enabled:
                udp_port = settings.http3.port or tls.getsockname()[1]
                listeners.udp = bind_udp(server.host, udp_port, udp_key)
            if server.http_port:
                listeners.http = bind_tcp(
                    server.host, server.http_port, backlog, "server.http_port"
                )
        except BindError as exc:
            listeners.close()
            udp_taken = listeners.udp is None and exc.errno == errno.EADDRINUSE
            if attempt + 1 == attempts or not udp_taken:
                raise
            continue
        return listeners
    raise AssertionError("unreachable")
