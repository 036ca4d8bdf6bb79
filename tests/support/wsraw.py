"""A raw WebSocket client on RawConn: the handshake by hand and frames byte by byte,
for input a real client library would refuse to send."""

from __future__ import annotations

import base64
import os
import struct
import time

from harness import RawConn


def frame(
    op: int, payload: bytes = b"", fin: bool = True, mask: bool = True, rsv: int = 0
) -> bytes:
    """One client frame; ``rsv`` is the RSV bits already shifted (0x40 = RSV1)."""
    b0 = (0x80 if fin else 0) | rsv | op
    n = len(payload)
    m = 0x80 if mask else 0
    if n < 126:
        head = bytes((b0, m | n))
    elif n < 65536:
        head = struct.pack("!BBH", b0, m | 126, n)
    else:
        head = struct.pack("!BBQ", b0, m | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i & 3] for i, b in enumerate(payload))


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


class RawWS:
    def __init__(self, conn: RawConn):
        self.conn = conn

    @classmethod
    def open(cls, server, path: str = "/echo", tls: bool = False, headers: bytes = b""):
        conn = server.connect(tls)
        key = base64.b64encode(os.urandom(16))
        conn.send(
            b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
            b"Sec-WebSocket-Version: 13\r\n" + headers + b"\r\n"
        )
        resp = conn.read_response()
        assert resp.status == 101, (resp.status, resp.body)
        ws = cls(conn)
        ws.response = resp
        return ws

    def send(self, data: bytes) -> None:
        self.conn.send(data)

    def recv_frame(self, timeout: float = 10.0) -> tuple[int, bool, bytes]:
        """(opcode, fin, payload) of the next server frame."""
        conn = self.conn
        deadline = time.monotonic() + timeout
        while True:
            buf = conn.buf
            if len(buf) >= 2:
                n = buf[1] & 0x7F
                assert not buf[1] & 0x80, "server frames must not be masked"
                hl = 2 + (2 if n == 126 else 8 if n == 127 else 0)
                if len(buf) >= hl:
                    if n == 126:
                        n = struct.unpack("!H", buf[2:4])[0]
                    elif n == 127:
                        n = struct.unpack("!Q", buf[2:10])[0]
                    if len(buf) >= hl + n:
                        b0 = buf[0]
                        payload = bytes(buf[hl : hl + n])
                        del buf[: hl + n]
                        return b0 & 0x0F, bool(b0 & 0x80), payload
            if not conn._fill(deadline):
                raise EOFError("connection closed before a whole frame")

    def recv_close(self, timeout: float = 10.0) -> tuple[int, str]:
        """Skip data and pings up to the close frame; (code, reason)."""
        while True:
            op, _, payload = self.recv_frame(timeout)
            if op == 8:
                if len(payload) < 2:
                    return 1005, ""
                return struct.unpack("!H", payload[:2])[0], payload[2:].decode()

    def close(self) -> None:
        self.conn.close()
