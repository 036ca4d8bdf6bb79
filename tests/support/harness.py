"""End-to-end harness: real fpy3 processes, real sockets, real TLS.

``start_server(...)`` writes a TOML config into a tmp dir, picks free ports, starts
``fpy3 run`` (or ``fpy3-master``) with this directory importable, and waits until an
HTTPS GET verified against the dev certificate succeeds. ``RawConn`` sends arbitrary
bytes and parses HTTP/1.1 responses by hand, for input httpx would refuse to send.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

# The apps and clients the servers under test import live beside this file.
SUPPORT_DIR = Path(__file__).resolve().parent

READY_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0


# --- small helpers ------------------------------------------------------------------


# The README's test command installs every test client and reference peer: there a
# missing one is a broken setup, not a reason to skip.
ALL_CLIENTS = os.environ.get("FPY3_TEST_ALL_CLIENTS") == "1"


def client_missing(exc: Exception):
    """A test client or peer is not installed here: skip, or fail under ALL_CLIENTS."""
    if ALL_CLIENTS:
        pytest.fail(f"test client missing: {exc}")
    pytest.skip(str(exc))


def call(fn, *args, **kwargs):
    """Run an h3clients function; a missing client goes to client_missing."""
    import h3clients

    try:
        return fn(*args, **kwargs)
    except h3clients.ClientUnavailable as exc:
        client_missing(exc)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, message: str = ""):
    """Poll ``predicate`` until it returns a truthy value (returned) or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = message() if callable(message) else message
            pytest.fail(f"condition not met within {timeout}s: {detail}")
        time.sleep(interval)


def free_port(host: str = "127.0.0.1", udp: bool = False) -> int:
    """A port free for TCP (and UDP too when ``udp``) right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if not udp:
            return port
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as u:
                u.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port found")


def ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(config: dict[str, dict]) -> str:
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(v)}" for key, v in values.items() if v is not None]
        lines.append("")
    return "\n".join(lines)


def merge_config(base: dict, override: dict | None) -> dict:
    merged = {section: dict(values) for section, values in base.items()}
    for section, values in (override or {}).items():
        merged.setdefault(section, {}).update(values)
    return merged


def fpy3_command(name: str = "fpy3") -> list[str]:
    """The installed console script next to this Python, else the module's main()."""
    script = Path(sys.executable).with_name(name)
    if script.exists():
        return [str(script)]
    module = {"fpy3": "fpy3.cli", "fpy3-master": "fpy3.supervisor.arbiter"}[name]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a server: no stray FPY3_* settings, tests dir importable."""
    # FPY3_MSQUIC_LIB is no setting: it says where libmsquic is, for the msquic cases.
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("FPY3_") or k == "FPY3_MSQUIC_LIB"
    }
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(SUPPORT_DIR), os.environ.get("PYTHONPATH", "")) if p
    )
    env.update(extra or {})
    return env


# --- raw HTTP/1.1 client ------------------------------------------------------------


class IncompleteResponse(AssertionError):
    pass


@dataclass
class Response:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    head: bytes
    body: bytes = b""
    complete: bool = True
    chunked: bool = False
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self.headers if n == name]


class RawConn:
    """A blocking client socket (TLS or not) with a read buffer kept across responses."""

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        timeout: float = 10.0,
        rcvbuf: int | None = None,
        sndbuf: int | None = None,
        source: str | None = None,
    ):
        # A host starting with "/" is a Unix socket's path (the port is unused).
        unix = host.startswith("/")
        family = socket.AF_UNIX if unix else socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        if source is not None:  # the client's address (another loopback address, say)
            sock.bind((source, 0))
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        sock.settimeout(timeout)
        try:
            sock.connect(host if unix else (host, port))
            if ssl_context is not None:
                sock = ssl_context.wrap_socket(sock, server_hostname=server_hostname or host)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.timeout = timeout
        self.buf = bytearray()
        self.eof = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    @property
    def local_port(self) -> int:
        return self.sock.getsockname()[1]

    def send(self, data: bytes) -> None:
        self.sock.settimeout(self.timeout)
        self.sock.sendall(data)

    def try_send(self, data: bytes) -> bool:
        """Send, but report a connection the server already closed as False."""
        try:
            self.send(data)
            return True
        except (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return False
        except ssl.SSLError:
            return False

    def _fill(self, deadline: float) -> bool:
        """Receive more into the buffer; False at EOF. Raises TimeoutError at the deadline."""
        if self.eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no data from the server before the deadline")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(256 * 1024)
        except TimeoutError:
            raise TimeoutError("no data from the server before the deadline") from None
        except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def readable_within(self, seconds: float) -> bool:
        """True if bytes (or EOF) arrive within ``seconds``; they stay in the buffer."""
        deadline = time.monotonic() + seconds
        while not (self.buf or self.eof):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if not isinstance(self.sock, ssl.SSLSocket):
                r, _, _ = select.select([self.sock], [], [], remaining)
                return bool(r)
            if not self.sock.pending():
                r, _, _ = select.select([self.sock], [], [], remaining)
                if not r:
                    return False
            # A TLS record may be a handshake message (a TLS 1.3 ticket), not data.
            self.sock.setblocking(False)
            try:
                data = self.sock.recv(256 * 1024)
                if data:
                    self.buf += data
                else:
                    self.eof = True
            except ssl.SSLWantReadError:
                continue
            except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
                self.eof = True
            finally:
                self.sock.settimeout(self.timeout)
        return True

    def read_until(self, needle: bytes, timeout: float = 10.0) -> bytes:
        """Bytes up to and including ``needle`` (raw: chunk framing and all)."""
        deadline = time.monotonic() + timeout
        while (i := self.buf.find(needle)) < 0:
            if not self._fill(deadline):
                raise AssertionError(f"EOF before {needle!r}: {bytes(self.buf[-200:])!r}")
        data = bytes(self.buf[: i + len(needle)])
        del self.buf[: i + len(needle)]
        return data

    def read_until_close(self, timeout: float = 10.0) -> bytes:
        """Everything up to EOF; fails if the server keeps the connection open."""
        deadline = time.monotonic() + timeout
        try:
            while self._fill(deadline):
                pass
        except TimeoutError:
            raise AssertionError(
                f"server did not close the connection within {timeout}s "
                f"(buffered: {bytes(self.buf[:200])!r})"
            ) from None
        data = bytes(self.buf)
        self.buf.clear()
        return data

    def is_closed_within(self, timeout: float) -> bool:
        try:
            self.read_until_close(timeout)
            return True
        except AssertionError:
            return False

    def _read_line(self, deadline: float) -> bytes:
        while (i := self.buf.find(b"\r\n")) < 0:
            if not self._fill(deadline):
                raise IncompleteResponse("EOF inside a line")
        line = bytes(self.buf[:i])
        del self.buf[: i + 2]
        return line

    def _read_exact(self, n: int, deadline: float, into: bytearray) -> None:
        while len(self.buf) < n:
            if not self._fill(deadline):
                into += self.buf
                self.buf.clear()
                raise IncompleteResponse(f"EOF after {len(into)} of {n} body bytes")
        into += self.buf[:n]
        del self.buf[:n]

    def read_response(
        self, method: str = "GET", timeout: float = 10.0, allow_incomplete: bool = False
    ) -> Response:
        """One response (a 1xx counts as one). ``allow_incomplete`` returns a truncated
        response with ``complete=False`` instead of failing."""
        deadline = time.monotonic() + timeout
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            if not self._fill(deadline):
                if allow_incomplete and not self.buf:
                    return Response("", 0, "", [], b"", complete=False)
                raise IncompleteResponse(
                    f"connection closed before a complete response head: {bytes(self.buf)!r}"
                )
        head = bytes(self.buf[:end])
        del self.buf[: end + 4]
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        assert len(parts) >= 2 and parts[0].startswith(b"HTTP/"), f"bad status line {lines[0]!r}"
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            assert sep, f"bad response header line {line!r}"
            headers.append((name.decode("latin-1").lower(), value.strip().decode("latin-1")))
        resp = Response(
            version=parts[0].decode(),
            status=int(parts[1]),
            reason=parts[2].decode("latin-1") if len(parts) > 2 else "",
            headers=headers,
            head=head,
        )
        if 100 <= resp.status < 200 or method == "HEAD" or resp.status in (204, 304):
            return resp
        body = bytearray()
        try:
            te = resp.header("transfer-encoding")
            cl = resp.header("content-length")
            if te is not None and "chunked" in te.lower():
                resp.chunked = True
                self._read_chunked(deadline, body, resp)
            elif cl is not None:
                self._read_exact(int(cl), deadline, body)
            else:
                while self._fill(deadline):
                    pass
                body += self.buf
                self.buf.clear()
        except IncompleteResponse:
            resp.body = bytes(body)
            resp.complete = False
            if allow_incomplete:
                return resp
            raise IncompleteResponse(
                f"truncated response: {resp.status} {resp.headers} body={bytes(body[:200])!r}"
            ) from None
        resp.body = bytes(body)
        return resp

    def _read_chunked(self, deadline: float, body: bytearray, resp: Response) -> None:
        while True:
            line = self._read_line(deadline)
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                while line := self._read_line(deadline):
                    name, _, value = line.partition(b":")
                    resp.trailers.append((name.decode().lower(), value.strip().decode()))
                return
            self._read_exact(size, deadline, body)
            crlf = bytearray()
            self._read_exact(2, deadline, crlf)
            assert crlf == b"\r\n", f"chunk not followed by CRLF: {bytes(crlf)!r}"


# --- the server process -------------------------------------------------------------


class ServerDied(Exception):
    pass


class Server:
    """One fpy3 process and the files around it."""

    def __init__(self, workdir: Path, app: str, config: dict, args, env, command: str, launcher=()):
        self.launcher = list(launcher)  # argv prefix that starts the command (sdlaunch.py)
        self.workdir = workdir
        self.app = app
        self.config = config
        self.args = list(args)
        self.extra_env = dict(env or {})
        self.command = command
        self.shared = workdir / "shared"
        self.shared.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "fpy3.toml"
        self.stdout_path = workdir / "stdout.log"
        self.stderr_path = workdir / "stderr.log"
        self.proc: subprocess.Popen | None = None
        self.cafile = Path(config["server"]["state_dir"]) / "dev-cert.pem"
        self.host = config["server"]["host"]
        self.port = config["server"]["port"]
        self.http_port = config["server"].get("http_port", 0)

    # process control

    def argv(self) -> list[str]:
        if self.command == "master":
            argv = [*fpy3_command("fpy3-master"), "--config", str(self.config_path), *self.args]
        else:
            argv = [*fpy3_command("fpy3"), "run", self.app, "--config", str(self.config_path)]
            argv += self.args
        return [*self.launcher, *argv]

    def spawn(self) -> None:
        self.config_path.write_text(to_toml(self.config))
        env = clean_env({"FPY3_TEST_SHARED": str(self.shared), **self.extra_env})
        env.setdefault("XDG_STATE_HOME", str(self.workdir / "xdg-state"))
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                self.argv(),
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.workdir,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        last_error = ["no attempt"]

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise ServerDied(
                    f"server exited with {self.proc.returncode} before serving:\n{self.stderr()}"
                )
            if not self.cafile.exists():
                return False
            try:
                with self.client(timeout=2.0) as c:
                    return c.get("/__ready__").status_code == 200
            except (httpx.HTTPError, ssl.SSLError, OSError) as e:
                last_error[0] = repr(e)
                return False

        wait_until(
            ready,
            timeout,
            interval=0.05,
            message=lambda: (
                f"server not ready (last error: {last_error[0]})\n"
                f"stderr:\n{self.stderr()}\nstdout:\n{self.stdout()[-2000:]}"
            ),
        )

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"server still running after {timeout}s\nstderr:\n{self.stderr()}")

    def stop(self, timeout: float = STOP_TIMEOUT, sig: int = signal.SIGTERM) -> int | None:
        """Signal, wait with a deadline, then SIGKILL what is left of its process group."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        # Workers a master left behind share its process group (our session).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode

    # output

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def stderr_size(self) -> int:
        return self.stderr_path.stat().st_size if self.stderr_path.exists() else 0

    def stderr_since(self, offset: int) -> str:
        with open(self.stderr_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def wait_stderr(self, needle: str, offset: int = 0, timeout: float = 10.0) -> str:
        return wait_until(
            lambda: needle in (text := self.stderr_since(offset)) and text,
            timeout,
            message=lambda: f"{needle!r} not in stderr:\n{self.stderr_since(offset)[-3000:]}",
        )

    # shared files with the app

    def flag(self, name: str) -> None:
        (self.shared / name).write_text("go")

    def record(self, name: str) -> list[str]:
        path = self.shared / name
        return path.read_text().splitlines() if path.exists() else []

    def wait_record(self, name: str, line: str, timeout: float = 10.0) -> None:
        wait_until(
            lambda: line in self.record(name),
            timeout,
            message=lambda: f"record {name!r} has {self.record(name)}, wanted {line!r}",
        )

    # clients

    def ssl_context(self, cafile: Path | None = None) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(cafile or self.cafile))

    def url(self, path: str = "/", tls: bool = True) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if tls:
            return f"https://{host}:{self.port}{path}"
        return f"http://{host}:{self.http_port}{path}"

    def client(self, tls: bool = True, **kwargs) -> httpx.Client:
        kwargs.setdefault("timeout", 15.0)
        return httpx.Client(
            base_url=self.url("", tls),
            verify=self.ssl_context() if tls else False,
            trust_env=False,
            **kwargs,
        )

    def get(self, path: str, tls: bool = True, **kwargs) -> httpx.Response:
        with self.client(tls) as c:
            return c.get(path, **kwargs)

    def connect(self, tls: bool = True, **kwargs) -> RawConn:
        if tls:
            return RawConn(self.host, self.port, self.ssl_context(), **kwargs)
        assert self.http_port, "this server has no cleartext port"
        return RawConn(self.host, self.http_port, **kwargs)

    def request(
        self, raw: bytes, tls: bool = True, method: str = "GET", timeout: float = 10.0
    ) -> tuple[Response, RawConn]:
        """Send raw bytes on a new connection and read one response (caller closes)."""
        conn = self.connect(tls)
        try:
            conn.send(raw)
            return conn.read_response(method=method, timeout=timeout), conn
        except BaseException:
            conn.close()
            raise

    def assert_serving(self, tls: bool = True) -> None:
        """The process is alive and a fresh request works."""
        assert self.alive(), f"server exited with {self.proc.returncode}:\n{self.stderr()}"
        r = self.get("/hello", tls)
        assert r.status_code == 200 and r.text == "Hello, world!"


def base_config(workdir: Path, app: str, http: bool, host: str = "127.0.0.1") -> dict:
    return {
        "server": {
            "app": app,
            "app_dir": str(SUPPORT_DIR),
            "host": host,
            "port": free_port(host),
            "http_port": free_port(host) if http else 0,
            "state_dir": str(workdir / "state"),
        },
        "http3": {"enabled": False},
        "logging": {"level": "info"},
    }


class ServerFactory:
    def __init__(self, tmp_dir_maker, engine: str | None = None):
        self._mkdir = tmp_dir_maker
        self.servers: list[Server] = []
        self.engine = engine  # http3.engine for servers with HTTP/3 on (unless set)

    def __call__(
        self,
        app: str = "apps:app",
        config: dict | None = None,
        args=(),
        env: dict | None = None,
        http: bool = False,
        host: str = "127.0.0.1",
        command: str = "run",
        wait: bool = True,
        workdir: Path | None = None,
        cafile: Path | None = None,
        launcher=(),
        ready: bool = True,
    ) -> Server:
        """Start a server. ``config`` sections override the defaults (free ports, state
        dir in the tmp dir, HTTP/3 off); ``wait=False`` returns right after spawning."""
        workdir = workdir or self._mkdir()
        fixed_ports = bool(config and {"port", "http_port"} & set(config.get("server", {})))
        for attempt in range(3):
            cfg = merge_config(base_config(workdir, app, http, host), config)
            if self.engine and cfg["http3"].get("enabled", True):
                cfg["http3"].setdefault("engine", self.engine)
            server = Server(workdir, cfg["server"]["app"], cfg, args, env, command, launcher)
            if cafile is not None:
                server.cafile = Path(cafile)
            self.servers.append(server)
            server.spawn()
            if not wait:
                return server
            if not ready:  # no TLS port to ask: wait for the worker's line instead
                try:
                    wait_until(
                        lambda s=server: s.proc.poll() is not None or " serving " in s.stderr(),
                        READY_TIMEOUT,
                        message=lambda s=server: s.stderr()[-2000:],
                    )
                    if server.proc.poll() is not None:
                        raise ServerDied(
                            f"exited with {server.proc.returncode}:\n{server.stderr()}"
                        )
                except ServerDied:
                    if fixed_ports or "in use" not in server.stderr().lower() or attempt == 2:
                        raise
                    server.stop()
                    server.stderr_path.rename(workdir / f"stderr.attempt{attempt}.log")
                    continue
                return server
            try:
                server.wait_ready()
                engine = cfg["http3"].get("engine") if cfg["http3"].get("enabled", True) else None
                if engine in ("ngtcp2", "msquic") and command == "run":
                    # The worker logs its engine before it reports ready.
                    assert f"HTTP/3 engine: {engine}" in server.stderr(), server.stderr()
                return server
            except ServerDied:
                in_use = "in use" in server.stderr().lower()
                if fixed_ports or not in_use or attempt == 2:
                    raise
                # Another test grabbed our port between picking and binding.
                server.stop()
                server.stderr_path.rename(workdir / f"stderr.attempt{attempt}.log")
        raise AssertionError("unreachable")

    def cleanup(self) -> None:
        for server in self.servers:
            server.stop()
        for server in self.servers:
            if server.proc is not None and server.proc.returncode not in (0, None):
                tail = server.stderr()[-3000:]
                print(f"--- {server.workdir.name}: exit {server.proc.returncode}\n{tail}")


def msquic_unavailable() -> str | None:
    """Why the msquic cases cannot run here (None: they can)."""
    from fpy3.msquic import probe_msquic

    reason = probe_msquic()
    return f"libmsquic cannot be loaded ({reason}); set FPY3_MSQUIC_LIB" if reason else None


def mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


ACCESS_COMMON_RE = re.compile(
    r"^(?P<addr>\S+) - - \[(?P<time>\d{2}/\w{3}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4})\] "
    r'"(?P<request>[^"]*)" (?P<status>\d{3}) (?P<bytes>\d+|-) '
    r'"(?P<referer>[^"]*)" "(?P<ua>[^"]*)"'
)
