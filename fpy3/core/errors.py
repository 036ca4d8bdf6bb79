"""Exceptions the core raises to apps and adapters."""

from __future__ import annotations


class ClientDisconnected(OSError):
    """``send()`` after the client went away (ASGI 2.4 asks for an OSError subclass), so
    a streaming app stops instead of writing into the void."""


class ProtocolError(Exception):
    """A websocket peer broke the protocol: close with ``code``."""

    def __init__(self, code: int, reason: str):
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
