"""HTTP/1.1 request head parser and chunked body decoder (thin wrapper over native/h1.c).

One native call per request head: C writes every bytes field NUL-separated into a
module-level buffer (NUL is invalid in a head) and the integers into a struct.
Module state is not thread-safe; each worker parses on its event loop thread only.
"""

from typing import NamedTuple

from fpy3._native import ffi as _ffi
from fpy3._native import lib as _lib

__all__ = [
    "CHUNKED",
    "EXPECT_CONTINUE",
    "KEEP_ALIVE",
    "UPGRADE",
    "ChunkedDecoder",
    "ParseError",
    "RequestHead",
    "parse_head",
]

KEEP_ALIVE = 1
CHUNKED = 2
EXPECT_CONTINUE = 4
UPGRADE = 8


class RequestHead(NamedTuple):
    end: int  # offset just past the head in the buffer parsed
    method: bytes
    raw_path: bytes
    query_string: bytes
    path: str  # percent-decoded
    minor: int  # HTTP/1.<minor>
    headers: list[tuple[bytes, bytes]]  # names lowercase
    content_length: int  # -1 when none
    flags: int  # KEEP_ALIVE | CHUNKED | EXPECT_CONTINUE | UPGRADE
    upgrade: bytes | None  # the Upgrade header's value


class ParseError(Exception):
    """Malformed or unacceptable request; answer with ``status`` and close."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


# tuple.__new__ skips RequestHead's Python-level __new__ (a third of the cost here).
_new_head = tuple.__new__
_head = _ffi.new("fpy3_h1_head *")
# The first six int64 fields of fpy3_h1_head, read with one unpack.
_ints = _ffi.cast("int64_t *", _head)
_fields = _ffi.new("char[]", 64)
_head.fields = _fields
_head.cap = len(_fields)
_cap_for = -1
_parse = _lib.fpy3_h1_parse_head
_unpack = _ffi.unpack


def _grow(max_size: int) -> None:
    # C needs cap >= 2 * max_size + 64 (see h1.h); _fields keeps the buffer alive.
    global _fields, _cap_for
    _fields = _ffi.new("char[]", 2 * max_size + 64)
    _head.fields = _fields
    _head.cap = len(_fields)
    _cap_for = max_size


def _error(status: int, reason) -> ParseError:
    return ParseError(status, _ffi.string(reason).decode("ascii", "replace"))


def parse_head(buf, start: int, max_size: int, max_count: int) -> RequestHead | None:
    """Parse the request head at ``buf[start:]``; None while incomplete; raises
    ParseError."""
    if max_size > _cap_for:
        _grow(max_size)
    try:
        # bytes reaches const char * without a copy
        r = _parse(buf, len(buf), start, max_size, max_count, _head)
    except TypeError:
        r = _parse(_ffi.from_buffer(buf), len(buf), start, max_size, max_count, _head)
    if r > 0:
        end, minor, nh, cl, flags, up = _unpack(_ints, 6)
        # The decoded path is last: maxsplit keeps a NUL from %00 inside it.
        parts = _unpack(_fields, r).split(b"\0", 3 + 2 * nh)
        it = iter(parts[3:-1])
        headers = [*zip(it, it)]  # noqa: B905 (one iterator, pairs by construction)
        path = parts[-1]
        try:
            path = path.decode()  # no-argument decode is ~3x cheaper than passing "replace"
        except UnicodeDecodeError:
            path = path.decode("utf-8", "replace")
        return _new_head(
            RequestHead,
            (
                end,
                parts[0],
                parts[1],
                parts[2],
                path,
                minor,
                headers,
                cl,
                flags,
                headers[up][1] if up >= 0 else None,
            ),
        )
    if r == 0:
        return None
    raise _error(-r, _head.reason)


_MAX_SPANS = 64
_spans = _ffi.new("int64_t[]", 2 * _MAX_SPANS)
_feed = _lib.fpy3_h1_chunked_feed


class ChunkedDecoder:
    """Decodes one chunked request body; feed it every received buffer in order."""

    __slots__ = ("_st",)

    def __init__(self) -> None:
        # Owned by this object; freed with it.
        self._st = _ffi.new("fpy3_h1_chunked *")

    @property
    def done(self) -> bool:
        return self._st.done != 0

    def feed(self, buf, start: int) -> tuple[int, list, bool]:
        """Decode ``buf[start:]``: (consumed, data memoryviews into buf, done).

        Input is consumed entirely unless the body ends (then consumed stops just past
        it) or ParseError is raised. A bytearray cannot be resized while views of it live.
        """
        st = self._st
        try:
            r = _feed(st, buf, len(buf), start, _spans, _MAX_SPANS)
        except TypeError:
            r = _feed(st, _ffi.from_buffer(buf), len(buf), start, _spans, _MAX_SPANS)
        if r < 0:
            raise _error(-r, st.reason)
        k = st.nspans
        # Fast paths: a buffer usually holds at most one chunk's data.
        if k == 1:
            return r - start, [memoryview(buf)[_spans[0] : _spans[1]]], st.done != 0
        if k == 0:
            return r - start, [], st.done != 0
        return self._feed_many(buf, start, r, k)

    def _feed_many(self, buf, start: int, r: int, k: int) -> tuple[int, list, bool]:
        st = self._st
        src = buf if buf.__class__ is bytes else _ffi.from_buffer(buf)
        mv = memoryview(buf)
        chunks = []
        while True:
            sp = _unpack(_spans, 2 * k)
            for i in range(0, 2 * k, 2):
                chunks.append(mv[sp[i] : sp[i + 1]])
            # A full span array means C stopped early, with input left.
            if k < _MAX_SPANS:
                return r - start, chunks, st.done != 0
            r = _feed(st, src, len(buf), r, _spans, _MAX_SPANS)
            if r < 0:
                raise _error(-r, st.reason)
            k = st.nspans
