"""Benchmark fpy3 against other ASGI servers with a hello-world app (see bench/README.md).

Each (server, mode) pair gets a fresh server process with one worker on a free loopback
port, a short unmeasured warmup, then one measured load run (per --rounds). A server that
fails to start or serve becomes a "failed: <reason>" row; the other rows still run.

Adding a server or a mode is one entry in SERVERS or MODES below.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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


@dataclass
class LoadOpts:
    duration: float
    connections: int
    threads: int
    cpus: str | None  # taskset CPU list for the load generator, None = unpinned


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
    loadgen: LoadGen  # an HTTP/3 client (libcurl) plugs in here as another LoadGen
    probe: Callable[[str, float], None] = http1_probe


MODES = {
    "http": Mode("http", "http", tls=False, loadgen=Wrk()),
    "https": Mode("https", "https", tls=True, loadgen=Wrk()),
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
    package: str  # distribution name, for the version line
    modes: frozenset[str] = frozenset(MODES)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    if mode.tls:
        argv += ["--ssl-certfile", tls.cert, "--ssl-keyfile", tls.key]
    return Launch(argv, port)


def granian(mode: Mode, tls: Tls) -> Launch:
    port = free_port()
    # Access log is off by default; runtime threads and loop keep their defaults.
    argv = [tool("granian"), "--interface", "asgi", "--workers", "1", "--no-ws"]
    argv += ["--log-level", "warning", "--host", "127.0.0.1", "--port", str(port)]
    if mode.tls:
        argv += ["--ssl-certificate", tls.cert, "--ssl-keyfile", tls.key]
    return Launch([*argv, APP], port)


def fpy3(mode: Mode, tls: Tls) -> Launch:
    tls_port, http_port = free_port(), free_port()
    argv = [tool("fpy3"), "run", APP, "--port", str(tls_port), "--http-port", str(http_port)]
    argv += ["--host", "127.0.0.1", "--workers", "1", "--no-access-log", "--log-level", "warning"]
    # Always given: --port is TLS in every mode, and fpy3 would otherwise make a dev cert.
    argv += ["--certfile", tls.cert, "--keyfile", tls.key]
    port = tls_port if mode.tls else http_port
    return Launch(argv, port, env={"FPY3_HTTP3__ENABLED": "false"})


SERVERS = {
    "fpy3": Server("fpy3", fpy3, "fpy3"),
    "uvicorn": Server("uvicorn", uvicorn, "uvicorn"),
    "granian": Server("granian", granian, "granian"),
}


# --- running one row ---------------------------------------------------------------


@dataclass
class Row:
    server: str
    mode: str
    result: LoadResult | None = None
    cpu_pct: float | None = None
    failed: str | None = None
    argv: list[str] | None = None
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
        launch = server.launch(mode, tls)
    except BenchError as e:
        row.failed = str(e)
        return row
    argv = ["taskset", "-c", args.server_cpus, *launch.argv] if args.server_cpus else launch.argv
    row.argv = argv
    url = f"{mode.scheme}://127.0.0.1:{launch.port}/"
    log = tmp / f"{server.name}-{mode.name}.log"
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath, **launch.env}
    opts = LoadOpts(args.duration, args.connections, args.threads, args.load_cpus)
    proc = None
    try:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        wait_ready(proc, log, mode, url, time.monotonic() + args.start_timeout)
        if args.warmup > 0:
            mode.loadgen.run(url, LoadOpts(args.warmup, args.connections, args.threads, opts.cpus))
        before, t0 = cpu_seconds(proc.pid), time.monotonic()
        row.result = mode.loadgen.run(url, opts)
        after, t1 = cpu_seconds(proc.pid), time.monotonic()
        used = sum(v - before.get(pid, 0.0) for pid, v in after.items())
        row.cpu_pct = 100.0 * used / (t1 - t0)
        if proc.poll() is not None:
            raise BenchError(
                f"server died during the run (exit {proc.returncode}): {log_reason(log)}"
            )
    except BenchError as e:
        row.failed, row.result = str(e), None
    except OSError as e:
        row.failed, row.result = f"{type(e).__name__}: {e}", None
    finally:
        if proc is not None:
            stop(proc)
    return row


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


def report(rows: list[Row], server_names: list[str]) -> str:
    lines = []
    lines.append(
        "| server | mode | req/s | p99 latency | server CPU % | req/s per core | fpy3 ÷ server req/s | fpy3 ÷ server per core | notes |"
    )
    lines.append("|---|---|--:|--:|--:|--:|--:|--:|---|")
    fpy3_rows = {r.mode: r for r in rows if r.server == "fpy3" and r.result}
    for r in rows:
        if not r.result:
            lines.append(
                f"| {r.server} | {r.mode} | — | — | — | — | — | — | {status(r.failed or '')} |"
            )
            continue
        ref = fpy3_rows.get(r.mode)
        mine = r.server == "fpy3"
        rps_ratio = "—" if mine else ratio(ref and ref.result.rps, r.result.rps)
        core_ratio = "—" if mine else ratio(ref and per_core(ref), per_core(r))
        pc = per_core(r)
        lines.append(
            f"| {r.server} | {r.mode} | {r.result.rps:,.0f} | {r.result.p99_ms:.2f} ms"
            f" | {r.cpu_pct:.0f}% | {f'{pc:,.0f}' if pc else '—'} | {rps_ratio} | {core_ratio}"
            f" | {cell('; '.join(filter(None, [fmt_errors(r.result.errors), r.note])))} |"
        )
    others = [s for s in server_names if s != "fpy3"]
    if "fpy3" in server_names and others:
        lines.append("")
        for mode in dict.fromkeys(r.mode for r in rows):
            by = {r.server: r for r in rows if r.mode == mode}
            me = by.get("fpy3")
            if not (me and me.result):
                lines.append(f"- {mode}: fpy3 failed, no ratio")
                continue
            rps = ", ".join(
                f"{ratio(me.result.rps, by[s].result and by[s].result.rps)} {s}" for s in others
            )
            core = ", ".join(f"{ratio(per_core(me), per_core(by[s]))} {s}" for s in others)
            lines.append(f"- {mode}: fpy3 = {rps} (per core: {core})")
    return "\n".join(lines) + "\n"


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


def describe(args: argparse.Namespace) -> list[str]:
    """The report's header: enough to reproduce the run and judge the numbers."""
    opts = LoadOpts(args.duration, args.connections, args.threads, args.load_cpus)
    loads = dict.fromkeys(shlex.join(MODES[m].loadgen.argv("URL", opts)) for m in args.modes)
    machine = f"{os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), {cpu_model()}"
    if args.server_cpus:
        machine += f"; pinned: servers on CPU {args.server_cpus}, load on CPU {args.load_cpus}"
    else:
        machine += "; load generator and server share them"
    versions = [f"Python {sys.version.split()[0]}"]
    versions += [f"{s} {version(SERVERS[s].package)}" for s in args.servers]
    versions.append(f"wrk {wrk_version()}")
    return [
        f"# fpy3 benchmark, {datetime.now():%Y-%m-%d %H:%M:%S}",
        "",
        f"- command: `{shlex.join(sys.orig_argv)}`",
        f"- machine: {machine}",
        f"- load: {', '.join(f'`{a}`' for a in loads)}; warmup {args.warmup:g} s;"
        f" rounds {args.rounds}",
        f"- versions: {', '.join(versions)}",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--servers", type=csv(SERVERS), default=list(SERVERS))
    ap.add_argument("--modes", type=csv(MODES), default=list(MODES))
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="load generator threads")
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
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    args.server_cpus, args.load_cpus = cpu_split(args.pin)

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
    body += "".join(f"- {r.server} / {r.mode}: `{shlex.join(r.argv)}`\n" for r in table if r.argv)
    print("\n" + body, end="")
    if not args.no_save:
        out = BENCH_DIR / "results" / f"{datetime.now():%Y%m%d-%H%M%S}.md"
        out.parent.mkdir(exist_ok=True)
        out.write_text("\n".join(header) + "\n\n" + body)
        print(f"\nsaved {out.relative_to(ROOT)}")
    return 0 if any(r.result for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
