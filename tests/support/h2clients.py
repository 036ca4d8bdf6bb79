"""HTTP/2 clients for end-to-end tests: the curl and nghttp commands, and a raw client.

``H2Raw`` speaks HTTP/2 frame by frame (hyperframe for the frames, hpack for the
header blocks), so a test can send what a real client never would (floods, resets,
endless header blocks, a window that never opens) and see every frame the server
sends back. It is blocking and every wait is bounded by a deadline.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Error codes (RFC 9113 7).
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
REFUSED_STREAM = 0x7
CANCEL = 0x8
ENHANCE_YOUR_CALM = 0xB

SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6
SETTINGS_ENABLE_CONNECT_PROTOCOL = 0x8


class ClientMissing(Exception):
    """The command is not installed here."""


def _env() -> dict[str, str]:
    # Not under a sanitizer run's preloaded runtime: these are no instrumented programs.
    return {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}


# --- the curl and nghttp commands ----------------------------------------------------


@dataclass
class CurlResult:
    status: int
    version: str  # "2", "1.1"
    headers: list[tuple[str, str]]
    body: bytes


def curl(url: str, *args: str, cafile: str | None = None, timeout: float = 30) -> CurlResult:
    """``curl --http2`` (or whatever ``args`` ask for) to ``url``."""
    exe = shutil.which("curl")
    if exe is None:
        raise ClientMissing("curl not found (Debian: apt-get install curl)")
    argv = [exe, "-sS", "--max-time", str(timeout), "-D", "-", "-o", "-", *args]
    argv += ["--cacert", cafile] if cafile else ["-k"]
    argv.append(url)
    p = subprocess.run(argv, capture_output=True, timeout=timeout + 10, env=_env())
    if p.returncode != 0:
        raise AssertionError(f"curl exited {p.returncode}: {p.stderr.decode(errors='replace')}")
    out = p.stdout
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    version, status = lines[0].split(" ")[0].removeprefix("HTTP/"), int(lines[0].split(" ")[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip().lower(), value.strip()))
    return CurlResult(status, version, headers, body)


def nghttp(url: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """The nghttp client (nghttp2-client), verbose: every frame is printed."""
    exe = shutil.which("nghttp")
    if exe is None:
        raise ClientMissing("nghttp not found (Debian: apt-get install nghttp2-client)")
    return subprocess.run(
        [exe, "-v", "-t", str(timeout), *args, url],
        capture_output=True,
        text=True,
        timeout=timeout + 10,
        env=_env(),
    )


# --- the raw client ---------------------------------------------------------------------


@dataclass
class StreamState:
    headers: list[tuple[str, str]] = field(default_factory=list)
    trailers: list[tuple[str, str]] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    ended: bool = False
    reset: int | None = None  # RST_STREAM error code from the server

    @property
    def status(self) -> int:
        return int(dict(self.headers).get(":status", "0"))

    def header(self, name: str) -> str | None:
        return dict(self.headers).get(name)

    @property
    def done(self) -> bool:
        return self.ended or self.reset is not None


class H2Raw:
    """One HTTP/2 connection, frame by frame."""

    def __init__(
        self,
        host: str,
        port: int,
        cafile: str | None = None,
        tls: bool = True,
        settings: dict[int, int] | None = None,
        timeout: float = 10.0,
        auto_window: bool = True,
        authority: str | None = None,
    ):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
            if tls:
                ctx = ssl.create_default_context(cafile=cafile)
                ctx.set_alpn_protocols(["h2"])
                sock = ctx.wrap_socket(sock, server_hostname=host)
                assert sock.selected_alpn_protocol() == "h2", sock.selected_alpn_protocol()
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.timeout = timeout
        self.authority = authority or f"{host}:{port}"
        self.scheme = "https" if tls else "http"
        self.auto_window = auto_window
        self.enc = hpack.Encoder()
        self.dec = hpack.Decoder()
        self.dec.max_header_list_size = 1 << 24
        self.buf = bytearray()
        self.next_sid = 1
        self.streams: dict[int, StreamState] = {}
        self.server_settings: dict[int, int] = {}
        self.goaway: list[tuple[int, int]] = []  # (last stream id, error code), in order
        self.pings_acked = 0
        self.closed = False  # EOF or a reset from the server
        self._block: tuple[int, bytearray, bool] | None = None  # header block in progress
        self.send(PREFACE + SettingsFrame(0, settings=settings or {}).serialize())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    # -- sending -----------------------------------------------------------------------

    def send(self, data: bytes) -> bool:
        """Raw bytes; False when the server has closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            self.closed = True
            return False

    def frame(self, f: Frame) -> bool:
        return self.send(f.serialize())

    def header_block(self, headers) -> bytes:
        return self.enc.encode([(n.encode() if isinstance(n, str) else n, v) for n, v in headers])

    def request_headers(self, method: str, path: str, headers=()) -> list:
        return [
            (":method", method),
            (":scheme", self.scheme),
            (":authority", self.authority),
            (":path", path),
            *headers,
        ]

    def open_stream(self, headers, end_stream: bool = True) -> int:
        sid = self.next_sid
        self.next_sid += 2
        self.streams[sid] = StreamState()
        block = self.header_block(headers)
        # Frames of at most 16 KiB (SETTINGS_MAX_FRAME_SIZE's default): CONTINUATIONs.
        parts = [block[i : i + 16384] for i in range(0, len(block), 16384)] or [b""]
        flags = (["END_HEADERS"] if len(parts) == 1 else []) + (
            ["END_STREAM"] if end_stream else []
        )
        out = HeadersFrame(sid, data=parts[0], flags=flags).serialize()
        for i, part in enumerate(parts[1:], 2):
            out += continuation(sid, part, end=i == len(parts))
        self.send(out)
        return sid

    def request(self, method: str, path: str, body: bytes | None = None, headers=()) -> int:
        sid = self.open_stream(self.request_headers(method, path, headers), body is None)
        if body is not None:
            self.data(sid, body, end=True)
        return sid

    def data(self, sid: int, data: bytes, end: bool = False) -> None:
        """DATA frames of at most 16 KiB (the default SETTINGS_MAX_FRAME_SIZE)."""
        step = 16384
        for i in range(0, max(len(data), 1), step):
            last = i + step >= len(data)
            flags = ["END_STREAM"] if end and last else []
            self.frame(DataFrame(sid, data=data[i : i + step], flags=flags))

    def reset(self, sid: int, code: int = CANCEL) -> None:
        self.frame(RstStreamFrame(sid, error_code=code))

    # -- receiving ---------------------------------------------------------------------

    def _read(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(1 << 18)
        except TimeoutError:
            return False
        except (ConnectionResetError, ssl.SSLError, OSError):
            data = b""
        if not data:
            self.closed = True
            return False
        self.buf += data
        return True

    def _frames(self):
        while len(self.buf) >= 9:
            f, length = Frame.parse_frame_header(memoryview(self.buf[:9]))
            if len(self.buf) < 9 + length:
                return
            f.parse_body(memoryview(bytes(self.buf[9 : 9 + length])))
            del self.buf[: 9 + length]
            yield f

    def _handle(self, f: Frame) -> None:
        kind = f.type
        if isinstance(f, SettingsFrame):
            if "ACK" not in f.flags:
                self.server_settings.update(f.settings)
                self.frame(SettingsFrame(0, flags=["ACK"]))
        elif isinstance(f, PingFrame):
            if "ACK" in f.flags:
                self.pings_acked += 1
            else:
                self.frame(PingFrame(0, opaque_data=f.opaque_data, flags=["ACK"]))
        elif isinstance(f, GoAwayFrame):
            self.goaway.append((f.last_stream_id, f.error_code))
        elif isinstance(f, RstStreamFrame):
            self.streams.setdefault(f.stream_id, StreamState()).reset = f.error_code
        elif isinstance(f, DataFrame):
            st = self.streams.setdefault(f.stream_id, StreamState())
            st.data += f.data
            if "END_STREAM" in f.flags:
                st.ended = True
            if self.auto_window and f.flow_controlled_length:
                n = f.flow_controlled_length
                self.frame(WindowUpdateFrame(0, window_increment=n))
                if not st.ended:
                    self.frame(WindowUpdateFrame(f.stream_id, window_increment=n))
        elif isinstance(f, HeadersFrame | ContinuationFrame):
            if isinstance(f, HeadersFrame):
                self._block = (f.stream_id, bytearray(f.data), "END_STREAM" in f.flags)
            else:
                assert self._block is not None
                self._block[1].extend(f.data)
            if "END_HEADERS" in f.flags:
                sid, block, end = self._block
                self._block = None
                fields = [
                    (n.decode(), v.decode()) for n, v in self.dec.decode(bytes(block), raw=True)
                ]
                st = self.streams.setdefault(sid, StreamState())
                if st.headers and not fields[0][0] == ":status":
                    st.trailers = fields
                elif st.headers and st.headers[0] == (":status", "100"):
                    st.headers = fields
                else:
                    st.headers = fields
                if end:
                    st.ended = True
        del kind

    def pump(self, timeout: float = 0.2) -> None:
        """Read what arrives within ``timeout`` and handle it."""
        deadline = time.monotonic() + timeout
        while self._read(deadline):
            for f in self._frames():
                self._handle(f)
            if not self.buf:
                deadline = min(deadline, time.monotonic() + 0.01)

    def wait(self, predicate, timeout: float | None = None, message: str = ""):
        """Read and handle frames until ``predicate()`` holds; AssertionError at the deadline."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for f in self._frames():
                self._handle(f)
            value = predicate()
            if value:
                return value
            if self.closed or not self._read(deadline):
                value = predicate()
                if value:
                    return value
                raise AssertionError(
                    f"HTTP/2: not met before {'EOF' if self.closed else 'the deadline'}: {message}"
                    f" (goaway={self.goaway})"
                )

    def response(self, sid: int, timeout: float | None = None) -> StreamState:
        st = self.streams[sid]
        self.wait(lambda: st.done, timeout, f"response on stream {sid}")
        return st

    def get(self, path: str, timeout: float | None = None) -> StreamState:
        return self.response(self.request("GET", path), timeout)

    def wait_closed(self, timeout: float | None = None) -> None:
        """Until the server closes the connection (EOF)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while not self.closed:
            for f in self._frames():
                self._handle(f)
            if not self._read(deadline) and not self.closed:
                if time.monotonic() >= deadline:
                    raise AssertionError(
                        f"the server kept the connection open (goaway={self.goaway})"
                    )
        for f in self._frames():
            self._handle(f)


def continuation(sid: int, data: bytes, end: bool = False) -> bytes:
    return ContinuationFrame(sid, data=data, flags=["END_HEADERS"] if end else []).serialize()
