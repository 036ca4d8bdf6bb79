"""The native HTTP/2 session (``native/h2.c``): its module, event kinds and error codes."""

from __future__ import annotations

from fpy3._native import ffi, lib

__all__ = [
    "CANCEL",
    "CLOSED",
    "DATA",
    "END",
    "ENHANCE_YOUR_CALM",
    "INTERNAL_ERROR",
    "NO_ERROR",
    "OUT_MAX",
    "REFUSED_STREAM",
    "REQUEST",
    "RESET",
    "WRITABLE",
    "ffi",
    "lib",
]

# Event kinds of a batch (fpy3_h2_events).
REQUEST = lib.FPY3_H2_REQUEST  # a request head: data = "name\0value\0..." (pseudo first)
DATA = lib.FPY3_H2_DATA  # request body bytes; consume() them to give credit back
END = lib.FPY3_H2_END  # the request body ended
RESET = lib.FPY3_H2_RESET  # the peer reset the stream (or it timed out)
WRITABLE = lib.FPY3_H2_WRITABLE  # unsent response bytes fell below the mark
CLOSED = lib.FPY3_H2_CLOSED  # the stream is gone: its last event

OUT_MAX = lib.FPY3_H2_OUT_MAX  # output() returned this much: write it and ask again

NO_ERROR = lib.FPY3_H2_NO_ERROR
INTERNAL_ERROR = lib.FPY3_H2_INTERNAL_ERROR
REFUSED_STREAM = lib.FPY3_H2_REFUSED_STREAM
CANCEL = lib.FPY3_H2_CANCEL
ENHANCE_YOUR_CALM = lib.FPY3_H2_ENHANCE_YOUR_CALM
