"""WebSocket connection state machine (RFC 6455), sans-I/O, server side.

Bytes in, events and bytes out. Frame checks, unmasking and UTF-8 validation are
done in C (``native/ws.c``); this module assembles messages, inflates and deflates
them (permessage-deflate, RFC 7692), answers pings and runs the close handshake.
The handshake helpers are in ``handshake.py``.
"""

from __future__ import annotations

import struct
import zlib

from fpy3._native import ffi, lib

from ..core.errors import ProtocolError

__all__ = [
    "CLOSED",
    "CLOSING",
    "OPEN",
    "Deflate",
    "ProtocolError",
    "WSProtocol",
    "negotiate_deflate",
    "open_protocol",
]

OPEN, CLOSING, CLOSED = range(3)

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
_FIN = lib.FPY3_WS_FIN
_RSV1 = lib.FPY3_WS_RSV1
_MAX_FRAMES = 64
# Frame spans out of C: (opcode, flags, start, end) each. Module state: every
# connection of a worker parses on its loop's thread, and reads the spans at once.
_frames = ffi.new("int64_t[]", 4 * _MAX_FRAMES)
_receive = lib.fpy3_ws_receive
_unpack = ffi.unpack
_TAIL = b"\x00\x00\xff\xff"

# Headers of unmasked server frames with short payloads, built once: a lookup here
# costs a quarter of a call into C that writes one.
_SHORT = {
    (op, rsv1): [bytes((0x80 | (0x40 if rsv1 else 0) | op, n)) for n in range(126)]
    for op in (OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG)
    for rsv1 in (False, True)
}


def _header(op: int, n: int, rsv1: bool = False) -> bytes:
    if n < 126:
        return _SHORT[op, rsv1][n]
    b0 = 0x80 | (0x40 if rsv1 else 0) | op
    if n < 65536:
        return struct.pack("!BBH", b0, 126, n)
    return struct.pack("!BBQ", b0, 127, n)


# --- permessage-deflate ------------------------------------------------------------------


class Deflate:
    """permessage-deflate state of one connection, after negotiation."""

    __slots__ = ("server_bits", "server_reset", "client_reset", "level", "_c", "_d")

    def __init__(self, server_bits: int, server_reset: bool, client_reset: bool, level: int):
        self.server_bits = server_bits
        self.server_reset = server_reset  # server_no_context_takeover
        self.client_reset = client_reset  # client_no_context_takeover
        self.level = level
        self._c: zlib._Compress | None = None
        self._d: zlib._Decompress | None = None

    def compress(self, data: bytes) -> bytes:
        c = self._c
        if c is None:
            c = zlib.compressobj(self.level, zlib.DEFLATED, -self.server_bits, 8)
            if not self.server_reset:
                self._c = c
        out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
        return out[:-4] if out.endswith(_TAIL) else out

    def decompress(self, data: bytes, limit: int) -> bytes:
        d = self._d
        if d is None:
            # A 15-bit window inflates anything the client's (smaller) window made.
            d = zlib.decompressobj(-15)
            if not self.client_reset:
                self._d = d
        try:
            out = d.decompress(data + _TAIL, limit + 1 if limit else 0)
        except zlib.error as exc:
            raise ProtocolError(1007, f"invalid deflate data: {exc}") from None
        if limit and (len(out) > limit or d.unconsumed_tail):
            raise ProtocolError(1009, "message larger than websocket.max_message_size")
        return out


def negotiate_deflate(headers, window_bits: int, level: int) -> tuple[Deflate | None, bytes]:
    """Accept the first permessage-deflate offer we can honour.

    Returns the state and the Sec-WebSocket-Extensions response value, or (None, b"").
    """
    for name, value in headers:
        if name != b"sec-websocket-extensions":
            continue
        for offer in value.decode("latin-1").split(","):
            params = [p.strip() for p in offer.split(";")]
            if params[0].lower() != "permessage-deflate":
                continue
            accepted = _deflate_offer(params[1:], window_bits, level)
            if accepted is not None:
                return accepted
    return None, b""


def _deflate_offer(params: list[str], window_bits: int, level: int):
    """One offer's parameters (RFC 7692 7.1); None declines the offer."""
    seen = set()
    server_bits = window_bits
    server_reset = client_reset = False
    for param in params:
        key, eq, val = param.partition("=")
        key = key.strip().lower()
        val = val.strip().strip('"')
        if key in seen:
            return None  # a parameter twice
        seen.add(key)
        if key == "server_no_context_takeover" and not eq:
            server_reset = True
        elif key == "client_no_context_takeover" and not eq:
            client_reset = True
        elif key == "server_max_window_bits":
            # zlib makes no raw deflate stream with an 8-bit window: decline 8.
            if not (val.isdigit() and 9 <= int(val) <= 15):
                return None
            server_bits = min(server_bits, int(val))
        elif key == "client_max_window_bits":
            # Any value is fine: we inflate with a full 15-bit window.
            if eq and not (val.isdigit() and 8 <= int(val) <= 15):
                return None
        else:
            return None
    parts = ["permessage-deflate"]
    if server_reset:
        parts.append("server_no_context_takeover")
    if client_reset:
        parts.append("client_no_context_takeover")
    if server_bits < 15 or "server_max_window_bits" in seen:
        parts.append(f"server_max_window_bits={server_bits}")
    return Deflate(server_bits, server_reset, client_reset, level), "; ".join(parts).encode()


# --- the connection ------------------------------------------------------------------------


class WSProtocol:
    """One WebSocket connection after the handshake.

    ``receive_data`` returns a list of events: ``("text", str)``, ``("bytes", bytes)``,
    ``("ping", bytes)``, ``("pong", bytes)``, ``("close", code, reason)``. Bytes to
    send (pongs, the close reply) accumulate in ``outgoing`` for the caller to write.
    A protocol error raises ProtocolError after queueing the close frame it needs.
    """

    __slots__ = (
        "state",
        "max_message",
        "deflate",
        "outgoing",
        "_p",
        "_parts",
        "_compressed",
        "_opcode",
        "close_code",
        "close_reason",
        "close_sent",
    )

    def __init__(self, max_message: int = 0, deflate: Deflate | None = None):
        self.state = OPEN
        self.max_message = max_message
        self.deflate = deflate
        self.outgoing: list[bytes] = []
        p = lib.fpy3_ws_parser_new(max_message, deflate is not None)
        if p == ffi.NULL:
            raise MemoryError("websocket parser")
        # Owned by this object: the parser and its receive buffer go with it.
        self._p = ffi.gc(p, lib.fpy3_ws_parser_free)
        self._parts: list[bytes] = []
        self._compressed = False
        self._opcode = 0
        self.close_code = 1005  # what the peer sent; 1005 = no code, 1006 = no close frame
        self.close_reason = ""
        self.close_sent = False

    # -- input ----------------------------------------------------------------------------

    @property
    def open(self) -> bool:
        return self.state == OPEN

    @property
    def closed(self) -> bool:
        return self.state == CLOSED

    def receive_data(self, data) -> list:
        """Bytes from the peer (any bytes-like object): copied into the parser at once."""
        if self.state == CLOSED:
            return []
        p = self._p
        if data.__class__ is bytes:
            n = _receive(p, data, len(data), _frames, _MAX_FRAMES)
        else:
            view = memoryview(data)
            n = _receive(p, ffi.from_buffer(view), view.nbytes, _frames, _MAX_FRAMES)
        if not n:
            return []
        events: list = []
        while True:
            if n < 0:
                n = p.nframes
                error = True
            else:
                error = False
            if n:
                spans = _unpack(_frames, 4 * n)
                # Valid until the next _receive; every payload is copied out below.
                buf = ffi.buffer(p.buf, spans[-1])
                for i in range(0, 4 * n, 4):
                    op = spans[i]
                    if op == OP_TEXT and spans[i + 1] == _FIN and not self._parts:
                        events.append(("text", buf[spans[i + 2] : spans[i + 3]].decode()))
                        continue
                    self._frame(op, spans[i + 1], buf[spans[i + 2] : spans[i + 3]], events)
                    if self.state == CLOSED:
                        return events  # nothing after a close frame counts
            if error:
                reason = ffi.string(p.reason).decode()
                self._fail(p.close_code, reason)
                raise ProtocolError(p.close_code, reason)
            if n < _MAX_FRAMES:
                return events
            n = _receive(p, b"", 0, _frames, _MAX_FRAMES)

    def _frame(self, op: int, flags: int, data: bytes, events: list) -> None:
        if op >= OP_CLOSE:
            self._control(op, data, events)
            return
        if op:
            self._opcode = op
            self._compressed = bool(flags & _RSV1)
        if not flags & _FIN:
            self._parts.append(data)
            return
        if self._parts:
            self._parts.append(data)
            data = b"".join(self._parts)
            self._parts.clear()
        if self._compressed:
            assert self.deflate is not None  # RSV1 is refused in C without deflate
            try:
                data = self.deflate.decompress(data, self.max_message)
            except ProtocolError as exc:
                self._fail(exc.code, exc.reason)
                raise
            if self._opcode == OP_TEXT:
                try:
                    events.append(("text", data.decode()))
                except UnicodeDecodeError:
                    self._fail(1007, "invalid UTF-8 in a text message")
                    raise ProtocolError(1007, "invalid UTF-8 in a text message") from None
                return
        elif self._opcode == OP_TEXT:
            events.append(("text", data.decode()))  # C has validated it
            return
        events.append(("bytes", data))

    def _control(self, op: int, payload: bytes, events: list) -> None:
        if op == OP_PING:
            if self.state == OPEN:
                self.outgoing.append(_header(OP_PONG, len(payload)) + payload)
            events.append(("ping", payload))
        elif op == OP_PONG:
            events.append(("pong", payload))
        else:
            if len(payload) >= 2:
                code = int.from_bytes(payload[:2])
                reason = payload[2:].decode()  # C has validated it
            else:
                code, reason = 1005, ""
            self.close_code, self.close_reason = code, reason
            if not self.close_sent:
                # Echo the code (RFC 6455 5.5.1); a close without one is answered 1000.
                reply = payload[:2] if code != 1005 else b""
                self.outgoing.append(_header(OP_CLOSE, len(reply)) + reply)
                self.close_sent = True
            self.state = CLOSED
            events.append(("close", code, reason))

    def _fail(self, code: int, reason: str) -> None:
        if not self.close_sent:
            self.outgoing.append(self._close_frame(code, reason))
            self.close_sent = True
        self.close_code = 1006
        self.state = CLOSED

    # -- output ---------------------------------------------------------------------------

    def message(self, data, text: bool) -> list[bytes]:
        """The frames of one message: [header, payload] (for writelines)."""
        if text:
            data = data.encode()
        op = OP_TEXT if text else OP_BINARY
        deflate = self.deflate
        if deflate is not None:
            data = deflate.compress(data)
            return [_header(op, len(data), True), data]
        return [_header(op, len(data)), data]

    def ping(self, payload: bytes = b"") -> bytes:
        return _header(OP_PING, len(payload)) + payload

    def close(self, code: int = 1000, reason: str = "") -> bytes:
        """Start the close handshake; b"" when a close was already sent."""
        if self.close_sent:
            return b""
        self.close_sent = True
        if self.state == OPEN:
            self.state = CLOSING
        return self._close_frame(code, reason)

    @staticmethod
    def _close_frame(code: int, reason: str) -> bytes:
        text = reason.encode()
        if len(text) > 123:  # a control frame holds 125 bytes; do not split a character
            text = text[:123].decode("utf-8", "ignore").encode()
        payload = code.to_bytes(2) + text
        return _header(OP_CLOSE, len(payload)) + payload


def open_protocol(headers, settings) -> tuple[WSProtocol, bytes]:
    """The protocol for an accepted handshake, with permessage-deflate when the client
    offered it and ``settings`` (the [websocket] section) allows it; and the
    Sec-WebSocket-Extensions response value (b"" without an extension)."""
    deflate, ext = None, b""
    if settings.per_message_deflate:
        deflate, ext = negotiate_deflate(
            headers, settings.deflate_window_bits, settings.deflate_level
        )
    return WSProtocol(settings.max_message_size, deflate), ext
