"""Independent HTTP/3 clients for end-to-end tests: aioquic, libcurl, gtlsclient, Chromium.

Every function is blocking and bounded by its ``timeout``. Each returns a ``Response``,
raises ``H3ClientError`` (or a subclass) when the exchange fails, and raises
``ClientUnavailable`` when its client is not installed here, so tests can skip.

``cafile=None`` means the server certificate is not verified; pass the dev certificate
to verify. gtlsclient never verifies; Chromium trusts by SPKI pin instead.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import fcntl
import json
import os
import re
import select
import shutil
import ssl
import subprocess
import tempfile
import time
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

__all__ = [
    "ClientTimeout",
    "ClientUnavailable",
    "ConnectionClosed",
    "H3ClientError",
    "Response",
    "StreamReset",
    "aioquic_abort_upload",
    "aioquic_headers_then_close",
    "aioquic_many",
    "aioquic_raw_headers",
    "aioquic_request",
    "chromium_fetch",
    "curl_altsvc_sequence",
    "curl_request",
    "curl_session",
    "gtlsclient_request",
    "h3_error_name",
]


# --- common -------------------------------------------------------------------------


class ClientUnavailable(Exception):
    """The client is not installed or lacks HTTP/3 here; str() says why (use it to skip)."""


class H3ClientError(Exception):
    """The exchange failed: handshake, protocol error, reset, close or a client error."""


class ClientTimeout(H3ClientError, TimeoutError):
    pass


class StreamReset(H3ClientError):
    def __init__(self, message: str, error_code: int):
        super().__init__(message)
        self.error_code = error_code


class ConnectionClosed(H3ClientError):
    def __init__(self, message: str, error_code: int, reason: str = ""):
        super().__init__(message)
        self.error_code = error_code
        self.reason = reason


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]  # names lowercased, pseudo-headers left out
    body: bytes
    http_version: str | None = None  # "3", "2", "1.1" where the client tells
    trailers: list[tuple[str, str]] = field(default_factory=list)
    interim: list[int] = field(default_factory=list)  # 1xx statuses seen before the final one

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self.headers if n == name]


_H3_ERRORS = {
    0x0: "NO_ERROR",
    0x1: "INTERNAL_ERROR",
    0x2: "CONNECTION_REFUSED",
    0x3: "FLOW_CONTROL_ERROR",
    0x4: "STREAM_LIMIT_ERROR",
    0x5: "STREAM_STATE_ERROR",
    0x6: "FINAL_SIZE_ERROR",
    0x7: "FRAME_ENCODING_ERROR",
    0x8: "TRANSPORT_PARAMETER_ERROR",
    0xA: "PROTOCOL_VIOLATION",
    0x33: "H3_DATAGRAM_ERROR",
    0x100: "H3_NO_ERROR",
    0x101: "H3_GENERAL_PROTOCOL_ERROR",
    0x102: "H3_INTERNAL_ERROR",
    0x103: "H3_STREAM_CREATION_ERROR",
    0x104: "H3_CLOSED_CRITICAL_STREAM",
    0x105: "H3_FRAME_UNEXPECTED",
    0x106: "H3_FRAME_ERROR",
    0x107: "H3_EXCESSIVE_LOAD",
    0x108: "H3_ID_ERROR",
    0x109: "H3_SETTINGS_ERROR",
    0x10A: "H3_MISSING_SETTINGS",
    0x10B: "H3_REQUEST_REJECTED",
    0x10C: "H3_REQUEST_CANCELLED",
    0x10D: "H3_REQUEST_INCOMPLETE",
    0x10E: "H3_MESSAGE_ERROR",
    0x10F: "H3_CONNECT_ERROR",
    0x110: "H3_VERSION_FALLBACK",
    0x200: "QPACK_DECOMPRESSION_FAILED",
    0x201: "QPACK_ENCODER_STREAM_ERROR",
    0x202: "QPACK_DECODER_STREAM_ERROR",
}

H3_NO_ERROR = 0x100
H3_REQUEST_CANCELLED = 0x10C
H3_MESSAGE_ERROR = 0x10E


def h3_error_name(code: int, transport: bool = False) -> str:
    """e.g. 0x10e -> 'H3_MESSAGE_ERROR (0x10e)'.

    ``transport``: the code came in a QUIC transport CONNECTION_CLOSE (frame 0x1c),
    where 0x100-0x1ff are TLS alerts rather than HTTP/3 codes.
    """
    if transport:
        if 0x100 <= code <= 0x1FF:
            return f"CRYPTO_ERROR, TLS alert {code - 0x100} ({code:#x})"
        return f"{_H3_ERRORS.get(code, 'UNKNOWN') if code < 0x100 else 'UNKNOWN'} ({code:#x})"
    if code < 0x100 and code != 0x33:
        return f"application error ({code:#x})"
    return f"{_H3_ERRORS.get(code, 'UNKNOWN')} ({code:#x})"


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _decode_headers(raw) -> list[tuple[str, str]]:
    return [(n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in raw]


def _run(make_coro, timeout: float, what: str, progress: list | None = None):
    """Run a coroutine to completion within ``timeout``, from sync or async callers.

    ``progress`` collects objects with describe(), quoted in the timeout message.
    """

    def quiet(loop, context) -> None:
        # aioquic fails its connect waiter when a timed-out attempt is torn down; no news.
        if isinstance(context.get("exception"), ConnectionError):
            return
        loop.default_exception_handler(context)

    async def bounded():
        asyncio.get_running_loop().set_exception_handler(quiet)
        try:
            return await asyncio.wait_for(make_coro(), timeout)
        except TimeoutError:
            states = "; ".join(p.describe() for p in progress or ()) or "no QUIC handshake"
            raise ClientTimeout(f"{what}: not finished within {timeout}s ({states})") from None

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        in_loop = False
    else:
        in_loop = True
    if not in_loop:
        return asyncio.run(bounded())
    # Called from async code: a private loop in a helper thread keeps the caller's loop free.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, bounded()).result()


# --- aioquic --------------------------------------------------------------------------


def _aioquic() -> types.SimpleNamespace:
    """The aioquic names used here; ClientUnavailable when it is not installed."""
    try:
        from aioquic.asyncio import client, protocol
        from aioquic.h3 import connection as h3
        from aioquic.h3 import events as h3_events
        from aioquic.quic import configuration, events
        from aioquic.quic import connection as quic
    except ImportError as e:
        raise ClientUnavailable(f"aioquic is not installed ({e})") from e
    return types.SimpleNamespace(
        connect=client.connect,
        QuicConnectionProtocol=protocol.QuicConnectionProtocol,
        H3_ALPN=h3.H3_ALPN,
        H3Connection=h3.H3Connection,
        DataReceived=h3_events.DataReceived,
        HeadersReceived=h3_events.HeadersReceived,
        QuicConfiguration=configuration.QuicConfiguration,
        DRAINING=quic.QuicConnectionState.DRAINING,
        ConnectionTerminated=events.ConnectionTerminated,
        StopSendingReceived=events.StopSendingReceived,
        QuicStreamReset=events.StreamReset,
    )


class _Exchange:
    """What one request stream has received so far."""

    def __init__(self, stream_id: int):
        self.stream_id = stream_id
        self.status: int | None = None
        self.headers: list[tuple[str, str]] = []
        self.trailers: list[tuple[str, str]] = []
        self.interim: list[int] = []
        self.body = bytearray()
        self.ended = False
        self.reset_code: int | None = None
        self.stop_sending_code: int | None = None
        self.done = asyncio.Event()

    def describe(self) -> str:
        if self.status is None:
            return f"stream {self.stream_id}: no response head"
        return (
            f"stream {self.stream_id}: status {self.status}, {len(self.body)} body bytes, not ended"
        )

    def response(self) -> Response:
        return Response(
            self.status,
            self.headers,
            bytes(self.body),
            "3",
            self.trailers,
            self.interim,
        )


_protocol_class = None


def _h3_protocol_class():
    """A QuicConnectionProtocol subclass routing HTTP/3 events to _Exchange objects."""
    global _protocol_class
    if _protocol_class is not None:
        return _protocol_class
    aq = _aioquic()

    class H3ClientProtocol(aq.QuicConnectionProtocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.h3 = aq.H3Connection(self._quic)
            # aioquic checks Content-Length against the DATA received even on responses
            # that have no content (HEAD, 304), which may carry a nonzero Content-Length
            # and no DATA (RFC 9114 4.1.2): let those through.
            check = self.h3._check_content_length
            self.h3._check_content_length = lambda s: s.content_length and check(s)
            self.exchanges: dict[int, _Exchange] = {}
            self.terminated = None  # (error_code, reason, by_peer, transport)

        def new_request(self) -> _Exchange:
            sid = self._quic.get_next_available_stream_id()
            ex = self.exchanges[sid] = _Exchange(sid)
            return ex

        def _process_events(self) -> None:
            super()._process_events()
            self._check_close()

        def _check_close(self) -> None:
            # aioquic emits ConnectionTerminated only after the draining period; look now.
            close = self._quic._close_event
            if close is not None and self.terminated is None:
                self._terminate(close, by_peer=self._quic._state == aq.DRAINING)

        def quic_event_received(self, event) -> None:
            if isinstance(event, aq.ConnectionTerminated):
                self._check_close()
                return
            if isinstance(event, aq.QuicStreamReset):
                ex = self.exchanges.get(event.stream_id)
                if ex is not None and not ex.ended:
                    ex.reset_code = event.error_code
                    ex.done.set()
            elif isinstance(event, aq.StopSendingReceived):
                ex = self.exchanges.get(event.stream_id)
                if ex is not None:
                    ex.stop_sending_code = event.error_code
            for h3_event in self.h3.handle_event(event):
                self._h3_event(h3_event)
            self._check_close()

        def _h3_event(self, ev) -> None:
            ex = self.exchanges.get(ev.stream_id)
            if ex is None:
                return
            if isinstance(ev, aq.HeadersReceived):
                if ex.status is None:
                    fields = dict(ev.headers)
                    try:
                        status = int(fields.get(b":status", b""))
                    except ValueError:
                        status = -1
                    if 100 <= status < 200:
                        ex.interim.append(status)
                    else:
                        ex.status = status
                        ex.headers = _decode_headers(
                            (n, v) for n, v in ev.headers if not n.startswith(b":")
                        )
                else:
                    ex.trailers = _decode_headers(ev.headers)
            elif isinstance(ev, aq.DataReceived):
                ex.body += ev.data
            if ev.stream_ended:
                ex.ended = True
                ex.done.set()

        def _terminate(self, close, by_peer: bool) -> None:
            transport = close.frame_type is not None
            self.terminated = (close.error_code, close.reason_phrase, by_peer, transport)
            for ex in self.exchanges.values():
                ex.done.set()

        def describe(self) -> str:
            if not self._connected:
                return "QUIC handshake not complete"
            pending = [ex for ex in self.exchanges.values() if not ex.done.is_set()]
            if not pending:
                return "connected, no stream pending"
            shown = "; ".join(ex.describe() for ex in pending[:3])
            return f"{len(pending)} of {len(self.exchanges)} streams unfinished: {shown}"

        def close_message(self) -> str:
            if self.terminated is None:
                return "connection not closed"
            code, reason, by_peer, transport = self.terminated
            who = "server" if by_peer else "client (aioquic)"
            return (
                f"{who} closed the connection with {h3_error_name(code, transport)}"
                f"{': ' + reason if reason else ''}"
            )

        def failure(self, ex: _Exchange) -> H3ClientError | None:
            """The error that ended ``ex`` without a complete response, if any."""
            if ex.ended:
                return None
            if ex.reset_code is not None:
                return StreamReset(
                    f"server reset stream {ex.stream_id} with {h3_error_name(ex.reset_code)}"
                    f" ({ex.describe()})",
                    ex.reset_code,
                )
            if self.terminated is not None:
                code, reason, _by_peer, _transport = self.terminated
                return ConnectionClosed(f"{self.close_message()} ({ex.describe()})", code, reason)
            return None

    _protocol_class = H3ClientProtocol
    return H3ClientProtocol


@contextlib.asynccontextmanager
async def _h3_connection(
    host: str, port: int, cafile: str | None, idle_timeout: float, progress: list | None = None
):
    aq = _aioquic()
    config = aq.QuicConfiguration(
        is_client=True,
        alpn_protocols=aq.H3_ALPN,
        idle_timeout=max(idle_timeout, 1.0),
        verify_mode=ssl.CERT_REQUIRED if cafile else ssl.CERT_NONE,
    )
    if cafile:
        config.load_verify_locations(cafile)
    config.server_name = host  # aioquic leaves IP literals out of SNI and checks IP SANs
    cls = _h3_protocol_class()
    made = []

    def factory(*args, **kwargs):
        made.append(cls(*args, **kwargs))
        if progress is not None:
            progress.append(made[-1])
        return made[-1]

    try:
        async with aq.connect(host, port, configuration=config, create_protocol=factory) as proto:
            try:
                yield proto
            finally:
                # aioquic would close with code 0x0, which is no HTTP/3 code.
                if proto.terminated is None:
                    proto.close(error_code=H3_NO_ERROR)
    except ConnectionError as e:
        proto = made[0] if made else None
        if proto is None or proto.terminated is None:
            raise ConnectionClosed(f"QUIC connection to {host}:{port} failed: {e!r}", -1) from e
        raise ConnectionClosed(
            f"QUIC connection to {_authority(host, port)} failed: {proto.close_message()}",
            proto.terminated[0],
            proto.terminated[1],
        ) from e


def _request_headers(method, path, authority, headers) -> list[tuple[bytes, bytes]]:
    def b(x):
        return x if isinstance(x, bytes) else str(x).encode("latin-1")

    out = [
        (b":method", b(method)),
        (b":scheme", b"https"),
        (b":authority", b(authority)),
        (b":path", b(path)),
    ]
    out += [(b(n).lower(), b(v)) for n, v in headers]
    return out


async def _send_request(proto, method, path, authority, headers, body) -> _Exchange:
    ex = proto.new_request()
    hdrs = _request_headers(method, path, authority, headers)
    if body and not any(n == b"content-length" for n, _ in hdrs):
        hdrs.append((b"content-length", str(len(body)).encode()))
    proto.h3.send_headers(ex.stream_id, hdrs, end_stream=not body)
    if body:
        proto.h3.send_data(ex.stream_id, bytes(body), end_stream=True)
    proto.transmit()
    return ex


async def _finish(proto, ex: _Exchange) -> Response:
    await ex.done.wait()
    err = proto.failure(ex)
    if err is not None:
        raise err
    if ex.status is None:
        raise H3ClientError(f"stream {ex.stream_id} ended without a final response head")
    return ex.response()


def aioquic_request(
    host: str,
    port: int,
    method: str,
    path: str,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    cafile: str | None = None,
    authority: str | None = None,
    timeout: float = 10,
) -> Response:
    """One request on a new QUIC connection; content-length is added when a body is sent."""
    headers = list(headers)
    authority = authority or _authority(host, port)

    progress: list = []

    async def go():
        async with _h3_connection(host, port, cafile, timeout, progress) as proto:
            ex = await _send_request(proto, method, path, authority, headers, body)
            return await _finish(proto, ex)

    return _run(go, timeout, f"aioquic {method} {path}", progress)


def aioquic_many(
    host: str,
    port: int,
    requests: list[tuple[str, str, bytes]],
    cafile: str | None,
    connections: int = 1,
    timeout: float = 30,
    authority: str | None = None,
) -> list[Response]:
    """All requests at once, spread round-robin over ``connections``; answers in order.

    Requests beyond the server's stream limit wait in aioquic until credit arrives.
    """
    authority = authority or _authority(host, port)
    connections = max(1, min(connections, len(requests) or 1))

    progress: list = []

    async def one_connection(batch):
        async with _h3_connection(host, port, cafile, timeout, progress) as proto:
            sent = [
                (i, await _send_request(proto, m, p, authority, (), b)) for i, (m, p, b) in batch
            ]
            return [(i, await _finish(proto, ex)) for i, ex in sent]

    async def go():
        batches = [list(enumerate(requests))[k::connections] for k in range(connections)]
        results = await asyncio.gather(*(one_connection(b) for b in batches if b))
        out: list[Response | None] = [None] * len(requests)
        for part in results:
            for i, resp in part:
                out[i] = resp
        return out

    return _run(go, timeout, f"aioquic_many ({len(requests)} requests)", progress)


def aioquic_sequence(
    host: str,
    port: int,
    paths: list[tuple[str, str]],
    cafile: str | None,
    timeout: float = 10,
    between=None,
) -> list[Response]:
    """Requests one after another on one connection, each once the previous response
    ended; ``between(i)`` runs (in a thread) after response i."""
    authority = _authority(host, port)
    progress: list = []

    async def go():
        out = []
        async with _h3_connection(host, port, cafile, timeout, progress) as proto:
            for i, (method, path) in enumerate(paths):
                ex = await _send_request(proto, method, path, authority, (), b"")
                out.append(await _finish(proto, ex))
                if between is not None:
                    await asyncio.to_thread(between, i)
        return out

    return _run(go, timeout, f"aioquic_sequence {paths}", progress)


def aioquic_until_closed(
    host: str, port: int, path: str, cafile: str | None, timeout: float = 30
) -> tuple[int, bool, float, int | None]:
    """GET ``path`` and wait until the connection ends (the server's CONNECTION_CLOSE or
    the idle timeout). Returns (error code, closed by the server, when (monotonic),
    the code the request stream was reset with or None)."""
    authority = _authority(host, port)
    progress: list = []

    async def go():
        async with _h3_connection(host, port, cafile, timeout, progress) as proto:
            ex = await _send_request(proto, "GET", path, authority, (), b"")
            await _until(lambda: proto.terminated is not None)
            code, _reason, by_peer, _transport = proto.terminated
            return code, by_peer, time.monotonic(), ex.reset_code

    return _run(go, timeout + 5, f"aioquic_until_closed {path}", progress)


def aioquic_read_then_close(
    host: str,
    port: int,
    path: str,
    cafile: str | None,
    min_bytes: int,
    timeout: float = 10,
) -> int:
    """GET ``path``, wait for ``min_bytes`` of body, then close the connection
    (CONNECTION_CLOSE) mid-response. Returns the body bytes received."""
    authority = _authority(host, port)
    progress: list = []

    async def go():
        async with _h3_connection(host, port, cafile, timeout, progress) as proto:
            ex = await _send_request(proto, "GET", path, authority, (), b"")
            await _until(lambda: len(ex.body) >= min_bytes or ex.done.is_set())
            return len(ex.body)

    return _run(go, timeout, f"aioquic_read_then_close {path}", progress)


def aioquic_raw_headers(
    host: str,
    port: int,
    headers: list[tuple[bytes, bytes]],
    cafile: str | None,
    end_stream: bool = True,
    timeout: float = 10,
    body: bytes = b"",
    raw_after: bytes = b"",
):
    """Send ``headers`` exactly as given (no validation, nothing added), then ``body``
    as one DATA frame, then ``raw_after`` as raw stream bytes (e.g. a misplaced frame);
    with ``end_stream`` the stream ends after all of it.

    Returns ("response", Response), ("reset", error_code) when the server reset the
    stream, or ("closed", error_code) when it closed the connection.
    """

    progress: list = []

    async def go():
        async with _h3_connection(host, port, cafile, timeout, progress) as proto:
            ex = proto.new_request()
            sid = ex.stream_id
            # aioquic validates only what it receives, so malformed lists go out as given.
            proto.h3.send_headers(
                sid, list(headers), end_stream=end_stream and not (body or raw_after)
            )
            if body:
                proto.h3.send_data(sid, body, end_stream=end_stream and not raw_after)
            if raw_after:
                proto._quic.send_stream_data(sid, raw_after, end_stream)
            proto.transmit()
            await ex.done.wait()
            if ex.ended and ex.status is not None:
                return ("response", ex.response())
            if ex.reset_code is not None:
                return ("reset", ex.reset_code)
            if proto.terminated is not None:
                code, reason, by_peer, _transport = proto.terminated
                if not by_peer:
                    raise ConnectionClosed(proto.close_message(), code, reason)
                return ("closed", code)
            raise H3ClientError(f"stream {ex.stream_id} ended without a final response head")

    return _run(go, timeout, "aioquic_raw_headers", progress)


def aioquic_headers_then_close(
    host: str,
    port: int,
    headers: list[tuple[bytes, bytes]],
    cafile: str | None,
    timeout: float = 10,
) -> None:
    """Send ``headers`` exactly as given, ending the stream, then close the connection
    at once (CONNECTION_CLOSE right behind the request, without waiting for an answer)."""

    async def go():
        async with _h3_connection(host, port, cafile, timeout) as proto:
            sid = proto.new_request().stream_id
            proto.h3.send_headers(sid, list(headers), end_stream=True)
            proto.transmit()

    _run(go, timeout, "aioquic_headers_then_close")


def aioquic_abort_upload(
    host: str,
    port: int,
    path: str,
    cafile: str | None,
    send_bytes: int,
    timeout: float = 10,
    followup_path: str | None = None,
    declared_length: int | None = None,
) -> Response | None:
    """POST with a declared body, send ``send_bytes`` of it, then reset the stream.

    The reset (H3_REQUEST_CANCELLED, with STOP_SENDING) is acknowledged before the
    connection closes, so the server sees a stream abort, not a connection loss. With
    ``followup_path``, a GET on the same connection afterwards is returned.
    """
    authority = _authority(host, port)
    total = declared_length if declared_length is not None else max(send_bytes * 2, 1)

    progress: list = []

    async def go():
        async with _h3_connection(host, port, cafile, timeout, progress) as proto:
            ex = proto.new_request()
            hdrs = _request_headers("POST", path, authority, [("content-length", str(total))])
            proto.h3.send_headers(ex.stream_id, hdrs, end_stream=False)
            if send_bytes:
                proto.h3.send_data(ex.stream_id, b"x" * send_bytes, end_stream=False)
            proto.transmit()
            # Wait until the partial body has left (and been acked), so the abort is mid-body.
            await _until(lambda: _stream_acked(proto, ex))
            stream = proto._quic._streams.get(ex.stream_id)
            # A STOP_SENDING from the server already made aioquic reset the stream.
            if stream is not None and stream.sender._reset_error_code is None:
                proto._quic.reset_stream(ex.stream_id, H3_REQUEST_CANCELLED)
            if stream is not None and not stream.receiver.is_finished:
                proto._quic.stop_stream(ex.stream_id, H3_REQUEST_CANCELLED)
            proto.transmit()
            await proto.ping()  # the PING's ack implies the RESET_STREAM before it arrived
            if followup_path is None:
                return None
            ex2 = await _send_request(proto, "GET", followup_path, authority, (), b"")
            return await _finish(proto, ex2)

    return _run(go, timeout, f"aioquic_abort_upload {path}", progress)


def _stream_acked(proto, ex: _Exchange) -> bool:
    """All written body bytes acked, or all that flow control let out acked (aioquic internals)."""
    quic = proto._quic
    stream = quic._streams.get(ex.stream_id)
    if stream is None or ex.done.is_set() or ex.stop_sending_code is not None:
        return True
    sender = stream.sender
    if sender._buffer_start >= sender._buffer_stop:
        return True
    blocked = (
        sender.highest_offset >= stream.max_stream_data_remote
        or quic._remote_max_data_used >= quic._remote_max_data
    )
    return blocked and sender._buffer_start >= sender.highest_offset


async def _until(cond, interval: float = 0.005) -> None:
    """Poll ``cond``; the caller's overall timeout bounds the wait."""
    while not cond():
        await asyncio.sleep(interval)


# --- libcurl (GnuTLS flavour, with ngtcp2/nghttp3) -----------------------------------------

_CURLOPT_URL = 10002
_CURLOPT_PROXY = 10004
_CURLOPT_ERRORBUFFER = 10010
_CURLOPT_WRITEFUNCTION = 20011
_CURLOPT_POSTFIELDS = 10015
_CURLOPT_HTTPHEADER = 10023
_CURLOPT_CUSTOMREQUEST = 10036
_CURLOPT_NOBODY = 44
_CURLOPT_POST = 47
_CURLOPT_SSL_VERIFYPEER = 64
_CURLOPT_CAINFO = 10065
_CURLOPT_HEADERFUNCTION = 20079
_CURLOPT_SSL_VERIFYHOST = 81
_CURLOPT_HTTP_VERSION = 84
_CURLOPT_NOSIGNAL = 99
_CURLOPT_TIMEOUT_MS = 155
_CURLOPT_CONNECTTIMEOUT_MS = 156
_CURLOPT_POSTFIELDSIZE_LARGE = 30120
_CURLOPT_ALTSVC_CTRL = 286
_CURLOPT_ALTSVC = 10287
_CURLINFO_RESPONSE_CODE = 0x200000 + 2
_CURLINFO_HTTP_VERSION = 0x200000 + 46
_CURLINFO_NUM_CONNECTS = 0x200000 + 26
_CURL_HTTP_VERSION_NONE = 0  # unlike the default 2TLS, lets alt-svc pick h3
_CURL_HTTP_VERSION_3 = 30
_CURL_HTTP_VERSION_3ONLY = 31
_CURLALTSVC_H1 = 1 << 3
_CURLALTSVC_H2 = 1 << 4
_CURLALTSVC_H3 = 1 << 5
_CURL_VERSION_ALTSVC = 1 << 24
_CURL_VERSION_HTTP3 = 1 << 25
_CURL_VERSIONS = {1: "1.0", 2: "1.1", 3: "2", 30: "3"}

_WRITE_CB = ctypes.CFUNCTYPE(
    ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p
)


class _CurlVersionInfo(ctypes.Structure):
    _fields_ = [
        ("age", ctypes.c_int),
        ("version", ctypes.c_char_p),
        ("version_num", ctypes.c_uint),
        ("host", ctypes.c_char_p),
        ("features", ctypes.c_int),
    ]


_curl_lib = None


def _curl():
    """(lib, version, altsvc) of libcurl-gnutls with HTTP/3, loaded once.

    ClientUnavailable when it is missing or lacks HTTP/3.
    """
    global _curl_lib
    if _curl_lib is not None:
        return _curl_lib
    lib = None
    for name in ("libcurl-gnutls.so.4", ctypes.util.find_library("curl-gnutls")):
        if name:
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
    if lib is None:
        raise ClientUnavailable("libcurl-gnutls.so.4 not found (Debian: libcurl3-gnutls)")
    lib.curl_version_info.restype = ctypes.POINTER(_CurlVersionInfo)
    lib.curl_version_info.argtypes = [ctypes.c_int]
    info = lib.curl_version_info(11).contents
    version = (info.version or b"?").decode()
    if not info.features & _CURL_VERSION_HTTP3:
        raise ClientUnavailable(f"libcurl-gnutls {version} is built without HTTP/3")
    lib.curl_easy_init.restype = ctypes.c_void_p
    lib.curl_easy_perform.argtypes = [ctypes.c_void_p]
    lib.curl_easy_cleanup.argtypes = [ctypes.c_void_p]
    lib.curl_easy_strerror.restype = ctypes.c_char_p
    lib.curl_easy_strerror.argtypes = [ctypes.c_int]
    lib.curl_slist_append.restype = ctypes.c_void_p
    lib.curl_slist_append.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.curl_slist_free_all.argtypes = [ctypes.c_void_p]
    lib.curl_easy_getinfo.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    _curl_lib = types.SimpleNamespace(
        lib=lib, version=version, altsvc=bool(info.features & _CURL_VERSION_ALTSVC)
    )
    return _curl_lib


class _CurlEasy:
    """One easy handle with its callbacks and the buffers they fill."""

    def __init__(self):
        self.curl = _curl()
        self.lib = self.curl.lib
        self.h = self.lib.curl_easy_init()
        if not self.h:
            raise H3ClientError("curl_easy_init failed")
        self.keep = []  # buffers and callbacks libcurl points at, alive until cleanup
        self.slist = None
        self.errbuf = ctypes.create_string_buffer(256)
        self.body = bytearray()
        self.head_lines: list[tuple[bytes, bool]] = []
        self._write_cb = _WRITE_CB(self._on_body)
        self._header_cb = _WRITE_CB(self._on_header)
        self.setopt(_CURLOPT_ERRORBUFFER, self.errbuf)
        self.setopt(_CURLOPT_WRITEFUNCTION, self._write_cb)
        self.setopt(_CURLOPT_HEADERFUNCTION, self._header_cb)
        self.setopt(_CURLOPT_NOSIGNAL, 1)
        self.setopt(_CURLOPT_PROXY, b"")  # no proxy from the environment

    def _on_body(self, ptr, size, n, _ud):
        self.body += ctypes.string_at(ptr, size * n)
        return size * n

    def _on_header(self, ptr, size, n, _ud):
        # Lines after body bytes are trailers.
        self.head_lines.append((ctypes.string_at(ptr, size * n), bool(self.body)))
        return size * n

    def setopt(self, opt: int, value) -> None:
        if isinstance(value, int):
            arg = ctypes.c_int64(value) if opt >= 30000 else ctypes.c_long(value)
        elif isinstance(value, str):
            arg = ctypes.c_char_p(value.encode())
        elif isinstance(value, bytes):
            arg = ctypes.c_char_p(value)
        else:
            arg = value
        self.keep.append(arg)
        rc = self.lib.curl_easy_setopt(ctypes.c_void_p(self.h), ctypes.c_int(opt), arg)
        if rc != 0:
            raise H3ClientError(f"curl_easy_setopt({opt}) failed: {self._strerror(rc)}")

    def set_headers(self, headers: Iterable[str]) -> None:
        for h in headers:
            self.slist = self.lib.curl_slist_append(self.slist, h.encode("latin-1"))
        if self.slist:
            self.setopt(_CURLOPT_HTTPHEADER, ctypes.c_void_p(self.slist))

    def _strerror(self, rc: int) -> str:
        return self.lib.curl_easy_strerror(rc).decode()

    def getinfo_long(self, info: int) -> int:
        out = ctypes.c_long(0)
        self.lib.curl_easy_getinfo(self.h, info, ctypes.byref(out))
        return out.value

    def perform(self, what: str) -> Response:
        self.body = bytearray()
        self.head_lines = []
        rc = self.lib.curl_easy_perform(self.h)
        if rc != 0:
            detail = self.errbuf.value.decode("latin-1") or self._strerror(rc)
            cls = ClientTimeout if rc == 28 else H3ClientError
            raise cls(f"libcurl {what}: error {rc}: {detail}")
        return self._response()

    def _response(self) -> Response:
        # Every response head arrives (1xx first); the last block is the final one.
        blocks: list[list[bytes]] = []
        interim, trailers = [], []
        for line, after_body in self.head_lines:
            m = re.match(rb"HTTP/\S+ (\d{3})", line)
            if m:
                blocks.append([])
                if m.group(1).startswith(b"1"):
                    interim.append(int(m.group(1)))
            elif line.strip():
                name, _, value = line.decode("latin-1").partition(":")
                pair = (name.strip().lower(), value.strip())
                if after_body:
                    trailers.append(pair)
                elif blocks:
                    blocks[-1].append(pair)
        version = _CURL_VERSIONS.get(self.getinfo_long(_CURLINFO_HTTP_VERSION))
        return Response(
            self.getinfo_long(_CURLINFO_RESPONSE_CODE),
            blocks[-1] if blocks else [],
            bytes(self.body),
            version,
            trailers,
            interim,
        )

    def close(self) -> None:
        if self.slist:
            self.lib.curl_slist_free_all(self.slist)
            self.slist = None
        if self.h:
            self.lib.curl_easy_cleanup(self.h)
            self.h = None


def _curl_setup(
    easy: _CurlEasy, url, method, body, headers, cafile, version, altsvc_file, timeout
) -> None:
    easy.setopt(_CURLOPT_URL, url)
    easy.setopt(_CURLOPT_HTTP_VERSION, version)
    easy.setopt(_CURLOPT_TIMEOUT_MS, int(timeout * 1000))
    easy.setopt(_CURLOPT_CONNECTTIMEOUT_MS, int(timeout * 1000))
    if cafile:
        easy.setopt(_CURLOPT_CAINFO, cafile)
    else:
        easy.setopt(_CURLOPT_SSL_VERIFYPEER, 0)
        easy.setopt(_CURLOPT_SSL_VERIFYHOST, 0)
    hdrs = list(headers)
    method = method.upper()
    if method == "HEAD":
        easy.setopt(_CURLOPT_NOBODY, 1)
    elif body or method == "POST":
        body_buf = ctypes.create_string_buffer(bytes(body), len(body))
        easy.keep.append(body_buf)
        easy.setopt(_CURLOPT_POST, 1)
        easy.setopt(_CURLOPT_POSTFIELDSIZE_LARGE, len(body))
        easy.setopt(_CURLOPT_POSTFIELDS, ctypes.cast(body_buf, ctypes.c_void_p))
        # libcurl adds a form content-type to POSTFIELDS; drop it unless asked for.
        if not any(h.lower().startswith("content-type:") for h in hdrs):
            hdrs.append("Content-Type:")
    if method not in ("GET", "HEAD", "POST") or (method == "GET" and body):
        easy.setopt(_CURLOPT_CUSTOMREQUEST, method)
    if altsvc_file:
        if not easy.curl.altsvc:
            raise ClientUnavailable(f"libcurl-gnutls {easy.curl.version} lacks alt-svc")
        easy.setopt(_CURLOPT_ALTSVC_CTRL, _CURLALTSVC_H1 | _CURLALTSVC_H2 | _CURLALTSVC_H3)
        easy.setopt(_CURLOPT_ALTSVC, altsvc_file)
    easy.set_headers(hdrs)


def curl_request(
    url: str,
    method: str = "GET",
    body: bytes = b"",
    headers: Iterable[tuple[str, str] | str] = (),
    cafile: str | None = None,
    http3_only: bool = True,
    altsvc_file: str | None = None,
    timeout: float = 10,
) -> Response:
    """One request with libcurl; ``http3_only=False`` lets libcurl pick (h3 raced with TCP).

    Response.http_version is what libcurl used ("3", "2", "1.1").
    """
    hdrs = [h if isinstance(h, str) else f"{h[0]}: {h[1]}" for h in headers]
    version = _CURL_HTTP_VERSION_3ONLY if http3_only else _CURL_HTTP_VERSION_3
    easy = _CurlEasy()
    try:
        _curl_setup(easy, url, method, body, hdrs, cafile, version, altsvc_file, timeout)
        return easy.perform(f"{method} {url}")
    finally:
        easy.close()


class CurlSession:
    """Requests on one libcurl easy handle: libcurl keeps the HTTP/3 connection between
    them and reuses it (see ``curl_session``)."""

    def __init__(self, cafile: str | None, timeout: float):
        self.cafile = cafile
        self.timeout = timeout
        self.easy = _CurlEasy()

    def get(self, url: str) -> tuple[Response, int]:
        """GET url: the response and how many new connections libcurl opened for it
        (0 when it reused the previous request's)."""
        easy = self.easy
        _curl_setup(
            easy, url, "GET", b"", [], self.cafile, _CURL_HTTP_VERSION_3ONLY, None, self.timeout
        )
        response = easy.perform(f"GET {url}")
        return response, easy.getinfo_long(_CURLINFO_NUM_CONNECTS)

    def close(self) -> None:
        self.easy.close()


@contextlib.contextmanager
def curl_session(cafile: str | None = None, timeout: float = 10):
    """A ``CurlSession``: HTTP/3 only, each request bounded by ``timeout``."""
    session = CurlSession(cafile, timeout)
    try:
        yield session
    finally:
        session.close()


def curl_altsvc_sequence(
    https_url_tcp: str,
    cafile: str | None,
    altsvc_file: str,
    timeout: float = 10,
    requests: int = 2,
) -> list[Response]:
    """Alt-Svc discovery: TCP first (HTTP/2 or HTTP/1.1, as ALPN gives), then the cached
    h3 alternative.

    ``altsvc_file`` is emptied first. Each request is a fresh easy handle (no TCP reuse)
    with no HTTP version forced: libcurl then never tries QUIC on its own, so h3 on a
    later request can only come from the Alt-Svc cache. Expect http_version "2" (or
    "1.1"), then "3" (libcurl falls back to TCP when the h3 alternative fails).
    """
    with open(altsvc_file, "wb"):
        pass
    out = []
    for i in range(requests):
        easy = _CurlEasy()
        try:
            _curl_setup(
                easy,
                https_url_tcp,
                "GET",
                b"",
                [],
                cafile,
                _CURL_HTTP_VERSION_NONE,
                altsvc_file,
                timeout,
            )
            out.append(easy.perform(f"alt-svc step {i + 1} GET {https_url_tcp}"))
        finally:
            easy.close()
    return out


# --- gtlsclient (ngtcp2's example client) ----------------------------------------------

_GTLS_HEADER = re.compile(r"^http: stream (0x[0-9a-f]+) \[(:?[^:]*): (.*)\]$")
_GTLS_CLOSED = re.compile(r"^HTTP stream (\d+) closed with error code (\d+)")
_GTLS_NOISE = ("I0", "Sent packet", "Received packet", "Set timer", "Timer has", "0000", "[")


def gtlsclient_request(
    host: str,
    port: int,
    path: str,
    cafile: str | None = None,
    body_file: str | None = None,
    timeout: float = 10,
    method: str | None = None,
) -> Response:
    """One request with gtlsclient; POST when ``body_file`` is given.

    gtlsclient does not verify the server certificate, so ``cafile`` is unused. It
    sends no custom headers; the response head is parsed from its debug log.
    """
    exe = shutil.which("gtlsclient")
    if exe is None:
        raise ClientUnavailable("gtlsclient not found (Debian: ngtcp2-client)")
    method = method or ("POST" if body_file else "GET")
    url = f"https://{_authority(host, port)}{path}"
    secs = max(1, int(timeout))
    with tempfile.TemporaryDirectory(prefix="h3kit-gtls-") as tmp:
        dl = os.path.join(tmp, "download")
        os.mkdir(dl)
        cmd = [
            exe,
            "--no-quic-dump",
            "--no-http-dump",
            "--exit-on-all-streams-close",
            f"--download={dl}",
            f"--timeout={secs}s",
            f"--handshake-timeout={secs}s",
            "-m",
            method,
        ]
        if body_file:
            cmd += ["-d", body_file]
        cmd += [host, str(port), url]
        log_path = os.path.join(tmp, "stderr.log")
        # Its debug log (on stderr) is where the response head is printed; it can be large.
        with open(log_path, "wb") as log:
            try:
                proc = subprocess.run(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    timeout=timeout + 5,
                    check=False,
                )
            except subprocess.TimeoutExpired as e:
                raise ClientTimeout(f"gtlsclient {url}: not finished within {timeout}s") from e
        status, headers, interim, close_code, tail = None, [], [], None, []
        with open(log_path, encoding="latin-1") as f:
            for line in f:
                line = line.rstrip("\n")
                if line and not line.startswith(_GTLS_NOISE):
                    tail = (tail + [line])[-6:]
                m = _GTLS_HEADER.match(line)
                if m:
                    name, value = m.group(2), m.group(3)
                    if name == ":status":
                        if status is not None and 100 <= status < 200:
                            interim.append(status)
                        status = int(value)
                        headers = []
                    elif not name.startswith(":"):
                        headers.append((name.lower(), value))
                    continue
                m = _GTLS_CLOSED.match(line)
                if m:
                    close_code = int(m.group(2))
        files = [os.path.join(dl, n) for n in os.listdir(dl)]
        body = b""
        if files:
            with open(files[0], "rb") as f:
                body = f.read()
        if status is None or proc.returncode != 0:
            raise H3ClientError(
                f"gtlsclient {method} {url}: exit {proc.returncode}, "
                f"status {status}; last lines: {' | '.join(tail)}"
            )
        if close_code not in (None, H3_NO_ERROR):
            raise StreamReset(
                f"gtlsclient {url}: stream closed with {h3_error_name(close_code)}", close_code
            )
        return Response(status, headers, body, "3", interim=interim)


# --- Chromium (headless, DevTools protocol over a pipe) ---------------------------------


def _chromium_exe() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        exe = shutil.which(name)
        if exe:
            return exe
    raise ClientUnavailable("chromium not found (Debian: apt-get install chromium)")


class _CdpPipe:
    """DevTools protocol over --remote-debugging-pipe: NUL-terminated JSON both ways."""

    def __init__(self, wfd: int, rfd: int, deadline: float):
        self.wfd, self.rfd, self.deadline = wfd, rfd, deadline
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []

    def _read_message(self) -> dict:
        while b"\0" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise ClientTimeout("chromium: DevTools answer not received in time")
            ready, _, _ = select.select([self.rfd], [], [], left)
            if ready:
                chunk = os.read(self.rfd, 1 << 16)
                if not chunk:
                    raise H3ClientError("chromium closed its DevTools pipe (crashed or exited)")
                self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self.wfd, data) :]
        return self.next_id

    def reply(self, msg_id: int, what: str) -> dict:
        while True:
            for i, msg in enumerate(self.events):
                if msg.get("id") == msg_id:
                    del self.events[i]
                    if "error" in msg:
                        raise H3ClientError(f"chromium {what}: {msg['error']}")
                    return msg.get("result", {})
            self.events.append(self._read_message())

    def call(self, method: str, params: dict | None = None, session: str | None = None):
        return self.reply(self.send(method, params, session), method)

    def wait_event(self, method: str, session: str | None = None) -> dict:
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("method") == method and (
                    session is None or ev.get("sessionId") == session
                ):
                    return self.events.pop(i)
            self.events.append(self._read_message())


# Runs in the page; %s is a JSON spec {url, method, headers, body_b64 (or null)}.
_FETCH_JS = """
(async () => {
  const spec = %s;
  const opts = {method: spec.method, headers: spec.headers, cache: "no-store"};
  if (spec.body_b64 !== null)
    opts.body = Uint8Array.from(atob(spec.body_b64), c => c.charCodeAt(0));
  const out = {};
  try {
    const r = await fetch(spec.url, opts);
    out.status = r.status;
    out.headers = [...r.headers.entries()];
    const bytes = new Uint8Array(await r.arrayBuffer());
    let s = "";
    for (let i = 0; i < bytes.length; i += 0x8000)
      s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    out.body_b64 = btoa(s);
    const entries = performance.getEntriesByName(r.url || spec.url);
    out.protocol = entries.length ? entries[entries.length - 1].nextHopProtocol : null;
  } catch (e) {
    out.error = String(e);
  }
  return JSON.stringify(out);
})()
"""


def _force_quic_origin(parts) -> str:
    # Chromium matches no spelling of an IPv6 literal here; "*" does, and this
    # throwaway browser talks to one origin only.
    return "*" if ":" in (parts.hostname or "") else parts.netloc


# A page on the target origin that never reaches the server: the fetch runs same-origin.
_BLANK_PATH = "/__h3kit_blank__"


def chromium_fetch(
    url: str,
    spki_b64: str,
    timeout: float = 30,
    method: str = "GET",
    headers: Iterable[tuple[str, str]] = (),
    body: bytes | None = None,
    quic: bool = True,
) -> dict:
    """fetch() ``url`` from a same-origin page in headless Chromium forced onto QUIC
    (``quic=False``: QUIC off, so TCP with whatever ALPN gives, HTTP/2 or HTTP/1.1).

    Returns {"status", "headers" (list of pairs), "body" (bytes), "text", "protocol"
    (Resource Timing nextHopProtocol: "h3" when HTTP/3 was used)}. Trust comes from
    the SPKI pin; the blank page is served by DevTools interception, not the server.
    Chromium sends QUIC for "localhost" to ::1 only, with no fallback to 127.0.0.1.
    """
    exe = _chromium_exe()
    parts = urlsplit(url)
    if parts.scheme != "https" or parts.port is None:
        raise ValueError("chromium_fetch needs an https URL with an explicit port")
    if parts.username or parts.password:
        raise ValueError("chromium_fetch: no userinfo in the URL")
    origin = f"https://{parts.netloc}"
    deadline = time.monotonic() + timeout
    to_chrome_r, to_chrome_w = os.pipe()
    from_chrome_r, from_chrome_w = os.pipe()
    # Above 4, so dup2 onto 3 and 4 in the child cannot clobber the other end.
    child_in = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD_CLOEXEC, 10)
    child_out = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(to_chrome_r)
    os.close(from_chrome_w)

    def child_fds():
        os.dup2(child_in, 3)
        os.dup2(child_out, 4)

    with tempfile.TemporaryDirectory(prefix="h3kit-chromium-") as profile:
        cmd = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-dev-shm-usage",
            "--disable-domain-reliability",
            "--no-pings",
            # Names other than localhost resolve to nothing: no traffic leaves loopback.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1, EXCLUDE ::1",
            f"--user-data-dir={profile}",
            *(
                ["--enable-quic", f"--origin-to-force-quic-on={_force_quic_origin(parts)}"]
                if quic
                else ["--disable-quic"]
            ),
            f"--ignore-certificate-errors-spki-list={spki_b64}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        err_path = os.path.join(profile, "chromium-stderr.log")
        try:
            with open(err_path, "wb") as err:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=err,
                    # Not under a sanitizer run's preloaded runtime: Chromium is no
                    # instrumented program and does not start with it.
                    env={k: v for k, v in os.environ.items() if k != "LD_PRELOAD"},
                    preexec_fn=child_fds,
                    close_fds=False,  # keeps the dup2'd 3 and 4; Python's own fds are CLOEXEC
                )
        except BaseException:
            for fd in (to_chrome_w, from_chrome_r):
                os.close(fd)
            raise
        finally:
            os.close(child_in)
            os.close(child_out)
        cdp = _CdpPipe(to_chrome_w, from_chrome_r, deadline)
        try:
            return _chromium_session(cdp, origin, url, method, list(headers), body)
        except H3ClientError as e:
            with open(err_path, "rb") as f:
                lines = f.read().decode("latin-1", "replace").splitlines()
            # Without a D-Bus session Chromium logs dbus errors; they never matter here.
            tail = "\n".join([ln for ln in lines if "dbus" not in ln][-12:])
            raise type(e)(f"{e}\nchromium stderr tail:\n{tail}") from e
        finally:
            with contextlib.suppress(Exception):
                cdp.deadline = time.monotonic() + 3
                cdp.call("Browser.close")
            os.close(to_chrome_w)
            os.close(from_chrome_r)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def _chromium_session(cdp: _CdpPipe, origin, url, method, headers, body) -> dict:
    targets = cdp.call("Target.getTargets")["targetInfos"]
    page = next((t for t in targets if t.get("type") == "page"), None)
    if page is None:
        page = {"targetId": cdp.call("Target.createTarget", {"url": "about:blank"})["targetId"]}
    session = cdp.call("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})[
        "sessionId"
    ]
    blank = origin + _BLANK_PATH
    cdp.call("Page.enable", session=session)
    cdp.call(
        "Fetch.enable",
        {"patterns": [{"urlPattern": blank + "*", "requestStage": "Request"}]},
        session=session,
    )
    # The navigation answers only once its request is fulfilled, so do not wait on it yet.
    nav = cdp.send("Page.navigate", {"url": blank}, session=session)
    paused = cdp.wait_event("Fetch.requestPaused", session)
    cdp.call(
        "Fetch.fulfillRequest",
        {
            "requestId": paused["params"]["requestId"],
            "responseCode": 200,
            "responseHeaders": [{"name": "content-type", "value": "text/html"}],
            "body": base64.b64encode(b"<!doctype html><title>h3kit</title>").decode(),
        },
        session=session,
    )
    nav_result = cdp.reply(nav, "Page.navigate")
    if nav_result.get("errorText"):
        raise H3ClientError(f"chromium: blank page navigation failed: {nav_result['errorText']}")
    cdp.wait_event("Page.loadEventFired", session)
    cdp.call("Fetch.disable", session=session)
    cdp.call("Network.enable", session=session)  # only for net::ERR_* detail on failure
    spec = {
        "url": url,
        "method": method,
        "headers": headers,
        "body_b64": None if body is None else base64.b64encode(body).decode(),
    }
    result = cdp.call(
        "Runtime.evaluate",
        {"expression": _FETCH_JS % json.dumps(spec), "awaitPromise": True, "returnByValue": True},
        session=session,
    )
    if "exceptionDetails" in result:
        raise H3ClientError(f"chromium script failed: {result['exceptionDetails']}")
    out = json.loads(result["result"]["value"])
    if "error" in out:
        net = [
            ev["params"].get("errorText", "?")
            for ev in cdp.events
            if ev.get("method") == "Network.loadingFailed"
        ]
        raise H3ClientError(f"chromium fetch({url}) failed: {out['error']} {' '.join(net)}")
    data = base64.b64decode(out.pop("body_b64"))
    out["body"] = data
    out["text"] = data.decode("utf-8", "replace")
    out["headers"] = [(n.lower(), v) for n, v in out["headers"]]
    return out
