"""The websocket opening handshake over HTTP/1.1 (RFC 6455, section 4)."""

from __future__ import annotations

import base64
import binascii
import hashlib

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_key(key: bytes) -> bytes:
    """Sec-WebSocket-Accept for the client's Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def valid_key(key: bytes | None) -> bool:
    """A Sec-WebSocket-Key is 16 bytes, base64-encoded."""
    if not key:
        return False
    try:
        return len(base64.b64decode(key.strip(), validate=True)) == 16
    except binascii.Error:
        return False
