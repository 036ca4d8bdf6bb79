"""The PROXY protocol in-process: the v1/v2 parser, and the listener on loopback
sockets (the header is taken, nothing after it; untrusted peers, bad headers and slow
ones are closed)."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
import uvloop

from fpy3.proxyproto import (
    V2_MAX,
    V2_SIGNATURE,
    ProxyHeaderError,
    ProxyInfo,
    ProxyProtocolServer,
    parse,
)


def v2(
    command: int = 1,
    family: int = 0x11,
    addresses: bytes | None = None,
    tlvs: bytes = b"",
    version: int = 2,
) -> bytes:
    if addresses is None:
        addresses = socket.inet_aton("203.0.113.7") + socket.inet_aton("192.0.2.1")
        addresses += struct.pack("!HH", 4711, 443)
    body = addresses + tlvs
    return (
        V2_SIGNATURE + bytes([version << 4 | command, family]) + struct.pack("!H", len(body)) + body
    )


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


# --- v1 ------------------------------------------------------------------------------


def test_v1_tcp4():
    data = b"PROXY TCP4 203.0.113.7 192.0.2.1 4711 443\r\nGET / HTTP/1.1\r\n"
    n, info = parse(data)
    assert data[:n].endswith(b"443\r\n") and data[n:].startswith(b"GET")
    assert info == ProxyInfo(("203.0.113.7", 4711), ("192.0.2.1", 443))


def test_v1_tcp6_and_unknown():
    _, info = parse(b"PROXY TCP6 2001:db8::7 2001:db8::1 1 65535\r\n")
    assert info == ProxyInfo(("2001:db8::7", 1), ("2001:db8::1", 65535))
    n, info = parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nrest")
    assert n == len(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n")
    assert info == ProxyInfo(None, None)
    assert parse(b"PROXY UNKNOWN\r\n") == (15, ProxyInfo(None, None))


def test_v1_is_incomplete_until_its_crlf():
    line = b"PROXY TCP4 203.0.113.7 192.0.2.1 4711 443\r\n"
    for i in range(1, len(line)):
        assert parse(line[:i]) is None, line[:i]
    assert parse(line) is not None


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"\x16\x03\x01\x02\x00",  # a TLS ClientHello without a header
        b"PROXZ",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 4711\r\n",
        b"PROXY TCP5 203.0.113.7 192.0.2.1 4711 443\r\n",
        b"PROXY TCP4 2001:db8::7 192.0.2.1 4711 443\r\n",
        b"PROXY TCP6 203.0.113.7 2001:db8::1 4711 443\r\n",
        b"PROXY TCP4 203.0.113.300 192.0.2.1 4711 443\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 65536 443\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 -1 443\r\n",
        b"PROXY TCP4 203.0.113.7  192.0.2.1 4711 443\r\n",
        b"PROXY " + b"x" * 120,  # no CRLF within 107 bytes
    ],
)
def test_v1_errors(data: bytes):
    with pytest.raises(ProxyHeaderError):
        parse(data)


# --- v2 ------------------------------------------------------------------------------------


def test_v2_tcp4():
    data = v2() + b"\x16\x03\x01"
    n, info = parse(data)
    assert data[n:] == b"\x16\x03\x01"
    assert info == ProxyInfo(("203.0.113.7", 4711), ("192.0.2.1", 443))


def test_v2_tcp6():
    addresses = socket.inet_pton(socket.AF_INET6, "2001:db8::7")
    addresses += socket.inet_pton(socket.AF_INET6, "2001:db8::1") + struct.pack("!HH", 5, 6)
    _, info = parse(v2(family=0x21, addresses=addresses))
    assert info == ProxyInfo(("2001:db8::7", 5), ("2001:db8::1", 6))


def test_v2_local_unspec_and_unix_keep_the_socket_addresses():
    assert parse(v2(command=0))[1] == ProxyInfo(None, None)
    assert parse(v2(family=0x00, addresses=b""))[1] == ProxyInfo(None, None)
    assert parse(v2(family=0x31, addresses=b"\0" * 216))[1] == ProxyInfo(None, None)


def test_v2_tls_tlv():
    ssl_tlv = tlv(0x20, b"\x01" + b"\0\0\0\0" + tlv(0x21, b"TLSv1.3"))
    _, info = parse(v2(tlvs=tlv(0x02, b"example.com") + ssl_tlv))
    assert info.tls
    _, info = parse(v2(tlvs=tlv(0x20, b"\x00\0\0\0\0")))  # not over TLS
    assert not info.tls


def test_v2_is_incomplete_until_its_length():
    data = v2(tlvs=tlv(0x04, b"unique-id"))
    for i in range(1, len(data)):
        assert parse(data[:i]) is None, i
    assert parse(data)[0] == len(data)


@pytest.mark.parametrize(
    "data",
    [
        V2_SIGNATURE[:11] + b"X" + b"\0" * 4,
        v2(version=1),
        v2(command=2),
        v2(family=0x41),
        v2(addresses=b"\0" * 8),  # shorter than two IPv4 addresses and ports
        v2(tlvs=b"\x20\x00\x05\x01"),  # a TLV longer than what is left
        v2(tlvs=b"\x20\x00"),
        V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", V2_MAX),
    ],
)
def test_v2_errors(data: bytes):
    with pytest.raises(ProxyHeaderError):
        parse(data)


# --- the listener, on loopback ---------------------------------------------------------------


class Recorder(asyncio.Protocol):
    def __init__(self, info: ProxyInfo, got: asyncio.Queue):
        self.info = info
        self.got = got
        self.data = b""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.data.endswith(b"\n"):
            self.got.put_nowait((self.info, self.data))
            self.transport.write(b"ok\n")


async def _serve(trusted=lambda host: True, timeout: float = 5.0):
    loop = asyncio.get_running_loop()
    got: asyncio.Queue = asyncio.Queue()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = ProxyProtocolServer(
        loop,
        sock,
        lambda info: Recorder(info, got),
        ssl_context=None,
        trusted=trusted,
        timeout=timeout,
    )
    return server, sock.getsockname()[1], got


async def _closed(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:  # closed with our bytes unread
        return True


def run(coro):
    return uvloop.run(asyncio.wait_for(coro, 10))


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


def header_bytes_read(server: ProxyProtocolServer) -> int:
    return sum(len(p.buf) for p in server.pending)


def test_listener_takes_the_header_in_pieces_and_nothing_after_it():
    async def main():
        server, port, got = await _serve()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        header = v2()
        for end in (5, 20):
            writer.write(header[header_bytes_read(server) : end])
            await until(lambda end=end: header_bytes_read(server) == end)
        writer.write(header[20:] + b"hello\n")
        info, data = await asyncio.wait_for(got.get(), 5)
        assert info.client == ("203.0.113.7", 4711)
        assert data == b"hello\n"
        assert await reader.readline() == b"ok\n"
        writer.close()
        server.close()
        await asyncio.wait_for(server.wait_closed(), 5)

    run(main())


def test_listener_v1_then_data_in_one_packet():
    async def main():
        server, port, got = await _serve()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"PROXY TCP4 198.51.100.9 192.0.2.1 1234 80\r\nline\n")
        info, data = await asyncio.wait_for(got.get(), 5)
        assert info.client == ("198.51.100.9", 1234) and data == b"line\n"
        writer.close()
        server.close()

    run(main())


def test_listener_refuses_untrusted_peers():
    async def main():
        server, port, got = await _serve(trusted=lambda host: host == "10.9.9.9")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(v2() + b"hello\n")
        assert await _closed(reader)
        assert got.empty() and not server.pending
        writer.close()
        server.close()

    run(main())


def test_listener_closes_on_a_bad_header():
    async def main():
        server, port, got = await _serve()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        assert await _closed(reader)
        assert got.empty()
        await until(lambda: not server.pending)
        server.close()

    run(main())


def test_listener_closes_a_connection_without_a_header_in_time():
    async def main():
        server, port, got = await _serve(timeout=0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"PROXY TCP4 ")  # and nothing more
        started = asyncio.get_running_loop().time()
        assert await _closed(reader)
        assert asyncio.get_running_loop().time() - started < 3
        assert got.empty() and not server.pending
        server.close()

    run(main())


def test_wait_closed_waits_for_connections_still_reading_their_header():
    async def main():
        server, port, got = await _serve()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"PROXY TCP4 ")
        await until(lambda: header_bytes_read(server) == 11)
        closed = asyncio.ensure_future(server.wait_closed())
        server.close()
        for _ in range(10):
            await asyncio.sleep(0)
        assert not closed.done()  # still reading that header
        writer.write(b"203.0.113.7 192.0.2.1 1 2\r\nafter close\n")
        info, data = await asyncio.wait_for(got.get(), 5)
        assert data == b"after close\n"
        await asyncio.wait_for(closed, 5)
        # The listening socket is closed: new connections are refused.
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

    run(main())


def test_kill_closes_connections_still_reading_their_header():
    async def main():
        server, port, got = await _serve()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"PROXY ")
        await until(lambda: header_bytes_read(server) == 6)
        server.kill()
        assert await _closed(reader)
        await asyncio.wait_for(server.wait_closed(), 5)

    run(main())
