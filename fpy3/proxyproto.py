"""The PROXY protocol (versions 1 and 2): the client address a TCP proxy puts in front
of a connection's bytes, and the listener that reads it before anything else.

A TCP proxy (HAProxy ``send-proxy-v2``, nginx ``proxy_protocol on``, Traefik's
``proxyProtocol``) passes the client's bytes through untouched, TLS included, so it
cannot add headers; it writes one PROXY header first instead. With
``proxy.protocol`` on for a listener every connection must start with one, it is
taken only from a trusted peer (``proxy.forwarded_allow_ips``), and it must arrive
within ``proxy.protocol_timeout``. The socket then goes to the loop as an ordinary
accepted connection: on the TLS listener the handshake starts after the header.

The header is read without reading past it (a peek, then a read of exactly the header's
bytes), so whatever follows (a TLS ClientHello, a request) is left for the protocol.
This runs once per connection: Python is fast enough, and the parser is sans-I/O.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger("fpy3.error")

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included (spec 2.1)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# A v2 header is 16 bytes and up to 65535 more; addresses and the TLVs proxies send
# (TLS details, unique ids, authority) fit in far less. Longer ones are refused.
V2_MAX = 16 + 2048

_PP2_TYPE_SSL = 0x20
_PP2_CLIENT_SSL = 0x01


class ProxyHeaderError(ValueError):
    """The connection does not start with a valid PROXY header."""


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    # What the proxy received: None for a LOCAL (the proxy's own health check) or
    # UNKNOWN header, or non-IP addresses; the socket's own addresses are kept then.
    client: tuple[str, int] | None
    server: tuple[str, int] | None
    tls: bool = False  # v2: the client spoke TLS to the proxy (PP2_TYPE_SSL)


def parse(buf: bytes) -> tuple[int, ProxyInfo] | None:
    """``(header length, info)`` once ``buf`` holds a whole header; None while more bytes
    are needed (then every byte of ``buf`` belongs to the header). Raises
    ProxyHeaderError for anything that is not a valid header."""
    if buf[:1] == b"\r":
        if len(buf) < 16:
            if not V2_SIGNATURE.startswith(buf[:12]):
                raise ProxyHeaderError("not a PROXY protocol header")
            return None
        return _parse_v2(buf)
    if len(buf) < len(V1_PREFIX):
        if not V1_PREFIX.startswith(buf):
            raise ProxyHeaderError("not a PROXY protocol header")
        return None
    if not buf.startswith(V1_PREFIX):
        raise ProxyHeaderError("not a PROXY protocol header")
    end = buf.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(buf) >= V1_MAX:
            raise ProxyHeaderError("PROXY v1 line longer than 107 bytes")
        return None
    return end + 2, _parse_v1(buf[:end])


def _parse_v1(line: bytes) -> ProxyInfo:
    parts = line.split(b" ")
    if len(parts) >= 2 and parts[1] == b"UNKNOWN":
        return ProxyInfo(None, None)
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError(f"bad PROXY v1 line {line[:V1_MAX]!r}")
    version = 4 if parts[1] == b"TCP4" else 6
    src = _v1_address(parts[2], version)
    dst = _v1_address(parts[3], version)
    return ProxyInfo((src, _v1_port(parts[4])), (dst, _v1_port(parts[5])))


def _v1_address(text: bytes, version: int) -> str:
    try:
        ip = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyHeaderError(f"bad address {text!r} in a PROXY v1 line") from None
    if ip.version != version:
        raise ProxyHeaderError(f"an IPv{ip.version} address in a TCP{version} PROXY line")
    return str(ip)


def _v1_port(text: bytes) -> int:
    if not text.isdigit() or len(text) > 5 or int(text) > 65535:
        raise ProxyHeaderError(f"bad port {text!r} in a PROXY v1 line")
    return int(text)


def _parse_v2(buf: bytes) -> tuple[int, ProxyInfo] | None:
    if buf[:12] != V2_SIGNATURE:
        raise ProxyHeaderError("not a PROXY protocol header")
    ver_cmd, family = buf[12], buf[13]
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2 header with version {ver_cmd >> 4}")
    command = ver_cmd & 0x0F
    if command > 1:
        raise ProxyHeaderError(f"PROXY v2 header with command {command}")
    total = 16 + int.from_bytes(buf[14:16], "big")
    if total > V2_MAX:
        raise ProxyHeaderError(f"PROXY v2 header of {total} bytes (at most {V2_MAX})")
    if len(buf) < total:
        return None
    body = buf[16:total]
    if command == 0:  # LOCAL: the proxy's own connection (a health check)
        return total, ProxyInfo(None, None)
    af = family >> 4
    if af == 1:
        size, client, server = 12, _v2_inet(body, 4, socket.AF_INET), None
    elif af == 2:
        size, client, server = 36, _v2_inet(body, 16, socket.AF_INET6), None
    elif af == 3:
        size, client, server = 216, None, None  # AF_UNIX: no address to report
    elif af == 0:
        size, client, server = 0, None, None
    else:
        raise ProxyHeaderError(f"PROXY v2 header with address family {af}")
    if len(body) < size:
        raise ProxyHeaderError("PROXY v2 header shorter than its addresses")
    if client is not None:
        client, server = client
    return total, ProxyInfo(client, server, _v2_tls(body[size:]))


def _v2_inet(body: bytes, n: int, family: int):
    if len(body) < 2 * n + 4:
        raise ProxyHeaderError("PROXY v2 header shorter than its addresses")
    src = socket.inet_ntop(family, body[:n])
    dst = socket.inet_ntop(family, body[n : 2 * n])
    sport = int.from_bytes(body[2 * n : 2 * n + 2], "big")
    dport = int.from_bytes(body[2 * n + 2 : 2 * n + 4], "big")
    return (src, sport), (dst, dport)


def _v2_tls(tlvs: bytes) -> bool:
    """Whether the TLVs say the client connected to the proxy over TLS."""
    tls = False
    pos = 0
    while pos < len(tlvs):
        if pos + 3 > len(tlvs):
            raise ProxyHeaderError("truncated TLV in a PROXY v2 header")
        kind = tlvs[pos]
        size = int.from_bytes(tlvs[pos + 1 : pos + 3], "big")
        value = tlvs[pos + 3 : pos + 3 + size]
        if len(value) < size:
            raise ProxyHeaderError("truncated TLV in a PROXY v2 header")
        if kind == _PP2_TYPE_SSL and value and value[0] & _PP2_CLIENT_SSL:
            tls = True
        pos += 3 + size
    return tls


# --- the listener ------------------------------------------------------------------

# Connections accepted per readiness of the listening socket, as asyncio does.
_ACCEPT_BATCH = 100
# Seconds to stop accepting after running out of file descriptors (asyncio's value).
_ACCEPT_RETRY = 1.0
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class _Pending:
    """A connection whose PROXY header is being read, then handed to the loop."""

    __slots__ = ("sock", "peer", "buf", "timer", "task")

    def __init__(self, sock: socket.socket, peer: str):
        self.sock = sock
        self.peer = peer
        self.buf = b""
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task | None = None


class ProxyProtocolServer:
    """Accepts on ``sock``; each connection must start with a PROXY header from a
    trusted peer within ``timeout`` seconds; the socket then goes to the loop with
    ``factory(info)`` as its protocol (and ``ssl_context``: the TLS handshake follows
    the header). ``close`` and ``wait_closed`` are those of an asyncio Server; while
    they run, connections still reading their header or in their TLS handshake count
    as open."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        factory: Callable[[ProxyInfo], asyncio.BaseProtocol],
        *,
        ssl_context: ssl.SSLContext | None,
        trusted: Callable[[str | None], bool],
        timeout: float,
        handshake_timeout: float | None = None,
        shutdown_timeout: float | None = None,
        max_pending: int = 0,
    ):
        self.loop = loop
        self.sock = sock
        self.factory = factory
        self.trusted = trusted
        self.timeout = timeout
        self.max_pending = max_pending  # 0 = no bound
        self.tls: dict = {}
        if ssl_context is not None:
            self.tls = {
                "ssl": ssl_context,
                "ssl_handshake_timeout": handshake_timeout,
                "ssl_shutdown_timeout": shutdown_timeout,
            }
        self.pending: set[_Pending] = set()
        self.closed = False
        self._idle: asyncio.Future | None = None
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._accept)

    # -- accepting ------------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    logger.error("PROXY listener: cannot accept (%s); retrying shortly", exc)
                    self.loop.remove_reader(self.sock.fileno())
                    self.loop.call_later(_ACCEPT_RETRY, self._resume)
                return  # ECONNABORTED and the like: the peer is gone already
            peer = addr[0] if isinstance(addr, tuple) else None
            if not self.trusted(peer):
                logger.info(
                    "PROXY protocol: connection from %s refused: not in proxy.forwarded_allow_ips",
                    peer,
                )
                conn.close()
                continue
            if self.max_pending and len(self.pending) >= self.max_pending:
                logger.warning("PROXY protocol: too many connections waiting for a header")
                conn.close()
                continue
            conn.setblocking(False)
            pending = _Pending(conn, peer or "unix")
            self.pending.add(pending)
            pending.timer = self.loop.call_later(self.timeout, self._expired, pending)
            self.loop.add_reader(conn.fileno(), self._readable, pending)

    def _resume(self) -> None:
        if not self.closed:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def _readable(self, pending: _Pending) -> None:
        sock = pending.sock
        buf = pending.buf
        try:
            data = sock.recv(V2_MAX - len(buf), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(pending)
            return
        if not data:
            self._drop(pending)
            return
        try:
            found = parse(buf + data)
        except ProxyHeaderError as exc:
            logger.info("PROXY protocol: connection from %s closed: %s", pending.peer, exc)
            self._drop(pending)
            return
        # Take only the header's bytes (all of them while it is incomplete): the rest is
        # the protocol's (a TLS ClientHello, a request).
        take = len(data) if found is None else found[0] - len(buf)
        try:
            pending.buf = buf + sock.recv(take)
        except OSError:
            self._drop(pending)
            return
        if found is None:
            return
        self.loop.remove_reader(sock.fileno())
        if pending.timer is not None:
            pending.timer.cancel()
            pending.timer = None
        pending.task = asyncio.ensure_future(self._hand_over(pending, found[1]), loop=self.loop)

    async def _hand_over(self, pending: _Pending, info: ProxyInfo) -> None:
        try:
            await self.loop.connect_accepted_socket(
                lambda: self.factory(info), pending.sock, **self.tls
            )
        except asyncio.CancelledError:
            pending.sock.close()
            raise
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            # A failed TLS handshake, a peer gone: routine on the internet.
            logger.debug("connection from %s failed: %r", pending.peer, exc)
            pending.sock.close()
        finally:
            self._forget(pending)

    def _expired(self, pending: _Pending) -> None:
        pending.timer = None
        logger.info(
            "PROXY protocol: connection from %s closed: no header within %gs",
            pending.peer,
            self.timeout,
        )
        self._drop(pending)

    def _drop(self, pending: _Pending) -> None:
        """Close a connection still reading its header."""
        if pending.timer is not None:
            pending.timer.cancel()
            pending.timer = None
        if pending.task is None:
            self.loop.remove_reader(pending.sock.fileno())
        pending.sock.close()
        self._forget(pending)

    def _forget(self, pending: _Pending) -> None:
        self.pending.discard(pending)
        self._check_idle()

    def _check_idle(self) -> None:
        idle = self._idle
        if self.closed and not self.pending and idle is not None and not idle.done():
            idle.set_result(None)

    # -- what asyncio's Server offers --------------------------------------------------------

    def close(self) -> None:
        """Stop accepting; connections already accepted go on."""
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self._check_idle()

    def kill(self) -> None:
        """Close the connections still reading their header or in their handshake."""
        self.close()
        for pending in list(self.pending):
            if pending.task is not None:
                pending.task.cancel()
            else:
                self._drop(pending)

    async def wait_closed(self) -> None:
        """Wait until closed and every connection accepted is handed over or gone."""
        if self.closed and not self.pending:
            return
        if self._idle is None:
            self._idle = self.loop.create_future()
        await asyncio.shield(self._idle)
