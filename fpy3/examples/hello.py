"""The bundled example app, served by ``./dev.sh run``."""

import json

PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>fpy3</title></head>
<body><h1>Hello from fpy3</h1>
<p>You are on %s. Try <code>/json</code>, <code>/echo</code> (POST) and <code>/stream</code>.</p>
<p id="ws">WebSocket echo: connecting...</p>
<script>
const ws = new WebSocket(location.href.replace(/^http/, "ws").replace(/[^/]*$/, "ws"));
ws.onopen = () => ws.send("hello over a websocket");
ws.onmessage = (e) => { document.getElementById("ws").textContent = "WebSocket echo: " + e.data; };
</script>
</body></html>
"""


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket":
        await websocket_echo(receive, send)
        return
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/json":
        body = json.dumps(
            {"http_version": scope["http_version"], "path": path, "client": scope["client"]}
        ).encode()
        ctype = b"application/json"
    elif path == "/echo":
        chunks = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        ctype = b"application/octet-stream"
    elif path == "/stream":
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        for i in range(10):
            await send({"type": "http.response.body", "body": b"chunk %d\n" % i, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    else:
        body = PAGE % ("HTTP/" + scope["http_version"]).encode()
        ctype = b"text/html; charset=utf-8"
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", ctype), (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def websocket_echo(receive, send):
    """Any websocket path: echo every message until the client closes."""
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") is not None:
            await send({"type": "websocket.send", "text": message["text"]})
        else:
            await send({"type": "websocket.send", "bytes": message["bytes"]})
