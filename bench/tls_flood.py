"""TLS flood: waves of idle TLS connections against one fpy3 worker (a benchmark, not a
test: it prints figures and never fails a build).

Each wave opens ``--connections`` TLS connections to the worker (at most
``--concurrency`` handshakes in flight), completes every handshake and sends nothing, so
each connection sits in the worker waiting for a request head until the worker's header
timeout closes it (or ``--hold`` seconds pass and the flooder closes what is left). Then
the script waits ``--settle`` seconds. Meanwhile a normal client sends requests
throughout (one on a new TLS connection and one on a kept-alive connection, each
``--rate`` times a second) and counts those answered 200 with the right body.

Printed per wave: the worker's RSS at its baseline (before the first wave), the peak
during the wave, the most connections the worker held at once (open descriptors over its
baseline; past ``limits.max_idle_connections`` it closes the longest idle) and the peak
rise per held connection, RSS ``--settle`` seconds after the wave's last connection
closed, and the normal clients' success rate during the wave and the settle. The goal:
the peak at most 64 MiB over the baseline and RSS back within 10 MiB of it after the
settle, with every normal request served.

    .venv/bin/python bench/tls_flood.py                  # 3 waves of 3,000
    .venv/bin/python bench/tls_flood.py --waves 1 --connections 500 --settle 10

The flooder runs in a child process (this file with ``--flooder``), the worker is
``fpy3 run`` with one worker on a free loopback port with a throwaway certificate. Both
raise their soft fd limit to the hard one. Loopback only; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
BIN_DIR = Path(sys.executable).parent
EXPECTED_BODY = b"Hello, world!"
MIB = 1024 * 1024


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # throwaway self-signed certificate
    return ctx


# --- the flooder (child process) ----------------------------------------------------


async def flood(host: str, port: int, count: int, concurrency: int, hold: float) -> None:
    """Open ``count`` idle TLS connections; report on stdout (one JSON object a line)."""
    ctx = client_context()
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    writers: list[asyncio.StreamWriter] = []
    closed_by_server = 0
    failed = 0
    all_open = loop.create_future()
    pending = count

    def report(**kw) -> None:
        print(json.dumps(kw), flush=True)

    async def one() -> None:
        nonlocal closed_by_server, failed, pending
        try:
            async with gate:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port, ssl=ctx), timeout=30
                )
        except (OSError, TimeoutError, ssl.SSLError):
            failed += 1
            reader = writer = None
        pending -= 1
        if not pending and not all_open.done():
            all_open.set_result(None)
        if reader is None or writer is None:
            return
        writers.append(writer)
        try:
            # Wait for the server to close it (its header timeout), at most ``hold``.
            await asyncio.wait_for(reader.read(1), timeout=hold)
            closed_by_server += 1
        except (OSError, TimeoutError, ssl.SSLError):
            pass
        finally:
            writer.close()

    started = time.monotonic()
    tasks = [asyncio.ensure_future(one()) for _ in range(count)]
    await all_open
    report(event="open", opened=count - failed, failed=failed, secs=time.monotonic() - started)
    await asyncio.gather(*tasks, return_exceptions=True)
    for writer in writers:
        writer.transport.abort()
    report(event="closed", by_server=closed_by_server, secs=time.monotonic() - started)


def flooder_main(args: argparse.Namespace) -> None:
    raise_fd_limit()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(flood(args.host, args.port, args.connections, args.concurrency, args.hold))


# --- the normal clients ----------------------------------------------------------------


@dataclass
class Tally:
    ok: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def add(self, error: str | None) -> None:
        if error is None:
            self.ok += 1
        else:
            self.failed += 1
            self.errors[error] = self.errors.get(error, 0) + 1

    def rate(self) -> str:
        total = self.ok + self.failed
        return f"{self.ok}/{total} ({100.0 * self.ok / total:.1f}%)" if total else "-"


def read_response(sock: ssl.SSLSocket) -> bytes:
    """The body of one Content-Length response (the bench app always sends one)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed before the response head")
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200 "):
        raise ConnectionError(head.split(b"\r\n", 1)[0].decode("latin-1"))
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed inside the body")
        body += data
    return body


class NormalClients:
    """Requests at a fixed rate, on new connections and on one kept-alive connection,
    tallied into whatever ``self.tally`` is at the time."""

    REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"

    def __init__(self, host: str, port: int, rate: float, timeout: float = 5.0):
        self.host, self.port, self.interval, self.timeout = host, port, 1.0 / rate, timeout
        self.ctx = client_context()
        self.tally = Tally()
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(False,), daemon=True),
            threading.Thread(target=self._run, args=(True,), daemon=True),
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(self.timeout + 2)

    def _connect(self) -> ssl.SSLSocket:
        raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
        return self.ctx.wrap_socket(raw, server_hostname="localhost")

    def _run(self, keep_alive: bool) -> None:
        sock: ssl.SSLSocket | None = None
        next_at = time.monotonic()
        while not self.stop.is_set():
            tally = self.tally
            error = None
            try:
                if sock is None:
                    sock = self._connect()
                sock.sendall(self.REQUEST)
                if read_response(sock) != EXPECTED_BODY:
                    error = "wrong body"
            except (OSError, ConnectionError, ssl.SSLError) as exc:
                error = type(exc).__name__ if not str(exc) else str(exc)[:60]
                if sock is not None:
                    sock.close()
                sock = None
            if not keep_alive and sock is not None:
                sock.close()
                sock = None
            tally.add(error)
            next_at += self.interval
            self.stop.wait(max(0.0, next_at - time.monotonic()))
        if sock is not None:
            sock.close()


# --- the worker -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_cert(tmp: Path) -> tuple[str, str]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    argv = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    argv += ["-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key)]
    argv += ["-out", str(cert), "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
    subprocess.run(argv, check=True, capture_output=True, timeout=30)
    return str(cert), str(key)


def start_worker(
    port: int, cert: str, key: str, env_extra: dict[str, str], log, log_level: str
) -> subprocess.Popen:
    argv = [str(BIN_DIR / "fpy3"), "run", "bench.app:app", "--port", str(port)]
    argv += ["--workers", "1", "--no-access-log", "--log-level", log_level]
    argv += ["--certfile", cert, "--keyfile", key]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FPY3_")}
    env["FPY3_HTTP3__ENABLED"] = "false"  # TCP only: the flood is TLS over TCP
    env["PYTHONPATH"] = str(ROOT)
    env.update(env_extra)
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=log)


def wait_ready(host: str, port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    ctx = client_context()
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the worker exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=2) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                    s.sendall(NormalClients.REQUEST)
                    if read_response(s) == EXPECTED_BODY:
                        return
        except (OSError, ConnectionError, ssl.SSLError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the worker did not answer in time")
        time.sleep(0.1)


class RSSSampler:
    """The worker's resident set, sampled every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.1):
        import psutil

        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.last = self.proc.memory_info().rss
        # Open descriptors above the start: the most connections the worker held at once
        # (past limits.max_idle_connections it closes the longest idle).
        self.fds_base = self.proc.num_fds()
        self.fds_peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.last = self.proc.memory_info().rss
                fds = self.proc.num_fds() - self.fds_base
            except Exception:
                return
            self.peak = max(self.peak, self.last)
            self.fds_peak = max(self.fds_peak, fds)

    def reset_peak(self) -> None:
        self.peak = self.last
        self.fds_peak = 0

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


# --- the run ----------------------------------------------------------------------------


def run_wave(args, sampler: RSSSampler, clients: NormalClients) -> dict:
    clients.tally = during = Tally()
    sampler.reset_peak()
    argv = [sys.executable, __file__, "--flooder", "--host", args.host, "--port", str(args.port)]
    argv += ["--connections", str(args.connections), "--concurrency", str(args.concurrency)]
    argv += ["--hold", str(args.hold)]
    started = time.monotonic()
    flooder = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert flooder.stdout is not None
    events = {}
    try:
        for line in flooder.stdout:
            event = json.loads(line)
            events[event["event"]] = event
    finally:
        flooder.wait(timeout=args.hold + 60)
    flood_secs = time.monotonic() - started
    peak = sampler.peak
    held = sampler.fds_peak
    clients.tally = after = Tally()
    settle_end = time.monotonic() + args.settle
    while time.monotonic() < settle_end:
        time.sleep(min(0.5, max(0.0, settle_end - time.monotonic())))
    return {
        "opened": events.get("open", {}).get("opened", 0),
        "failed": events.get("open", {}).get("failed", 0),
        "open_secs": events.get("open", {}).get("secs", 0.0),
        "by_server": events.get("closed", {}).get("by_server", 0),
        "flood_secs": flood_secs,
        "peak": peak,
        "held": held,
        "settled": sampler.last,
        "during": during,
        "after": after,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--waves", type=int, default=3)
    p.add_argument("--connections", type=int, default=3000, help="idle TLS connections a wave")
    p.add_argument("--concurrency", type=int, default=200, help="handshakes in flight")
    p.add_argument("--hold", type=float, default=60.0, help="most seconds a connection stays")
    p.add_argument("--settle", type=float, default=30.0, help="seconds after each wave")
    p.add_argument("--rate", type=float, default=10.0, help="normal requests a second, each kind")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a worker setting (as FPY3_SECTION__KEY)",
    )
    p.add_argument("--log-level", default="warning", help="the worker's; debug shows trims")
    p.add_argument("--flooder", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.flooder:
        flooder_main(args)
        return
    if not 1 <= args.waves <= 10 or not 1 <= args.connections <= 20000:
        p.error("--waves must be 1..10 and --connections 1..20000")
    limit = raise_fd_limit()  # the worker inherits it
    if limit < args.connections + 100:
        p.error(f"the fd limit ({limit}) is too low for {args.connections} connections")
    env_extra = {}
    for item in args.set:
        name, _, value = item.partition("=")
        section, _, key = name.partition(".")
        env_extra[f"FPY3_{section.upper()}__{key.upper()}"] = value
    args.port = free_port()
    with tempfile.TemporaryDirectory(prefix="fpy3-tls-flood-") as tmp:
        cert, key = make_cert(Path(tmp))
        log_path = Path(tmp) / "worker.log"
        with open(log_path, "wb") as log:
            worker = start_worker(args.port, cert, key, env_extra, log, args.log_level)
            try:
                wait_ready(args.host, args.port, worker)
                report(args, worker, env_extra)
            finally:
                worker.send_signal(signal.SIGTERM)
                try:
                    worker.wait(15)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait()
        lines = log_path.read_text(errors="replace").strip().splitlines()
        trims = [line for line in lines if "gave freed memory back" in line]
        if args.log_level == "debug":
            print(f"memory trims: {len(trims)}")
            for line in trims:
                print("  " + line)
        tail = [line for line in lines if "DEBUG" not in line][-5:]
        if tail:
            print("worker log (last lines):\n  " + "\n  ".join(tail))


def report(args, worker: subprocess.Popen, env_extra: dict[str, str]) -> None:
    clients = NormalClients(args.host, args.port, args.rate)
    clients.start()
    sampler = RSSSampler(worker.pid)
    try:
        # Warm up with normal traffic, then take the baseline.
        time.sleep(3.0)
        baseline = sampler.last
        print(
            f"fpy3 worker pid {worker.pid}, {args.waves} wave(s) of {args.connections} idle TLS "
            f"connections ({args.concurrency} handshakes in flight), settle {args.settle:g} s; "
            f"normal clients {args.rate:g}/s new-connection + {args.rate:g}/s keep-alive"
        )
        if env_extra:
            print("worker settings: " + " ".join(f"{k}={v}" for k, v in env_extra.items()))
        print(f"baseline RSS {baseline / MIB:.1f} MiB")
        header = (
            f"{'wave':>4} {'opened':>7} {'failed':>6} {'open s':>6} {'peak MiB':>9} "
            f"{'+MiB':>6} {'held':>5} {'KiB/held':>8} {'after MiB':>9} {'+MiB':>6}  normal during / after"
        )
        print(header)
        worst_peak = worst_after = 0.0
        during_all, after_all = Tally(), Tally()
        for n in range(1, args.waves + 1):
            w = run_wave(args, sampler, clients)
            up = (w["peak"] - baseline) / MIB
            left = (w["settled"] - baseline) / MIB
            worst_peak, worst_after = max(worst_peak, up), max(worst_after, left)
            for total, part in ((during_all, w["during"]), (after_all, w["after"])):
                total.ok += part.ok
                total.failed += part.failed
                for k, v in part.errors.items():
                    total.errors[k] = total.errors.get(k, 0) + v
            print(
                f"{n:>4} {w['opened']:>7} {w['failed']:>6} {w['open_secs']:>6.1f} "
                f"{w['peak'] / MIB:>9.1f} {up:>+6.1f} {w['held']:>5} {up * 1024 / max(1, w['held']):>8.1f} "
                f"{w['settled'] / MIB:>9.1f} {left:>+6.1f}  "
                f"{w['during'].rate()} / {w['after'].rate()}",
                flush=True,
            )
    finally:
        clients.close()
        sampler.close()
    ok = during_all.ok + after_all.ok
    total = ok + during_all.failed + after_all.failed
    print(
        f"goal: peak <= baseline + 64 MiB: {'yes' if worst_peak <= 64 else 'NO'} "
        f"(worst {worst_peak:+.1f}); back within 10 MiB after {args.settle:g} s: "
        f"{'yes' if abs(worst_after) <= 10 else 'NO'} (worst {worst_after:+.1f}); "
        f"normal clients served: {ok}/{total}"
    )
    errors = {**during_all.errors}
    for k, v in after_all.errors.items():
        errors[k] = errors.get(k, 0) + v
    if errors:
        print("normal client errors: " + ", ".join(f"{k}: {v}" for k, v in errors.items()))


if __name__ == "__main__":
    main()
