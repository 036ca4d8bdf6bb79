"""ASGI apps served by the end-to-end tests (``apps:app`` and friends).

The server process imports this module. Apps talk back to the tests through files in
the directory named by ``FPY3_TEST_SHARED``: records they write, flags the tests create.
"""

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path
from urllib.parse import parse_qs

CHUNK = 64 * 1024


def shared_dir() -> Path:
    return Path(os.environ.get("FPY3_TEST_SHARED", "."))


def record(name: str, text: str) -> None:
    with open(shared_dir() / name, "a", encoding="utf-8") as f:
        f.write(text + "\n")


async def wait_for_file(name: str, timeout: float = 60.0) -> bool:
    path = shared_dir() / name
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        await asyncio.sleep(0.01)
    return False


def stream_chunk(i: int) -> bytes:
    """Chunk ``i`` of a deterministic stream; the tests recompute it to check the bytes."""
    return hashlib.sha256(b"chunk %d" % i).digest() * (CHUNK // 32)


def jsonable(value):
    if isinstance(value, bytes | bytearray):
        return value.decode("latin-1")
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return repr(value)


def query(scope) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(scope["query_string"].decode("latin-1")).items()}


async def read_body(receive) -> tuple[bytes, list[dict]]:
    """The whole request body and the http.request messages (without their bodies)."""
    chunks, messages = [], []
    while True:
        message = await receive()
        messages.append({k: v for k, v in message.items() if k != "body"})
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks), messages


async def respond(send, body: bytes, status: int = 200, headers=(), ctype=b"text/plain"):
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", ctype),
                (b"content-length", b"%d" % len(body)),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def respond_json(send, obj, status: int = 200):
    await respond(send, json.dumps(jsonable(obj)).encode(), status, ctype=b"application/json")


async def simple_lifespan(scope, receive, send):
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            if "state" in scope:
                scope["state"]["started"] = True
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


# --- /path handlers of the main app -------------------------------------------------


async def h_ready(scope, receive, send):
    await respond(send, b"ready")


async def h_hello(scope, receive, send):
    await respond(send, b"Hello, world!")


async def h_scope(scope, receive, send):
    await respond_json(send, scope)


async def h_echo(scope, receive, send):
    body, _ = await read_body(receive)
    sha = hashlib.sha256(body).hexdigest().encode()
    await respond(send, body, headers=[(b"x-body-sha256", sha)], ctype=b"application/octet-stream")


async def h_echo_info(scope, receive, send):
    body, messages = await read_body(receive)
    info = {"len": len(body), "sha256": hashlib.sha256(body).hexdigest(), "messages": messages}
    await respond_json(send, info)


async def h_stream(scope, receive, send):
    # No content-length and more_body: the server must frame it (chunked on HTTP/1.1).
    q = query(scope)
    n, size = int(q.get("n", "5")), int(q.get("size", "10"))
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for i in range(n):
        piece = (b"%d:" % i).ljust(size, b".")
        await send({"type": "http.response.body", "body": piece, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def h_nocl(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"no content-length here"})


async def h_headers(scope, receive, send):
    await send(
        {
            "type": "http.response.start",
            "status": 201,
            "headers": [
                (b"set-cookie", b"a=1"),
                (b"X-Custom", b"Mixed-Case"),
                (b"set-cookie", b"b=2"),
                (b"content-length", b"2"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"ok"})


async def h_delay(scope, receive, send):
    q = query(scope)
    await read_body(receive)
    await asyncio.sleep(int(q.get("ms", "100")) / 1000)
    await respond(send, ("delay:" + q.get("id", "")).encode())


async def h_id(scope, receive, send):
    body, _ = await read_body(receive)
    await respond(send, ("id:" + query(scope).get("id", "") + ":").encode() + body)


async def h_status(scope, receive, send):
    code = int(query(scope).get("code", "200"))
    if code in (204, 304):
        await send({"type": "http.response.start", "status": code, "headers": []})
        await send({"type": "http.response.body", "body": b""})
    else:
        await respond(send, b"status %d" % code, status=code)


async def h_raise_before(scope, receive, send):
    raise RuntimeError("boom-before-start")


async def h_raise_after(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"partial", "more_body": True})
    raise RuntimeError("boom-after-start")


async def h_double_start(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.start", "status": 201, "headers": []})
    await send({"type": "http.response.body", "body": b"second"})


async def h_body_after_final(scope, receive, send):
    await respond(send, b"complete")
    await send({"type": "http.response.body", "body": b"extra"})


async def h_cl_more(scope, receive, send):
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"10")]}
    )
    await send({"type": "http.response.body", "body": b"0123456789ABCDEFGHIJ"})


async def h_cl_less(scope, receive, send):
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"10")]}
    )
    await send({"type": "http.response.body", "body": b"01234"})


async def h_cl_less_stream(scope, receive, send):
    # The head goes out with the first part; the end comes 5 bytes short.
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"10")]}
    )
    await send({"type": "http.response.body", "body": b"01234", "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def h_slow_consumer(scope, receive, send):
    # Reads nothing until the test creates the flag, so the upload must stall.
    name = query(scope).get("flag", "consume")
    record("slow-consumer", "waiting " + name)
    if not await wait_for_file(name, timeout=90):
        await respond(send, b"flag never came", status=500)
        return
    record("slow-consumer", "reading " + name)
    h, n = hashlib.sha256(), 0
    fd = os.open(shared_dir() / (name + "-received"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while True:
            message = await receive()
            if message["type"] != "http.request":
                record("slow-consumer", "disconnect " + name)
                return
            body = message.get("body", b"")
            h.update(body)
            n += len(body)
            os.pwrite(fd, b"%15d" % n, 0)  # lets a failing test say where it stopped
            if not message.get("more_body", False):
                break
    finally:
        os.close(fd)
    await respond_json(send, {"len": n, "sha256": h.hexdigest()})


async def h_big_stream(scope, receive, send):
    # Writes how many chunks send() has accepted so far; a slow client must hold it back.
    q = query(scope)
    n = int(q.get("n", "2000"))
    progress = shared_dir() / q.get("progress", "progress")
    await send({"type": "http.response.start", "status": 200, "headers": []})
    fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(n):
            await send({"type": "http.response.body", "body": stream_chunk(i), "more_body": True})
            os.pwrite(fd, b"%12d" % (i + 1), 0)
        await send({"type": "http.response.body", "body": b""})
        os.pwrite(fd, b"%12d" % n + b" done", 0)
    finally:
        os.close(fd)


async def h_wait_disconnect(scope, receive, send):
    name = query(scope).get("name", "disconnect")
    await read_body(receive)
    record(name, "body-read")
    message = await receive()
    record(name, message["type"])


async def h_expect_delayed(scope, receive, send):
    record("expect", "app-started")
    await wait_for_file("expect-go", timeout=60)
    body, _ = await read_body(receive)
    await respond(send, b"got:" + body)


async def h_no_read(scope, receive, send):
    await respond(send, b"not reading your body")


async def h_pid(scope, receive, send):
    await respond(send, str(os.getpid()).encode())


async def h_wait_flag(scope, receive, send):
    # Blocks until the test creates the flag: an in-flight request for drain tests.
    name = query(scope).get("flag", "go")
    await read_body(receive)
    record(name + "-started", "started")
    ok = await wait_for_file(name, timeout=60)
    await respond(send, b"finished" if ok else b"timed out", status=200 if ok else 500)


async def h_state(scope, receive, send):
    state = scope.get("state")
    snapshot = dict(state) if state is not None else None
    if state is not None:
        # A per-request copy: the next request must not see this.
        state["mutated_by_request"] = True
    await respond_json(send, {"state": snapshot})


# --- the response rules (tests/e2e/test_response_rules.py) ---------------------------


async def h_background(scope, receive, send):
    # Background work after the response (FastAPI BackgroundTasks, Starlette's
    # BackgroundTask): the connection must go on without waiting for it.
    name = query(scope).get("flag", "background")
    await respond(send, b"responded")
    record(name + "-log", "background-started")
    ok = await wait_for_file(name, timeout=60)
    record(name + "-log", "background-finished" if ok else "background-timed-out")


async def h_file(scope, receive, send):
    # Starlette's FileResponse: Content-Length always; on HEAD an empty body.
    body = b"0123456789" * 123
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"1230")],
        }
    )
    payload = b"" if scope["method"] == "HEAD" else body
    await send({"type": "http.response.body", "body": payload})


async def h_bodyless(scope, receive, send):
    # A 204 or 304 with a body from the app: the body must never go out.
    code = int(query(scope).get("code", "204"))
    headers = [(b"etag", b'"v1"')]
    if "cl" in query(scope):
        headers.append((b"content-length", query(scope)["cl"].encode()))
    await send({"type": "http.response.start", "status": code, "headers": headers})
    await send({"type": "http.response.body", "body": b"must not", "more_body": True})
    await send({"type": "http.response.body", "body": b" be sent"})


async def h_body_type(scope, receive, send):
    import array

    kind = query(scope).get("kind", "bytes")
    raw = b"hello bytes-like world"
    body = {
        "bytes": raw,
        "bytearray": bytearray(raw),
        "memoryview": memoryview(raw),
        "memoryview-slice": memoryview(b"xx" + raw + b"yy")[2:-2],
        "array": array.array("B", raw),
    }[kind]
    streamed = "stream" in query(scope)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    if streamed:
        half = len(raw) // 2
        await send({"type": "http.response.body", "body": body[:half], "more_body": True})
        await send({"type": "http.response.body", "body": body[half:]})
    else:
        await send({"type": "http.response.body", "body": body})


BAD_STATUS = {
    "true": True,
    "minus1": -1,
    "99": 99,
    "100": 100,
    "103": 103,
    "199": 199,
    "600": 600,
    "1000": 1000,
    "str": "200",
    "float": 200.0,
}
BAD_HEADERS = {
    "space-name": [(b"bad name", b"x")],
    "colon-name": [(b"bad:name", b"x")],
    "empty-name": [(b"", b"x")],
    "cr-value": [(b"x-split", b"a\rb")],
    "lf-value": [(b"x-split", b"a\nset-cookie: evil=1")],
    "crlf-value": [(b"x-split", b"a\r\nset-cookie: evil=1")],
    "nul-value": [(b"x-nul", b"a\x00b")],
    "lf-name": [(b"x-a\nb", b"x")],
    "str-name": [("x-str", b"x")],
    "str-value": [(b"x-str", "x")],
    "cl-letters": [(b"content-length", b"abc")],
    "cl-negative": [(b"content-length", b"-1")],
    "cl-duplicate": [(b"content-length", b"5"), (b"content-length", b"5")],
    "cl-two-values": [(b"content-length", b"5, 5")],
}


async def h_bad_status(scope, receive, send):
    value = BAD_STATUS[query(scope)["v"]]
    await send({"type": "http.response.start", "status": value, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})


async def h_bad_header(scope, receive, send):
    headers = BAD_HEADERS[query(scope)["v"]]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"hello"})


async def h_server_date(scope, receive, send):
    # Server and Date from the app replace the server's own.
    await respond(
        send,
        b"own headers",
        headers=[(b"Server", b"my-app/1.0"), (b"date", b"Mon, 01 Jan 2024 00:00:00 GMT")],
    )


async def h_sse(scope, receive, send):
    # Streams events until send() fails; records how it failed.
    name = query(scope).get("name", "sse")
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream")],
        }
    )
    i = 0
    try:
        while i < 6000:  # bounded: a minute at most
            await send(
                {"type": "http.response.body", "body": b"data: %d\n\n" % i, "more_body": True}
            )
            i += 1
            await asyncio.sleep(0.01)
        record(name, "never-failed")
    except OSError as exc:
        record(name, f"{type(exc).__name__} {isinstance(exc, OSError)} after {i}")
        raise
    except BaseException as exc:
        record(name, f"other {type(exc).__name__}")
        raise


async def h_cancellable(scope, receive, send):
    # Runs until cancelled (the drain deadline); records that it was, and unwinds.
    name = query(scope).get("name", "cancellable")
    record(name, "started")
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        record(name, "cancelled")
        raise


ROUTES = {
    "/__ready__": h_ready,
    "/hello": h_hello,
    "/scope": h_scope,
    "/echo": h_echo,
    "/echo-info": h_echo_info,
    "/stream": h_stream,
    "/nocl": h_nocl,
    "/headers": h_headers,
    "/delay": h_delay,
    "/id": h_id,
    "/status": h_status,
    "/raise-before": h_raise_before,
    "/raise-after": h_raise_after,
    "/double-start": h_double_start,
    "/body-after-final": h_body_after_final,
    "/cl-more": h_cl_more,
    "/cl-less": h_cl_less,
    "/cl-less-stream": h_cl_less_stream,
    "/slow-consumer": h_slow_consumer,
    "/big-stream": h_big_stream,
    "/wait-disconnect": h_wait_disconnect,
    "/expect-delayed": h_expect_delayed,
    "/no-read": h_no_read,
    "/pid": h_pid,
    "/wait-flag": h_wait_flag,
    "/state": h_state,
    "/background": h_background,
    "/file": h_file,
    "/bodyless": h_bodyless,
    "/body-type": h_body_type,
    "/bad-status": h_bad_status,
    "/bad-header": h_bad_header,
    "/server-date": h_server_date,
    "/sse": h_sse,
    "/cancellable": h_cancellable,
}


async def app(scope, receive, send):
    """The main test app: routes by path; unknown paths dump the scope."""
    if scope["type"] == "lifespan":
        await simple_lifespan(scope, receive, send)
        return
    assert scope["type"] == "http"
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    handler = ROUTES.get(path, h_scope)
    await handler(scope, receive, send)


# --- lifespan variants ------------------------------------------------------------


async def _http(scope, receive, send):
    handler = ROUTES.get(scope["path"], h_scope)
    await handler(scope, receive, send)


async def lifespan_state_app(scope, receive, send):
    """Startup puts values into the lifespan state; shutdown is recorded."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                record("lifespan", "startup")
                scope["state"]["token"] = "abc123"
                scope["state"]["number"] = 42
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                record("lifespan", "shutdown")
                await send({"type": "lifespan.shutdown.complete"})
                return
    await _http(scope, receive, send)


async def lifespan_failed_app(scope, receive, send):
    if scope["type"] == "lifespan":
        message = await receive()
        assert message["type"] == "lifespan.startup"
        record("lifespan", "startup-failing")
        await send({"type": "lifespan.startup.failed", "message": "database unreachable xyzzy"})
        return
    await _http(scope, receive, send)


async def lifespan_unsupported_app(scope, receive, send):
    if scope["type"] != "http":
        raise RuntimeError("lifespan not supported here")
    await _http(scope, receive, send)


async def lifespan_returns_app(scope, receive, send):
    """Returns at once on the lifespan scope, as many minimal apps do."""
    if scope["type"] != "http":
        return
    await _http(scope, receive, send)


async def lifespan_slow_startup_app(scope, receive, send):
    """Startup waits for a flag file: the server must not serve before it completes."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                record("lifespan", "startup-begin")
                await wait_for_file("startup-go", timeout=60)
                scope["state"]["ready"] = "yes"
                record("lifespan", "startup-done")
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await _http(scope, receive, send)


# --- routes for the HTTP/3 suite (tests/test_h3_*.py) ------------------------------


async def h_h3_record_receive(scope, receive, send):
    # Logs every receive() result, so a test can see the disconnect of an aborted upload.
    name = query(scope).get("name", "receive")
    while True:
        message = await receive()
        if message["type"] != "http.request":
            record(name, message["type"])
            return
        more = message.get("more_body", False)
        record(name, f"http.request {len(message.get('body', b''))} {more}")
        if not more:
            break
    await respond(send, b"complete")


async def h_h3_download(scope, receive, send):
    # n stream_chunk()s with a content-length, sent in several sends.
    n = int(query(scope).get("n", "160"))
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/octet-stream"),
                (b"content-length", b"%d" % (n * CHUNK)),
            ],
        }
    )
    for i in range(n):
        await send({"type": "http.response.body", "body": stream_chunk(i), "more_body": i < n - 1})


async def h_h3_scope_types(scope, receive, send):
    # The JSON scope dump turns bytes into str; this reports the real types.
    types = {k: type(v).__name__ for k, v in scope.items()}
    types["headers[]"] = sorted(
        {f"{type(n).__name__},{type(v).__name__}" for n, v in scope["headers"]}
    )
    await respond_json(send, types)


async def h_trailers(scope, receive, send):
    # The http.response.trailers extension: a body (whole or in parts), then trailer
    # fields in two messages. ?cl=1 declares a Content-Length.
    body, _ = await read_body(receive)
    payload = body or b"body with trailers"
    q = query(scope)
    headers = [(b"content-type", b"text/plain"), (b"trailer", b"x-checksum, x-count")]
    if "cl" in q:
        headers.append((b"content-length", b"%d" % len(payload)))
    await send({"type": "http.response.start", "status": 200, "headers": headers, "trailers": True})
    if "whole" in q:
        await send({"type": "http.response.body", "body": payload})
    else:
        half = len(payload) // 2
        await send({"type": "http.response.body", "body": payload[:half], "more_body": True})
        await send({"type": "http.response.body", "body": payload[half:]})
    checksum = hashlib.sha256(payload).hexdigest().encode()
    await send(
        {
            "type": "http.response.trailers",
            "headers": [(b"x-checksum", checksum)],
            "more_trailers": True,
        }
    )
    await send({"type": "http.response.trailers", "headers": [(b"X-Count", b"%d" % len(payload))]})


ROUTES.update(
    {
        "/trailers": h_trailers,
        "/h3-record-receive": h_h3_record_receive,
        "/h3-scope-types": h_h3_scope_types,
        "/h3-download": h_h3_download,
    }
)


def create_app():
    """An app factory (``--factory``): returns the main test app."""
    record("factory", "called")
    return app
