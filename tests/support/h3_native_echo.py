"""A tiny HTTP/3 server straight on fpy3._native (no ASGI), for the native tests.

    GET  /hello        -> 200 "hello"
    POST /echo         -> 200, the request body streamed back (consume() as it goes)
    GET  /big?n=BYTES  -> 200, BYTES bytes of bytes(range(256)) repeated
    GET  /slow?ms=N    -> 200 "slow" after N ms (a request in flight, for drain tests)
    POST /hold?ms=N    -> consumes nothing for N ms (prints "HELD <bytes received>"),
                          then everything; answers the body length
    anything else      -> 404

The driving pattern is the one the real worker uses: add_reader on the UDP fd with
one native call per readiness, one call_later timer for the engine's deadline, and
one flush after each batch. Prints "READY <port>" once serving; SIGTERM drains
(GOAWAY) and exits 0 when every connection is gone.

SIGUSR1 closes every connection at once (fpy3_h3_close_all, H3_NO_ERROR) and prints
"CLOSED_ALL"; the server then refuses new connections. SIGUSR2 exits at once, without
draining: fpy3_h3_server_free closes what is left (MsQuic: then "LEFT_OPEN n", the engines
whose close ran out of --close-wait-ms; --after-free-ms keeps the process going after).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
from urllib.parse import parse_qs, urlsplit

import uvloop
from fpy3._native import ffi, lib

PATTERN = bytes(range(256)) * 256  # 64 KiB
HIGH_WATER = 256 * 1024

REQUEST = lib.FPY3_H3_REQUEST
DATA = lib.FPY3_H3_DATA
END = lib.FPY3_H3_END
RESET = lib.FPY3_H3_RESET
WRITABLE = lib.FPY3_H3_WRITABLE
CLOSED = lib.FPY3_H3_CLOSED


class Req:
    __slots__ = ("conn", "stream", "kind", "left", "held", "done", "total", "ended")

    def __init__(self, conn: int, stream: int, kind: str):
        self.conn = conn
        self.stream = stream
        self.kind = kind
        self.left = 0  # /big: bytes still to send
        self.held = 0  # /echo: body bytes not yet consumed (waiting for WRITABLE)
        self.done = False
        self.total = 0  # /hold: body bytes received
        self.ended = False


def headers_block(pairs) -> bytes:
    return b"".join(n + b"\0" + v + b"\0" for n, v in pairs)


class Echo:
    def __init__(self, loop, srv, fd: int, log_requests: bool = False):
        self.log_requests = log_requests
        self.loop = loop
        self.srv = srv
        self.fd = fd
        self.reqs: dict[tuple[int, int], Req] = {}
        self.count = ffi.new("size_t *")
        self.timer = None
        self.deadline = None
        self.writer = False
        self.draining = False
        self.done = loop.create_future()

    # --- driving ---------------------------------------------------------------------

    def on_readable(self) -> None:
        lib.fpy3_h3_read(self.srv)
        self.round()

    def on_timer(self) -> None:
        self.timer = self.deadline = None
        lib.fpy3_h3_expire(self.srv)
        self.round()

    def on_writable(self) -> None:
        self.loop.remove_writer(self.fd)
        self.writer = False
        self.round()

    def round(self) -> None:
        """Handle the batch, flush once, re-arm the timer."""
        self.handle()
        lib.fpy3_h3_flush(self.srv)
        if lib.fpy3_h3_want_write(self.srv) and not self.writer:
            self.writer = True
            self.loop.add_writer(self.fd, self.on_writable)
        ms = lib.fpy3_h3_next_timeout_ms(self.srv)
        if ms < 0:
            if self.timer:
                self.timer.cancel()
                self.timer = self.deadline = None
        else:
            when = self.loop.time() + ms / 1000
            if self.deadline is None or abs(when - self.deadline) > 0.0005:
                if self.timer:
                    self.timer.cancel()
                self.deadline = when
                self.timer = self.loop.call_at(when, self.on_timer)
        if self.draining and lib.fpy3_h3_connection_count(self.srv) == 0:
            if not self.done.done():
                self.done.set_result(None)

    def close_all(self) -> None:
        lib.fpy3_h3_close_all(self.srv, lib.FPY3_H3_NO_ERROR)
        print("CLOSED_ALL", flush=True)
        self.round()  # the RESET/CLOSED events it raised come with the next batch

    def quit_now(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def drain(self) -> None:
        self.draining = True
        lib.fpy3_h3_shutdown(self.srv, 1)  # the GOAWAY notice
        lib.fpy3_h3_shutdown(self.srv, 2)  # and at once the final GOAWAY
        # Bounded: connections that never finish are dropped with the server.
        self.loop.call_later(10, lambda: self.done.done() or self.done.set_result(None))
        self.round()

    # --- the app ---------------------------------------------------------------------

    def handle(self) -> None:
        evs = lib.fpy3_h3_events(self.srv, self.count)
        for i in range(self.count[0]):
            ev = evs[i]
            t = ev.type
            key = (ev.conn, ev.stream)
            if t == REQUEST:
                self.on_request(ev.conn, ev.stream, ffi.buffer(ev.data, ev.len)[:])
            elif t == DATA:
                req = self.reqs.get(key)
                if req is not None:
                    self.on_body(req, ffi.buffer(ev.data, ev.len)[:])
            elif t == END:
                req = self.reqs.get(key)
                if req is not None and req.kind == "echo":
                    self.send(req, b"", fin=True)
                elif req is not None and req.kind == "hold":
                    req.ended = True
                    self.finish_hold(req)
            elif t == WRITABLE:
                req = self.reqs.get(key)
                if req is not None:
                    self.on_writable_stream(req)
            elif t == RESET:
                req = self.reqs.get(key)
                if req is not None:
                    req.done = True
                if self.log_requests:
                    print("RESET", hex(ev.code), flush=True)
            elif t == CLOSED:
                self.reqs.pop(key, None)

    def respond(self, conn, stream, status, pairs, end=False) -> None:
        block = headers_block(pairs)
        lib.fpy3_h3_respond(self.srv, conn, stream, status, block, len(block), int(end))

    def send(self, req: Req, data: bytes, fin: bool = False) -> int:
        if req.done:
            return -1
        n = lib.fpy3_h3_send(self.srv, req.conn, req.stream, data, len(data), int(fin))
        if fin or n < 0:
            req.done = True
        return n

    def on_request(self, conn: int, stream: int, block: bytes) -> None:
        fields = block.split(b"\0")
        pseudo = dict(zip(fields[0:-1:2], fields[1::2], strict=False))
        method = pseudo.get(b":method", b"")
        url = urlsplit(pseudo.get(b":path", b"/").decode("latin-1"))
        if self.log_requests:
            print("REQUEST", method.decode(), url.path, flush=True)
        if method == b"GET" and url.path == "/hello":
            req = Req(conn, stream, "hello")
            self.reqs[(conn, stream)] = req
            self.respond(
                conn, stream, 200, [(b"content-type", b"text/plain"), (b"content-length", b"5")]
            )
            self.send(req, b"hello", fin=True)
        elif method == b"POST" and url.path == "/echo":
            req = Req(conn, stream, "echo")
            self.reqs[(conn, stream)] = req
            self.respond(conn, stream, 200, [(b"content-type", b"application/octet-stream")])
        elif method == b"GET" and url.path == "/big":
            n = int(parse_qs(url.query).get("n", ["0"])[0])
            req = Req(conn, stream, "big")
            req.left = n
            self.reqs[(conn, stream)] = req
            self.respond(conn, stream, 200, [(b"content-length", str(n).encode())])
            self.pump(req)
        elif method == b"POST" and url.path == "/hold":
            ms = int(parse_qs(url.query).get("ms", ["100"])[0])
            req = Req(conn, stream, "hold")
            req.left = 1  # still holding
            self.reqs[(conn, stream)] = req
            self.loop.call_later(ms / 1000, self.release_hold, req)
        elif method == b"GET" and url.path == "/slow":
            ms = int(parse_qs(url.query).get("ms", ["100"])[0])
            req = Req(conn, stream, "slow")
            self.reqs[(conn, stream)] = req
            self.loop.call_later(ms / 1000, self.finish_slow, req)
        else:
            req = Req(conn, stream, "404")
            self.reqs[(conn, stream)] = req
            self.respond(conn, stream, 404, [(b"content-length", b"9")])
            self.send(req, b"not found", fin=True)

    def finish_slow(self, req: Req) -> None:
        if not req.done:
            self.respond(req.conn, req.stream, 200, [(b"content-length", b"4")])
            self.send(req, b"slow", fin=True)
        self.round()  # outside a readiness callback: flush and re-arm here

    def release_hold(self, req: Req) -> None:
        print("HELD", req.total, flush=True)
        req.left = 0
        lib.fpy3_h3_consume(self.srv, req.conn, req.stream, req.held)
        req.held = 0
        self.finish_hold(req)
        self.round()

    def finish_hold(self, req: Req) -> None:
        if req.ended and not req.left and not req.done:
            body = str(req.total).encode()
            self.respond(req.conn, req.stream, 200, [(b"content-length", str(len(body)).encode())])
            self.send(req, body, fin=True)

    def on_body(self, req: Req, data: bytes) -> None:
        if req.kind == "hold":
            req.total += len(data)
            if req.left:
                req.held += len(data)  # no credit back while holding
            else:
                lib.fpy3_h3_consume(self.srv, req.conn, req.stream, len(data))
            return
        if req.kind != "echo":
            lib.fpy3_h3_consume(self.srv, req.conn, req.stream, len(data))
            return
        buffered = self.send(req, data)
        if buffered > HIGH_WATER or req.held:
            req.held += len(data)  # credit waits until the echo drains
        else:
            lib.fpy3_h3_consume(self.srv, req.conn, req.stream, len(data))

    def on_writable_stream(self, req: Req) -> None:
        if req.kind == "echo" and req.held:
            lib.fpy3_h3_consume(self.srv, req.conn, req.stream, req.held)
            req.held = 0
        elif req.kind == "big":
            self.pump(req)

    def pump(self, req: Req) -> None:
        while req.left > 0 and not req.done:
            n = min(req.left, len(PATTERN))
            req.left -= n
            if self.send(req, PATTERN[:n], fin=req.left == 0) > HIGH_WATER:
                return  # WRITABLE resumes
        if req.left == 0 and not req.done:
            self.send(req, b"", fin=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--worker-id", type=int, default=7)
    ap.add_argument("--retry", action="store_true")
    ap.add_argument("--qlog-dir", default="")
    ap.add_argument("--max-header-size", type=int, default=16384)
    ap.add_argument("--max-header-count", type=int, default=100)
    ap.add_argument("--max-streams", type=int, default=100)
    ap.add_argument("--max-stream-data", type=int, default=0, help="per-stream window")
    ap.add_argument("--log-requests", action="store_true")
    ap.add_argument("--engine", choices=("ngtcp2", "msquic"), default="ngtcp2")
    ap.add_argument("--close-wait-ms", type=int, default=0, help="engine close deadline")
    ap.add_argument(
        "--after-free-ms", type=int, default=0, help="run the loop on after the server is freed"
    )
    args = ap.parse_args(argv)

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((args.host, args.port))
    sock.setblocking(False)

    keep = [ffi.new("char[]", s.encode()) for s in (args.cert, args.key, args.qlog_dir)]
    cfg = ffi.new("fpy3_h3_config *")
    cfg.cert_file, cfg.key_file, cfg.qlog_dir = keep
    cfg.worker_id = args.worker_id
    cfg.static_secret = os.urandom(32)
    cfg.retry = int(args.retry)
    cfg.idle_timeout_ms = 30000
    cfg.max_streams_bidi = args.max_streams
    cfg.max_header_size = args.max_header_size
    cfg.max_header_count = args.max_header_count
    cfg.initial_max_stream_data = args.max_stream_data
    cfg.send_high_water = HIGH_WATER
    cfg.close_wait_ms = args.close_wait_ms
    err = ffi.new("char[256]")
    port = sock.getsockname()[1]
    fd = sock.fileno()
    if args.engine == "msquic":
        # MsQuic binds its own socket: it gets the address, the port is freed for it.
        cfg.engine = lib.FPY3_ENGINE_MSQUIC
        keep.append(ffi.new("char[]", args.host.encode()))
        cfg.listen_host, cfg.listen_port = keep[-1], port
        sock.close()
        fd = -1
    srv = lib.fpy3_h3_server_new(fd, cfg, err, 256)
    if srv == ffi.NULL:
        print("server_new failed:", ffi.string(err).decode(), file=sys.stderr)
        return 2

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    fd = lib.fpy3_h3_fd(srv)  # the UDP socket, or MsQuic's epoll set
    echo = Echo(loop, srv, fd, args.log_requests)
    loop.add_reader(fd, echo.on_readable)
    loop.add_signal_handler(signal.SIGTERM, echo.drain)
    loop.add_signal_handler(signal.SIGINT, echo.drain)
    loop.add_signal_handler(signal.SIGUSR1, echo.close_all)
    loop.add_signal_handler(signal.SIGUSR2, echo.quit_now)
    print("READY", port, flush=True)
    try:
        loop.run_until_complete(asyncio.wait_for(echo.done, None))
    finally:
        loop.remove_reader(fd)
        if echo.timer:
            echo.timer.cancel()
        lib.fpy3_h3_server_free(srv)
        if args.engine == "msquic":
            print("LEFT_OPEN", lib.fpy3_msquic_left_open(), flush=True)
        if args.after_free_ms:
            # A process that lives on after its HTTP/3 server (a worker serving on).
            loop.run_until_complete(asyncio.sleep(args.after_free_ms / 1000))
        loop.close()
        sock.close()
    print("DRAINED", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
