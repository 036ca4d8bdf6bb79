"""ASGI websocket apps for the websocket tests (``ws_apps:app``); HTTP goes to apps.app.

Routes by path. Each websocket app records how its session ended in the shared
directory (``ws-<path>`` records), so tests can assert what the app saw.
"""

import json
import os

import apps


def _name(scope) -> str:
    return "ws" + scope["path"].replace("/", "-")


async def _wait_disconnect(scope, receive) -> dict:
    while True:
        msg = await receive()
        if msg["type"] == "websocket.disconnect":
            apps.record(_name(scope), f"disconnect {msg['code']} {msg.get('reason', '')}")
            return msg


async def ws_echo(scope, receive, send):
    """Echo every message; the subprotocol is the first offered one we know."""
    assert (await receive())["type"] == "websocket.connect"
    known = [p for p in scope["subprotocols"] if p in ("chat", "superchat")]
    await send(
        {
            "type": "websocket.accept",
            "subprotocol": known[0] if known else None,
            "headers": [(b"x-accepted-by", b"fpy3-test")],
        }
    )
    while True:
        msg = await receive()
        if msg["type"] == "websocket.disconnect":
            apps.record(_name(scope), f"disconnect {msg['code']} {msg.get('reason', '')}")
            return
        if msg.get("text") == "close-me":
            await send({"type": "websocket.close", "code": 4001, "reason": "bye now"})
            await _wait_disconnect(scope, receive)
            return
        if msg.get("text") is not None:
            await send({"type": "websocket.send", "text": msg["text"]})
        else:
            await send({"type": "websocket.send", "bytes": msg["bytes"]})


async def ws_scope(scope, receive, send):
    await receive()
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": json.dumps(apps.jsonable(scope))})
    await _wait_disconnect(scope, receive)


async def ws_deny(scope, receive, send):
    await receive()
    body = b"go away"
    await send(
        {
            "type": "websocket.http.response.start",
            "status": 401,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "websocket.http.response.body", "body": body})


async def ws_close_first(scope, receive, send):
    await receive()
    await send({"type": "websocket.close"})


async def ws_raise_before(scope, receive, send):
    await receive()
    raise RuntimeError("boom before accept")


async def ws_raise_after(scope, receive, send):
    await receive()
    await send({"type": "websocket.accept"})
    raise RuntimeError("boom after accept")


async def ws_hold(scope, receive, send):
    """Accept, say hello, then wait for the end (drain and limit tests)."""
    await receive()
    await send({"type": "websocket.accept"})
    pid = f" {os.getpid()}" if "pid" in apps.query(scope) else ""
    await send({"type": "websocket.send", "text": "hello" + pid})
    apps.record(_name(scope), "open")
    await _wait_disconnect(scope, receive)


async def ws_flood(scope, receive, send):
    """Send ``n`` messages of ``size`` bytes as fast as send() lets us (backpressure)."""
    await receive()
    await send({"type": "websocket.accept"})
    q = apps.query(scope)
    n, size = int(q.get("n", "100")), int(q.get("size", "65536"))
    chunk = b"x" * size
    for _ in range(n):
        await send({"type": "websocket.send", "bytes": chunk})
    apps.record(_name(scope), "sent")
    await send({"type": "websocket.send", "text": "done"})
    await _wait_disconnect(scope, receive)


async def ws_slow_reader(scope, receive, send):
    """Accept, wait for the ``go`` flag, then count the bytes received until 'end'."""
    await receive()
    await send({"type": "websocket.accept"})
    await apps.wait_for_file("go")
    total = 0
    while True:
        msg = await receive()
        if msg["type"] == "websocket.disconnect":
            return
        if msg.get("text") == "end":
            await send({"type": "websocket.send", "text": str(total)})
            continue
        total += len(msg.get("bytes") or b"")


async def ws_empty(scope, receive, send):
    """Empty messages both ways: sends an empty text and an empty binary message, then
    reports what it receives ("text ''" / "bytes b''") until the end."""
    await receive()
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": ""})
    await send({"type": "websocket.send", "bytes": b""})
    # Both keys present, one None: as some frameworks send it.
    await send({"type": "websocket.send", "bytes": None, "text": ""})
    while True:
        msg = await receive()
        if msg["type"] == "websocket.disconnect":
            apps.record(_name(scope), f"disconnect {msg['code']}")
            return
        if msg.get("text") is not None:
            apps.record(_name(scope), f"text {msg['text']!r}")
            await send({"type": "websocket.send", "text": msg["text"]})
        else:
            apps.record(_name(scope), f"bytes {msg['bytes']!r}")
            await send({"type": "websocket.send", "bytes": msg["bytes"]})


ROUTES = {
    "/empty": ws_empty,
    "/echo": ws_echo,
    "/scope": ws_scope,
    "/deny": ws_deny,
    "/close-first": ws_close_first,
    "/raise-before": ws_raise_before,
    "/raise-after": ws_raise_after,
    "/hold": ws_hold,
    "/flood": ws_flood,
    "/slow-reader": ws_slow_reader,
}


async def app(scope, receive, send):
    if scope["type"] == "websocket":
        await ROUTES.get(scope["path"], ws_echo)(scope, receive, send)
        return
    await apps.app(scope, receive, send)
