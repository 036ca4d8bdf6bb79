"""The native HTTP/2 session (``native/h2.c``): its module, event kinds and error codes."""

from __future__ import annotations

from fpy3._native import ffi, lib

__all__ = [
    "CANCEL",
    "CLOSED",
    "DATA",
    "END",
    "ENHANCE_YOUR_CALM",
    "FIN",
    "FORGET",
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
# A request head: data = "method\0path\0authority\0protocol\0" then the regular fields
# "name\0value\0..."; code = 1 when a host field is among them.
REQUEST = lib.FPY3_H2_REQUEST
DATA = lib.FPY3_H2_DATA  # request body bytes; consume() them to give credit back
END = lib.FPY3_H2_END  # the request body ended
RESET = lib.FPY3_H2_RESET  # the peer reset the stream (or it timed out)
WRITABLE = lib.FPY3_H2_WRITABLE  # unsent response bytes fell below the mark
CLOSED = lib.FPY3_H2_CLOSED  # the stream is gone: its last event

# respond/send/trailers flags
FIN = lib.FPY3_H2_FIN  # the response ends here
FORGET = lib.FPY3_H2_FORGET  # and Python is done with the stream: no more events for it

OUT_MAX = lib.FPY3_H2_OUT_MAX  # output() returned this much: write it and ask again

NO_ERROR = lib.FPY3_H2_NO_ERROR
INTERNAL_ERROR = lib.FPY3_H2_INTERNAL_ERROR
REFUSED_STREAM = lib.FPY3_H2_REFUSED_STREAM
CANCEL = lib.FPY3_H2_CANCEL
ENHANCE_YOUR_CALM = lib.FPY3_H2_ENHANCE_YOUR_CALM
