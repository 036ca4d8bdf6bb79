"""The native HTTP/3 bridge (``native/h3.c``): its module, event kinds and error codes."""

from __future__ import annotations

from fpy3._native import ffi, lib

__all__ = [
    "CLOSED",
    "DATA",
    "END",
    "H3_INTERNAL_ERROR",
    "H3_NO_ERROR",
    "H3_REQUEST_CANCELLED",
    "REQUEST",
    "RESET",
    "WRITABLE",
    "ffi",
    "lib",
]

# Event kinds of a batch (fpy3_h3_events).
REQUEST = lib.FPY3_H3_REQUEST  # a request head: data = "name\0value\0..." (pseudo first)
DATA = lib.FPY3_H3_DATA  # request body bytes; consume() them to give credit back
END = lib.FPY3_H3_END  # the request body ended
RESET = lib.FPY3_H3_RESET  # the peer reset or stopped the stream, or the connection is lost
WRITABLE = lib.FPY3_H3_WRITABLE  # unacknowledged response bytes fell below the mark
CLOSED = lib.FPY3_H3_CLOSED  # the stream is gone: its last event

H3_NO_ERROR = lib.FPY3_H3_NO_ERROR
H3_INTERNAL_ERROR = lib.FPY3_H3_INTERNAL_ERROR
H3_REQUEST_CANCELLED = lib.FPY3_H3_REQUEST_CANCELLED
