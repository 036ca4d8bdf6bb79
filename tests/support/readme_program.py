import asyncio
import uvloop
from fpy3.asgi import ASGIServer

async def app(scope, receive, send):
    if scope['type'] == 'http':
        body = f"Hello World from FPY over HTTP/{scope['http_version']}!".encode()
        await send({'type': 'http.response.start', 'status': 200,
                    'headers': [(b'content-type', b'text/plain'), (b'server', b'fpy3-asgi')]})
        await send({'type': 'http.response.body', 'body': body})

async def main():
    server = ASGIServer(app, debug=True)
    server.start("0.0.0.0", 8080)
    await asyncio.Event().wait()

if __name__ == "__main__":
    uvloop.install()
    asyncio.run(main())
