"""The app of the HTTP/3 hostile-client tests (``h3_hostile_apps:app``).

    GET  /hello              -> "Hello, world!"
    GET  /scope              -> the scope as JSON (path, raw_path, headers...)
    POST /noread?hold=S      -> never reads the body; answers "held" after S seconds
    POST /drain              -> reads the whole body; answers its length
    POST /wait-body?name=N   -> reads the body, recording each message type in record N
    GET  /big?n=B&name=N     -> streams B bytes; records "sent" or the send's exception in N

Records go to the files the tests read (apps.record).
"""

import asyncio

from apps import query, record, respond, respond_json

CHUNK = 64 * 1024


async def h_noread(scope, receive, send):
    await asyncio.sleep(float(query(scope).get("hold", "30")))
    await respond(send, b"held")


async def h_drain(scope, receive, send):
    total = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return
        total += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    await respond(send, b"%d" % total)


async def h_wait_body(scope, receive, send):
    name = query(scope).get("name", "wait-body")
    total = 0
    while True:
        message = await receive()
        record(name, message["type"])
        if message["type"] != "http.request":
            return
        total += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    await respond(send, b"%d" % total)


async def h_big(scope, receive, send):
    q = query(scope)
    name, left = q.get("name", "big"), int(q.get("n", str(20 * 1024 * 1024)))
    try:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        chunk = b"b" * CHUNK
        while left > 0:
            data = chunk[:left]
            left -= len(data)
            await send({"type": "http.response.body", "body": data, "more_body": left > 0})
    except OSError as e:  # ClientDisconnected: the stream was reset
        record(name, f"send failed: {type(e).__name__}")
        return
    record(name, "sent")


async def h_hello(scope, receive, send):
    await respond(send, b"Hello, world!")


async def h_scope(scope, receive, send):
    await respond_json(send, scope)


ROUTES = {
    "/hello": h_hello,
    "/noread": h_noread,
    "/drain": h_drain,
    "/wait-body": h_wait_body,
    "/big": h_big,
}


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await ROUTES.get(scope["path"], h_scope)(scope, receive, send)
