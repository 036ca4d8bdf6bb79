"""Embedding: ``fpy3.asgi`` (``ASGIServer``, ``serve``) inside a Python program, each run
in a subprocess (so a crash in native code cannot take pytest down):

- the README's quick start program, byte for byte (``support/readme_program.py``), on
  both QUIC engines, in a private network namespace since it binds 0.0.0.0:8080:
  curl, httpx, aioquic and libcurl (directly and through Alt-Svc) get the body naming
  their HTTP version; the logs say where the certificate is, what is served, each request;
- a program driving ``ASGIServer`` from its own loop (uvloop and asyncio; HTTPS with the
  development certificate, and cleartext when asked for): both protocols, and ``stop()``
  draining both;
- the ``start()`` contract: bind errors, lifespan failure, port 0, restart, ``async with``,
  cleartext only on request, no certificate;
- ``serve()``: websockets over both protocols; SIGTERM drains both; a second signal stops
  at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

import h3clients as kit
import httpx
import pytest
from harness import SUPPORT_DIR, call, clean_env, client_missing, free_port, wait_until
from netns import private_network
from wsraw import close_payload, frame

HELLO = "Hello World from FPY over HTTP/{}!"
ALT_SVC = re.compile(r'^h3=":(\d+)"; ma=\d+$')


def dev_cert(tmp_path: Path) -> Path:
    """Where the development certificate lands with XDG_STATE_HOME=tmp_path/xdg."""
    return tmp_path / "xdg" / "fpy3" / "dev-cert.pem"


def program_env(tmp_path: Path, engine: str = "ngtcp2", **extra: str) -> dict[str, str]:
    # The engine through the environment: the programs themselves do not choose it.
    shared = tmp_path / "shared"
    shared.mkdir(exist_ok=True)
    return clean_env(
        {
            "XDG_STATE_HOME": str(tmp_path / "xdg"),
            "FPY3_TEST_SHARED": str(shared),
            "FPY3_HTTP3__ENGINE": engine,
            **extra,
        }
    )


class Program:
    """A Python program running in the background, its output in files."""

    def __init__(self, tmp_path: Path, argv: list[str], env: dict[str, str]):
        self.out = tmp_path / "program.stdout"
        self.err = tmp_path / "program.stderr"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, *argv],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=tmp_path,
                start_new_session=True,
            )

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def wait_log(self, needle: str, timeout: float = 20.0) -> str:
        def seen() -> str | None:
            text = self.stderr()
            if needle in text:
                return text
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{text}"
            return None

        return wait_until(seen, timeout, message=lambda: f"{needle!r} not in:\n{self.stderr()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


# --- the README's program, as written ----------------------------------------------------


def udp_and_tcp_free(port: int) -> bool:
    try:
        with socket.socket() as t, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            t.bind(("0.0.0.0", port))
            u.bind(("0.0.0.0", port))
        return True
    except OSError:
        return False


@contextlib.contextmanager
def port_8080():
    """A network where 0.0.0.0:8080 is ours: a private namespace, or (without the right
    to make one) the shared one, one test run at a time, when 8080 is free there."""
    with private_network() as why:
        if why is None:
            yield
            return
        lock_path = os.path.join(tempfile.gettempdir(), "fpy3-test-port-8080.lock")
        with open(lock_path, "w") as lock:
            wait_until(lambda: _try_lock(lock), 60, message="another run holds port 8080")
            if not udp_and_tcp_free(8080):
                pytest.skip(f"{why}; and port 8080 is in use in the shared network")
            print(f"{why}: the program runs in the shared network namespace")
            yield


def _try_lock(f) -> bool:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def curl_head(url: str) -> tuple[str, dict[str, str]]:
    """``curl -k -I URL``: the status line and the headers."""
    if shutil.which("curl") is None:
        client_missing(Exception("the curl command is not installed"))
    p = subprocess.run(
        ["curl", "-k", "-sS", "-I", "--max-time", "10", url],
        capture_output=True,
        text=True,
        timeout=20,
        stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 0, p.stderr
    status, *lines = p.stdout.strip().splitlines()
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


README_PROGRAM = SUPPORT_DIR / "readme_program.py"


def test_readme_quick_start_is_the_program_tested():
    readme = (SUPPORT_DIR.parent.parent / "README.md").read_text()
    assert "```python\n" + README_PROGRAM.read_text() + "```\n" in readme


def test_readme_program(tmp_path, quic_engine):
    program = README_PROGRAM
    cafile = str(dev_cert(tmp_path))
    with port_8080():
        prog = Program(tmp_path, [str(program)], program_env(tmp_path, quic_engine))
        try:
            log = prog.wait_log("serving ")
            status, headers = curl_head("https://127.0.0.1:8080/")
            assert re.fullmatch(r"HTTP/[\d.]+ 200( OK)?\s*", status), status
            assert ALT_SVC.fullmatch(headers["alt-svc"])[1] == "8080", headers
            assert headers["server"] == "fpy3-asgi"

            verified = ssl.create_default_context(cafile=cafile)
            with httpx.Client(verify=verified, trust_env=False, timeout=10) as c:
                r = c.get("https://127.0.0.1:8080/")
            assert (r.status_code, r.http_version, r.text) == (200, "HTTP/1.1", HELLO.format("1.1"))
            assert ALT_SVC.fullmatch(r.headers["alt-svc"])[1] == "8080"

            r3 = call(kit.aioquic_request, "127.0.0.1", 8080, "GET", "/", cafile=cafile)
            assert (r3.status, r3.body) == (200, HELLO.format(3).encode())
            assert r3.header("server") == "fpy3-asgi"
            r3 = call(kit.curl_request, "https://127.0.0.1:8080/", cafile=cafile)
            assert (r3.status, r3.http_version, r3.body) == (200, "3", HELLO.format(3).encode())
            # As a browser finds it: HTTP/2 over TCP first, then HTTP/3 from the Alt-Svc
            # cache.
            steps = call(
                kit.curl_altsvc_sequence,
                "https://127.0.0.1:8080/",
                cafile,
                str(tmp_path / "altsvc.txt"),
            )
            assert [(s.http_version, s.body.decode()) for s in steps] == [
                ("2", HELLO.format(2)),
                ("3", HELLO.format(3)),
            ]

            # debug=True: where the certificate is and how to trust it, the engine,
            # what is served where, and each request (the access log, on stdout).
            assert f"using the development certificate {cafile}" in log
            assert f"--cacert {cafile}" in log and "curl -k" in log
            assert f"HTTP/3 engine: {quic_engine}" in log
            assert re.search(
                r"serving https://0\.0\.0\.0:8080 \(HTTP/2, HTTP/1\.1, Alt-Svc h3", log
            )
            assert f"HTTP/3 on UDP 0.0.0.0:8080 ({quic_engine})" in log
            wanted = ['"HEAD / HTTP/2" 200', '"GET / HTTP/1.1" 200', '"GET / HTTP/3" 200']
            wait_until(
                lambda: all(w in prog.stdout() for w in wanted),
                message=lambda: f"access log:\n{prog.stdout()}",
            )
            assert "Traceback" not in prog.stderr(), prog.stderr()
        finally:
            prog.stop()


# --- ASGIServer driven from the program's own loop ---------------------------------------

PROGRAM = r"""
import asyncio, json, os, socket, ssl, sys, time
from pathlib import Path

import httpx

import apps
import h3clients as kit
from fpy3.asgi import ASGIServer

loop_kind, port, tls, debug = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1"
shared = Path(os.environ["FPY3_TEST_SHARED"])
cafile = os.path.join(os.environ["XDG_STATE_HOME"], "fpy3", "dev-cert.pem")


async def wait_file(path, timeout=10):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        await asyncio.sleep(0.01)


async def in_thread(fn, *args, **kwargs):
    # The h3 clients block: run them beside this loop, which serves them.
    return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args, **kwargs))


def udp_free(port):
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False


async def main():
    out = {}
    server = ASGIServer(apps.app, debug=debug)
    await server.start("127.0.0.1", port, tls=tls)
    scheme = "https" if tls else "http"
    verify = ssl.create_default_context(cafile=cafile) if tls else False
    async with httpx.AsyncClient(
        base_url=f"{scheme}://127.0.0.1:{port}", verify=verify, trust_env=False, timeout=15
    ) as c:
        r = await c.get("/hello")
        out["hello"] = [r.status_code, r.text, r.headers.get("server"), "date" in r.headers]
        out["alt_svc"] = r.headers.get("alt-svc")
        body = os.urandom(200_000)
        r = await c.post("/echo", content=body)
        out["echo"] = [r.status_code, r.content == body]
        out["scope"] = (await c.get("/scope/x%20y?a=1")).json()
        r = await c.get("/raise-before")
        out["raise"] = [r.status_code, "boom-before-start" in r.text]
        r = await c.get("/stream?n=100&size=1000")
        out["stream"] = [r.status_code, len(r.content)]
        rs = await asyncio.gather(*[c.get(f"/delay?ms=300&id={i}") for i in range(10)])
        out["concurrent"] = [r.text for r in rs]
        if tls:
            r = await in_thread(kit.aioquic_request, "127.0.0.1", port, "GET", "/hello", cafile=cafile)
            out["h3_hello"] = [r.status, r.body.decode()]
            r = await in_thread(kit.aioquic_request, "127.0.0.1", port, "POST", "/echo", body=body, cafile=cafile)
            out["h3_echo"] = [r.status, r.body == body]
            r = await in_thread(kit.aioquic_request, "127.0.0.1", port, "GET", "/scope/x%20y?a=1", cafile=cafile)
            out["h3_scope"] = json.loads(r.body)

        # stop() drains both protocols: in-flight requests finish before stop() returns
        pending = [asyncio.ensure_future(c.get("/wait-flag?flag=embed-drain"))]
        if tls:
            pending.append(asyncio.ensure_future(in_thread(
                kit.aioquic_request, "127.0.0.1", port, "GET", "/wait-flag?flag=embed-drain",
                cafile=cafile, timeout=30,
            )))
        started = shared / "embed-drain-started"  # a line per request the app holds
        while not started.exists() or len(started.read_text().splitlines()) < len(pending):
            await asyncio.sleep(0.01)
        stopping = asyncio.ensure_future(server.stop())
        done, _ = await asyncio.wait({stopping}, timeout=1.0)
        out["stop_waited_for_requests"] = not done
        (shared / "embed-drain").write_text("go")
        results = await asyncio.gather(*pending)
        out["drained"] = [
            [r.status_code, r.text] if isinstance(r, httpx.Response) else [r.status, r.body.decode()]
            for r in results
        ]
        await asyncio.wait_for(stopping, 15)
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        out["after_stop"] = "still accepting"
    except OSError:
        out["after_stop"] = "refused"
    out["udp_free_after_stop"] = udp_free(port)
    print("RESULT " + json.dumps(out))


if loop_kind == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""


def run_program(tmp_path, source: str, args, engine: str = "ngtcp2", timeout: float = 90):
    script = tmp_path / "embed_prog.py"
    script.write_text(source)
    p = subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=program_env(tmp_path, engine),
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert p.returncode == 0 and lines, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr}"
    return json.loads(lines[-1][len("RESULT ") :]), p.stderr


@pytest.mark.parametrize("tls", [True, False], ids=["https", "cleartext"])
@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_embedded_server(tmp_path, loop_kind, tls):
    port = free_port(udp=True)
    out, stderr = run_program(tmp_path, PROGRAM, [loop_kind, port, int(tls), 0])
    assert out["hello"] == [200, "Hello, world!", "fpy3", True]
    assert out["echo"] == [200, True]
    scope = out["scope"]
    assert scope["type"] == "http"
    assert scope["scheme"] == ("https" if tls else "http")
    assert scope["path"] == "/scope/x y"
    assert scope["query_string"] == "a=1"
    assert scope["server"] == ["127.0.0.1", port]
    assert scope["http_version"] == "1.1"
    assert out["raise"] == [500, False]
    assert "Exception in ASGI application" in stderr
    assert out["stream"] == [200, 100_000]
    assert out["concurrent"] == [f"delay:{i}" for i in range(10)]
    assert out["stop_waited_for_requests"] is True
    assert out["drained"] == [[200, "finished"]] * (2 if tls else 1)
    assert out["after_stop"] == "refused"
    assert out["udp_free_after_stop"] is True
    if tls:
        # HTTPS, announcing HTTP/3 on the same port, which serves it.
        assert ALT_SVC.fullmatch(out["alt_svc"])[1] == str(port)
        assert out["h3_hello"] == [200, "Hello, world!"]
        assert out["h3_echo"] == [200, True]
        assert out["h3_scope"]["http_version"] == "3"
        assert out["h3_scope"]["scheme"] == "https"
        assert out["h3_scope"]["path"] == "/scope/x y"
        assert f"serving https://127.0.0.1:{port} " in stderr
        assert f"HTTP/3 on UDP 127.0.0.1:{port} (ngtcp2)" in stderr
        assert "using the development certificate" in stderr
    else:
        # Cleartext was asked for: HTTP/1.1 alone, nothing announced or bound on UDP.
        assert out["alt_svc"] is None
        assert f"serving http://127.0.0.1:{port} (HTTP/1.1)" in stderr
        assert "HTTP/3" not in stderr


def test_embedded_debug_puts_traceback_in_500(tmp_path):
    out, _ = run_program(tmp_path, PROGRAM, ["uvloop", free_port(udp=True), 0, 1])
    assert out["raise"] == [500, True]


# --- the start() contract ------------------------------------------------------------------

CONTRACT = r"""
import asyncio, dataclasses, errno, json, logging, os, socket, ssl, time

import httpx

import apps
import h3clients as kit
from fpy3.asgi import ASGIServer
from fpy3.config import Settings, TLSSettings
from fpy3.core.lifespan import LifespanError

cafile = os.path.join(os.environ["XDG_STATE_HOME"], "fpy3", "dev-cert.pem")
out = {}
logged = []


class Keep(logging.Handler):
    def emit(self, record):
        logged.append(record.getMessage())


# The program configures logging itself: fpy3 adds no handler of its own then.
logging.getLogger("fpy3").addHandler(Keep())
logging.getLogger("fpy3").setLevel(logging.INFO)


def refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return False
    except OSError:
        return True


def udp_free(port):
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False


def free_port():
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if udp_free(port):
            return port


async def in_thread(fn, *args, **kwargs):
    return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args, **kwargs))


async def get(port, path="/hello", tls=True):
    verify = ssl.create_default_context(cafile=cafile) if tls else False
    scheme = "https" if tls else "http"
    async with httpx.AsyncClient(verify=verify, trust_env=False, timeout=10) as c:
        r = await c.get(f"{scheme}://127.0.0.1:{port}{path}")
    return [r.status_code, r.text, r.headers.get("alt-svc")]


async def get_h3(port):
    r = await in_thread(kit.aioquic_request, "127.0.0.1", port, "GET", "/hello", cafile=cafile)
    return [r.status, r.body.decode()]


def error(exc):
    return [type(exc).__name__, exc.errno == errno.EADDRINUSE if isinstance(exc, OSError) else None, str(exc)]


async def main():
    # A bind error raises from start() itself, awaited or not.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = ASGIServer(apps.app)
        out["bind_tcp"] = []
        for awaited in (False, True):
            try:
                if awaited:
                    await server.start("127.0.0.1", port)
                else:
                    server.start("127.0.0.1", port)
                out["bind_tcp"].append("started")
            except OSError as exc:
                out["bind_tcp"].append(error(exc))
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", port))
        try:
            ASGIServer(apps.app).start("127.0.0.1", port)
            out["bind_udp"] = "started"
        except OSError as exc:
            out["bind_udp"] = error(exc)
        out["bind_udp_tcp_closed"] = refused(port)

    # A lifespan startup failure is logged at once, closes the sockets, raises from the task.
    port = free_port()
    server = ASGIServer(apps.lifespan_failed_app)
    task = server.start("127.0.0.1", port)
    deadline = time.monotonic() + 10
    while not any("database unreachable xyzzy" in m for m in logged) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    out["lifespan_logged"] = [m for m in logged if "xyzzy" in m]
    out["lifespan_closed"] = [task.done(), refused(port), udp_free(port)]
    try:
        await task
        out["lifespan_raised"] = "nothing"
    except LifespanError as exc:
        out["lifespan_raised"] = str(exc)
    await server.stop()  # harmless after a failed start

    # start() not awaited returns the scheduled task; the server serves once it is done.
    server = ASGIServer(apps.app, port=0)
    task = server.start()
    out["task"] = type(task).__name__
    await task
    port = server.port
    out["port0"] = [port != 0, await get(port), await get_h3(port)]
    try:
        server.start()
        out["twice"] = "started"
    except RuntimeError as exc:
        out["twice"] = str(exc)
    await server.stop()
    out["stopped"] = [refused(port), udp_free(port)]
    await server.start()  # again, on a new port the system picks
    out["restarted"] = [server.port != port, await get(server.port), await get_h3(server.port)]
    await server.stop()

    async with ASGIServer(apps.app, port=0) as server:
        port = server.port
        out["async_with"] = [await get(port), await get_h3(port)]
    out["async_with_closed"] = [refused(port), udp_free(port)]

    # Cleartext only when asked for: HTTP/1.1 alone, no Alt-Svc, nothing on UDP.
    async with ASGIServer(apps.app, port=0, tls=False) as server:
        port = server.port
        out["cleartext"] = [await get(port, tls=False), udp_free(port)]

    # No certificate and no development certificate: a clear error, nothing bound.
    settings = dataclasses.replace(Settings(), tls=TLSSettings(dev_cert=False))
    try:
        ASGIServer(apps.app, settings=settings, port=0).start()
        out["no_cert"] = "started"
    except ValueError as exc:
        out["no_cert"] = str(exc)
    out["logged"] = logged
    print("RESULT " + json.dumps(out))


asyncio.run(main())
"""


def test_start_contract(tmp_path):
    out, stderr = run_program(tmp_path, CONTRACT, [])
    for kind, in_use, message in out["bind_tcp"]:
        assert (kind, in_use) == ("BindError", True)
        assert re.fullmatch(r"server\.port: cannot listen on 127\.0\.0\.1:\d+ \(TCP\): .*", message)
    kind, in_use, message = out["bind_udp"]
    assert (kind, in_use) == ("BindError", True)
    assert "(UDP)" in message
    assert out["bind_udp_tcp_closed"] is True

    assert len(out["lifespan_logged"]) == 1, out["logged"]
    assert "not serving (the sockets are closed)" in out["lifespan_logged"][0]
    assert out["lifespan_closed"] == [True, True, True]
    assert out["lifespan_raised"] == "lifespan startup failed: database unreachable xyzzy"
    assert "never retrieved" not in stderr

    assert out["task"] == "Task"
    ok_port0, (status, text, alt_svc), h3 = out["port0"]
    assert ok_port0 and (status, text) == (200, "Hello, world!")
    assert ALT_SVC.fullmatch(alt_svc)
    assert h3 == [200, "Hello, world!"]
    assert out["twice"] == "server already started"
    assert out["stopped"] == [True, True]
    moved, h1, h3 = out["restarted"]
    assert moved and h1[:2] == [200, "Hello, world!"] and h3 == [200, "Hello, world!"]
    h1, h3 = out["async_with"]
    assert h1[:2] == [200, "Hello, world!"] and ALT_SVC.fullmatch(h1[2]) and h3[0] == 200
    assert out["async_with_closed"] == [True, True]
    assert out["cleartext"] == [[200, "Hello, world!", None], True]
    assert "tls=False" in out["no_cert"] and "certfile" in out["no_cert"]
    # The program's own logging got fpy3's lines; fpy3 wrote nothing to stderr itself.
    assert any(m.startswith("serving https://127.0.0.1:") for m in out["logged"])
    assert "serving" not in stderr


# --- serve(): the one-call form --------------------------------------------------------------

SERVE = r"""
import sys

import fpy3.asgi
import ws_apps

fpy3.asgi.serve(ws_apps.app, "127.0.0.1", int(sys.argv[1]), drain_timeout=float(sys.argv[2]))
"""


def start_serve(tmp_path, engine: str, drain_timeout: float) -> tuple[Program, int, str]:
    script = tmp_path / "serve_prog.py"
    script.write_text(SERVE)
    port = free_port(udp=True)
    prog = Program(
        tmp_path, [str(script), str(port), str(drain_timeout)], program_env(tmp_path, engine)
    )
    prog.wait_log("serving ")
    return prog, port, str(dev_cert(tmp_path))


def h3_websocket_echo(port: int, cafile: str, text: bytes) -> tuple[int | None, list]:
    """RFC 9220 extended CONNECT on ``/echo``: a text message, then (once echoed) a
    close; returns the status and the server's first two frames as (opcode, payload)."""

    async def go():
        closing: list[bool] = []
        async with kit._h3_connection("127.0.0.1", port, cafile, 10) as proto:
            ex = proto.new_request()
            proto.h3.send_headers(
                ex.stream_id,
                [
                    (b":method", b"CONNECT"),
                    (b":protocol", b"websocket"),
                    (b":scheme", b"https"),
                    (b":path", b"/echo"),
                    (b":authority", f"127.0.0.1:{port}".encode()),
                    (b"sec-websocket-version", b"13"),
                ],
                end_stream=False,
            )
            proto.h3.send_data(ex.stream_id, frame(1, text), end_stream=False)
            proto.transmit()
            frames: list[tuple[int, bytes]] = []
            while len(frames) < 2:
                # Server frames are unmasked, and short here (length < 126).
                if len(ex.body) >= 2 and len(ex.body) >= 2 + ex.body[1]:
                    n = ex.body[1]
                    frames.append((ex.body[0] & 0x0F, bytes(ex.body[2 : 2 + n])))
                    del ex.body[: 2 + n]
                    continue
                if ex.ended or ex.reset_code is not None or proto.terminated:
                    raise EOFError(f"stream over: {ex.describe()}, frames {frames}")
                if len(frames) == 1 and not closing:
                    # The echo came: now the closing handshake.
                    closing.append(True)
                    proto.h3.send_data(ex.stream_id, frame(8, close_payload(1000)), False)
                    proto.transmit()
                await asyncio.sleep(0.01)
            return ex.status, frames

    return kit._run(go, 15, "websocket over HTTP/3")


def test_serve_websockets_and_drain_on_sigterm(tmp_path, quic_engine):
    from websockets.sync.client import connect

    prog, port, cafile = start_serve(tmp_path, quic_engine, 30)
    try:
        verified = ssl.create_default_context(cafile=cafile)
        with connect(f"wss://127.0.0.1:{port}/echo", ssl=verified, open_timeout=10) as ws:
            ws.send("over HTTP/1.1")
            assert ws.recv(timeout=10) == "over HTTP/1.1"
        status, frames = call(h3_websocket_echo, port, cafile, b"over HTTP/3")
        assert (status, frames) == (200, [(1, b"over HTTP/3"), (8, close_payload(1000))])

        # Requests in flight on both protocols when SIGTERM comes: they finish.
        shared = tmp_path / "shared"
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            h1 = pool.submit(
                lambda: httpx.get(
                    f"https://127.0.0.1:{port}/wait-flag?flag=drain",
                    verify=verified,
                    trust_env=False,
                    timeout=30,
                )
            )
            h3 = pool.submit(
                kit.aioquic_request,
                "127.0.0.1",
                port,
                "GET",
                "/wait-flag?flag=drain",
                cafile=cafile,
                timeout=30,
            )
            wait_until(
                lambda: (
                    (shared / "drain-started").exists()
                    and len((shared / "drain-started").read_text().splitlines()) == 2
                )
            )
            prog.proc.send_signal(signal.SIGTERM)
            prog.wait_log("SIGTERM: draining")
            wait_until(lambda: _refused(port), message="still accepting TCP while draining")
            assert prog.proc.poll() is None, prog.stderr()
            (shared / "drain").write_text("go")
            r1, r3 = h1.result(timeout=30), call(h3.result, timeout=30)
        assert (r1.status_code, r1.text, r1.headers.get("connection")) == (200, "finished", "close")
        assert (r3.status, r3.body) == (200, b"finished")
        assert prog.proc.wait(20) == 0, prog.stderr()
        assert "Traceback" not in prog.stderr(), prog.stderr()
    finally:
        prog.stop()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return False
    except OSError:
        return True


def test_serve_second_signal_stops_at_once(tmp_path):
    prog, port, cafile = start_serve(tmp_path, "ngtcp2", 60)
    try:
        shared = tmp_path / "shared"
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            h3 = pool.submit(
                kit.aioquic_request,
                "127.0.0.1",
                port,
                "GET",
                "/wait-flag?flag=never",
                cafile=cafile,
                timeout=30,
            )
            wait_until(lambda: (shared / "never-started").exists())
            prog.proc.send_signal(signal.SIGINT)
            prog.wait_log("SIGINT: draining")
            prog.proc.send_signal(signal.SIGINT)
            # Well before the 60 s drain deadline; the QUIC client learns at once
            # (CONNECTION_CLOSE), not at its idle timeout.
            assert prog.proc.wait(10) == 0, prog.stderr()
            with pytest.raises(kit.H3ClientError):
                h3.result(timeout=10)
        assert "stopping at once" in prog.stderr()
    finally:
        prog.stop()
