"""QUIC below the clients: Initial packets made by hand, and a UDP relay that delays.

- ``InitialMaker`` takes one real client Initial (aioquic's ClientHello) apart once and
  seals its payload again under new connection ids (the source id also inside the
  ClientHello's transport parameters): each such packet looks like a new client to a
  server, as a spoofed flood would, and costs a few microseconds to make. The sender
  never answers the server.
- ``DelayRelay`` forwards UDP datagrams between clients and a server with a fixed delay
  each way, so that loopback gets a round trip long enough for flow-control windows
  to matter (the environment has no netem).
"""

from __future__ import annotations

import os
import socket
import threading
import time


class InitialMaker:
    """Client Initial datagrams to ``port``, one new connection id each."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        from aioquic.buffer import Buffer
        from aioquic.h3.connection import H3_ALPN
        from aioquic.quic.configuration import QuicConfiguration
        from aioquic.quic.connection import QuicConnection
        from aioquic.quic.crypto import CryptoPair
        from aioquic.quic.packet import pull_quic_header

        config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, verify_mode=0)
        config.server_name = "localhost"
        quic = QuicConnection(configuration=config)
        quic.connect((host, port), now=time.monotonic())
        datagram = quic.datagrams_to_send(now=time.monotonic())[0][0]
        buf = Buffer(data=datagram)
        header = pull_quic_header(buf, host_cid_length=8)
        pair = CryptoPair()
        pair.setup_initial(header.destination_cid, is_client=False, version=header.version)
        _, payload, _ = pair.decrypt_packet(datagram[: header.packet_length], buf.tell(), 0)
        # The ClientHello names the source id (initial_source_connection_id): a new id
        # goes there too. Nothing signs a ClientHello; the server only hashes it.
        self.scid = header.source_cid
        assert payload.count(self.scid) == 1
        self.payload = payload

    def packet(self, dcid: bytes | None = None, version: int = 1) -> bytes:
        """One Initial datagram of 1200 bytes (RFC 9000 14.1) for a new connection."""
        from aioquic.quic.crypto import CryptoPair

        dcid = dcid or os.urandom(8)
        scid = os.urandom(len(self.scid))
        head_len = 1 + 4 + 1 + len(dcid) + 1 + len(scid) + 1 + 2 + 2
        payload = self.payload.replace(self.scid, scid)
        payload += bytes(max(0, 1200 - head_len - len(payload) - 16))
        pn = 0
        length = 2 + len(payload) + 16  # packet number, payload, AEAD tag
        first = 0xC1 if version == 1 else 0xD1  # Initial (v2 numbers it 1), 2-byte pn
        header = bytes([first]) + version.to_bytes(4, "big")
        header += bytes([len(dcid)]) + dcid + bytes([len(scid)]) + scid + b"\x00"  # no token
        header += (0x4000 | length).to_bytes(2, "big") + pn.to_bytes(2, "big")
        pair = CryptoPair()
        pair.setup_initial(dcid, is_client=True, version=version)
        return pair.encrypt_packet(header, payload, pn)


class DelayRelay:
    """UDP between clients and ``(host, port)`` with ``delay`` seconds each way.

    Clients send to ``relay.port``; each client address gets its own upstream socket.
    A thread does the work; ``close()`` stops it.
    """

    def __init__(self, host: str, port: int, delay: float) -> None:
        self.target = (host, port)
        self.delay = delay
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self._up: dict[tuple, socket.socket] = {}  # client address -> upstream socket
        self._down: dict[socket.socket, tuple] = {}
        self._queue: list[tuple[float, int, socket.socket, bytes, tuple]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import heapq
        import select

        seq = 0
        while not self._stop.is_set():
            timeout = 0.05
            if self._queue:
                timeout = max(0.0, min(timeout, self._queue[0][0] - time.monotonic()))
            ready, _, _ = select.select([self.sock, *self._down], [], [], timeout)
            now = time.monotonic()
            for s in ready:
                while True:
                    try:
                        data, addr = s.recvfrom(65536)
                    except BlockingIOError:
                        break
                    if s is self.sock:
                        up = self._up.get(addr)
                        if up is None:
                            up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                            up.setblocking(False)
                            up.bind((self.target[0], 0))
                            self._up[addr] = up
                            self._down[up] = addr
                        out, dest = up, self.target
                    else:
                        out, dest = self.sock, self._down[s]
                    seq += 1
                    heapq.heappush(self._queue, (now + self.delay, seq, out, data, dest))
            now = time.monotonic()
            while self._queue and self._queue[0][0] <= now:
                _, _, out, data, dest = heapq.heappop(self._queue)
                try:
                    out.sendto(data, dest)
                except BlockingIOError:
                    pass  # dropped, as a full queue on a path would

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for s in [self.sock, *self._up.values()]:
            s.close()

    def __enter__(self) -> DelayRelay:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
