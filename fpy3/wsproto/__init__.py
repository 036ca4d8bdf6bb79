"""The websocket protocol, sans-I/O: framing (checked in C, ``native/ws.c``),
permessage-deflate, the close handshake, and the HTTP/1.1 opening handshake."""

from .protocol import WSProtocol, open_protocol

__all__ = ["WSProtocol", "open_protocol"]
