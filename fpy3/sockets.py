"""Listening sockets, bound (or inherited) before any worker starts.

Where they come from:

- systemd socket activation: ``LISTEN_FDS`` sockets passed to this very process
  (``LISTEN_PID``) are the listeners, and nothing is bound. ``LISTEN_FDNAMES`` (the
  units' ``FileDescriptorName=``) may say ``https``, ``http`` or ``quic``; otherwise a
  TCP stream socket serves HTTPS, a Unix one cleartext HTTP/1.1 and a UDP one HTTP/3.
- Else the configuration: on every address of ``server.host`` (or ``server.hosts``)
  HTTPS on ``server.port``, cleartext HTTP/1.1 on ``server.http_port`` and HTTP/3 on
  the UDP port; cleartext HTTP/1.1 on the Unix socket ``server.uds``; and the
  inherited sockets of ``server.fds`` (``--fd``), classified as above.

An IPv6 wildcard (``::``) also serves IPv4 (IPV6_V6ONLY off, TCP and UDP) unless an
IPv4 address is bound beside it, as uvicorn and most servers do on Linux.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field

from .config import Settings, parse_fd

SD_LISTEN_FDS_START = 3  # systemd passes its sockets from fd 3 on


class BindError(OSError):
    """A socket could not be bound; the message names the setting and the address."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.errno = code


@dataclass
class Listeners:
    tls: list[socket.socket] = field(default_factory=list)  # HTTP/1.1 over TLS
    http: list[socket.socket] = field(default_factory=list)  # cleartext HTTP/1.1 (TCP, Unix)
    udp: list[socket.socket] = field(default_factory=list)  # HTTP/3
    # MsQuic under fpy3-master: no shared socket; each worker's MsQuic binds this address.
    udp_addr: tuple | None = None
    quic_port: int = 0  # the UDP port HTTP/3 is served on (Alt-Svc); 0 = none
    # Unix socket files this process bound: (path, device, inode), removed on close.
    unix_files: list[tuple[str, int, int]] = field(default_factory=list)
    owner: int = field(default_factory=os.getpid)  # only it removes the files
    systemd: bool = False  # the sockets came from systemd socket activation

    def all(self) -> list[socket.socket]:
        return [*self.tls, *self.http, *self.udp]

    def close(self) -> None:
        for sock in self.all():
            sock.close()
        if os.getpid() != self.owner:
            return  # a worker's copy: the files belong to the master
        for path, dev, ino in self.unix_files:
            with contextlib.suppress(OSError):
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == (dev, ino):  # not another server's since
                    os.unlink(path)
        self.unix_files = []

    def describe(self) -> str:
        """Where it serves, for the logs."""
        parts = [f"https://{where(s)}" for s in self.tls]
        parts += [f"http://{where(s)}" for s in self.http]
        parts += [f"HTTP/3 on udp://{where(s)}" for s in self.udp]
        if self.udp_addr is not None:
            parts.append(f"HTTP/3 on udp://{_where(self.udp_addr)}")
        return ", ".join(parts) or "nothing"


def where(sock: socket.socket) -> str:
    """A socket's address as text: host:port, [v6]:port or unix:PATH."""
    try:
        addr = sock.getsockname()
    except OSError:
        return "?"
    if sock.family == socket.AF_UNIX:
        return f"unix:{addr.decode(errors='replace') if isinstance(addr, bytes) else addr}"
    return _where(addr)


def _where(addr: tuple) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


def _resolve(host: str, port: int, socktype: int, key: str):
    try:
        infos = socket.getaddrinfo(
            host, port, type=socktype, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
        )
    except socket.gaierror as exc:
        raise BindError(f"{key}: cannot resolve host {host!r}: {exc.strerror}") from None
    family, _, _, _, addr = infos[0]
    return family, addr


def dual_stack(host: str, hosts: tuple[str, ...] = ()) -> bool:
    """Whether ``host`` is the IPv6 wildcard that should serve IPv4 as well: yes unless
    an IPv4 address is bound beside it (the two would collide on the port)."""
    try:
        if ipaddress.ip_address(host) != ipaddress.IPv6Address("::"):
            return False
    except ValueError:
        return False
    for other in hosts:
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(other).version == 4:
                return False
    return True


def _v6only(sock: socket.socket, family: int, dual: bool) -> None:
    if family != socket.AF_INET6:
        return
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual else 1)
    except OSError:
        pass  # a host without IPv4 (or one that forbids mixing): IPv6 only


def bind_tcp(
    host: str, port: int, backlog: int, key: str, dual: bool | None = None
) -> socket.socket:
    family, addr = _resolve(host, port, socket.SOCK_STREAM, key)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _v6only(sock, family, dual_stack(host) if dual is None else dual)
        sock.bind(addr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise BindError(
            f"{key}: cannot listen on {_where(addr)} (TCP): {exc.strerror}", exc.errno
        ) from None
    sock.setblocking(False)
    return sock


def bind_udp(host: str, port: int, key: str, dual: bool | None = None) -> socket.socket:
    family, addr = _resolve(host, port, socket.SOCK_DGRAM, key)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        _v6only(sock, family, dual_stack(host) if dual is None else dual)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise BindError(
            f"{key}: cannot bind {_where(addr)} (UDP): {exc.strerror}", exc.errno
        ) from None
    sock.setblocking(False)
    return sock


def bind_unix(path: str, mode: int, backlog: int, key: str = "server.uds") -> tuple:
    """A listening Unix stream socket at ``path``; returns (socket, (path, dev, ino)).

    A stale socket file (nobody accepts on it) is replaced; a live one, or any other
    kind of file, is an error.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise BindError(f"{key}: cannot use {path}: {exc.strerror}") from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise BindError(f"{key}: {path} exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale: left by a server that is gone
            else:
                raise BindError(
                    f"{key}: cannot listen on unix:{path}: another server accepts there"
                )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        sock.listen(backlog)
        st = os.stat(path)
    except OSError as exc:
        sock.close()
        raise BindError(f"{key}: cannot listen on unix:{path}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock, (path, st.st_dev, st.st_ino)


def adopt_fd(fd: int, kind: str, backlog: int, key: str) -> tuple[socket.socket, str]:
    """An inherited socket as a listener: (socket, "https" | "http" | "quic")."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise BindError(f"{key}: fd {fd} is not a usable socket: {exc.strerror}") from None
    try:
        if sock.type == socket.SOCK_DGRAM:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                raise BindError(f"{key}: fd {fd}: a datagram socket, but not UDP")
            if kind not in ("", "quic"):
                raise BindError(f"{key}: fd {fd}: a UDP socket cannot serve {kind}")
            kind = "quic"
        elif sock.type == socket.SOCK_STREAM:
            if kind == "quic":
                raise BindError(f"{key}: fd {fd}: a stream socket cannot serve quic")
            if not kind:
                kind = "http" if sock.family == socket.AF_UNIX else "https"
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                sock.listen(backlog)
        else:
            raise BindError(f"{key}: fd {fd}: neither a stream nor a datagram socket")
        sock.getsockname()  # bound at all?
    except BindError:
        sock.detach()  # the fd stays as it was handed to us
        raise
    except OSError as exc:
        sock.detach()
        raise BindError(f"{key}: fd {fd}: {exc.strerror}") from None
    os.set_inheritable(fd, False)  # for the app's subprocesses
    sock.setblocking(False)
    return sock, kind


_KIND_NAMES = {"https": "https", "tls": "https", "http": "http", "quic": "quic", "h3": "quic"}


def systemd_fds(env: Mapping[str, str]) -> list[tuple[int, str]] | None:
    """The sockets systemd passed to this process, as (fd, kind hint); None when none.

    The variables are removed from ``os.environ`` so that workers, the app and its
    subprocesses do not take the sockets for theirs.
    """
    count, pid = env.get("LISTEN_FDS", ""), env.get("LISTEN_PID", "")
    if not count or not pid.isdigit() or int(pid) != os.getpid():
        return None
    names = env.get("LISTEN_FDNAMES", "").split(":")
    for var in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    if not count.isdigit():
        raise BindError(f"LISTEN_FDS: expected a number, got {count!r}")
    fds = []
    for i in range(int(count)):
        name = names[i].lower() if i < len(names) else ""
        fds.append((SD_LISTEN_FDS_START + i, _KIND_NAMES.get(name, "")))
    return fds


def _add(listeners: Listeners, sock: socket.socket, kind: str) -> None:
    {"https": listeners.tls, "http": listeners.http, "quic": listeners.udp}[kind].append(sock)


def bind_listeners(settings: Settings, env: Mapping[str, str] | None = None) -> Listeners:
    server = settings.server
    backlog = settings.http1.backlog
    listeners = Listeners()
    try:
        inherited = systemd_fds(os.environ if env is None else env)
        if inherited is not None:
            listeners.systemd = True
            for fd, kind in inherited:
                _add(listeners, *adopt_fd(fd, kind, backlog, "LISTEN_FDS"))
        else:
            hosts = settings.bind_hosts
            for host in hosts:
                dual = dual_stack(host, hosts)
                if server.port:
                    listeners.tls.append(bind_tcp(host, server.port, backlog, "server.port", dual))
                if server.http_port:
                    listeners.http.append(
                        bind_tcp(host, server.http_port, backlog, "server.http_port", dual)
                    )
                if settings.http3.enabled and settings.udp_port:
                    key = "http3.port" if settings.http3.port else "server.port"
                    listeners.udp.append(bind_udp(host, settings.udp_port, key, dual))
            if server.uds:
                sock, unix_file = bind_unix(server.uds, server.uds_mode, backlog)
                listeners.http.append(sock)
                listeners.unix_files.append(unix_file)
            for text in server.fds:
                fd, kind = parse_fd(text)
                _add(listeners, *adopt_fd(fd, kind, backlog, "server.fds"))
        if not settings.http3.enabled:
            for sock in listeners.udp:
                sock.close()
            listeners.udp = []
        if not listeners.all():
            raise BindError(
                "server.port: nothing to listen on (server.port and server.http_port are 0, "
                "and there is no server.uds, server.fds or socket from systemd)"
            )
    except BindError:
        listeners.close()
        raise
    if listeners.udp:
        listeners.quic_port = listeners.udp[0].getsockname()[1]
    return listeners


# Tries at a system-picked TCP port whose UDP twin is free too.
UDP_PICK_ATTEMPTS = 20


def bind_picked(settings: Settings) -> Listeners:
    """For server.port 0 in the embedding API: TLS on a port the system picks, and HTTP/3
    on the same number over UDP (another pick when that one is taken)."""
    server = settings.server
    for attempt in range(UDP_PICK_ATTEMPTS):
        tls = bind_tcp(server.host, 0, settings.http1.backlog, "server.port")
        listeners = Listeners(tls=[tls])
        if not settings.http3.enabled:
            return listeners
        port = tls.getsockname()[1]
        try:
            listeners.udp.append(bind_udp(server.host, port, "server.port"))
        except BindError as exc:
            listeners.close()
            if attempt + 1 == UDP_PICK_ATTEMPTS or exc.errno != errno.EADDRINUSE:
                raise
            continue
        listeners.quic_port = port
        return listeners
    raise AssertionError("unreachable")
