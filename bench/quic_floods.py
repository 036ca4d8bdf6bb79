"""QUIC floods against one fpy3 worker: its RSS before, at the peak and after, and how
normal clients fare meanwhile (see bench/README.md, "QUIC floods").

Each flood gets a fresh ``fpy3 run`` (one worker, HTTP/3 on, the engine named), in a
network namespace of its own when allowed (loopback only), with a throwaway
certificate. The floods:

- ``initials``: 20,000 QUIC Initial packets in 5 s, each with a new connection id,
  from 256 source ports; the senders never answer (as spoofed sources would not).
- ``bodies``: 20 HTTP/3 connections each POST 8 MiB to a route that never reads its
  body; after ``--hold`` seconds the clients close.
- ``abandon``: 2,000 HTTP/3 connections each GET / and then vanish without a
  CONNECTION_CLOSE. The server cannot tell them from idle clients until its idle
  timeout (``http3.idle_timeout``, 30 s) passes: for this flood the server's idle
  timeout is part of the flood, and "after" is measured that much later.

Meanwhile a normal client makes one request on a new connection every 0.25 s. The RSS
of the worker is sampled every 50 ms: the baseline (after a warm-up), the peak, and the
value ``--settle`` seconds after the flood stopped. This is a benchmark: it prints
numbers and the goals (peak at most +64 MiB, back within 10 MiB), and never fails a
build.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import run  # bench/run.py, next to this file

sys.path.insert(0, str(run.ROOT / "tests" / "support"))
import h3clients as kit  # noqa: E402 (the independent HTTP/3 clients of the test suite)
from quicraw import InitialMaker  # noqa: E402 (hand-made Initials, as a flood sends them)

APP = "bench.flood_app:app"
MiB = 1024 * 1024
GOAL_PEAK_MIB = 64
GOAL_AFTER_MIB = 10


# --- the server ------------------------------------------------------------------------


@dataclass
class Fpy3:
    proc: subprocess.Popen
    port: int
    log: Path
    argv: list[str]
    env: dict[str, str]

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss


def start_server(tmp: Path, tls: run.Tls, engine: str, settings: dict[str, str]) -> Fpy3:
    port = run.free_port()
    argv = [run.tool("fpy3"), "run", APP, "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--workers", "1", "--no-access-log", "--log-level", "info"]
    argv += ["--certfile", tls.cert, "--keyfile", tls.key]
    env = {"FPY3_HTTP3__ENABLED": "true", "FPY3_HTTP3__ENGINE": engine}
    for key, value in settings.items():
        section, _, name = key.partition(".")
        env[f"FPY3_{section.upper()}__{name.upper()}"] = value
    log = tmp / f"server-{port}.log"
    pythonpath = os.pathsep.join(filter(None, [str(run.ROOT), os.environ.get("PYTHONPATH")]))
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=run.ROOT,
            env={**os.environ, **env, "PYTHONPATH": pythonpath},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    server = Fpy3(proc, port, log, argv, env)
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise run.BenchError(f"server exited {proc.returncode}: {run.log_reason(log)}")
        if normal_request(port, 2.0):
            return server
        if time.monotonic() > deadline:
            run.stop(proc)
            raise run.BenchError(f"server not ready: {run.log_reason(log)}")
        time.sleep(0.05)  # poll interval, not a startup guess


def normal_request(port: int, timeout: float) -> bool:
    try:
        r = kit.aioquic_request("127.0.0.1", port, "GET", "/", timeout=timeout)
    except kit.H3ClientError:
        return False
    return r.status == 200 and r.body == b"Hello, world!"


# --- watching: RSS and a normal client --------------------------------------------------


@dataclass
class Watch:
    server: Fpy3
    samples: list[tuple[float, int]] = field(default_factory=list)
    ok: int = 0
    failed: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self._threads = [
            threading.Thread(target=self._sample, daemon=True),
            threading.Thread(target=self._client, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(10)

    def _sample(self) -> None:
        while not self.stop.is_set():
            try:
                self.samples.append((time.monotonic(), self.server.rss()))
            except psutil.Error:
                return
            self.stop.wait(0.05)

    def _client(self) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            if normal_request(self.server.port, 5.0):
                self.ok += 1
            else:
                self.failed += 1
            self.stop.wait(max(0.0, 0.25 - (time.monotonic() - start)))

    def rss_between(self, t0: float, t1: float) -> list[int]:
        return [rss for t, rss in self.samples if t0 <= t <= t1]


def settled_rss(server: Fpy3, seconds: float = 1.0) -> int:
    """The median RSS over ``seconds``."""
    values = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        values.append(server.rss())
        time.sleep(0.05)
    return sorted(values)[len(values) // 2]


# --- flood: Initials ---------------------------------------------------------------------


def flood_initials(port: int, count: int, seconds: float, nsockets: int) -> str:
    maker = InitialMaker(port)
    packets = [maker.packet() for _ in range(count)]
    socks = []
    for _ in range(nsockets):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    replies = {"retry": 0, "other": 0}

    def drain() -> None:
        for s in socks:
            while True:
                try:
                    data = s.recv(2048)
                except BlockingIOError:
                    break
                if data[0] & 0xB0 == 0xB0:  # long header, type 3: Retry (v1)
                    replies["retry"] += 1
                else:
                    replies["other"] += 1

    tick = 0.005
    per_tick = max(1, round(count * tick / seconds))
    start = time.monotonic()
    sent = 0
    try:
        while sent < count:
            for pkt in packets[sent : sent + per_tick]:
                sock = socks[sent % nsockets]
                try:
                    sock.sendto(pkt, ("127.0.0.1", port))
                except BlockingIOError:
                    pass  # a full socket buffer drops it, as the network would
                sent += 1
            drain()
            delay = start + (sent / per_tick) * tick - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        took = time.monotonic() - start
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:  # late answers
            drain()
            time.sleep(0.05)
    finally:
        for s in socks:
            s.close()
    return (
        f"{sent} Initials in {took:.1f} s from {nsockets} ports; answers: "
        f"{replies['retry']} Retry, {replies['other']} other datagrams"
    )


# --- flood: unread bodies -----------------------------------------------------------------


def flood_bodies(port: int, conns: int, size: int, hold: float) -> str:
    authority = f"127.0.0.1:{port}"

    async def one(results: list[int]) -> None:
        async with kit._h3_connection("127.0.0.1", port, None, hold + 30) as proto:
            ex = proto.new_request()
            headers = kit._request_headers(
                "POST", "/noread?120", authority, [("content-length", str(size))]
            )
            proto.h3.send_headers(ex.stream_id, headers, end_stream=False)
            proto.h3.send_data(ex.stream_id, b"x" * size, end_stream=True)
            proto.transmit()
            await asyncio.sleep(hold)
            stream = proto._quic._streams.get(ex.stream_id)
            results.append(stream.sender.highest_offset if stream is not None else 0)

    async def go() -> list[int]:
        results: list[int] = []
        await asyncio.gather(*(one(results) for _ in range(conns)))
        return results

    let_in = asyncio.run(go())
    return (
        f"{conns} connections x {size // MiB} MiB unread for {hold:.0f} s; the server's "
        f"windows let in {sum(let_in) / MiB:.1f} MiB in all"
    )


# --- flood: abandoned connections ---------------------------------------------------------


def flood_abandon(port: int, conns: int, concurrency: int) -> str:
    from aioquic.h3.connection import H3_ALPN
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    authority = f"127.0.0.1:{port}"
    cls = kit._h3_protocol_class()
    done = {"ok": 0, "failed": 0}

    async def one(sem: asyncio.Semaphore) -> None:
        async with sem:
            loop = asyncio.get_running_loop()
            config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, verify_mode=0)
            config.server_name = "localhost"
            transport, proto = await loop.create_datagram_endpoint(
                lambda: cls(QuicConnection(configuration=config)),
                remote_addr=("127.0.0.1", port),
            )
            try:
                proto.connect(("127.0.0.1", port))
                await asyncio.wait_for(proto.wait_connected(), 10)
                ex = await kit._send_request(proto, "GET", "/", authority, (), b"")
                await asyncio.wait_for(ex.done.wait(), 10)
                done["ok" if ex.status == 200 else "failed"] += 1
            except (TimeoutError, ConnectionError):
                done["failed"] += 1
            finally:
                # Vanish: no CONNECTION_CLOSE, no more packets.
                if proto._timer is not None:
                    proto._timer.cancel()
                    proto._timer = None
                transport.abort()

    async def go() -> None:
        sem = asyncio.Semaphore(concurrency)
        await asyncio.gather(*(one(sem) for _ in range(conns)))

    asyncio.run(go())
    return f"{done['ok']} connections made a request and vanished ({done['failed']} failed)"


# --- one flood ---------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    detail: str = ""
    baseline: int = 0
    peak: int = 0
    after: int = 0
    ok: int = 0
    failed: int = 0
    error: str = ""


def run_flood(name, flood, args, tls: run.Tls, tmp: Path, extra: float = 0.0) -> Result:
    """``extra``: seconds the flood lasts in the server after the clients are done."""
    res = Result(name)
    server = start_server(tmp, tls, args.engine, dict(args.set))
    try:
        for _ in range(20):  # warm up: the allocator and the pools see normal traffic
            normal_request(server.port, 5.0)
        res.baseline = settled_rss(server, 2.0)
        watch = Watch(server)
        watch.start()
        t0 = time.monotonic()
        try:
            res.detail = flood(server.port)
        finally:
            t1 = time.monotonic()
            end = t1 + extra + args.settle
            while time.monotonic() < end and server.proc.poll() is None:
                time.sleep(0.2)
            watch.finish()
        if server.proc.poll() is not None:
            raise run.BenchError(f"server exited {server.proc.returncode}")
        res.peak = max(watch.rss_between(t0, end))
        res.after = sorted(watch.rss_between(end - 1, end))[-1]
        res.ok, res.failed = watch.ok, watch.failed
    except Exception as e:  # noqa: BLE001 (a flood that breaks becomes its row)
        res.error = f"{type(e).__name__}: {e}"
    finally:
        run.stop(server.proc)
    return res


def report(results: list[Result], args) -> str:
    lines = [
        f"QUIC floods against one fpy3 worker (engine {args.engine}); RSS in MiB; "
        f"'after' = {args.settle:.0f} s after the flood stopped (abandon: after the server's "
        "idle timeout dropped the connections)",
        "",
        "| flood | baseline | peak | peak - base | after | after - base | normal clients ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.name} | failed: {r.error} | | | | | |")
            continue
        total = r.ok + r.failed
        rate = f"{r.ok}/{total} ({100 * r.ok / total:.1f}%)" if total else "-"
        lines.append(
            f"| {r.name} | {r.baseline / MiB:.1f} | {r.peak / MiB:.1f} | "
            f"{(r.peak - r.baseline) / MiB:+.1f} | {r.after / MiB:.1f} | "
            f"{(r.after - r.baseline) / MiB:+.1f} | {rate} |"
        )
    lines.append("")
    for r in results:
        if not r.error:
            lines.append(f"- {r.name}: {r.detail}")
    lines.append("")
    lines.append(f"goal: peak - base <= {GOAL_PEAK_MIB} MiB, after - base <= {GOAL_AFTER_MIB} MiB")
    for r in results:
        if r.error:
            continue
        peak_ok = r.peak - r.baseline <= GOAL_PEAK_MIB * MiB
        after_ok = r.after - r.baseline <= GOAL_AFTER_MIB * MiB
        lines.append(
            f"- {r.name}: peak {'met' if peak_ok else 'MISSED'}, "
            f"after {'met' if after_ok else 'MISSED'}"
        )
    return "\n".join(lines)


FLOODS = ("initials", "bodies", "abandon")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--engine", default="ngtcp2", choices=("ngtcp2", "msquic"))
    p.add_argument("--floods", default=",".join(FLOODS), help="comma-separated subset")
    p.add_argument("--settle", type=float, default=30.0, help="seconds to watch after a flood")
    p.add_argument("--initials", type=int, default=20_000)
    p.add_argument("--initials-seconds", type=float, default=5.0)
    p.add_argument("--body-conns", type=int, default=20)
    p.add_argument("--body-mib", type=int, default=8)
    p.add_argument("--hold", type=float, default=10.0, help="seconds the body flood holds")
    p.add_argument("--abandon", type=int, default=2000)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        type=lambda s: tuple(s.split("=", 1)),
        metavar="SECTION.KEY=VALUE",
        help="a server setting (as FPY3_SECTION__KEY), e.g. http3.idle_timeout=10",
    )
    p.add_argument("--no-netns", action="store_true", help="stay in this network namespace")
    args = p.parse_args()
    floods = {
        "initials": (
            "initials",
            lambda port: flood_initials(port, args.initials, args.initials_seconds, 256),
        ),
        "bodies": (
            "bodies",
            lambda port: flood_bodies(port, args.body_conns, args.body_mib * MiB, args.hold),
        ),
        "abandon": ("abandon", lambda port: flood_abandon(port, args.abandon, 64)),
    }
    idle = float(dict(args.set).get("http3.idle_timeout", 30.0))
    extra = {"abandon": idle}
    chosen = [floods[name] for name in args.floods.split(",") if name]
    random.seed()
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="fpy3-floods-") as tmpdir:
        tmp = Path(tmpdir)
        tls = run.make_cert(tmp)
        for name, flood in chosen:
            with run.own_netns(not args.no_netns) as isolated:
                print(f"{name}: running{' in its own netns' if isolated else ''}...", flush=True)
                results.append(run_flood(name, flood, args, tls, tmp, extra.get(name, 0.0)))
    print(report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
