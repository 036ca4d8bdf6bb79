"""Embedding: ``fpy3.asgi.ASGIServer`` inside an asyncio program (run in a subprocess,
so a crash in native code cannot take pytest down), driven with httpx.AsyncClient."""

import json
import subprocess
import sys

import pytest
from harness import clean_env, free_port

PROGRAM = r"""
import asyncio, json, os, socket, ssl, sys, time
from pathlib import Path

import httpx

import apps
from fpy3.asgi import ASGIServer

loop_kind, port, certfile, keyfile, debug = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5] == "1"
certfile, keyfile = certfile or None, keyfile or None
shared = Path(os.environ["FPY3_TEST_SHARED"])


async def wait_file(path, timeout=10):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        await asyncio.sleep(0.01)


async def main():
    out = {}
    server = ASGIServer(apps.app, debug=debug)
    await server.start("127.0.0.1", port, certfile=certfile, keyfile=keyfile)
    scheme = "https" if certfile else "http"
    verify = ssl.create_default_context(cafile=certfile) if certfile else False
    async with httpx.AsyncClient(
        base_url=f"{scheme}://127.0.0.1:{port}", verify=verify, trust_env=False, timeout=15
    ) as c:
        r = await c.get("/hello")
        out["hello"] = [r.status_code, r.text, r.headers.get("server"), "date" in r.headers]
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

        # stop() drains: an in-flight request finishes before stop() returns
        pending = asyncio.ensure_future(c.get("/wait-flag?flag=embed-drain"))
        await wait_file(shared / "embed-drain-started")
        stopping = asyncio.ensure_future(server.stop())
        done, _ = await asyncio.wait({stopping}, timeout=1.0)
        out["stop_waited_for_request"] = not done
        (shared / "embed-drain").write_text("go")
        r = await pending
        out["drained"] = [r.status_code, r.text]
        await asyncio.wait_for(stopping, 15)
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        out["after_stop"] = "still accepting"
    except OSError:
        out["after_stop"] = "refused"
    print("RESULT " + json.dumps(out))


if loop_kind == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""


def run_program(tmp_path, loop_kind, tls, debug=False):
    shared = tmp_path / "shared"
    shared.mkdir()
    script = tmp_path / "embed_prog.py"
    script.write_text(PROGRAM)
    cert = key = ""
    if tls:
        from fpy3.devcert import ensure_dev_cert

        cert, key = (str(p) for p in ensure_dev_cert(str(tmp_path / "state")))
    port = free_port()
    p = subprocess.run(
        [sys.executable, str(script), loop_kind, str(port), cert, key, "1" if debug else "0"],
        capture_output=True,
        text=True,
        timeout=90,
        env=clean_env({"FPY3_TEST_SHARED": str(shared)}),
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert p.returncode == 0 and lines, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr}"
    return json.loads(lines[-1][len("RESULT ") :]), port, p.stderr


@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_embedded_server(tmp_path, loop_kind, tls):
    out, port, stderr = run_program(tmp_path, loop_kind, tls)
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
    assert out["stop_waited_for_request"] is True
    assert out["drained"] == [200, "finished"]
    assert out["after_stop"] == "refused"


def test_embedded_debug_puts_traceback_in_500(tmp_path):
    out, _, _ = run_program(tmp_path, "uvloop", tls=False, debug=True)
    assert out["raise"] == [500, True]
